//! TLS-MA: the server-side rustls configuration and the client certificate verifier.
//!
//! Each trust bundle (e.g. NHS INT, NHS PROD) gets its own webpki verifier with its own
//! CRLs, so a chain is judged only against the CAs of one environment; a client is
//! accepted when any bundle accepts it. Only self-signed Root CAs are trust anchors; a
//! configured SubCA is a pinned intermediate: paths are built leaf → configured SubCA →
//! root (NHS clients commonly send only their leaf), so the SubCA itself is checked
//! against the root's CRL, and a client under another SubCA of the same root is refused.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};

use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::X509Certificate;

use serde::Deserialize;

use crate::config::error::{err, ConfigError};

/// The crypto provider used for every TLS context of the gateway.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Human names of the PEM blocks in `text`, to say what a file holds instead.
fn pem_labels(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut out: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .filter_map(|l| l.strip_suffix("-----"))
        .map(str::to_owned)
        .collect();
    out.dedup();
    out
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| err(field, format!("cannot read {}: {e}", path.display())))
}

/// Whether `bytes` look like DER (a SEQUENCE) rather than PEM text.
fn is_der(bytes: &[u8]) -> bool {
    bytes.first() == Some(&0x30)
}

/// Checks that `der` is one whole X.509 certificate, with a message fit for an operator.
fn check_cert_der(field: &str, path: &Path, der: &[u8], what: &str) -> Result<(), ConfigError> {
    match x509_parser::parse_x509_certificate(der) {
        Ok(([], _)) => Ok(()),
        Ok(_) => Err(err(
            field,
            format!(
                "{}: {what} has trailing data after the certificate",
                path.display()
            ),
        )),
        Err(_) => Err(err(
            field,
            format!(
                "{}: {what} is not a valid X.509 certificate (its DER encoding could not be parsed)",
                path.display()
            ),
        )),
    }
}

/// Reads every certificate of a PEM file (one or more `CERTIFICATE` blocks) or a DER
/// file (one certificate); an empty file is an error.
pub fn load_certs(field: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = read(field, path)?;
    if is_der(&bytes) {
        check_cert_der(field, path, &bytes, "the DER file")?;
        return Ok(vec![CertificateDer::from(bytes)]);
    }
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(field, format!("{}: bad PEM: {e}", path.display())))?;
    if certs.is_empty() {
        let found = pem_labels(&bytes);
        let hint = if found.is_empty() {
            "expected PEM `-----BEGIN CERTIFICATE-----` blocks or a DER certificate".to_owned()
        } else {
            format!(
                "the file holds {} (is it in the wrong field?)",
                found.join(", ")
            )
        };
        return Err(err(
            field,
            format!("{}: no CERTIFICATE found: {hint}", path.display()),
        ));
    }
    for (i, c) in certs.iter().enumerate() {
        check_cert_der(field, path, c, &format!("PEM block {}", i + 1))?;
    }
    Ok(certs)
}

/// Reads a private key: PEM (PKCS#8 `PRIVATE KEY`, PKCS#1 `RSA PRIVATE KEY`, SEC1 `EC
/// PRIVATE KEY`) or DER. An encrypted key is refused with the command that decrypts it.
pub fn load_key(field: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let bytes = read(field, path)?;
    let text = String::from_utf8_lossy(&bytes);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(err(
            field,
            format!(
                "{p}: the private key is encrypted (fhirgate cannot prompt for a passphrase); \
                 decrypt it with `openssl pkey -in {p} -out {p}.dec`, keep the result readable \
                 only by the service user (chmod 600) and point {field} at it",
                p = path.display()
            ),
        ));
    }
    if is_der(&bytes) {
        return PrivateKeyDer::try_from(bytes).map_err(|_| {
            err(
                field,
                format!(
                    "{}: not a PKCS#8, PKCS#1 or SEC1 private key (DER); an encrypted \
                     PKCS#8 DER key must be decrypted with `openssl pkey -inform DER -in KEY -out KEY.pem`",
                    path.display()
                ),
            )
        });
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        let found = pem_labels(&bytes);
        let hint = if found.is_empty() {
            "expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block, or a DER key"
                .to_owned()
        } else {
            format!(
                "the file holds {} (is it in the wrong field?)",
                found.join(", ")
            )
        };
        err(
            field,
            format!("{}: no usable private key: {hint}", path.display()),
        )
    })
}

/// A parsed CRL and where it came from, for the verifier and for expiry reports.
#[derive(Clone, Debug)]
pub struct LoadedCrl {
    pub der: CertificateRevocationListDer<'static>,
    /// File path (or, for fetched CRLs, the URL).
    pub source: String,
    /// Config field it came from, for messages.
    pub field: String,
    /// RFC 4514 issuer DN.
    pub issuer: String,
    /// DER of the issuer name, to match it to a CA of the bundle.
    pub issuer_raw: Vec<u8>,
    /// thisUpdate, Unix seconds.
    pub this_update: i64,
    /// nextUpdate, Unix seconds (RFC 5280 profile: always present).
    pub next_update: Option<i64>,
    /// CRL number, big-endian without leading zeros: with thisUpdate, which of two CRLs
    /// of one issuer is newer ([`crate::revocation::newest_first`]).
    pub number: Option<Vec<u8>>,
    pub revoked: usize,
}

/// Parses one DER CRL as the verifier will and explains any refusal. `source` names it in
/// messages; fetched CRLs can be fed through here too.
pub fn parse_crl(field: &str, source: &str, der: Vec<u8>) -> Result<LoadedCrl, ConfigError> {
    let crl = match x509_parser::parse_x509_crl(&der) {
        Ok(([], c)) => c,
        Ok(_) => return Err(err(field, format!("{source}: trailing data after the CRL"))),
        Err(_) => {
            return Err(err(
                field,
                format!(
                    "{source}: not a valid CRL (its DER encoding could not be parsed as an \
                     X.509 CertificateList)"
                ),
            ))
        }
    };
    // RFC 5280 §5.1.2.1: "When extensions are used, as required by this profile, this
    // field MUST be present and MUST specify version 2"; webpki refuses v1 CRLs.
    if crl.version() != Some(x509_parser::x509::X509Version::V2) {
        return Err(err(
            field,
            format!(
                "{source}: version 1 CRLs are not supported (RFC 5280 requires v2); ask the CA \
                 for a v2 CRL (`openssl ca -gencrl` writes v2 when a crlnumber file or \
                 crl_extensions is configured)"
            ),
        ));
    }
    // The remaining webpki limits (delta, indirect, critical extensions) are found by
    // letting webpki parse it alone, so the message names this CRL.
    let loaded = LoadedCrl {
        source: source.to_owned(),
        field: field.to_owned(),
        issuer: crl.issuer().to_string(),
        issuer_raw: crl.issuer().as_raw().to_vec(),
        this_update: crl.last_update().timestamp(),
        next_update: crl.next_update().map(|t| t.timestamp()),
        number: crl.crl_number().map(|n| n.to_bytes_be()),
        revoked: crl.iter_revoked_certificates().count(),
        der: CertificateRevocationListDer::from(der.clone()),
    };
    if let Some(e) = verifier_refuses_crl(&loaded.der) {
        return Err(err(field, format!("{source}: {e}")));
    }
    Ok(loaded)
}

/// Why the handshake's verifier would refuse this CRL, in words an operator can act on;
/// `None` when it can use it. rustls parses a verifier's CRLs with exactly this call
/// (`with_crls`), and only then, so a CRL it would refuse is caught here with its file
/// named rather than at the next reload.
pub fn verifier_refuses_crl(der: &[u8]) -> Option<String> {
    use webpki::Error as E;
    let e = webpki::OwnedCertRevocationList::from_der(der).err()?;
    Some(
        match e {
            E::UnsupportedCrlVersion => "version 1 CRLs are not supported (RFC 5280 requires v2)",
            E::UnsupportedDeltaCrl => {
                "delta CRLs are not supported: configure the CA's full (base) CRL"
            }
            E::UnsupportedIndirectCrl => {
                "indirect CRLs (entries for another CA's certificates) are not supported: \
                 configure the CRL the certificate's own CA signs"
            }
            E::UnsupportedRevocationReasonsPartitioning => {
                "CRLs that cover only some revocation reasons (Issuing Distribution Point \
                 onlySomeReasons) are not supported: configure the CA's CRL for all reasons"
            }
            E::UnsupportedCrlIssuingDistributionPoint => {
                "its Issuing Distribution Point names no distribution point URI, so the \
                 verifier cannot tell which certificates it covers: configure a CRL whose \
                 Issuing Distribution Point has a fullName URI, or one without that extension"
            }
            E::UnsupportedCriticalExtension => {
                "the CRL, or an entry in it, has a critical extension the verifier does not support"
            }
            E::UnsupportedRevocationReason => {
                "an entry has a revocation reason RFC 5280 §5.3.1 does not define"
            }
            E::InvalidCrlNumber => "the CRL number is not a valid positive integer",
            E::InvalidSerialNumber => "an entry has an invalid certificate serial number",
            E::MalformedExtensions => "an extension of the CRL is malformed (RFC 5280 §5.2)",
            _ => "not a CRL the verifier can use (malformed RFC 5280 CertificateList)",
        }
        .to_owned(),
    )
}

/// Reads CRLs from a PEM file (one or more `X509 CRL` blocks) or a single DER file.
/// Each CRL is parsed here so that a corrupt file is reported with its own field path.
pub fn load_crl_file(field: &str, path: &Path) -> Result<Vec<LoadedCrl>, ConfigError> {
    let bytes = read(field, path)?;
    let source = path.display().to_string();
    let ders: Vec<Vec<u8>> = if is_der(&bytes) {
        vec![bytes]
    } else {
        let ders: Vec<CertificateRevocationListDer<'static>> =
            CertificateRevocationListDer::pem_slice_iter(&bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| err(field, format!("{source}: bad PEM: {e}")))?;
        if ders.is_empty() {
            let found = pem_labels(&bytes);
            let hint = if found.is_empty() {
                "expected a PEM `-----BEGIN X509 CRL-----` block or a DER CRL".to_owned()
            } else {
                format!(
                    "the file holds {} (is it in the wrong field?)",
                    found.join(", ")
                )
            };
            return Err(err(field, format!("{source}: no X509 CRL found: {hint}")));
        }
        ders.into_iter().map(|d| d.as_ref().to_vec()).collect()
    };
    ders.into_iter()
        .map(|d| parse_crl(field, &source, d))
        .collect()
}

/// Reads CRLs from a PEM or DER file (see [`load_crl_file`]).
pub fn load_crls(
    field: &str,
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, ConfigError> {
    Ok(load_crl_file(field, path)?
        .into_iter()
        .map(|c| c.der)
        .collect())
}

/// An outbound HTTP(S) connector (to the upstream or the authorisation server) that
/// trusts only the CAs in `ca_file` (no public roots: these are internal services) and
/// optionally presents a client certificate. `field` names the config section in errors.
pub fn client_connector(
    field: &str,
    ca_file: Option<&Path>,
    client_cert: Option<(&Path, &Path)>,
    connect_timeout: std::time::Duration,
    http2: bool,
) -> Result<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    ConfigError,
> {
    let mut roots = RootCertStore::empty();
    if let Some(p) = ca_file {
        let f = format!("{field}.ca_file");
        for c in load_certs(&f, p)? {
            roots
                .add(c)
                .map_err(|e| err(&f, format!("not a usable CA: {e}")))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(field, e.to_string()))?
        .with_root_certificates(roots);
    let tls = match client_cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                load_certs(&format!("{field}.client_cert"), c)?,
                load_key(&format!("{field}.client_key"), k)?,
            )
            .map_err(|e| err(format!("{field}.client_key"), e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http.enforce_http(false);
    // hyper-rustls sets ALPN itself from the enabled versions.
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    Ok(if http2 {
        https.enable_http2().wrap_connector(http)
    } else {
        https.enable_http1().wrap_connector(http)
    })
}

/// A trust bundle's certificates and CRLs as read from its files, before the verifier
/// is built. CRLs obtained elsewhere (e.g. fetched) are added to `crls` before
/// [`BundleVerifier::from_loaded`]: this list is the one place a bundle's CRLs come from.
#[derive(Clone, Debug)]
pub struct LoadedBundle {
    pub name: String,
    /// `tls.trust_bundles[i]`, for messages.
    pub field: String,
    pub anchor: AnchorMode,
    /// (config field, certificate) for every configured CA.
    pub cas: Vec<(String, CertificateDer<'static>)>,
    pub crls: Vec<LoadedCrl>,
    /// `crl_files` CRLs not used because a newer one of the same issuer and scope is
    /// configured too: an operator who added the new file without removing the old one
    /// is told (`check`, start-up and reload warnings).
    pub superseded: Vec<LoadedCrl>,
    /// CRLs also come from fetching (`crl_urls`, distribution points): a CA with no CRL
    /// yet is then a passing state (`check` lists each URL and its cache), not a set-up
    /// warning. Set by [`crate::revocation::add_fetched`].
    pub fetches_crls: bool,
}

/// Reads the CA and CRL files of bundle `i`.
pub fn load_bundle(i: usize, b: &TrustBundleConfig) -> Result<LoadedBundle, ConfigError> {
    let f = format!("tls.trust_bundles[{i}]");
    let mut cas = Vec::new();
    for (j, p) in b.ca_files.iter().enumerate() {
        let field = format!("{f}.ca_files[{j}]");
        for c in load_certs(&field, p)? {
            cas.push((field.clone(), c));
        }
    }
    // webpki uses the first CRL whose issuer matches, so two CRLs of one issuer (an old
    // and a new file, or both in one PEM) are reduced to the newer.
    let mut crls = Vec::new();
    let mut superseded = Vec::new();
    for (j, p) in b.crl_files.iter().enumerate() {
        for c in load_crl_file(&format!("{f}.crl_files[{j}]"), p)? {
            if let Some(old) = crate::revocation::merge_newest(&mut crls, c) {
                superseded.push(old);
            }
        }
    }
    Ok(LoadedBundle {
        name: b.name.clone(),
        field: f,
        anchor: b.anchor,
        cas,
        crls,
        superseded,
        fetches_crls: false,
    })
}

/// Reads every trust bundle of `cfg`.
pub fn load_bundles(cfg: &TlsConfig) -> Result<Vec<LoadedBundle>, ConfigError> {
    let mut bundles: Vec<LoadedBundle> = cfg
        .trust_bundles
        .iter()
        .enumerate()
        .map(|(i, b)| load_bundle(i, b))
        .collect::<Result<_, _>>()?;
    // Plus the last good CRLs fetched over HTTP, newest per issuer (see revocation).
    crate::revocation::add_fetched(&mut bundles, &cfg.fetched_crls);
    Ok(bundles)
}

/// A configured certificate's expiry, for logs, `check`, `/readyz` and metrics.
#[derive(Clone, Debug)]
pub struct CertFact {
    /// Bundle name, or `server` for the gateway's own certificate.
    pub bundle: String,
    pub field: String,
    /// `root CA`, `SubCA`, `SubCA (anchor)` or `server certificate`.
    pub role: &'static str,
    pub subject: String,
    pub not_after: i64,
}

/// What the trust configuration holds and what may go stale: every CA, the server
/// certificate, every CRL, and configuration warnings.
#[derive(Clone, Debug, Default)]
pub struct TrustInventory {
    pub certs: Vec<CertFact>,
    /// (bundle name, CRL).
    pub crls: Vec<(String, LoadedCrl)>,
    /// Weaknesses of an accepted configuration (e.g. `anchor: subca`), for `check` and
    /// the start-up log.
    pub warnings: Vec<String>,
    pub enforce_crl_expiry: bool,
}

/// Certificates are flagged this long before their notAfter.
pub const CERT_WARN_SECS: i64 = 30 * 86_400;

/// `2026-12-01T10:00:00Z` for Unix seconds.
pub fn utc(t: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(t) {
        Ok(d) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            d.year(),
            u8::from(d.month()),
            d.day(),
            d.hour(),
            d.minute(),
            d.second()
        ),
        Err(_) => t.to_string(),
    }
}

fn ago_or_in(t: i64, now: i64) -> String {
    let d = t - now;
    let (n, unit) = if d.abs() >= 2 * 86_400 {
        (d.abs() / 86_400, "days")
    } else if d.abs() >= 3600 {
        (d.abs() / 3600, "hours")
    } else {
        (d.abs() / 60, "minutes")
    };
    if d < 0 {
        format!("{n} {unit} ago")
    } else {
        format!("in {n} {unit}")
    }
}

impl TrustInventory {
    /// One line per CRL past or within `warn_before` of its nextUpdate and per
    /// certificate past or within 30 days of its notAfter; empty when all is current.
    pub fn stale(&self, now: i64, warn_before: i64) -> Vec<String> {
        let mut out = Vec::new();
        for (bundle, c) in &self.crls {
            if let Some(next) = c.next_update {
                if next <= now {
                    out.push(format!(
                        "CRL {} (bundle {bundle}, issuer {}) is past its nextUpdate {} ({}): {}",
                        c.source,
                        c.issuer,
                        utc(next),
                        ago_or_in(next, now),
                        if self.enforce_crl_expiry {
                            "clients it covers are REFUSED (enforce_crl_expiry)"
                        } else {
                            "stale revocation data is being trusted (enforce_crl_expiry: false)"
                        }
                    ));
                } else if next - now <= warn_before {
                    out.push(format!(
                        "CRL {} (bundle {bundle}, issuer {}) reaches its nextUpdate {} ({}): replace it before then",
                        c.source,
                        c.issuer,
                        utc(next),
                        ago_or_in(next, now)
                    ));
                }
            }
        }
        for c in &self.certs {
            if c.not_after <= now {
                out.push(format!(
                    "{} {} ({}, {}) EXPIRED at {} ({})",
                    c.role,
                    c.subject,
                    c.bundle,
                    c.field,
                    utc(c.not_after),
                    ago_or_in(c.not_after, now)
                ));
            } else if c.not_after - now <= CERT_WARN_SECS {
                out.push(format!(
                    "{} {} ({}, {}) expires {} ({})",
                    c.role,
                    c.subject,
                    c.bundle,
                    c.field,
                    utc(c.not_after),
                    ago_or_in(c.not_after, now)
                ));
            }
        }
        out
    }

    /// The `fhirgate check` listing: every certificate's notAfter and every CRL's
    /// nextUpdate, stale ones flagged.
    pub fn render(&self, now: i64, warn_before: i64) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for c in &self.certs {
            let flag = if c.not_after <= now {
                "  EXPIRED"
            } else if c.not_after - now <= CERT_WARN_SECS {
                "  EXPIRES SOON"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "certificate [{}] {} {}: notAfter {} ({}){flag}",
                c.bundle,
                c.role,
                c.subject,
                utc(c.not_after),
                ago_or_in(c.not_after, now)
            );
        }
        for (bundle, c) in &self.crls {
            let (next, flag) = match c.next_update {
                Some(n) if n <= now => (format!("{} ({})", utc(n), ago_or_in(n, now)), "  STALE"),
                Some(n) if n - now <= warn_before => (
                    format!("{} ({})", utc(n), ago_or_in(n, now)),
                    "  STALE SOON",
                ),
                Some(n) => (format!("{} ({})", utc(n), ago_or_in(n, now)), ""),
                None => ("none".to_owned(), ""),
            };
            let _ = writeln!(
                s,
                "CRL [{bundle}] {} issuer {}: {} revoked, nextUpdate {next}{flag}",
                c.source, c.issuer, c.revoked
            );
        }
        s
    }
}

/// Whether a certificate is self-signed: issuer = subject and, when both are present,
/// the authority key identifier is its own subject key identifier (RFC 5280 §3.2).
fn is_self_signed(c: &X509Certificate<'_>) -> bool {
    if c.subject().as_raw() != c.issuer().as_raw() {
        return false;
    }
    let mut ski = None;
    let mut aki = None;
    for e in c.extensions() {
        match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => ski = Some(k.0),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|k| k.0)
            }
            _ => {}
        }
    }
    match (ski, aki) {
        (Some(s), Some(a)) => s == a,
        _ => true,
    }
}

/// One trust bundle's verifier.
struct Bundle {
    name: String,
    verifier: Arc<dyn ClientCertVerifier>,
    /// Configured non-anchor CAs (SubCAs).
    intermediates: Vec<CertificateDer<'static>>,
    /// Build paths only from `intermediates`, ignoring what the client sends.
    pinned: bool,
    /// Subject DER of each of `intermediates`: a pinned bundle's leaves must be issued
    /// by one of them.
    intermediate_subjects: Vec<Vec<u8>>,
}

impl Bundle {
    /// Verifies a client chain against this bundle.
    ///
    /// When the bundle lists SubCAs (`pinned`), the intermediates a client sends are
    /// ignored and the path is built from the configured SubCAs only. This is what keeps
    /// trust pinned: NHS roots sign several SubCAs, and if client-sent intermediates took
    /// part in path building, a client of an unlisted SubCA of the same root would be
    /// accepted by sending that SubCA. It also makes a leaf-only client and a
    /// full-chain client get the same verdict, with every SubCA in the path checked
    /// against the root's CRL. A leaf issued by the root itself is refused too. Chains
    /// deeper than root → SubCA → leaf need every
    /// intermediate listed in `ca_files`. A bundle with only roots (no SubCA listed)
    /// trusts everything under them, so there the client's intermediates are used; so
    /// does an `anchor: subca` bundle, where every path must end at a listed SubCA anyway.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        sent: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let intermediates: &[CertificateDer<'_>] = if self.pinned {
            // A leaf the root issued directly is not under a listed SubCA either.
            if let Ok((_, leaf)) = x509_parser::parse_x509_certificate(end_entity) {
                let issuer = leaf.issuer().as_raw();
                if !self.intermediate_subjects.iter().any(|s| s == issuer) {
                    return Err(rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer,
                    ));
                }
            }
            &self.intermediates
        } else {
            sent
        };
        self.verifier
            .verify_client_cert(end_entity, intermediates, now)
    }
}

/// Builds one bundle's verifier from its CA certificates and CRLs, and adds its facts
/// and warnings to `inv`.
fn build_bundle(
    lb: &LoadedBundle,
    rev: &RevocationConfig,
    provider: &Arc<CryptoProvider>,
    inv: &mut TrustInventory,
    hints: &mut Vec<DistinguishedName>,
) -> Result<Bundle, ConfigError> {
    let f = &lb.field;
    let mut roots = RootCertStore::empty();
    let mut intermediates = Vec::new();
    let mut intermediate_subjects = Vec::new();
    // (subject DER, subject text, is anchor) of every CA, to match CRLs to issuers.
    let mut issuers: Vec<(Vec<u8>, String, bool)> = Vec::new();
    let mut self_signed_any = None;
    let mut sub_any = None;
    for (field, der) in &lb.cas {
        let (_, c) = x509_parser::parse_x509_certificate(der)
            .map_err(|_| err(field, "not a valid X.509 certificate"))?;
        let subject = c.subject().to_string();
        let root = is_self_signed(&c);
        if root {
            self_signed_any.get_or_insert(field.clone());
        } else {
            sub_any.get_or_insert((field.clone(), subject.clone()));
            if !c.is_ca() {
                return Err(err(
                    field,
                    format!(
                        "{subject} is not a CA certificate (no basicConstraints CA:TRUE): is a \
                         leaf certificate in the wrong field?"
                    ),
                ));
            }
        }
        let anchor = root || lb.anchor == AnchorMode::Subca;
        hints.push(DistinguishedName::from(c.subject().as_raw().to_vec()));
        issuers.push((c.subject().as_raw().to_vec(), subject.clone(), anchor));
        inv.certs.push(CertFact {
            bundle: lb.name.clone(),
            field: field.clone(),
            role: match (root, anchor) {
                (true, _) => "root CA",
                (false, true) => "SubCA (anchor)",
                (false, false) => "SubCA",
            },
            subject: subject.clone(),
            not_after: c.validity().not_after.timestamp(),
        });
        if anchor {
            roots.add(der.clone()).map_err(|_| {
                err(
                    field,
                    format!("{subject} cannot be used as a trust anchor (unsupported encoding)"),
                )
            })?;
        } else {
            intermediates.push(der.clone());
            intermediate_subjects.push(c.subject().as_raw().to_vec());
        }
    }
    match lb.anchor {
        AnchorMode::Root if self_signed_any.is_none() => {
            let sub = sub_any.map(|(_, s)| s).unwrap_or_default();
            return Err(err(
                format!("{f}.ca_files"),
                format!(
                    "no self-signed Root CA listed (only {sub}): add the Root CA that issued it \
                     so that a revoked SubCA is detected through the root's CRL, or set \
                     `anchor: subca` on this bundle to trust the SubCA itself (a revoked SubCA \
                     then cannot be detected)"
                ),
            ));
        }
        AnchorMode::Subca => {
            if let Some(field) = self_signed_any {
                return Err(err(
                    format!("{f}.anchor"),
                    format!(
                        "`subca` is for bundles without their Root CA, but {field} is a \
                         self-signed root: remove `anchor: subca` (recommended: the root \
                         anchors the chain and SubCA revocation is checked) or the root"
                    ),
                ));
            }
            inv.warnings.push(format!(
                "{f}.anchor: subca: the SubCAs of bundle {:?} are trust anchors, so a revoked \
                 SubCA cannot be detected; list the Root CA instead when you can",
                lb.name
            ));
        }
        AnchorMode::Root => {}
    }
    let pinned = !intermediates.is_empty();
    if pinned && rev.scope == RevocationScope::EndEntity {
        inv.warnings.push(format!(
            "tls.revocation.scope: end_entity: a revoked SubCA of bundle {:?} is not detected \
             (use `chain` with the root's CRL)",
            lb.name
        ));
    }
    for c in &lb.crls {
        if crate::revocation::is_placeholder(c) {
            continue; // stands for "no CRL yet"; the per-CA warnings below say so
        }
        inv.crls.push((lb.name.clone(), c.clone()));
        if !issuers.iter().any(|(raw, _, _)| *raw == c.issuer_raw) {
            inv.warnings.push(format!(
                "{}: CRL {} is issued by {}, which is not a CA of bundle {:?}: it is never used",
                c.field, c.source, c.issuer, lb.name
            ));
        }
    }
    for old in &lb.superseded {
        inv.warnings.push(format!(
            "{}: CRL {} of {} is not used: another CRL of that issuer, at least as new, is \
             configured too; remove the older file",
            old.field, old.source, old.issuer
        ));
    }
    // Fail-closed set-ups that would refuse every client are worth saying out loud.
    if lb.crls.is_empty() {
        // rustls/webpki check no revocation at all for a verifier without CRLs.
        inv.warnings.push(format!(
            "{f}.crl_files: none configured: revocation is NOT checked for bundle {:?} \
             (unknown_status does not apply without CRLs)",
            lb.name
        ));
    } else if rev.unknown_status == UnknownRevocation::Deny && !lb.fetches_crls {
        for (raw, subject, anchor) in &issuers {
            // A CA needs a CRL when something it issues is revocation-checked: with
            // `chain` every CA (roots issue the SubCAs); with `end_entity` only issuers
            // of leaves (the SubCAs, or the root when none is listed).
            let needed = match rev.scope {
                RevocationScope::Chain => true,
                RevocationScope::EndEntity => !pinned || !*anchor,
            };
            if needed && !lb.crls.iter().any(|c| c.issuer_raw == *raw) {
                inv.warnings.push(format!(
                    "{f}.crl_files: no CRL from {subject}: with unknown_status: deny, \
                     certificates it issued are refused (unknown_revocation); add its CRL"
                ));
            }
        }
    }
    // webpki consults the first CRL authoritative for a certificate, and CRLs of one
    // issuer with different Issuing Distribution Points are all kept: the newest goes
    // first, so an older one is consulted only for what the newer does not cover.
    let ordered = crate::revocation::newest_first(&lb.crls);
    for pair in ordered.windows(2) {
        let (newer, older) = (pair[0], pair[1]);
        if newer.issuer_raw == older.issuer_raw
            && crate::revocation::is_older(older, newer)
            && !crate::revocation::is_placeholder(older)
        {
            inv.warnings.push(format!(
                "{}: CRL {} of {} is older than CRL {} of that issuer, whose scope (Issuing \
                 Distribution Point) differs: it is consulted only for certificates outside \
                 that scope; remove it unless the CA still publishes both",
                older.field, older.source, older.issuer, newer.source
            ));
        }
    }
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .with_crls(ordered.iter().map(|c| c.der.clone()));
    if rev.scope == RevocationScope::EndEntity {
        builder = builder.only_check_end_entity_revocation();
    }
    if rev.unknown_status == UnknownRevocation::Allow {
        builder = builder.allow_unknown_revocation_status();
    }
    if rev.enforce_crl_expiry() {
        builder = builder.enforce_revocation_expiration();
    }
    let verifier = builder.build().map_err(|e| {
        err(
            format!("{f}.crl_files"),
            format!("the verifier refused this bundle's CRLs: {e}"),
        )
    })?;
    Ok(Bundle {
        name: lb.name.clone(),
        verifier,
        intermediates,
        pinned,
        intermediate_subjects,
    })
}

/// Accepts a client whose chain verifies against any configured bundle, and refuses
/// chains longer than `max_depth` before doing any signature work.
pub struct BundleVerifier {
    bundles: Vec<Bundle>,
    hints: Vec<DistinguishedName>,
    max_depth: usize,
    /// nextUpdate of every loaded CRL: (file, Unix seconds).
    pub crl_next_updates: Vec<(String, i64)>,
    /// CAs, CRLs and warnings of every bundle.
    pub inventory: TrustInventory,
    /// Fetched CRLs; shown each presented leaf to learn its CRL URL (revocation.rs).
    fetched: crate::revocation::FetchedCrls,
    /// Chains this verifier has accepted ([`Accepted`]).
    accepted: moka::sync::Cache<[u8; 32], Accepted>,
}

/// Most accepted chains remembered per verifier: far more than the client certificates
/// a gateway serves (a few per sending system), at about 100 bytes each.
const ACCEPTED_CHAINS: u64 = 4096;

/// A chain the verifier accepted, and how long that verdict stands. Verifying a chain
/// (path building, two signatures, two CRL signatures with `scope: chain`) is about a
/// tenth of a full RSA-2048 mTLS handshake's CPU (bench/README.md), and the same few
/// client certificates connect again and again. The verdict depends only on the chain's
/// bytes (the key), this verifier's bundles and CRLs (a reload or fetched CRL builds a
/// new verifier, with an empty cache) and the time: it stands until the first notAfter
/// among the certificates sent or the first CRL nextUpdate or CA notAfter of the
/// verifier. Only acceptances are kept; the client's proof that it holds the key
/// (CertificateVerify) is checked in every handshake, outside this verifier's chain check.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    /// Index into `bundles` of the bundle that accepted it.
    bundle: usize,
    /// The latest notBefore among the certificates sent (Unix seconds).
    from: i64,
    /// Stands while the time is before this (Unix seconds).
    until: i64,
}

impl fmt::Debug for BundleVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.bundles.iter().map(|b| b.name.as_str()).collect();
        f.debug_struct("BundleVerifier")
            .field("bundles", &names)
            .field("max_depth", &self.max_depth)
            .finish()
    }
}

impl BundleVerifier {
    pub fn from_config(
        cfg: &TlsConfig,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, ConfigError> {
        Self::from_loaded(cfg, &load_bundles(cfg)?, provider)
    }

    /// Builds the verifier from bundles already read (plus any CRLs added to them).
    pub fn from_loaded(
        cfg: &TlsConfig,
        loaded: &[LoadedBundle],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, ConfigError> {
        let mut inventory = TrustInventory {
            enforce_crl_expiry: cfg.revocation.enforce_crl_expiry(),
            ..Default::default()
        };
        let mut hints = Vec::new();
        let mut bundles = Vec::new();
        for lb in loaded {
            bundles.push(build_bundle(
                lb,
                &cfg.revocation,
                provider,
                &mut inventory,
                &mut hints,
            )?);
        }
        let crl_next_updates = inventory
            .crls
            .iter()
            .filter_map(|(_, c)| c.next_update.map(|n| (c.source.clone(), n)))
            .collect();
        Ok(BundleVerifier {
            bundles,
            hints,
            max_depth: cfg.verify_depth,
            crl_next_updates,
            inventory,
            fetched: cfg.fetched_crls.clone(),
            accepted: moka::sync::Cache::new(ACCEPTED_CHAINS),
        })
    }

    /// The earliest nextUpdate of the CRLs or notAfter of the bundles' CAs at or after
    /// `from` (`i64::MAX`: none): when this verifier's verdicts may next change.
    pub fn next_change_from(&self, from: i64) -> i64 {
        let crls = self.crl_next_updates.iter().map(|(_, t)| *t);
        let cas = (self.inventory.certs.iter())
            .filter(|c| c.bundle != "server")
            .map(|c| c.not_after);
        crls.chain(cas)
            .filter(|t| *t >= from)
            .min()
            .unwrap_or(i64::MAX)
    }

    /// The bundle that accepted this chain, if its verdict still stands at `now`.
    fn accepted(&self, key: &[u8; 32], now: UnixTime) -> Option<usize> {
        let a = self.accepted.get(key)?;
        let now = unix_secs(now);
        (a.from <= now && now < a.until).then_some(a.bundle)
    }

    #[cfg(test)]
    fn remembers(
        &self,
        end_entity: &CertificateDer<'_>,
        sent: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        self.accepted(&chain_key(end_entity, sent), now).is_some()
    }

    /// Remembers that `bundle` accepted the chain at `now` ([`Accepted`]).
    fn accept(
        &self,
        key: [u8; 32],
        bundle: usize,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) {
        let now = unix_secs(now);
        let (mut from, mut until) = (i64::MIN, self.next_change_from(now));
        for der in std::iter::once(end_entity).chain(intermediates) {
            // Unreadable here yet accepted by webpki: not worth remembering.
            let Ok((_, c)) = x509_parser::parse_x509_certificate(der) else {
                return;
            };
            from = from.max(c.validity().not_before.timestamp());
            until = until.min(c.validity().not_after.timestamp());
        }
        if from <= now && now < until {
            self.accepted.insert(
                key,
                Accepted {
                    bundle,
                    from,
                    until,
                },
            );
        }
    }

    /// Name of the bundle a (verified) chain belongs to. With one bundle this is free;
    /// with several, the bundle that accepted it in the handshake (or the chain is
    /// verified again per bundle).
    pub fn bundle_of(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Option<&str> {
        if let [only] = self.bundles.as_slice() {
            return Some(&only.name);
        }
        let now = UnixTime::now();
        if let Some(i) = self.accepted(&chain_key(end_entity, intermediates), now) {
            return Some(&self.bundles[i].name);
        }
        self.bundles
            .iter()
            .find(|b| b.verify(end_entity, intermediates, now).is_ok())
            .map(|b| b.name.as_str())
    }

    /// Verifies a client chain against every bundle separately, with each bundle's
    /// result (for `fhirgate inspect-cert`; the handshake uses the same
    /// [`Bundle::verify`] through [`ClientCertVerifier`]).
    pub fn verify_each(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Vec<(&str, Result<(), rustls::Error>)> {
        let now = UnixTime::now();
        let too_deep = intermediates.len() + 1 > self.max_depth;
        self.bundles
            .iter()
            .map(|b| {
                // The same depth limit the handshake applies first.
                let r = if too_deep {
                    Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                        rustls::OtherError(Arc::new(ChainTooDeep(self.max_depth))),
                    )))
                } else {
                    b.verify(end_entity, intermediates, now).map(|_| ())
                };
                (b.name.as_str(), r)
            })
            .collect()
    }

    fn first(&self) -> &Arc<dyn ClientCertVerifier> {
        // from_config refuses an empty bundle list, so index 0 exists.
        &self.bundles[0].verifier
    }
}

/// Subject, issuer, serial and notAfter of a certificate a client presented, for the
/// log line of a refused handshake.
#[derive(Clone, Debug, Default)]
pub struct PresentedCert {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_after: String,
}

impl PresentedCert {
    /// `None` when the bytes are not a certificate (nothing more to say about them).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
        Some(PresentedCert {
            subject: c.subject().to_string(),
            issuer: c.issuer().to_string(),
            serial: c.raw_serial_as_string(),
            not_after: utc(c.validity().not_after.timestamp()),
        })
    }
}

tokio::task_local! {
    /// Set by the listener around one handshake; the verifier leaves the refused leaf
    /// here so the "handshake refused" line can name it together with the peer.
    pub static REFUSED_CERT: Arc<std::sync::Mutex<Option<PresentedCert>>>;
}

impl ClientCertVerifier for BundleVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.fetched.observe(end_entity);
        if intermediates.len() + 1 > self.max_depth {
            let _ = REFUSED_CERT.try_with(|slot| {
                if let Ok(mut slot) = slot.lock() {
                    *slot = PresentedCert::from_der(end_entity);
                }
            });
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(ChainTooDeep(self.max_depth))),
            )));
        }
        let key = chain_key(end_entity, intermediates);
        if self.accepted(&key, now).is_some() {
            return Ok(ClientCertVerified::assertion());
        }
        let mut best: Option<rustls::Error> = None;
        for (i, b) in self.bundles.iter().enumerate() {
            match b.verify(end_entity, intermediates, now) {
                Ok(v) => {
                    self.accept(key, i, end_entity, intermediates, now);
                    return Ok(v);
                }
                // "Unknown issuer" from one bundle says nothing; a revoked or expired
                // verdict from the bundle that knows the issuer is the one to report.
                Err(e) => {
                    let specific = !matches!(
                        e,
                        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                    );
                    if best.is_none() || specific {
                        best = Some(e);
                    }
                }
            }
        }
        // Only reached on refusal: parse the leaf so the log can name it.
        let _ = REFUSED_CERT.try_with(|slot| {
            if let Ok(mut slot) = slot.lock() {
                *slot = PresentedCert::from_der(end_entity);
            }
        });
        Err(best.unwrap_or(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.first().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.first().supported_verify_schemes()
    }
}

/// The key of a chain in [`BundleVerifier`]'s accepted chains: SHA-256 of every
/// certificate as sent, each after its length, so no two chains share a key.
fn chain_key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for der in std::iter::once(end_entity).chain(intermediates) {
        h.update((der.len() as u64).to_be_bytes());
        h.update(der.as_ref());
    }
    h.finalize().into()
}

/// `t` in Unix seconds, as certificate and CRL times are compared.
pub(crate) fn unix_secs(t: UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

/// The development PKI written to a temporary directory, and a verifier of its one
/// bundle (named `bundle`, with `crl` as the SubCA's CRL file), for unit tests.
#[cfg(test)]
pub(crate) mod dev {
    use super::*;
    use crate::tools::pki::DevPki;

    pub fn pki_dir() -> (DevPki, tempfile::TempDir) {
        let pki = DevPki::generate().expect("pki");
        let dir = tempfile::tempdir().expect("tempdir");
        pki.write_to(dir.path()).expect("write");
        (pki, dir)
    }

    pub fn verifier(dir: &Path, crl: &str, bundle: &str) -> BundleVerifier {
        let yaml = format!(
            "server_cert: {d}/server.crt\nserver_key: {d}/server.key\ntrust_bundles:\n  - name: {bundle}\n    ca_files: [{d}/root-ca.crt, {d}/sub-ca.crt]\n    crl_files: [{d}/{crl}, {d}/root-ca.crl]\n",
            d = dir.display()
        );
        let cfg: TlsConfig = serde_saphyr::from_str(&yaml).expect("tls section");
        BundleVerifier::from_config(&cfg, &provider()).expect("verifier")
    }
}

#[derive(Debug)]
struct ChainTooDeep(usize);

impl fmt::Display for ChainTooDeep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client chain longer than verify_depth {}", self.0)
    }
}

impl std::error::Error for ChainTooDeep {}

/// The gateway's server TLS context and the verifier inside it (kept for
/// [`BundleVerifier::bundle_of`]).
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    pub verifier: Arc<BundleVerifier>,
    /// notAfter of the server leaf (Unix seconds), for expiry alerts.
    pub server_not_after: Option<i64>,
    /// nextUpdate of every CRL (file path, Unix seconds), for expiry alerts.
    pub crl_next_updates: Vec<(String, i64)>,
    /// Every CA, the server certificate and every CRL, for expiry reports.
    pub inventory: TrustInventory,
}

/// Builds the server configuration: TLS 1.2 + 1.3, mandatory client certificates, ALPN
/// `h2` and `http/1.1`, stateful resumption and stateless tickets.
pub fn server_tls(cfg: &TlsConfig) -> Result<ServerTls, ConfigError> {
    server_tls_with(cfg, &load_bundles(cfg)?)
}

/// [`server_tls`] from bundles already read (with any extra CRLs added to them).
pub fn server_tls_with(
    cfg: &TlsConfig,
    bundles: &[LoadedBundle],
) -> Result<ServerTls, ConfigError> {
    let provider = provider();
    let verifier = Arc::new(BundleVerifier::from_loaded(cfg, bundles, &provider)?);
    let chain = load_certs("tls.server_cert", &cfg.server_cert)?;
    let leaf = chain
        .first()
        .and_then(|c| x509_parser::parse_x509_certificate(c).ok().map(|(_, x)| x));
    let server_not_after = leaf.as_ref().map(|x| x.validity().not_after.timestamp());
    let mut inventory = verifier.inventory.clone();
    if let Some(x) = &leaf {
        inventory.certs.insert(
            0,
            CertFact {
                bundle: "server".into(),
                field: "tls.server_cert".into(),
                role: "server certificate",
                subject: x.subject().to_string(),
                not_after: x.validity().not_after.timestamp(),
            },
        );
    }
    drop(leaf);
    let crl_next_updates = verifier.crl_next_updates.clone();
    let key = load_key("tls.server_key", &cfg.server_key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("tls", e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key)
        .map_err(|e| {
            err(
                "tls.server_key",
                match e {
                    rustls::Error::InconsistentKeys(_) => format!(
                        "{} does not match the certificate in tls.server_cert",
                        cfg.server_key.display()
                    ),
                    _ => format!(
                        "{}: not a key rustls can use with tls.server_cert (RSA, ECDSA P-256/P-384 or Ed25519)",
                        cfg.server_key.display()
                    ),
                },
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
        .map_err(|e| err("tls", format!("cannot create session ticketer: {e}")))?;
    Ok(ServerTls {
        config: Arc::new(config),
        verifier,
        server_not_after,
        crl_next_updates,
        inventory,
    })
}

/// Why a TLS handshake ended, as the `result` label of `fhirgate_tls_handshakes_total`
/// and the `kind` of the refusal log line. A closed set: new labels are added here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeKind {
    /// The handshake succeeded and the certificate matched a bundle.
    Ok,
    /// `tls.handshake_timeout` passed.
    Timeout,
    /// The client closed the connection.
    Eof,
    /// Not a TLS record.
    BadRecord,
    /// Another I/O error.
    Io,
    /// No client certificate.
    NoCert,
    /// On a CRL.
    Revoked,
    /// Past notAfter.
    Expired,
    /// Before notBefore.
    NotYetValid,
    /// Chains to no configured bundle.
    UnknownCa,
    /// No clientAuth extended key usage.
    BadPurpose,
    /// No CRL can say (with `unknown_status: deny`).
    UnknownRevocation,
    /// The CRL is past nextUpdate (with `enforce_crl_expiry`).
    ExpiredCrl,
    /// A signature in the chain does not verify.
    BadSignature,
    /// More intermediates than allowed.
    ChainTooDeep,
    /// Any other certificate fault.
    BadCertificate,
    /// No common version, cipher suite or signature scheme.
    Incompatible,
    /// A malformed handshake message.
    BadMessage,
    /// No common ALPN protocol.
    NoAlpn,
    /// Any other TLS error.
    TlsError,
}

impl HandshakeKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [HandshakeKind; 20] = [
        HandshakeKind::Ok,
        HandshakeKind::Timeout,
        HandshakeKind::Eof,
        HandshakeKind::BadRecord,
        HandshakeKind::Io,
        HandshakeKind::NoCert,
        HandshakeKind::Revoked,
        HandshakeKind::Expired,
        HandshakeKind::NotYetValid,
        HandshakeKind::UnknownCa,
        HandshakeKind::BadPurpose,
        HandshakeKind::UnknownRevocation,
        HandshakeKind::ExpiredCrl,
        HandshakeKind::BadSignature,
        HandshakeKind::ChainTooDeep,
        HandshakeKind::BadCertificate,
        HandshakeKind::Incompatible,
        HandshakeKind::BadMessage,
        HandshakeKind::NoAlpn,
        HandshakeKind::TlsError,
    ];

    /// The label, byte-identical to the strings used before this enum existed.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeKind::Ok => "ok",
            HandshakeKind::Timeout => "timeout",
            HandshakeKind::Eof => "eof",
            HandshakeKind::BadRecord => "bad_record",
            HandshakeKind::Io => "io",
            HandshakeKind::NoCert => "no_cert",
            HandshakeKind::Revoked => "revoked",
            HandshakeKind::Expired => "expired",
            HandshakeKind::NotYetValid => "not_yet_valid",
            HandshakeKind::UnknownCa => "unknown_ca",
            HandshakeKind::BadPurpose => "bad_purpose",
            HandshakeKind::UnknownRevocation => "unknown_revocation",
            HandshakeKind::ExpiredCrl => "expired_crl",
            HandshakeKind::BadSignature => "bad_signature",
            HandshakeKind::ChainTooDeep => "chain_too_deep",
            HandshakeKind::BadCertificate => "bad_certificate",
            HandshakeKind::Incompatible => "incompatible",
            HandshakeKind::BadMessage => "bad_message",
            HandshakeKind::NoAlpn => "no_alpn",
            HandshakeKind::TlsError => "tls_error",
        }
    }
}

impl std::fmt::Display for HandshakeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Short, stable label for a failed handshake, for logs and metrics.
pub fn handshake_failure_kind(err: &std::io::Error) -> HandshakeKind {
    let Some(inner) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => HandshakeKind::Eof,
            std::io::ErrorKind::InvalidData => HandshakeKind::BadRecord,
            _ => HandshakeKind::Io,
        };
    };
    rustls_error_kind(inner)
}

/// The label of [`handshake_failure_kind`] for a rustls error itself.
pub fn rustls_error_kind(inner: &rustls::Error) -> HandshakeKind {
    use rustls::Error as E;
    match inner {
        E::NoCertificatesPresented => HandshakeKind::NoCert,
        E::InvalidCertificate(c) => match c {
            CertificateError::Revoked => HandshakeKind::Revoked,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                HandshakeKind::Expired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                HandshakeKind::NotYetValid
            }
            CertificateError::UnknownIssuer => HandshakeKind::UnknownCa,
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                HandshakeKind::BadPurpose
            }
            CertificateError::UnknownRevocationStatus => HandshakeKind::UnknownRevocation,
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => HandshakeKind::ExpiredCrl,
            CertificateError::BadSignature => HandshakeKind::BadSignature,
            CertificateError::Other(o) if o.0.is::<ChainTooDeep>() => HandshakeKind::ChainTooDeep,
            _ => HandshakeKind::BadCertificate,
        },
        E::PeerIncompatible(_) => HandshakeKind::Incompatible,
        E::InvalidMessage(_) => HandshakeKind::BadMessage,
        E::NoApplicationProtocol => HandshakeKind::NoAlpn,
        _ => HandshakeKind::TlsError,
    }
}

// === The `tls:` section of the config ===

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM: the server leaf first, then any intermediates to send.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub trust_bundles: Vec<TrustBundleConfig>,
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// Longest chain accepted from a client, leaf included.
    #[serde(default = "default_verify_depth")]
    pub verify_depth: usize,
    #[serde(
        default = "default_handshake_timeout",
        with = "crate::config::duration"
    )]
    pub handshake_timeout: Duration,
    /// Last good CRLs fetched over HTTP, per bundle: set by the running server (never
    /// read from YAML) so that the verifier is built from files and fetched CRLs alike.
    #[serde(skip)]
    pub fetched_crls: crate::revocation::FetchedCrls,
}

fn default_verify_depth() -> usize {
    4
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A named set of CA certificates, e.g. the NHS INT or PROD Root CA + SubCA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBundleConfig {
    pub name: String,
    /// PEM or DER files with the Root CA and SubCA certificates of this chain. The
    /// self-signed Root CA is the trust anchor; SubCAs are pinned intermediates.
    pub ca_files: Vec<PathBuf>,
    /// PEM or DER CRLs published by the CAs of this chain.
    #[serde(default)]
    pub crl_files: Vec<PathBuf>,
    /// `root` (default): the self-signed Root CA is the anchor. `subca`: the listed
    /// SubCAs are anchors (no Root CA available), so a revoked SubCA cannot be detected.
    #[serde(default)]
    pub anchor: AnchorMode,
    /// http:// URLs the CAs of this chain publish their CRLs at; fetched at start and
    /// every `revocation.refresh_interval` (see [`crate::revocation`]).
    #[serde(default)]
    pub crl_urls: Vec<String>,
}

/// Which configured CA certificates are trust anchors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AnchorMode {
    /// Self-signed roots are anchors; every other CA is a pinned intermediate whose
    /// revocation is checked against its issuer's CRL.
    #[default]
    Root,
    /// Every listed CA is an anchor (opt-in for bundles without their Root CA).
    Subca,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RevocationScope {
    /// Check every certificate of the chain (needs a CRL from each issuing CA).
    #[default]
    Chain,
    /// Check only the client's leaf certificate.
    EndEntity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownRevocation {
    /// A certificate with no CRL from its issuer is refused (fail closed).
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    pub scope: RevocationScope,
    pub unknown_status: UnknownRevocation,
    /// Refuse clients when a CRL is past its nextUpdate. Unset: true outside
    /// `environment: development` ([`Config::from_yaml`] fills it in).
    pub enforce_crl_expiry: Option<bool>,
    /// Warn (log, `check`, `/readyz`) this long before a CRL's nextUpdate.
    #[serde(with = "crate::config::duration")]
    pub warn_before: Duration,
    /// Also fetch the CRLs named in the CRL Distribution Points of the bundle's CAs and
    /// of the client certificates they issued.
    pub fetch_distribution_points: bool,
    /// How often fetched CRLs are refreshed (default 1h); they are also fetched again
    /// shortly before a held CRL's nextUpdate.
    #[serde(with = "crate::config::duration")]
    pub refresh_interval: Duration,
    /// Time allowed for one CRL download, connect to last byte (default 10s).
    #[serde(with = "crate::config::duration")]
    pub fetch_timeout: Duration,
    /// Largest CRL accepted (default 10 MiB).
    pub max_crl_bytes: u64,
    /// Where the last good fetched CRLs are kept across restarts; none: memory only.
    pub cache_dir: Option<PathBuf>,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        RevocationConfig {
            scope: RevocationScope::default(),
            unknown_status: UnknownRevocation::default(),
            enforce_crl_expiry: None,
            warn_before: Duration::from_secs(24 * 3600),
            fetch_distribution_points: false,
            refresh_interval: Duration::from_secs(3600),
            fetch_timeout: Duration::from_secs(10),
            max_crl_bytes: 10 * 1024 * 1024,
            cache_dir: None,
        }
    }
}

impl RevocationConfig {
    /// Whether a CRL past its nextUpdate refuses clients (true unless development set it).
    pub fn enforce_crl_expiry(&self) -> bool {
        self.enforce_crl_expiry.unwrap_or(true)
    }
    pub fn refresh_interval(&self) -> Duration {
        self.refresh_interval
    }
    pub fn fetch_timeout(&self) -> Duration {
        self.fetch_timeout
    }
    pub fn max_crl_bytes(&self) -> u64 {
        self.max_crl_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 5280 §6.1.3 (a)(2)-(3) and §6.3.3 hold at each handshake: a chain accepted
    // once is taken from the verifier's memory only while nothing its verdict rests on
    // can have changed, and is verified again (and refused) from the instant it could.
    #[test]
    fn an_accepted_chain_is_remembered_only_while_its_verdict_stands() {
        let (pki, dir) = dev::pki_dir();
        let v = dev::verifier(dir.path(), "sub-ca.crl", "nhs-int");
        let der = |pem: &str| CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem");
        let (leaf, sub) = (der(&pki.client.cert), der(&pki.sub_ca.cert));
        let at = |secs: i64| UnixTime::since_unix_epoch(Duration::from_secs(secs as u64));
        let now = unix_secs(UnixTime::now());

        assert!(!v.remembers(&leaf, &[], at(now)));
        v.verify_client_cert(&leaf, &[], at(now)).expect("accepted");
        assert!(v.remembers(&leaf, &[], at(now)));
        // The same leaf sent with its SubCA is another chain.
        assert!(!v.remembers(&leaf, std::slice::from_ref(&sub), at(now)));
        // A refused chain is not remembered.
        let revoked = der(&pki.revoked_client.cert);
        assert!(v.verify_client_cert(&revoked, &[], at(now)).is_err());
        assert!(!v.remembers(&revoked, &[], at(now)));

        // The SubCA's CRL comes before the leaf's notAfter: the verdict stands until
        // that CRL's nextUpdate and no later, when it is verified again and refused
        // (the CRL is stale, enforced outside development).
        let next_update = v.next_change_from(now);
        assert!(next_update < i64::MAX);
        assert!(v.remembers(&leaf, &[], at(next_update - 1)));
        assert!(!v.remembers(&leaf, &[], at(next_update)));
        let stale = v.verify_client_cert(&leaf, &[], at(next_update + 1));
        assert!(
            matches!(
                stale,
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredRevocationList
                        | CertificateError::ExpiredRevocationListContext { .. }
                ))
            ),
            "{stale:?}"
        );
        // Nor before the latest notBefore of the chain (a clock set back).
        let not_before = x509_parser::parse_x509_certificate(&leaf)
            .expect("leaf")
            .1
            .validity()
            .not_before
            .timestamp();
        assert!(!v.remembers(&leaf, &[], at(not_before - 1)));
    }

    /// The handshake labels are the metric's label values: fixed, distinct, snake_case.
    #[test]
    fn handshake_kinds_are_the_documented_labels() {
        let labels: Vec<&str> = HandshakeKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            labels.join(","),
            "ok,timeout,eof,bad_record,io,no_cert,revoked,expired,not_yet_valid,unknown_ca,bad_purpose,unknown_revocation,expired_crl,bad_signature,chain_too_deep,bad_certificate,incompatible,bad_message,no_alpn,tls_error"
        );
    }

    type Made = (rcgen::CertificateParams, rcgen::KeyPair, rcgen::Certificate);

    fn ca(name: &str, issuer: Option<&Made>) -> Made {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = match issuer {
            None => p.self_signed(&key).unwrap(),
            Some((ip, ik, _)) => p
                .signed_by(&key, &rcgen::Issuer::from_params(ip, ik))
                .unwrap(),
        };
        (p, key, cert)
    }

    #[test]
    fn roots_are_self_signed_subcas_are_not_and_hints_match_rustls_encoding() {
        let made = ca("Root", None);
        let (_, _, sub) = ca("Sub", Some(&made));
        let root = &made.2;
        let parse = |c: &rcgen::Certificate| {
            x509_parser::parse_x509_certificate(c.der())
                .unwrap()
                .1
                .subject()
                .as_raw()
                .to_vec()
        };
        assert!(is_self_signed(
            &x509_parser::parse_x509_certificate(root.der()).unwrap().1
        ));
        assert!(!is_self_signed(
            &x509_parser::parse_x509_certificate(sub.der()).unwrap().1
        ));
        // Our hints (full Name TLV) are what RootCertStore::subjects gives for anchors.
        let mut store = RootCertStore::empty();
        store.add(root.der().clone()).unwrap();
        assert_eq!(store.subjects()[0].as_ref(), parse(root).as_slice());
    }

    #[test]
    fn pem_labels_say_what_a_file_holds() {
        let text = b"-----BEGIN X509 CRL-----\nAA==\n-----END X509 CRL-----\n";
        assert_eq!(pem_labels(text), vec!["X509 CRL".to_owned()]);
        assert!(pem_labels(b"garbage").is_empty());
    }

    #[test]
    fn stale_lists_past_and_soon_crls_and_expiring_certificates_only() {
        let crl = |next: i64| LoadedCrl {
            der: CertificateRevocationListDer::from(vec![]),
            source: format!("crl-{next}"),
            field: "f".into(),
            issuer: "CN=x".into(),
            issuer_raw: vec![],
            this_update: 0,
            next_update: Some(next),
            number: None,
            revoked: 0,
        };
        let cert = |t: i64| CertFact {
            bundle: "b".into(),
            field: "f".into(),
            role: "root CA",
            subject: format!("CN=c{t}"),
            not_after: t,
        };
        let now = 1_000_000;
        let inv = TrustInventory {
            certs: vec![
                cert(now - 1),
                cert(now + 10 * 86_400),
                cert(now + 60 * 86_400),
            ],
            crls: vec![
                ("b".into(), crl(now - 1)),
                ("b".into(), crl(now + 3600)),
                ("b".into(), crl(now + 3 * 86_400)),
            ],
            warnings: vec![],
            enforce_crl_expiry: true,
        };
        let stale = inv.stale(now, 86_400);
        assert_eq!(stale.len(), 4, "{stale:#?}");
        assert!(stale[0].contains("past its nextUpdate") && stale[0].contains("REFUSED"));
        assert!(stale[1].contains("reaches its nextUpdate"));
        assert!(stale[2].contains("EXPIRED"));
        assert!(stale[3].contains(&format!("CN=c{}", now + 10 * 86_400)));
        let r = inv.render(now, 86_400);
        assert_eq!(r.matches("STALE SOON").count(), 1, "{r}");
        assert_eq!(r.matches("  STALE\n").count(), 1, "{r}");
    }
}
