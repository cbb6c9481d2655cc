//! CRLs fetched from where the CA publishes them.
//!
//! Each trust bundle may list `crl_urls`, and with `tls.revocation.fetch_distribution_points`
//! the http:// URLs in the CRL Distribution Points extension of its CA certificates are
//! added, and those of client certificates its CAs issued (learned in the handshake,
//! see [`FetchedCrls::observe`]). Every URL is fetched at start, every `refresh_interval`, and again shortly
//! before the held CRL's nextUpdate. Plain HTTP is normal here because a CRL is signed
//! (RFC 5280 §5): a fetched CRL is kept only if webpki (the verifier's own parser)
//! accepts it, its signature verifies against a CA of the same bundle, and it is not
//! older than the one held (CRL number, else thisUpdate). Size and time are bounded.
//! A failed fetch changes nothing: the last good CRL keeps serving, and stays on disk in
//! `cache_dir` (written atomically) for the next start.
//!
//! The verifier is built from `crl_files` plus [`FetchedCrls`]; for each issuer and scope
//! only the newest CRL is kept ([`add_fetched`]), and the newest of an issuer is handed to
//! webpki first ([`newest_first`]), because webpki consults the first CRL authoritative
//! for a certificate it finds. When a fetched CRL changes, the server builds a new TLS
//! context and swaps it in (new connections use it; open ones check their client's chain
//! against it at their next request).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateRevocationListDer;
use sha2::{Digest, Sha256};
use x509_parser::extensions::{DistributionPointName, GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::error::{err, ConfigError};
use crate::metrics::{CrlFailureLabel, CrlLabel, Metrics};
use crate::tls::TlsConfig;
use crate::tls::{LoadedBundle, LoadedCrl};

/// The last good fetched CRLs, by bundle name: an immutable copy handed to the verifier,
/// with (when `fetch_distribution_points` is on) the means to learn CRL URLs from the
/// client certificates the verifier sees.
#[derive(Clone, Default)]
pub struct FetchedCrls {
    /// Bundle name → (URL, CRL).
    crls: Arc<HashMap<String, Vec<(String, CertificateRevocationListDer<'static>)>>>,
    /// Bundles that get CRLs by fetching (`crl_urls` or distribution points).
    fetching: Arc<std::collections::HashSet<String>>,
    observer: Option<Arc<Observer>>,
}

impl std::fmt::Debug for FetchedCrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n: usize = self.crls.values().map(Vec::len).sum();
        write!(f, "FetchedCrls({n})")
    }
}

impl FetchedCrls {
    /// Called by the verifier with each presented client leaf (accepted or not): a new
    /// http:// URL in its CRL Distribution Points (where its issuing SubCA publishes) is
    /// fetched from then on, if the leaf was really issued by a CA of a bundle (its
    /// signature verifies), at most [`MAX_LEARNED_URLS`] per bundle. Cheap when nothing
    /// is new: one certificate parse.
    pub fn observe(&self, leaf: &[u8]) {
        if let Some(o) = &self.observer {
            o.observe(leaf);
        }
    }
}

/// Most URLs learned from client certificates per bundle (a SubCA has one CRL; a few
/// SubCAs per root).
pub const MAX_LEARNED_URLS: usize = 16;

/// URLs learned from client certificates, shared by every snapshot of one server and
/// kept in `cache_dir/learned-urls` for restarts.
#[derive(Default)]
struct Learner {
    urls: Mutex<Vec<(String, String)>>,
    wake: tokio::sync::Notify,
    file: Mutex<Option<PathBuf>>,
}

impl Learner {
    fn list(&self) -> Vec<(String, String)> {
        self.urls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn contains(&self, bundle: &str, url: &str) -> bool {
        let urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        urls.iter().any(|(b, u)| b == bundle && u == url)
    }

    /// Adds a URL (bounded per bundle); returns whether it is new.
    fn add(&self, bundle: &str, url: &str) -> bool {
        let mut urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        if urls.iter().any(|(b, u)| b == bundle && u == url)
            || urls.iter().filter(|(b, _)| b == bundle).count() >= MAX_LEARNED_URLS
        {
            return false;
        }
        urls.push((bundle.to_owned(), url.to_owned()));
        let file = self.file.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(f) = file {
            let text: String = urls.iter().map(|(b, u)| format!("{b}\t{u}\n")).collect();
            if let Err(e) = write_atomic(&f, text.as_bytes()) {
                tracing::warn!(file = %f.display(), error = %e, "cannot keep learned CRL URLs");
            }
        }
        true
    }
}

/// Reads `cache_dir/learned-urls` (bundle TAB url per line); bad lines are skipped.
fn read_learned(tls: &TlsConfig) -> Vec<(String, String)> {
    let Some(dir) = &tls.revocation.cache_dir else {
        return Vec::new();
    };
    let text = std::fs::read_to_string(dir.join(LEARNED_FILE)).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(_, u)| check_url(u).is_ok())
        .map(|(b, u)| (b.to_owned(), u.to_owned()))
        .collect()
}

const LEARNED_FILE: &str = "learned-urls";

struct Observer {
    learner: Arc<Learner>,
    /// Each bundle's CA certificates (DER), for bundles that learn URLs.
    bundles: Vec<(String, Arc<Vec<Vec<u8>>>)>,
    /// URLs already fetched, per bundle: nothing to do for them.
    known: std::collections::HashSet<(String, String)>,
}

impl Observer {
    fn observe(&self, leaf: &[u8]) {
        let Ok((_, cert)) = X509Certificate::from_der(leaf) else {
            return;
        };
        let urls = distribution_points(&cert);
        for (bundle, cas) in &self.bundles {
            let new: Vec<&String> = urls
                .iter()
                .filter(|u| {
                    !self.known.contains(&(bundle.clone(), (*u).clone()))
                        && !self.learner.contains(bundle, u)
                })
                .collect();
            if new.is_empty() {
                continue;
            }
            // Only a certificate a CA of this bundle really issued may name URLs.
            let issued = cas.iter().any(|der| {
                X509Certificate::from_der(der).is_ok_and(|(_, ca)| {
                    ca.subject().as_raw() == cert.issuer().as_raw()
                        && cert.verify_signature(Some(ca.public_key())).is_ok()
                })
            });
            if !issued {
                continue;
            }
            let mut added = false;
            for u in new {
                if self.learner.add(bundle, u) {
                    tracing::info!(%bundle, url = %u, issuer = %crate::logging::Escaped(&cert.issuer().to_string()), "CRL URL learned from a client certificate");
                    added = true;
                }
            }
            if added {
                self.learner.wake.notify_one();
            }
        }
    }
}

/// A CRL from a throwaway issuer that no certificate names, for a bundle that expects
/// fetched CRLs but holds none yet (CRL host unreachable at first start, no cache).
/// webpki checks no revocation at all when a verifier has no CRL, which would fail open;
/// with this one present, `unknown_status` decides (deny: refused until a CRL arrives).
///
/// The CRL is fixed (made once with `openssl ca -gencrl`, next update in 2126; the
/// signing key was discarded), so the gateway needs no certificate generator at run time.
fn placeholder() -> Option<CertificateRevocationListDer<'static>> {
    Some(CertificateRevocationListDer::from(PLACEHOLDER_CRL))
}

/// Issuer `CN=fhirgate placeholder: no CRL fetched yet`, CRL number 1, no entries.
const PLACEHOLDER_CRL: &[u8] = include_bytes!("placeholder-crl.der");

/// Checks a configured CRL URL: http:// with a host (RFC 5280 §4.2.1.13 names HTTP for
/// CRLs; a signed CRL needs no TLS, and https would make revocation depend on a
/// second PKI).
pub fn check_url(u: &str) -> Result<(), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("not a valid URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(
            "must be an http:// URL (CRLs are signed, so plain HTTP is what CAs publish them on)"
                .into(),
        );
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("must include a host".into());
    }
    crate::config::error::no_userinfo(&uri)
}

/// Why a fetch was refused: a closed set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Timeout,
    Connect,
    HttpStatus,
    TooLarge,
    Parse,
    UnknownIssuer,
    BadSignature,
    Older,
    /// Another issuer (or scope) than the CRL held for this URL.
    IssuerChanged,
    Io,
}

impl Failure {
    pub fn label(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connect => "connect",
            Failure::HttpStatus => "http_status",
            Failure::TooLarge => "too_large",
            Failure::Parse => "parse",
            Failure::UnknownIssuer => "unknown_issuer",
            Failure::BadSignature => "bad_signature",
            Failure::Older => "older",
            Failure::IssuerChanged => "issuer_changed",
            Failure::Io => "io",
        }
    }
}

/// What the gateway needs to know about one CRL.
#[derive(Debug, Clone)]
struct CrlInfo {
    /// Issuer name and Issuing Distribution Point (raw DER): CRLs with the same scope.
    scope: (Vec<u8>, Option<Vec<u8>>),
    /// CRL number, big-endian without leading zeros.
    number: Option<Vec<u8>>,
    this_update: i64,
    next_update: Option<i64>,
    revoked: usize,
}

impl CrlInfo {
    fn parse(
        der: &[u8],
    ) -> Result<
        (
            CrlInfo,
            x509_parser::revocation_list::CertificateRevocationList<'_>,
        ),
        String,
    > {
        // The verifier's parser first: what it refuses (e.g. a version 1 CRL) must
        // never replace a CRL it can use.
        if let Some(why) = crate::tls::verifier_refuses_crl(der) {
            return Err(format!("refused by the verifier: {why}"));
        }
        let crl = match x509_parser::parse_x509_crl(der) {
            Ok(([], crl)) => crl,
            Ok(_) => return Err("trailing data after the CRL".into()),
            Err(e) => return Err(format!("not a valid CRL: {e}")),
        };
        let idp = crl
            .extensions()
            .iter()
            .find(|e| {
                matches!(
                    e.parsed_extension(),
                    ParsedExtension::IssuingDistributionPoint(_)
                )
            })
            .map(|e| e.value.to_vec());
        let info = CrlInfo {
            scope: (crl.issuer().as_raw().to_vec(), idp),
            number: crl.crl_number().map(|n| n.to_bytes_be()),
            this_update: crl.last_update().timestamp(),
            next_update: crl.next_update().map(|t| t.timestamp()),
            revoked: crl.iter_revoked_certificates().count(),
        };
        Ok((info, crl))
    }

    /// Newer, same or older: by CRL number when both have one (RFC 5280 §5.2.3: "a
    /// monotonically increasing sequence number"), else by thisUpdate.
    fn cmp_age(&self, other: &CrlInfo) -> std::cmp::Ordering {
        match (&self.number, &other.number) {
            (Some(a), Some(b)) => (a.len(), a).cmp(&(b.len(), b)),
            _ => self.this_update.cmp(&other.this_update),
        }
    }
}

/// Adds the fetched CRLs to the bundles read from files (called by
/// [`crate::tls::load_bundles`]), keeping per issuer and scope only the newest CRL:
/// webpki would otherwise use whichever of two CRLs of one issuer comes first, e.g. a
/// stale seed file before the fresh fetched one.
pub fn add_fetched(bundles: &mut [LoadedBundle], fetched: &FetchedCrls) {
    for lb in bundles.iter_mut() {
        lb.fetches_crls = fetched.fetching.contains(&lb.name);
        let Some(list) = fetched.crls.get(&lb.name) else {
            continue;
        };
        for (url, der) in list {
            let field = format!("{}.crl_urls", lb.field);
            match crate::tls::parse_crl(&field, url, der.to_vec()) {
                // A file older than what was fetched is the usual case, not a mistake.
                Ok(c) => drop(merge_newest(&mut lb.crls, c)),
                // Checked when fetched; only a future webpki could disagree.
                Err(e) => tracing::warn!(error = %e, "fetched CRL not used"),
            }
        }
    }
}

/// Adds `new` to `list` unless a CRL of the same issuer and scope is there already, in
/// which case the newer of the two (CRL number, else thisUpdate) is kept. Returns the
/// one not kept, if any.
pub(crate) fn merge_newest(list: &mut Vec<LoadedCrl>, new: LoadedCrl) -> Option<LoadedCrl> {
    // The scope starts with the issuer name, so only CRLs of the same issuer are parsed
    // for it: usually none (a root's and a SubCA's CRL), at start-up and on every reload.
    if !list.iter().any(|held| held.issuer_raw == new.issuer_raw) {
        list.push(new);
        return None;
    }
    let Ok((ni, _)) = CrlInfo::parse(&new.der) else {
        list.push(new);
        return None;
    };
    for held in list.iter_mut().filter(|h| h.issuer_raw == new.issuer_raw) {
        if let Ok((hi, _)) = CrlInfo::parse(&held.der) {
            if hi.scope == ni.scope {
                if ni.cmp_age(&hi) == std::cmp::Ordering::Greater {
                    return Some(std::mem::replace(held, new));
                }
                return Some(new);
            }
        }
    }
    list.push(new);
    None
}

/// The CRLs in the order webpki is to consult them: by issuer, and within one issuer
/// the newest first (CRL number, RFC 5280 §5.2.3: "monotonically increasing"; else
/// thisUpdate). webpki uses the first CRL authoritative for a certificate, and CRLs of
/// one issuer whose Issuing Distribution Points differ are all kept by
/// [`merge_newest`], so an older CRL listed first would hide a newer one that revokes.
/// The key is a total order (a CRL without a number, which RFC 5280 does not allow,
/// comes after those with one), as `sort` requires.
pub fn newest_first(crls: &[LoadedCrl]) -> Vec<&LoadedCrl> {
    let mut ordered: Vec<&LoadedCrl> = crls.iter().collect();
    // Usually one CRL per issuer: nothing to move, and `sort_by_key` is stable.
    ordered.sort_by_key(|c| age_key(c));
    ordered
}

type AgeKey<'a> = (
    &'a [u8],
    std::cmp::Reverse<Option<(usize, &'a [u8])>>,
    std::cmp::Reverse<i64>,
);

fn age_key(c: &LoadedCrl) -> AgeKey<'_> {
    let number = c.number.as_deref().map(|n| (n.len(), n));
    (
        &c.issuer_raw,
        std::cmp::Reverse(number),
        std::cmp::Reverse(c.this_update),
    )
}

/// Whether `a` is strictly older than `b` by [`newest_first`]'s order (same issuer).
pub fn is_older(a: &LoadedCrl, b: &LoadedCrl) -> bool {
    age_key(a) > age_key(b)
}

/// Whether a CRL is the stand-in for "no CRL fetched yet" (see [`placeholder`]).
pub fn is_placeholder(c: &LoadedCrl) -> bool {
    c.source == PLACEHOLDER_SOURCE
}

const PLACEHOLDER_SOURCE: &str = "(no CRL fetched yet)";

/// One CRL URL of one bundle, with the CAs its CRL may be signed by.
#[derive(Clone)]
pub struct Source {
    pub bundle: String,
    pub url: String,
    /// Where the URL comes from, for `fhirgate check`.
    pub origin: String,
    cas: Arc<Vec<Vec<u8>>>,
}

const MAX_REDIRECTS: usize = 3;

/// The http:// URL a `Location` header points to, relative ones resolved against `base`.
fn redirect_target(base: &http::Uri, location: &str) -> Option<http::Uri> {
    let target = if location.starts_with('/') && !location.starts_with("//") {
        format!(
            "http://{}{location}",
            base.authority().map(|a| a.as_str()).unwrap_or_default()
        )
    } else {
        location.to_owned()
    };
    check_url(&target).ok()?;
    target.parse().ok()
}

/// Most URLs learned from distribution points per bundle (a CA lists one or two).
const MAX_DP_URLS: usize = 16;

/// The CRL sources of a configuration: `crl_urls`, then (if enabled) the http:// URLs in
/// the CRL Distribution Points of each bundle's CA certificates, and those `learned`
/// from client certificates. Reads files only.
pub fn sources(
    tls: &TlsConfig,
    learned_urls: &[(String, String)],
) -> Result<Vec<Source>, ConfigError> {
    let mut out: Vec<Source> = Vec::new();
    for (i, b) in tls.trust_bundles.iter().enumerate() {
        if b.crl_urls.is_empty() && !tls.revocation.fetch_distribution_points {
            continue;
        }
        let cas = bundle_cas(tls, i)?;
        let mut push = |url: String, origin: String| {
            if !out.iter().any(|s| s.bundle == b.name && s.url == url) {
                out.push(Source {
                    bundle: b.name.clone(),
                    url,
                    origin,
                    cas: cas.clone(),
                });
            }
        };
        for u in &b.crl_urls {
            push(u.clone(), "crl_urls".into());
        }
        if tls.revocation.fetch_distribution_points {
            let mut learned = 0;
            for der in cas.iter() {
                let Ok((_, cert)) = X509Certificate::from_der(der) else {
                    continue;
                };
                for url in distribution_points(&cert) {
                    if learned < MAX_DP_URLS {
                        learned += 1;
                        push(url, format!("CRL distribution point of {}", cert.subject()));
                    }
                }
            }
            for (_, url) in learned_urls.iter().filter(|(lb, _)| lb == &b.name) {
                push(url.clone(), "learned from a client certificate".into());
            }
        }
    }
    Ok(out)
}

/// The CA certificates (DER) of bundle `i`.
fn bundle_cas(tls: &TlsConfig, i: usize) -> Result<Arc<Vec<Vec<u8>>>, ConfigError> {
    let mut cas = Vec::new();
    if let Some(b) = tls.trust_bundles.get(i) {
        for (j, p) in b.ca_files.iter().enumerate() {
            let field = format!("tls.trust_bundles[{i}].ca_files[{j}]");
            for c in crate::tls::load_certs(&field, p)? {
                cas.push(c.to_vec());
            }
        }
    }
    Ok(Arc::new(cas))
}

/// The http:// URIs of a certificate's CRL Distribution Points (ldap:// ones are skipped).
pub fn distribution_points(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::CRLDistributionPoints(points) = ext.parsed_extension() {
            for p in points.iter() {
                if let Some(DistributionPointName::FullName(names)) = &p.distribution_point {
                    for n in names {
                        if let GeneralName::URI(u) = n {
                            if check_url(u).is_ok() {
                                out.push((*u).to_owned());
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

/// Verifies a CRL's signature against the CA certificates it may come from: a CA whose
/// subject is the CRL's issuer and that may sign CRLs (keyUsage cRLSign when present,
/// RFC 5280 §4.2.1.3).
fn verify_issuer(
    crl: &x509_parser::revocation_list::CertificateRevocationList<'_>,
    cas: &[Vec<u8>],
) -> Result<(), Failure> {
    let mut known = false;
    for der in cas {
        let Ok((_, ca)) = X509Certificate::from_der(der) else {
            continue;
        };
        if ca.subject().as_raw() != crl.issuer().as_raw() {
            continue;
        }
        if let Ok(Some(ku)) = ca.key_usage() {
            if !ku.value.crl_sign() {
                continue;
            }
        }
        known = true;
        if crl.verify_signature(ca.public_key()).is_ok() {
            return Ok(());
        }
    }
    Err(if known {
        Failure::BadSignature
    } else {
        Failure::UnknownIssuer
    })
}

/// When a source is next due, and the CAs it was fetched for.
type Due = (std::time::Instant, Arc<Vec<Vec<u8>>>);

struct Held {
    der: CertificateRevocationListDer<'static>,
    info: CrlInfo,
}

/// Where one source is cached: a name derived from bundle and URL.
fn cache_file(dir: &Path, bundle: &str, url: &str) -> PathBuf {
    let h = Sha256::digest(format!("{bundle}\n{url}").as_bytes());
    dir.join(format!("{}.crl", &hex::encode(h)[..32]))
}

/// Writes `bytes` to `path` by temp file + fsync + rename, so a crash never leaves a
/// half-written CRL for the next start.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("crl");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The fetched CRLs of a running gateway, and the means to refresh them.
pub struct CrlStore {
    held: Mutex<HashMap<(String, String), Held>>,
    /// When each source is next due (a source not listed is due now), and the CAs its
    /// CRL was checked against then: a reload that changes them makes it due at once.
    due: Mutex<HashMap<(String, String), Due>>,
    metrics: Arc<Metrics>,
    http: Client<HttpConnector, Empty<Bytes>>,
    learner: Arc<Learner>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl CrlStore {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        CrlStore {
            held: Mutex::default(),
            due: Mutex::default(),
            metrics,
            http: Client::builder(TokioExecutor::new()).build(http),
            learner: Arc::default(),
        }
    }

    /// Resolves when a client certificate taught a new CRL URL.
    pub async fn learned(&self) {
        self.learner.wake.notified().await
    }

    fn sources(&self, tls: &TlsConfig) -> Result<Vec<Source>, ConfigError> {
        sources(tls, &self.learner.list())
    }

    /// A copy of `cfg` whose TLS section carries the current fetched CRLs.
    pub fn apply(&self, cfg: &crate::config::Config) -> crate::config::Config {
        let mut cfg = cfg.clone();
        cfg.tls.fetched_crls = self.snapshot(&cfg.tls);
        cfg
    }

    fn snapshot(&self, tls: &TlsConfig) -> FetchedCrls {
        let srcs = self.sources(tls).unwrap_or_default();
        let held = self.lock_held();
        let mut map: HashMap<String, Vec<_>> = HashMap::new();
        for ((bundle, url), h) in held.iter() {
            // Only URLs still configured: a CRL from a removed URL no longer counts.
            if srcs.iter().any(|s| &s.bundle == bundle && &s.url == url) {
                map.entry(bundle.clone())
                    .or_default()
                    .push((url.clone(), h.der.clone()));
            }
        }
        // A bundle with CRL sources but no CRL at all (from fetch, cache or files). With
        // `fetch_distribution_points` every bundle expects some, also one whose CAs name
        // no distribution point and whose URLs are yet to be learned from clients: with
        // no CRL at all the verifier would check no revocation.
        for b in &tls.trust_bundles {
            let expects =
                tls.revocation.fetch_distribution_points || srcs.iter().any(|s| s.bundle == b.name);
            if expects && b.crl_files.is_empty() && !map.contains_key(&b.name) {
                let p = placeholder().map(|d| (PLACEHOLDER_SOURCE.to_owned(), d));
                map.insert(b.name.clone(), p.into_iter().collect());
            }
        }
        let observer = tls.revocation.fetch_distribution_points.then(|| {
            // Every bundle learns, also one whose CAs name no distribution point.
            let bundles = tls
                .trust_bundles
                .iter()
                .enumerate()
                .filter_map(|(i, b)| Some((b.name.clone(), bundle_cas(tls, i).ok()?)))
                .collect();
            Arc::new(Observer {
                learner: self.learner.clone(),
                bundles,
                known: srcs
                    .iter()
                    .map(|s| (s.bundle.clone(), s.url.clone()))
                    .collect(),
            })
        });
        let fetching = tls
            .trust_bundles
            .iter()
            .filter(|b| {
                tls.revocation.fetch_distribution_points || srcs.iter().any(|s| s.bundle == b.name)
            })
            .map(|b| b.name.clone())
            .collect();
        FetchedCrls {
            crls: Arc::new(map),
            fetching: Arc::new(fetching),
            observer,
        }
    }

    /// Loads the cached copies of every source not held yet (at start, or after a reload
    /// added a URL), re-checking each as if it had just been fetched. Creates `cache_dir`.
    /// Also drops held CRLs that no longer verify against their bundle's CAs as now
    /// configured (a CA replaced on reload), so that only CRLs of the current CAs count.
    pub fn load_cache(&self, tls: &TlsConfig) -> Result<(), ConfigError> {
        for (b, u) in read_learned(tls) {
            self.learner.add(&b, &u);
        }
        *self.learner.file.lock().unwrap_or_else(|p| p.into_inner()) = tls
            .revocation
            .cache_dir
            .as_ref()
            .map(|d| d.join(LEARNED_FILE));
        let srcs = self.sources(tls)?;
        self.lock_held().retain(|(bundle, url), h| {
            let Some(src) = srcs.iter().find(|s| &s.bundle == bundle && &s.url == url) else {
                return true; // not configured now: ignored by snapshot(), kept for a revert
            };
            let ok = x509_parser::parse_x509_crl(&h.der)
                .ok()
                .is_some_and(|(_, crl)| verify_issuer(&crl, &src.cas).is_ok());
            if !ok {
                tracing::warn!(%bundle, %url, "held CRL dropped: no CA of the bundle signed it now");
            }
            ok
        });
        self.read_cache(tls, true)
    }

    fn read_cache(&self, tls: &TlsConfig, create: bool) -> Result<(), ConfigError> {
        let Some(dir) = &tls.revocation.cache_dir else {
            return Ok(());
        };
        let srcs = self.sources(tls)?;
        if srcs.is_empty() {
            return Ok(());
        }
        if create {
            std::fs::create_dir_all(dir).map_err(|e| {
                err(
                    "tls.revocation.cache_dir",
                    format!("cannot create {}: {e}", dir.display()),
                )
            })?;
        }
        for s in &srcs {
            let key = (s.bundle.clone(), s.url.clone());
            if self.lock_held().contains_key(&key) {
                continue;
            }
            let path = cache_file(dir, &s.bundle, &s.url);
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            match self.accept(s, bytes, None) {
                Ok(_) => {
                    tracing::info!(bundle = %s.bundle, url = %s.url, file = %path.display(), "using cached CRL")
                }
                Err((kind, reason)) => tracing::warn!(
                    bundle = %s.bundle, url = %s.url, file = %path.display(), kind = kind.label(), %reason,
                    "cached CRL ignored"
                ),
            }
        }
        Ok(())
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a CRL for `src` and holds it if it is newer than the one held. Returns
    /// whether the held CRL changed.
    fn accept(
        &self,
        src: &Source,
        bytes: Vec<u8>,
        cache_dir: Option<&Path>,
    ) -> Result<bool, (Failure, String)> {
        let (info, crl) = CrlInfo::parse(&bytes).map_err(|r| (Failure::Parse, r))?;
        verify_issuer(&crl, &src.cas).map_err(|f| {
            let why = match f {
                Failure::BadSignature => {
                    "signature does not verify with the bundle's CA of that name"
                }
                _ => "issued by no CA of this bundle",
            };
            (f, format!("{why} (issuer {})", crl.issuer()))
        })?;
        let issuer = crl.issuer().to_string();
        drop(crl);
        let key = (src.bundle.clone(), src.url.clone());
        let mut held = self.lock_held();
        if let Some(h) = held.get(&key) {
            // A URL serves one issuer's CRL. Another CA's CRL, however well signed, would
            // replace the one held and let an older CRL of the first issuer back in
            // after it (RFC 5280 §5.2.3: CRL numbers only increase), so it is refused.
            // (A reload that takes the held CRL's issuer out of the bundle drops it
            // first: `load_cache`.)
            if h.info.scope != info.scope {
                return Err((
                    Failure::IssuerChanged,
                    format!(
                        "issued by {issuer}, another issuer or scope than the CRL this URL \
                         served before"
                    ),
                ));
            }
            match info.cmp_age(&h.info) {
                std::cmp::Ordering::Less => {
                    return Err((
                        Failure::Older,
                        "older than the CRL held (CRL number / thisUpdate)".into(),
                    ))
                }
                std::cmp::Ordering::Equal => return Ok(false),
                std::cmp::Ordering::Greater => {}
            }
        }
        let labels = CrlLabel {
            bundle: src.bundle.clone(),
            url: src.url.clone(),
        };
        if let Some(n) = info.next_update {
            self.metrics
                .crl_fetched_next_update
                .get_or_create(&labels)
                .set(n);
            if n < now_unix() {
                tracing::warn!(bundle = %src.bundle, url = %src.url, "newest CRL available is past its nextUpdate");
            }
        }
        self.metrics
            .crl_revoked_entries
            .get_or_create(&labels)
            .set(i64::try_from(info.revoked).unwrap_or(i64::MAX));
        let der = CertificateRevocationListDer::from(bytes);
        held.insert(
            key,
            Held {
                der: der.clone(),
                info,
            },
        );
        drop(held);
        if let Some(dir) = cache_dir {
            if let Err(e) = write_atomic(&cache_file(dir, &src.bundle, &src.url), &der) {
                // Still serving it from memory; only a restart loses it.
                self.fail(src, Failure::Io, &format!("cannot write to cache_dir: {e}"));
            }
        }
        Ok(true)
    }

    fn fail(&self, src: &Source, kind: Failure, reason: &str) {
        self.metrics
            .crl_fetch_failures
            .get_or_create(&CrlFailureLabel {
                bundle: src.bundle.clone(),
                url: src.url.clone(),
                reason: kind.label().into(),
            })
            .inc();
        tracing::warn!(
            bundle = %src.bundle, url = %src.url, kind = kind.label(), %reason,
            "CRL fetch refused; the last good CRL stays in force"
        );
    }

    async fn download(&self, url: &str, tls: &TlsConfig) -> Result<Vec<u8>, (Failure, String)> {
        let max = tls.revocation.max_crl_bytes();
        let work = async {
            let mut uri: http::Uri = url
                .parse()
                .map_err(|_| (Failure::Parse, "bad URL".to_string()))?;
            // A few redirects to other http:// URLs (CDNs), never to another scheme.
            let mut hops = 0;
            let resp = loop {
                let resp = self
                    .http
                    .get(uri.clone())
                    .await
                    .map_err(|e| (Failure::Connect, e.to_string()))?;
                if !resp.status().is_redirection() || hops == MAX_REDIRECTS {
                    break resp;
                }
                hops += 1;
                let next = resp
                    .headers()
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|l| redirect_target(&uri, l));
                match next {
                    Some(n) => uri = n,
                    None => {
                        return Err((
                            Failure::HttpStatus,
                            format!(
                                "HTTP status {} without a usable http:// Location",
                                resp.status()
                            ),
                        ))
                    }
                }
            };
            if !resp.status().is_success() {
                return Err((
                    Failure::HttpStatus,
                    format!("HTTP status {}", resp.status()),
                ));
            }
            let declared = resp
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return Err((
                    Failure::TooLarge,
                    format!("larger than max_crl_bytes {max}"),
                ));
            }
            let limit = usize::try_from(max).unwrap_or(usize::MAX);
            match Limited::new(resp.into_body(), limit).collect().await {
                Ok(b) => Ok(b.to_bytes().to_vec()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Err((
                    Failure::TooLarge,
                    format!("larger than max_crl_bytes {max}"),
                )),
                Err(e) => Err((Failure::Connect, e.to_string())),
            }
        };
        match tokio::time::timeout(tls.revocation.fetch_timeout(), work).await {
            Ok(r) => r,
            Err(_) => Err((
                Failure::Timeout,
                format!(
                    "no complete answer within {:?}",
                    tls.revocation.fetch_timeout()
                ),
            )),
        }
    }

    /// Fetches every source of `tls` that is due (all of them with `all`), concurrently.
    /// Returns whether any held CRL changed, and when the next source is due.
    pub async fn round(&self, tls: &TlsConfig, all: bool) -> (bool, std::time::Instant) {
        let interval = tls.revocation.refresh_interval();
        let now = std::time::Instant::now();
        let srcs = match self.sources(tls) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the CA files for CRL fetching; retrying later");
                return (false, now + interval.min(Duration::from_secs(60)));
            }
        };
        let due_now: Vec<&Source> = {
            let due = self.due.lock().unwrap_or_else(|p| p.into_inner());
            srcs.iter()
                .filter(|s| {
                    all || due
                        .get(&(s.bundle.clone(), s.url.clone()))
                        .is_none_or(|(d, cas)| *d <= now || *cas != s.cas)
                })
                .collect()
        };
        let results = futures_util::future::join_all(
            due_now
                .iter()
                .map(|s| async move { (*s, self.download(&s.url, tls).await) }),
        )
        .await;
        let mut changed = false;
        for (s, r) in results {
            let outcome =
                r.and_then(|bytes| self.accept(s, bytes, tls.revocation.cache_dir.as_deref()));
            match outcome {
                Ok(c) => {
                    changed |= c;
                    self.metrics
                        .crl_fetch_success
                        .get_or_create(&CrlLabel {
                            bundle: s.bundle.clone(),
                            url: s.url.clone(),
                        })
                        .set(now_unix());
                    if c {
                        tracing::info!(bundle = %s.bundle, url = %s.url, "new CRL fetched");
                    }
                }
                Err((kind, reason)) => self.fail(s, kind, &reason),
            }
        }
        let mut due = self.due.lock().unwrap_or_else(|p| p.into_inner());
        let held = self.lock_held();
        let wall = now_unix();
        for s in &due_now {
            let key = (s.bundle.clone(), s.url.clone());
            // Nothing held for the URL yet (its fetches failed): retried as often as a
            // stale CRL, as the clients it covers are refused until one arrives.
            let next_update = match held.get(&key) {
                Some(h) => h.info.next_update,
                None => Some(wall),
            };
            due.insert(
                key,
                (now + next_wait(interval, next_update, wall), s.cas.clone()),
            );
        }
        due.retain(|k, _| srcs.iter().any(|s| s.bundle == k.0 && s.url == k.1));
        let next = srcs
            .iter()
            .filter_map(|s| due.get(&(s.bundle.clone(), s.url.clone())).map(|d| d.0))
            .min()
            .unwrap_or(now + interval);
        (changed, next)
    }
}

/// The CRLs a gateway starting now would hold before fetching: the verified cached
/// copies (read only). For `fhirgate inspect-cert --config`, to judge as the handshake.
pub fn cached(tls: &TlsConfig) -> FetchedCrls {
    let store = CrlStore::new(Arc::new(Metrics::new()));
    for (b, u) in read_learned(tls) {
        store.learner.add(&b, &u);
    }
    if let Err(e) = store.read_cache(tls, false) {
        tracing::debug!(error = %e, "no cached CRLs");
    }
    store.snapshot(tls)
}

/// When to fetch a URL again: after one interval, or a minute before the held CRL's
/// nextUpdate if that is sooner; a CRL at or past its nextUpdate (or none held at all)
/// is retried every 30 s (or every interval, if shorter) until the CA publishes one.
fn next_wait(interval: Duration, next_update: Option<i64>, now_unix: i64) -> Duration {
    let Some(next) = next_update else {
        return interval;
    };
    let before = Duration::from_secs(u64::try_from(next - 60 - now_unix).unwrap_or(0));
    interval.min(before.max(interval.min(Duration::from_secs(30))))
}

/// The state of every CRL source, from the cache only (no network): for `fhirgate check`.
pub fn describe(tls: &TlsConfig) -> Result<String, ConfigError> {
    use std::fmt::Write;
    let mut s = String::new();
    for src in sources(tls, &read_learned(tls))? {
        let _ = write!(
            s,
            "CRL URL {} (bundle {:?}, {}): ",
            src.url, src.bundle, src.origin
        );
        let Some(dir) = &tls.revocation.cache_dir else {
            let _ = writeln!(
                s,
                "fetched at start (no cache_dir: not kept across restarts)"
            );
            continue;
        };
        let path = cache_file(dir, &src.bundle, &src.url);
        match std::fs::read(&path) {
            Err(_) => {
                let _ = writeln!(s, "not cached yet ({})", path.display());
            }
            Ok(bytes) => match CrlInfo::parse(&bytes) {
                Ok((info, _)) => {
                    let t = |u: i64| {
                        x509_parser::time::ASN1Time::from_timestamp(u)
                            .map(|t| t.to_string())
                            .unwrap_or_else(|_| u.to_string())
                    };
                    let stale = info.next_update.is_some_and(|n| n < now_unix());
                    let _ = writeln!(
                        s,
                        "cached {}: thisUpdate {}, nextUpdate {}{}, {} revoked",
                        path.display(),
                        t(info.this_update),
                        info.next_update.map(t).unwrap_or_else(|| "none".into()),
                        if stale { " (STALE)" } else { "" },
                        info.revoked
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "cache file {} unusable: {e}", path.display());
                }
            },
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed placeholder CRL still does its job: webpki parses it (v2, RFC 5280
    /// §5.1.2.1), and its issuer and far-off nextUpdate are what the docs above say.
    #[test]
    fn placeholder_crl_is_a_v2_crl_webpki_accepts() {
        use x509_parser::prelude::FromDer;
        let der = placeholder().expect("placeholder");
        webpki::OwnedCertRevocationList::from_der(der.as_ref()).expect("webpki parses it");
        let (_, crl) =
            x509_parser::revocation_list::CertificateRevocationList::from_der(der.as_ref())
                .expect("x509-parser parses it");
        assert_eq!(
            crl.issuer().to_string(),
            "CN=fhirgate placeholder: no CRL fetched yet"
        );
        assert_eq!(crl.iter_revoked_certificates().count(), 0);
        // 2100-01-01: decades beyond any deployment of this version.
        assert!(crl.next_update().expect("nextUpdate").timestamp() > 4_102_444_800);
    }

    #[test]
    fn only_http_urls_with_a_host() {
        assert!(check_url("http://crl.nhs.uk/int/1d/crlc3.crl").is_ok());
        for bad in [
            "https://x/y.crl",
            "ldap://x/cn=y",
            "http:///y.crl",
            "not a url",
            "ftp://x/y",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn newer_is_by_crl_number_then_this_update() {
        let mk = |number: Option<Vec<u8>>, this_update| CrlInfo {
            scope: (vec![1], None),
            number,
            this_update,
            next_update: None,
            revoked: 0,
        };
        use std::cmp::Ordering::*;
        assert_eq!(mk(Some(vec![2]), 1).cmp_age(&mk(Some(vec![1]), 9)), Greater);
        assert_eq!(
            mk(Some(vec![1, 0]), 1).cmp_age(&mk(Some(vec![0xff]), 1)),
            Greater
        );
        assert_eq!(mk(Some(vec![3]), 1).cmp_age(&mk(Some(vec![3]), 1)), Equal);
        assert_eq!(mk(None, 5).cmp_age(&mk(Some(vec![9]), 6)), Less);
    }

    /// RFC 5280 §5.2.3: CRL numbers are "monotonically increasing"; webpki consults the
    /// first CRL authoritative for a certificate, so within an issuer the newest comes
    /// first whatever the order of files and fetches (e.g. an old seed file first).
    #[test]
    fn newest_first_orders_each_issuer_by_number_then_this_update() {
        let mk = |issuer: u8, number: Option<Vec<u8>>, this_update: i64| LoadedCrl {
            der: CertificateRevocationListDer::from(vec![]),
            source: format!("{issuer}-{number:?}-{this_update}"),
            field: "f".into(),
            issuer: format!("CN={issuer}"),
            issuer_raw: vec![issuer],
            this_update,
            next_update: None,
            number,
            revoked: 0,
        };
        let list = [
            mk(1, Some(vec![1]), 9),    // seed file, no IDP
            mk(2, Some(vec![7]), 1),    // another issuer
            mk(1, Some(vec![0xff]), 1), // fetched, with an IDP
            mk(1, Some(vec![1, 0]), 1), // 256 > 255: longer is larger
            mk(1, None, 50),            // no number: after those with one
            mk(1, None, 60),
        ];
        let got: Vec<&str> = newest_first(&list)
            .iter()
            .map(|c| c.source.as_str())
            .collect();
        assert_eq!(
            got,
            [
                "1-Some([1, 0])-1",
                "1-Some([255])-1",
                "1-Some([1])-9",
                "1-None-60",
                "1-None-50",
                "2-Some([7])-1",
            ]
        );
        assert!(is_older(&list[0], &list[2]) && !is_older(&list[2], &list[0]));
    }

    #[test]
    fn redirects_stay_on_http() {
        let base: http::Uri = "http://crl.example/a/b.crl".parse().unwrap();
        let t = |l| redirect_target(&base, l).map(|u| u.to_string());
        assert_eq!(t("/c.crl").as_deref(), Some("http://crl.example/c.crl"));
        assert_eq!(
            t("http://cdn.example/c.crl").as_deref(),
            Some("http://cdn.example/c.crl")
        );
        assert_eq!(t("https://cdn.example/c.crl"), None);
        assert_eq!(t("//cdn.example/c.crl"), None);
        assert_eq!(t("file:///etc/passwd"), None);
    }

    #[test]
    fn refetch_before_next_update() {
        let h = Duration::from_secs(3600);
        assert_eq!(next_wait(h, None, 0), h);
        // nextUpdate a day away: the interval.
        assert_eq!(next_wait(h, Some(86_400), 0), h);
        // nextUpdate in 10 min: a minute before it.
        assert_eq!(next_wait(h, Some(600), 0), Duration::from_secs(540));
        // Stale: every 30 s; and never more often than a short interval asks.
        assert_eq!(next_wait(h, Some(-5), 0), Duration::from_secs(30));
        let s = Duration::from_secs(1);
        assert_eq!(next_wait(s, Some(-5), 0), s);
    }

    #[test]
    fn cache_write_is_atomic_and_named_per_source() {
        let dir = tempfile::tempdir().unwrap();
        let a = cache_file(dir.path(), "int", "http://h/a.crl");
        assert_ne!(a, cache_file(dir.path(), "prod", "http://h/a.crl"));
        write_atomic(&a, b"one").unwrap();
        write_atomic(&a, b"two").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temp file left behind");
    }
}
