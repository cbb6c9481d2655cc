//! Trust decisions on an openssl-made, NHS-shaped PKI (Root CA → several SubCAs →
//! leaves, `openssl ca` certificates and CRLs, PEM and DER), through real TLS handshakes
//! with the running gateway, `fhirgate check`, `fhirgate inspect-cert` and `/readyz`.

use std::io::{BufRead, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::metric;
use crate::harness::pki::{Alg, Ca, CrlTimes, Issued, Kind, OpensslPki};
use crate::harness::{fhirgate, get, send, upstream, UpstreamMode};
use fhirgate::config::Config;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;

/// Root CA with three SubCAs: A (listed, good), B (not listed), R (listed, revoked in
/// the root's CRL), and a client under each; the server certificate is under A.
struct Nhs {
    pki: OpensslPki,
    root: Ca,
    sub_a: Ca,
    sub_b: Ca,
    sub_r: Ca,
    server: Issued,
    good: Issued,
    other: Issued,
    under_revoked: Issued,
    root_crl: PathBuf,
    a_crl: PathBuf,
    b_crl: PathBuf,
    r_crl: PathBuf,
}

fn nhs() -> Nhs {
    let pki = OpensslPki::new();
    let a = Alg::Rsa2048;
    let root = pki.root("Test NHS Root CA", a);
    let sub_a = pki.sub_ca(&root, "Test NHS SubCA A", a);
    let sub_b = pki.sub_ca(&root, "Test NHS SubCA B", a);
    let sub_r = pki.sub_ca(&root, "Test NHS SubCA R", a);
    let server = pki.server(&sub_a, "server", a);
    let good = pki.client(&sub_a, "good-client", a);
    let other = pki.client(&sub_b, "other-subca-client", a);
    let under_revoked = pki.client(&sub_r, "revoked-subca-client", a);
    pki.revoke(&root, &sub_r.cert);
    // The root's CRL (ARL) in DER, as the NHS publishes it; the SubCA CRLs in PEM.
    let root_crl = pki.der(&pki.crl(&root, CrlTimes::Hours(48)), Kind::Crl);
    let a_crl = pki.crl(&sub_a, CrlTimes::Hours(48));
    let b_crl = pki.crl(&sub_b, CrlTimes::Hours(48));
    let r_crl = pki.crl(&sub_r, CrlTimes::Hours(48));
    Nhs {
        pki,
        root,
        sub_a,
        sub_b,
        sub_r,
        server,
        good,
        other,
        under_revoked,
        root_crl,
        a_crl,
        b_crl,
        r_crl,
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

fn list(paths: &[&Path]) -> String {
    paths.iter().map(|x| p(x)).collect::<Vec<_>>().join(", ")
}

/// A gateway config: one bundle `nhs-int` with `cas` and `crls`, the given environment
/// and extra `tls.revocation` lines.
fn yaml(
    env: &str,
    server: &Issued,
    cas: &[&Path],
    crls: &[&Path],
    bundle_extra: &str,
    revocation: &str,
    upstream: SocketAddr,
) -> String {
    let auth = if env == "production" {
        // Production refuses development auth; tokens are never reached in these tests.
        "auth:\n  mode: jwt\n  issuer: https://127.0.0.1:9\n  expected_issuer: https://127.0.0.1:9\n  expected_audience: fhir\n  jwks_uri: https://127.0.0.1:9/jwks\n  ca_file: "
            .to_owned()
            + &p(&server.chain)
            + "\n"
    } else {
        "auth:\n  mode: development\n".to_owned()
    };
    format!(
        "environment: {env}\n\
listeners:\n  - address: 127.0.0.1:0\n\
tls:\n  server_cert: {sc}\n  server_key: {sk}\n  handshake_timeout: 2s\n  trust_bundles:\n    - name: nhs-int\n      ca_files: [{cas}]\n      crl_files: [{crls}]\n{bundle_extra}  revocation:\n    scope: chain\n{revocation}\
upstream:\n  url: http://{upstream}\n\
{auth}\
routes:\n  - name: all\n    path_prefix: /\n    token: none\n",
        sc = p(&server.chain),
        sk = p(&server.key),
        cas = list(cas),
        crls = list(crls),
    )
}

async fn start(yaml: &str) -> (fhirgate::server::Running, SocketAddr) {
    let cfg = Config::from_yaml(yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let running = fhirgate::server::start(&cfg).await.expect("gateway starts");
    let addr = running.addrs[0];
    (running, addr)
}

/// A client trusting `root` and presenting `chain` (PEM, leaf first) with `key`.
fn client(root: &Path, chain: &Path, key: &Path) -> TlsConnector {
    client_of(root, chain, key, rustls::DEFAULT_VERSIONS)
}

/// [`client`] asking for HTTP/2 by ALPN.
fn client_h2(root: &Path, chain: &Path, key: &Path) -> TlsConnector {
    let c = client_of(root, chain, key, rustls::DEFAULT_VERSIONS);
    let mut cfg = (*c.config().clone()).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

/// [`client`] speaking only `versions`. Each connector keeps rustls's default session
/// cache, so its later connections offer to resume.
fn client_of(
    root: &Path,
    chain: &Path,
    key: &Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(root).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(chain)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = fhirgate::tls::provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

/// Status of a GET / as `who` sending `chain`, or the error text when refused.
async fn status(addr: SocketAddr, root: &Path, chain: &Path, key: &Path) -> Result<u16, String> {
    send(&client(root, chain, key), addr, get("/"))
        .await
        .map(|g| g.status.as_u16())
}

/// The same request with curl (OpenSSL) as the client: the status, or `None` when the
/// handshake or request failed.
async fn curl(addr: SocketAddr, cacert: &Path, cert: &Path, key: &Path) -> Option<u16> {
    let args = [
        "-sS".to_owned(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        "--max-time".into(),
        "5".into(),
        "--cacert".into(),
        p(cacert),
        "--cert".into(),
        p(cert),
        "--key".into(),
        p(key),
        format!("https://localhost:{}/", addr.port()),
    ];
    let out = tokio::task::spawn_blocking(move || Command::new("curl").args(&args).output())
        .await
        .unwrap()
        .expect("curl is installed");
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn write_cfg(pki: &OpensslPki, name: &str, yaml: &str) -> String {
    let path = pki.path(name);
    std::fs::write(&path, yaml).unwrap();
    p(&path)
}

/// The verdict line of `inspect-cert --config` for bundle nhs-int.
fn inspect(cfg: &str, cert: &Path) -> String {
    let (ok, out, err) = fhirgate(&["inspect-cert", &p(cert), "--config", cfg]);
    let verdict = out
        .lines()
        .find(|l| l.contains("bundle nhs-int:"))
        .unwrap_or_else(|| panic!("no verdict in {out} {err}"))
        .to_owned();
    // One bundle: the exit status follows its verdict (1 when every bundle refuses).
    assert_eq!(ok, verdict.contains("ACCEPTED"), "{verdict}\n{err}");
    verdict
}

async fn wait_for(gw: &fhirgate::server::Running, sample: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(gw, sample) < want {
        assert!(
            Instant::now() < deadline,
            "{sample} below {want}:\n{}",
            gw.server().metrics().encode()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const REVOKED: &str = "fhirgate_tls_handshakes_total{result=\"revoked\"}";
const UNKNOWN_CA: &str = "fhirgate_tls_handshakes_total{result=\"unknown_ca\"}";
const EXPIRED_CRL: &str = "fhirgate_tls_handshakes_total{result=\"expired_crl\"}";
const EXPIRED: &str = "fhirgate_tls_handshakes_total{result=\"expired\"}";

// RFC 5280 §6.1.3 (a)(3): "At the current time, the certificate is not revoked" holds for
// every certificate of the path but the trust anchor, SubCAs included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subca_revoked_by_the_root_crl_is_refused_leaf_only_and_full_chain() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let cas = [&*n.root.cert, &*n.sub_a.cert, &*n.sub_r.cert];
    let crls = [&*n.root_crl, &*n.a_crl, &*n.r_crl];
    let y = yaml("development", &n.server, &cas, &crls, "", "", up);
    let (gw, addr) = start(&y).await;
    let root = &n.root.cert;

    // A good client of a listed SubCA: 200 sending its leaf only and its full chain.
    assert_eq!(status(addr, root, &n.good.cert, &n.good.key).await, Ok(200));
    assert_eq!(
        status(addr, root, &n.good.chain, &n.good.key).await,
        Ok(200)
    );
    assert_eq!(seen.count(), 2);

    // A client of the SubCA the root revoked: refused either way, as `revoked`.
    let r = &n.under_revoked;
    assert!(status(addr, root, &r.cert, &r.key).await.is_err());
    assert!(status(addr, root, &r.chain, &r.key).await.is_err());
    wait_for(&gw, REVOKED, 2.0).await;
    assert_eq!(
        seen.count(),
        2,
        "nothing from the revoked SubCA reached the upstream"
    );

    // The same with curl (OpenSSL) as the peer.
    assert_eq!(curl(addr, root, &n.good.cert, &n.good.key).await, Some(200));
    assert_eq!(curl(addr, root, &r.cert, &r.key).await, None);
    assert_eq!(curl(addr, root, &r.chain, &r.key).await, None);
    wait_for(&gw, REVOKED, 4.0).await;
    assert_eq!(seen.count(), 3);

    // inspect-cert gives the handshake's verdicts.
    let cfg = write_cfg(&n.pki, "sub.yaml", &y);
    assert!(inspect(&cfg, &n.good.cert).contains("ACCEPTED"));
    assert!(inspect(&cfg, &n.good.chain).contains("ACCEPTED"));
    for f in [&r.cert, &r.chain] {
        let v = inspect(&cfg, f);
        assert!(v.contains("refused (revoked"), "{v}");
    }
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Two CRLs of one issuer in `crl_files` (last month's file left beside this month's,
/// or both in one PEM): the newer counts, whichever comes first. RFC 5280 §5.2.3: CRL
/// numbers are "monotonically increasing"; webpki would use the first CRL whose issuer
/// matches, so the gateway keeps only the newer of the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_crls_from_one_issuer_the_newer_counts_whatever_their_order() {
    let n = nhs();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let old = n.a_crl.clone();
    n.pki.revoke(&n.sub_a, &n.good.cert);
    let new = n.pki.crl(&n.sub_a, CrlTimes::Hours(48));
    let both_old_first = n.pki.path("both.crl.pem");
    let mut joined = std::fs::read(&old).unwrap();
    joined.extend(std::fs::read(&new).unwrap());
    std::fs::write(&both_old_first, joined).unwrap();
    let cas = [&*n.root.cert, &*n.sub_a.cert];
    let cases: [(&str, Vec<&Path>, bool); 4] = [
        ("the old CRL alone", vec![&n.root_crl, &old], true),
        (
            "old file listed first",
            vec![&n.root_crl, &old, &new],
            false,
        ),
        (
            "new file listed first",
            vec![&n.root_crl, &new, &old],
            false,
        ),
        (
            "both in one PEM, old first",
            vec![&n.root_crl, &both_old_first],
            false,
        ),
    ];
    for (i, (what, crls, served)) in cases.into_iter().enumerate() {
        let y = yaml("development", &n.server, &cas, &crls, "", "", up);
        let (gw, addr) = start(&y).await;
        let got = status(addr, &n.root.cert, &n.good.cert, &n.good.key).await;
        assert_eq!(got.is_ok(), served, "{what}: {got:?}");
        gw.shutdown(Duration::from_secs(2)).await;
        // The CRL not used is named, so the operator can remove it.
        let cfg = write_cfg(&n.pki, &format!("two-crls-{i}.yaml"), &y);
        let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
        assert!(ok, "{what}: {err}");
        let unused = match i {
            0 => None,
            3 => Some(&both_old_first),
            _ => Some(&old),
        };
        let line = out
            .lines()
            .find(|l| l.contains("is not used: another CRL of that issuer, at least as new"));
        match (unused, line) {
            (None, None) => {}
            (Some(p), Some(l)) => assert!(l.contains(&p.display().to_string()), "{what}: {l}"),
            _ => panic!("{what}: expected {unused:?} named unused: {out}"),
        }
    }
}

/// RFC 5280 §5.2.3: "CRL number is a non-critical CRL extension that conveys a
/// monotonically increasing sequence number for a given CRL scope and CRL issuer", and
/// webpki consults the first CRL authoritative for a certificate. Two CRLs of one
/// issuer whose Issuing Distribution Points differ are both kept: the newer, which
/// revokes the leaf, must win whatever the order of the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_crl_with_another_scope_is_not_hidden_by_an_older_one_of_its_issuer() {
    let n = nhs();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    // Old: no Issuing Distribution Point, nothing revoked. New: end-entity certificates
    // only, revoking the client. Both in DER, as CAs publish them.
    let old = n.pki.der(&n.a_crl, Kind::Crl);
    n.pki.revoke(&n.sub_a, &n.good.cert);
    let new = n.pki.der(
        &n.pki.crl_only_user(&n.sub_a, CrlTimes::Hours(48)),
        Kind::Crl,
    );
    let cas = [&*n.root.cert, &*n.sub_a.cert];
    let cases: [(&str, Vec<&Path>, bool); 4] = [
        ("the old CRL alone", vec![&n.root_crl, &old], true),
        ("the new CRL alone", vec![&n.root_crl, &new], false),
        (
            "old file listed first",
            vec![&n.root_crl, &old, &new],
            false,
        ),
        (
            "new file listed first",
            vec![&n.root_crl, &new, &old],
            false,
        ),
    ];
    for (i, (what, crls, served)) in cases.into_iter().enumerate() {
        let y = yaml("development", &n.server, &cas, &crls, "", "", up);
        let (gw, addr) = start(&y).await;
        let got = status(addr, &n.root.cert, &n.good.cert, &n.good.key).await;
        assert_eq!(got.is_ok(), served, "{what}: {got:?}");
        gw.shutdown(Duration::from_secs(2)).await;
        let cfg = write_cfg(&n.pki, &format!("two-scopes-{i}.yaml"), &y);
        let verdict = inspect(&cfg, &n.good.cert);
        assert_eq!(verdict.contains("ACCEPTED"), served, "{what}: {verdict}");
        // The older CRL is still consulted for what the newer does not cover (a CA
        // certificate of SubCA A's), so `check` names it rather than it being dropped.
        let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
        assert!(ok, "{what}: {err}");
        let line = out.lines().find(|l| l.contains("is older than CRL"));
        match (i, line) {
            (0 | 1, None) => {}
            (2 | 3, Some(l)) => assert!(
                l.contains(&p(&old)) && l.contains(&p(&new)) && l.contains("scope"),
                "{what}: {l}"
            ),
            _ => panic!("{what}: unexpected warning {line:?}: {out}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_of_an_unlisted_subca_of_the_listed_root_is_refused_whatever_unknown_status() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let root = &n.root.cert;
    let direct = n.pki.client(&n.root, "root-issued-client", Alg::Rsa2048);
    for unknown in ["allow", "deny"] {
        // The bundle pins SubCA A; B is another SubCA of the same root, and its CRL is
        // even configured: the client sends B with its leaf, and is still refused.
        let cas = [&*n.root.cert, &*n.sub_a.cert];
        let crls = [&*n.root_crl, &*n.a_crl, &*n.b_crl];
        let rev = format!("    unknown_status: {unknown}\n");
        let y = yaml("development", &n.server, &cas, &crls, "", &rev, up);
        let (gw, addr) = start(&y).await;
        let before = seen.count();
        assert_eq!(status(addr, root, &n.good.cert, &n.good.key).await, Ok(200));
        assert!(status(addr, root, &n.other.chain, &n.other.key)
            .await
            .is_err());
        assert!(status(addr, root, &n.other.cert, &n.other.key)
            .await
            .is_err());
        // Nor a leaf the root issued itself: it is not under a listed SubCA.
        assert!(status(addr, root, &direct.cert, &direct.key).await.is_err());
        wait_for(&gw, UNKNOWN_CA, 3.0).await;
        assert_eq!(seen.count(), before + 1, "unknown_status: {unknown}");
        let cfg = write_cfg(&n.pki, &format!("pin-{unknown}.yaml"), &y);
        let v = inspect(&cfg, &n.other.chain);
        assert!(v.contains("refused (unknown_ca"), "{unknown}: {v}");
        let v = inspect(&cfg, &direct.cert);
        assert!(v.contains("refused (unknown_ca"), "{unknown}: {v}");
        gw.shutdown(Duration::from_secs(2)).await;
    }
}

#[test]
fn a_bundle_without_its_root_is_an_error_unless_anchor_subca_which_check_warns_about() {
    let n = nhs();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let y = yaml(
        "development",
        &n.server,
        &[&n.sub_a.cert],
        &[&n.a_crl],
        "",
        "",
        up,
    );
    let cfg = write_cfg(&n.pki, "noroot.yaml", &y);
    let (ok, _, err) = fhirgate(&["check", "--config", &cfg]);
    assert!(!ok);
    assert!(
        err.contains("tls.trust_bundles[0].ca_files: no self-signed Root CA listed"),
        "{err}"
    );
    assert!(err.contains("anchor: subca"), "{err}");

    let y = yaml(
        "development",
        &n.server,
        &[&n.sub_a.cert],
        &[&n.a_crl],
        "      anchor: subca\n",
        "",
        up,
    );
    let cfg = write_cfg(&n.pki, "subca.yaml", &y);
    let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
    assert!(ok, "{err}");
    assert!(
        out.contains("WARNING: tls.trust_bundles[0].anchor: subca")
            && out.contains("a revoked SubCA cannot be detected"),
        "{out}"
    );
    // inspect-cert accepts the SubCA's client and repeats the caveat.
    let (ok, out, err) = fhirgate(&["inspect-cert", &p(&n.good.cert), "--config", &cfg]);
    assert!(ok, "{err}");
    assert!(out.contains("bundle nhs-int: ACCEPTED"), "{out}");
    assert!(
        out.contains("note: tls.trust_bundles[0].anchor: subca"),
        "{out}"
    );

    // `anchor: subca` with the root listed as well is contradictory.
    let y = yaml(
        "development",
        &n.server,
        &[&n.root.cert, &n.sub_a.cert],
        &[&n.a_crl],
        "      anchor: subca\n",
        "",
        up,
    );
    let cfg = write_cfg(&n.pki, "subca-root.yaml", &y);
    let (ok, _, err) = fhirgate(&["check", "--config", &cfg]);
    assert!(!ok && err.contains("tls.trust_bundles[0].anchor:"), "{err}");
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Sleeps until a second after `t` (Unix seconds), so that `t` is in the past for a
/// validity check with one-second resolution.
async fn past(t: i64) {
    while now() <= t + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// RFC 5280 §5.1.2.5: nextUpdate "indicates the date by which the next CRL will be issued";
// past it, the CRL no longer says whether a certificate is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_crl_is_flagged_by_check_and_refuses_clients_outside_development() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let stale = n.pki.crl(
        &n.sub_a,
        CrlTimes::At {
            last: now() - 2 * 86_400,
            next: now() - 3600,
        },
    );
    let cas = [&*n.root.cert, &*n.sub_a.cert];
    let crls = [&*n.root_crl, &*stale];
    let root = &n.root.cert;

    // check: the stale CRL is listed with its nextUpdate and flagged; the CAs' notAfter too.
    let y = yaml("development", &n.server, &cas, &crls, "", "", up);
    let cfg = write_cfg(&n.pki, "stale.yaml", &y);
    let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("CRL [nhs-int]") && l.contains(&p(&stale)))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.ends_with("STALE"), "{line}");
    assert!(
        out.lines().any(|l| l.starts_with("CRL [nhs-int]")
            && l.contains(&p(&n.root_crl))
            && !l.contains("STALE")),
        "the current root CRL is not flagged: {out}"
    );
    assert!(
        out.contains("WARNING: CRL") && out.contains("past its nextUpdate"),
        "{out}"
    );
    assert!(
        out.contains(
            "certificate [nhs-int] root CA O=fhirgate test, CN=Test NHS Root CA: notAfter"
        ),
        "{out}"
    );
    assert!(
        out.contains("certificate [server] server certificate"),
        "{out}"
    );
    assert!(
        out.contains("enforce_crl_expiry=false"),
        "development default: {out}"
    );

    // Development: served, with the warning above.
    let (gw, addr) = start(&y).await;
    assert_eq!(status(addr, root, &n.good.cert, &n.good.key).await, Ok(200));
    assert!(!gw.server().trust_stale().is_empty());
    gw.shutdown(Duration::from_secs(2)).await;

    // Integration and production (no enforce_crl_expiry set): refused, as `expired_crl`.
    for env in ["integration", "production"] {
        let y = yaml(env, &n.server, &cas, &crls, "", "", up);
        let (gw, addr) = start(&y).await;
        let before = seen.count();
        assert!(
            status(addr, root, &n.good.cert, &n.good.key).await.is_err(),
            "{env}"
        );
        wait_for(&gw, EXPIRED_CRL, 1.0).await;
        assert_eq!(seen.count(), before, "{env}");
        gw.shutdown(Duration::from_secs(2)).await;
    }

    // A CRL within warn_before of its nextUpdate is flagged as soon-stale, not stale.
    let soon = n.pki.crl(&n.sub_a, CrlTimes::Hours(2));
    let y = yaml(
        "development",
        &n.server,
        &cas,
        &[&n.root_crl, &soon],
        "",
        "    warn_before: 3h\n",
        up,
    );
    let cfg = write_cfg(&n.pki, "soon.yaml", &y);
    let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
    assert!(ok, "{err}");
    assert!(out.contains("STALE SOON"), "{out}");
    assert!(out.contains("reaches its nextUpdate"), "{out}");
}

/// The real binary, its stderr collected line by line.
struct Proc {
    child: std::process::Child,
    log: Arc<Mutex<String>>,
    tls: SocketAddr,
    admin: SocketAddr,
}

impl Proc {
    // The child is killed and waited for by `Drop` (or before the panic below).
    #[allow(clippy::zombie_processes)]
    fn start(cfg: &str) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
            .args(["run", "--config", cfg])
            .env("FHIRGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("fhirgate runs");
        let log = Arc::new(Mutex::new(String::new()));
        let l = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let addr_after = |text: &str, msg: &str| -> Option<SocketAddr> {
            let line = text.lines().find(|l| l.contains(msg))?;
            let a = line.split("address=").nth(1)?;
            a.split_whitespace().next()?.parse().ok()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = log.lock().unwrap().clone();
            if let (Some(tls), Some(admin)) = (
                addr_after(&text, "listening (TLS-MA)"),
                addr_after(&text, "admin listener"),
            ) {
                return Proc {
                    child,
                    log,
                    tls,
                    admin,
                };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("gateway did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, path: &str) -> String {
        let mut s = std::net::TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// Waits (up to 5 s) for a log line containing every one of `parts`.
    fn wait_log(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = self.log.lock().unwrap().clone();
            if let Some(l) = text.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {parts:?} in\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_lists_stale_crls_and_refusals_name_the_certificate() {
    let n = nhs();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    let stale = n.pki.crl(
        &n.sub_a,
        CrlTimes::At {
            last: now() - 2 * 86_400,
            next: now() - 3600,
        },
    );
    let y = yaml(
        "development",
        &n.server,
        &[&n.root.cert, &n.sub_a.cert, &n.sub_r.cert],
        &[&n.root_crl, &stale, &n.r_crl],
        "",
        "",
        up,
    ) + "admin:\n  address: 127.0.0.1:0\n";
    let cfg = write_cfg(&n.pki, "run.yaml", &y);
    let gw = Proc::start(&cfg);

    // Start-up WARN for the stale CRL.
    gw.wait_log(&["WARN", "past its nextUpdate", &p(&stale)]);
    // /readyz stays 200 (the gateway serves) and names the stale CRL.
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let r = gw.get("/readyz");
        if r.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("certificates_and_crls: ok (STALE: CRL") && body.contains(&p(&stale)),
        "{body}"
    );
    // The CA notAfter gauges, by bundle and subject.
    let metrics = gw.get("/metrics");
    assert!(
        metrics.contains(
            "fhirgate_cert_not_after_seconds{bundle=\"nhs-int\",subject=\"CN=Test NHS SubCA A, O=fhirgate test\"}"
        ),
        "{metrics}"
    );

    // Refusals name the presented certificate: subject, issuer, serial, notAfter, reason.
    let root = &n.root.cert;
    assert!(status(gw.tls, root, &n.other.chain, &n.other.key)
        .await
        .is_err());
    let line = gw.wait_log(&["handshake refused", "CN=other-subca-client"]);
    let serial = {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in", &p(&n.other.cert)])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        s.trim_start_matches("serial=").to_ascii_lowercase()
    };
    assert!(
        line.contains("kind=\"unknown_ca\"") || line.contains("kind=unknown_ca"),
        "{line}"
    );
    assert!(line.contains("issuer=CN=Test NHS SubCA B"), "{line}");
    assert!(
        line.to_ascii_lowercase().replace(':', "").contains(&serial),
        "serial {serial}: {line}"
    );
    assert!(line.contains("not_after="), "{line}");
    assert!(
        status(gw.tls, root, &n.under_revoked.cert, &n.under_revoked.key)
            .await
            .is_err()
    );
    let line = gw.wait_log(&["handshake refused", "CN=revoked-subca-client"]);
    assert!(line.contains("revoked"), "{line}");
}

/// One chain of `alg`: root and SubCA, a server and a client certificate.
struct Chain {
    root: Ca,
    sub: Ca,
    server: Issued,
    client: Issued,
}

fn chain(pki: &OpensslPki, tag: &str, alg: Alg) -> Chain {
    let root = pki.root(&format!("{tag} Root"), alg);
    let sub = pki.sub_ca(&root, &format!("{tag} SubCA"), alg);
    let server = pki.server(&sub, &format!("{tag}-server"), alg);
    let client = pki.client(&sub, &format!("{tag}-client"), alg);
    Chain {
        root,
        sub,
        server,
        client,
    }
}

// Real NHS files: RSA-2048 and RSA-4096 (NHS roots), ECDSA P-256; DER and PEM for CA
// files, CRLs and the server certificate; PKCS#1, SEC1 and PKCS#8 keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_2048_4096_and_ecdsa_chains_in_der_and_pem_with_pkcs1_and_pkcs8_keys() {
    let pki = OpensslPki::new();
    let (up, _seen) = upstream(UpstreamMode::Echo).await;
    for (tag, alg, der, traditional) in [
        ("rsa2048", Alg::Rsa2048, true, true),
        ("rsa4096", Alg::Rsa4096, false, false),
        ("ecdsa", Alg::EcP256, true, true),
    ] {
        let c = chain(&pki, tag, alg);
        let root_crl = pki.crl(&c.root, CrlTimes::Hours(48));
        let sub_crl = pki.crl(&c.sub, CrlTimes::Hours(48));
        let (root, sub, root_crl, sub_crl) = if der {
            (
                pki.der(&c.root.cert, Kind::Cert),
                pki.der(&c.sub.cert, Kind::Cert),
                pki.der(&root_crl, Kind::Crl),
                pki.der(&sub_crl, Kind::Crl),
            )
        } else {
            (c.root.cert.clone(), c.sub.cert.clone(), root_crl, sub_crl)
        };
        let mut server = c.server.clone();
        let mut client_key = c.client.key.clone();
        if traditional {
            // PKCS#1 `RSA PRIVATE KEY` / SEC1 `EC PRIVATE KEY`, as older NHS tooling writes.
            server.key = pki.traditional_key(&c.server.key);
            client_key = pki.traditional_key(&c.client.key);
            let head = std::fs::read_to_string(&server.key).unwrap();
            assert!(
                head.starts_with("-----BEGIN RSA PRIVATE KEY")
                    || head.starts_with("-----BEGIN EC PRIVATE KEY"),
                "{head}"
            );
        }
        if der {
            // A DER server certificate holds the leaf alone.
            server.chain = pki.der(&c.server.cert, Kind::Cert);
        } else {
            // A DER PKCS#8 key.
            server.key = pki.der(&c.server.key, Kind::Key);
        }
        let y = yaml(
            "development",
            &server,
            &[&root, &sub],
            &[&root_crl, &sub_crl],
            "",
            "",
            up,
        );
        let cfg = write_cfg(&pki, &format!("{tag}.yaml"), &y);
        let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
        assert!(ok, "{tag}: {err}");
        assert!(out.contains("is valid"), "{tag}: {out}");
        let (gw, addr) = start(&y).await;
        assert_eq!(
            curl(addr, &c.sub.chain, &c.client.cert, &client_key).await,
            Some(200),
            "{tag} with curl"
        );
        assert_eq!(
            status(addr, &c.sub.chain, &c.client.cert, &client_key).await,
            Ok(200),
            "{tag}"
        );
        assert_eq!(
            status(addr, &c.sub.chain, &c.client.chain, &client_key).await,
            Ok(200),
            "{tag}"
        );
        gw.shutdown(Duration::from_secs(2)).await;
    }
}

#[test]
fn unusable_certificate_key_and_crl_files_get_clear_errors_naming_file_and_field() {
    let n = nhs();
    let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cas = [&*n.root.cert, &*n.sub_a.cert];
    let check = |name: &str, server: &Issued, cas: &[&Path], crls: &[&Path]| -> String {
        let y = yaml("development", server, cas, crls, "", "", up);
        let cfg = write_cfg(&n.pki, name, &y);
        let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
        assert!(!ok, "{name} passed: {out}");
        // No Rust debug text: no struct or enum dumps.
        for bad in [
            "{",
            "Der(",
            "UnexpectedTag",
            "ParseError",
            "Some(",
            "Error(",
        ] {
            assert!(!err.contains(bad), "{name}: debug text {bad:?} in {err}");
        }
        err
    };

    // An encrypted key: say so, and how to decrypt it.
    let mut enc = n.server.clone();
    enc.key = n.pki.encrypted_key(&n.server.key);
    let e = check("enc.yaml", &enc, &cas, &[&n.root_crl, &n.a_crl]);
    assert!(
        e.contains("tls.server_key:") && e.contains(&p(&enc.key)),
        "{e}"
    );
    assert!(
        e.contains("encrypted") && e.contains("openssl pkey -in"),
        "{e}"
    );

    // A version 1 CRL.
    let v1 = n.pki.crl_v1(&n.sub_a);
    let e = check("v1.yaml", &n.server, &cas, &[&n.root_crl, &v1]);
    assert!(
        e.contains("tls.trust_bundles[0].crl_files[1]:")
            && e.contains(&p(&v1))
            && e.contains("version 1 CRLs are not supported (RFC 5280 requires v2)"),
        "{e}"
    );

    // CRLs a CA may publish that the handshake's verifier (webpki) cannot use: each is
    // refused at load with its file and what to configure instead, never taken as if
    // it revoked nothing. RFC 5280 §5.2.4: a delta CRL holds only changes "since the
    // issuance of a referenced base CRL"; §5.2.5: the Issuing Distribution Point's
    // onlySomeReasons and indirectCRL narrow or widen what the CRL covers.
    let kinds = [
        (
            "a delta CRL",
            // deltaCRLIndicator (2.5.29.27), base CRL number 1: openssl has no text form.
            "2.5.29.27 = critical, DER:02:01:01",
            "",
            "delta CRLs are not supported: configure the CA's full (base) CRL",
        ),
        (
            "an indirect CRL",
            "issuingDistributionPoint = critical, @idp",
            "[ idp ]\nfullname = URI:http://crl.invalid/a.crl\nindirectCRL = TRUE\n",
            "indirect CRLs (entries for another CA's certificates) are not supported",
        ),
        (
            "a CRL for some reasons only",
            "issuingDistributionPoint = critical, @idp",
            "[ idp ]\nfullname = URI:http://crl.invalid/a.crl\nonlysomereasons = keyCompromise\n",
            "onlySomeReasons) are not supported",
        ),
        (
            "an Issuing Distribution Point without a name",
            "issuingDistributionPoint = critical, @idp",
            "[ idp ]\nonlyuser = TRUE\n",
            "names no distribution point URI",
        ),
    ];
    for (i, (what, ext, sections, says)) in kinds.into_iter().enumerate() {
        let crl = n.pki.crl_with(&n.sub_a, CrlTimes::Hours(24), ext, sections);
        let der = n.pki.der(&crl, Kind::Crl);
        for (form, file) in [("PEM", &crl), ("DER", &der)] {
            let e = check(
                &format!("kind-{i}.yaml"),
                &n.server,
                &cas,
                &[&n.root_crl, file],
            );
            assert!(
                e.contains("tls.trust_bundles[0].crl_files[1]:")
                    && e.contains(&p(file))
                    && e.contains(says),
                "{what} ({form}): {e}"
            );
        }
    }

    // Garbage CRLs: text, and bytes that start like DER.
    let junk = n.pki.path("junk.crl");
    std::fs::write(&junk, "this is not a CRL\n").unwrap();
    let e = check("junk.yaml", &n.server, &cas, &[&junk]);
    assert!(
        e.contains("tls.trust_bundles[0].crl_files[0]:")
            && e.contains(&p(&junk))
            && e.contains("no X509 CRL found"),
        "{e}"
    );
    let junk_der = n.pki.path("junk.der.crl");
    std::fs::write(&junk_der, [0x30, 0x03, 0x02, 0x01, 0x05]).unwrap();
    let e = check("junkder.yaml", &n.server, &cas, &[&junk_der]);
    assert!(
        e.contains("crl_files[0]:") && e.contains("not a valid CRL"),
        "{e}"
    );
    // A certificate where a CRL belongs.
    let e = check("swap.yaml", &n.server, &cas, &[&n.sub_b.cert]);
    assert!(
        e.contains("crl_files[0]:") && e.contains("CERTIFICATE") && e.contains("wrong field"),
        "{e}"
    );

    // Garbage CA file, PEM and DER-looking.
    let junk_ca = n.pki.path("junk-ca.pem");
    std::fs::write(
        &junk_ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let e = check(
        "junkca.yaml",
        &n.server,
        &[&n.root.cert, &junk_ca],
        &[&n.a_crl],
    );
    assert!(
        e.contains("tls.trust_bundles[0].ca_files[1]:") && e.contains(&p(&junk_ca)),
        "{e}"
    );
    let e = check("derca.yaml", &n.server, &[&junk_der], &[&n.a_crl]);
    assert!(
        e.contains("tls.trust_bundles[0].ca_files[0]:")
            && e.contains("not a valid X.509 certificate"),
        "{e}"
    );

    // A key that is not the server certificate's.
    let mut wrong = n.server.clone();
    wrong.key = n.good.key.clone();
    let e = check("wrongkey.yaml", &wrong, &cas, &[&n.a_crl]);
    assert!(
        e.contains("tls.server_key:") && e.contains("does not match"),
        "{e}"
    );
    let _ = (&n.sub_r, &n.b_crl, &n.r_crl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_only_bundle_uses_client_intermediates_and_still_checks_them() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let root = &n.root.cert;
    // No SubCA listed: everything under the root is trusted, so paths are built from
    // what the client sends, and every SubCA in them is checked against the root's CRL.
    let y = yaml(
        "development",
        &n.server,
        &[root],
        &[&n.root_crl, &n.a_crl, &n.b_crl, &n.r_crl],
        "",
        "",
        up,
    );
    let (gw, addr) = start(&y).await;
    // The server certificate is under SubCA A, so this client trusts A's chain.
    let trust = &n.sub_a.chain;
    assert_eq!(
        status(addr, trust, &n.good.chain, &n.good.key).await,
        Ok(200)
    );
    assert_eq!(
        status(addr, trust, &n.other.chain, &n.other.key).await,
        Ok(200)
    );
    // Here a leaf the root issued itself is accepted: nothing narrower was configured.
    let direct = n.pki.client(&n.root, "root-issued-client", Alg::Rsa2048);
    assert_eq!(
        status(addr, trust, &direct.cert, &direct.key).await,
        Ok(200)
    );
    // A SubCA's leaf alone cannot be chained to the root.
    assert!(status(addr, trust, &n.good.cert, &n.good.key)
        .await
        .is_err());
    wait_for(&gw, UNKNOWN_CA, 1.0).await;
    let r = &n.under_revoked;
    assert!(status(addr, trust, &r.chain, &r.key).await.is_err());
    wait_for(&gw, REVOKED, 1.0).await;
    assert_eq!(seen.count(), 3);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_root_crl_chain_scope_fails_closed_and_check_says_why() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let y = yaml(
        "development",
        &n.server,
        &[&n.root.cert, &n.sub_a.cert],
        &[&n.a_crl],
        "",
        "",
        up,
    );
    let cfg = write_cfg(&n.pki, "noarl.yaml", &y);
    let (ok, out, err) = fhirgate(&["check", "--config", &cfg]);
    assert!(ok, "{err}");
    assert!(
        out.contains("WARNING: tls.trust_bundles[0].crl_files: no CRL from O=fhirgate test, CN=Test NHS Root CA"),
        "{out}"
    );
    // unknown_status: deny and no CRL from the root: the SubCA's status is unknown, so
    // its clients are refused rather than waved through.
    let (gw, addr) = start(&y).await;
    assert!(status(addr, &n.root.cert, &n.good.cert, &n.good.key)
        .await
        .is_err());
    wait_for(
        &gw,
        "fhirgate_tls_handshakes_total{result=\"unknown_revocation\"}",
        1.0,
    )
    .await;
    assert_eq!(seen.count(), 0);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A gateway trusting SubCA A of [`nhs`], and a client certificate of A that expires
/// `until` (8 s from now), for the tests of certificates that lapse after the handshake.
struct Lapsing {
    n: Nhs,
    up: SocketAddr,
    seen: crate::harness::Seen,
    gw: fhirgate::server::Running,
    addr: SocketAddr,
    brief: Issued,
    until: i64,
}

async fn lapsing() -> Lapsing {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = start(&lapsing_yaml(&n, &n.a_crl, up)).await;
    let until = now() + 8;
    let brief = n
        .pki
        .client_until(&n.sub_a, "brief-client", Alg::Rsa2048, until);
    Lapsing {
        n,
        up,
        seen,
        gw,
        addr,
        brief,
        until,
    }
}

/// Revokes `n.good` in SubCA A's database and reloads `gw` with A's new CRL (and
/// `extra` config lines).
fn revoke_good_and_reload(n: &Nhs, gw: &fhirgate::server::Running, up: SocketAddr, extra: &str) {
    n.pki.revoke(&n.sub_a, &n.good.cert);
    let a_crl = n.pki.crl(&n.sub_a, CrlTimes::Hours(48));
    reload(gw, lapsing_yaml(n, &a_crl, up) + extra);
}

/// Reloads `gw` with `yaml`, as SIGHUP would.
fn reload(gw: &fhirgate::server::Running, yaml: String) {
    let cfg = Config::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    gw.server().reload(&cfg).expect("reload");
}

fn lapsing_yaml(n: &Nhs, a_crl: &Path, up: SocketAddr) -> String {
    let cas = [&*n.root.cert, &*n.sub_a.cert];
    yaml(
        "development",
        &n.server,
        &cas,
        &[&*n.root_crl, a_crl],
        "",
        "",
        up,
    )
}

impl Lapsing {
    /// Revokes `n.good` in SubCA A's database and reloads with A's new CRL.
    fn revoke_good_and_reload(&self) {
        revoke_good_and_reload(&self.n, &self.gw, self.up, "");
    }

    /// Sleeps until `brief` has expired.
    async fn past_not_after(&self) {
        past(self.until).await;
    }
}

/// openssl s_client as the peer, HTTP/1.1 `GET /` with `Connection: close`, saving the
/// session to `sess_out` or offering the one in `sess_in`; everything it printed.
async fn s_client(addr: SocketAddr, root: &Path, who: &Issued, sess: (&str, &Path)) -> String {
    let args = [
        "s_client".to_owned(),
        "-connect".into(),
        addr.to_string(),
        "-servername".into(),
        "localhost".into(),
        "-tls1_3".into(),
        "-CAfile".into(),
        p(root),
        "-cert".into(),
        p(&who.cert),
        "-key".into(),
        p(&who.key),
        sess.0.into(),
        p(sess.1),
        "-ign_eof".into(),
    ];
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("openssl")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("openssl is installed");
        let mut stdin = child.stdin.take().expect("stdin");
        let _ = stdin.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        drop(stdin);
        let out = child.wait_with_output().expect("s_client ran");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
    .await
    .unwrap()
}

// RFC 8446 §4.6.1: "It is RECOMMENDED that implementations place limits on the total
// lifetime of such keying material; these limits should take into account the lifetime of
// the peer's certificate, the likelihood of intervening revocation, and the time since the
// peer's online CertificateVerify signature." A resumed session skips the certificate
// check in the handshake, and each resumption is handed a new ticket, so without a check
// of its own the gateway would serve an expired certificate for as long as its holder kept
// resuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumed_after_its_certificate_expired_or_was_revoked_gets_no_answer() {
    let l = lapsing().await;
    let (n, seen, addr, brief) = (&l.n, &l.seen, l.addr, &l.brief);
    let root = &n.root.cert;

    // A certificate that expires a few seconds from now, resumed with TLS 1.3 and 1.2
    // (rustls) and TLS 1.3 (openssl) while it is valid.
    let by_version = [
        (
            "TLS 1.3",
            client_of(root, &brief.cert, &brief.key, &[&rustls::version::TLS13]),
        ),
        (
            "TLS 1.2",
            client_of(root, &brief.cert, &brief.key, &[&rustls::version::TLS12]),
        ),
    ];
    for (v, c) in &by_version {
        let first = send(c, addr, get("/")).await.unwrap();
        assert_eq!((first.status.as_u16(), first.resumed), (200, false), "{v}");
        let again = send(c, addr, get("/")).await.unwrap();
        assert_eq!(
            (again.status.as_u16(), again.resumed),
            (200, true),
            "{v}: resumed"
        );
    }
    let sess = n.pki.path("brief.session");
    let fresh = s_client(addr, root, brief, ("-sess_out", &sess)).await;
    assert!(fresh.contains("HTTP/1.1 200"), "{fresh}");
    let resumed = s_client(addr, root, brief, ("-sess_in", &sess)).await;
    assert!(
        resumed.contains("Reused, TLSv1.3") && resumed.contains("HTTP/1.1 200"),
        "{resumed}"
    );
    assert_eq!(seen.count(), 6);

    // Past its notAfter: each client still resumes at the TLS level, and gets no answer.
    l.past_not_after().await;
    for (v, c) in &by_version {
        let mut tls = crate::harness::connect(c, addr)
            .await
            .unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Resumed),
            "{v}: the client offered its session and the server took it"
        );
        let _ = tls
            .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await;
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(3), tls.read_to_end(&mut got)).await;
        assert!(
            got.is_empty(),
            "{v}: an answer on a resumed session whose certificate has expired: {}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            closed.is_ok(),
            "{v}: the gateway closes the connection at once"
        );
    }
    let resumed = s_client(addr, root, brief, ("-sess_in", &sess)).await;
    assert!(resumed.contains("Reused, TLSv1.3"), "{resumed}");
    assert!(!resumed.contains("HTTP/1.1"), "{resumed}");
    wait_for(&l.gw, EXPIRED, 3.0).await;
    // Without a session to offer, the handshake itself refuses it.
    assert!(status(addr, root, &brief.cert, &brief.key).await.is_err());
    wait_for(&l.gw, EXPIRED, 4.0).await;

    // Revoked after its session was made: the new CRL takes effect on reload, and a
    // client offering a session from before it gets no answer either.
    let c = client_of(root, &n.good.cert, &n.good.key, &[&rustls::version::TLS13]);
    assert_eq!(send(&c, addr, get("/")).await.unwrap().status, 200);
    assert!(send(&c, addr, get("/")).await.unwrap().resumed);
    assert_eq!(seen.count(), 8);
    l.revoke_good_and_reload();
    assert!(send(&c, addr, get("/")).await.is_err());
    wait_for(&l.gw, REVOKED, 1.0).await;
    assert_eq!(
        seen.count(),
        8,
        "nothing reached the upstream after expiry or revocation"
    );
    l.gw.shutdown(Duration::from_secs(2)).await;
}

/// One connection held open by a client, HTTP/1.1 or HTTP/2.
enum Held {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>),
}

impl Held {
    async fn open(connector: &TlsConnector, addr: SocketAddr) -> Held {
        let tls = crate::harness::connect(connector, addr).await.unwrap();
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = hyper_util::rt::TokioIo::new(tls);
        if h2 {
            let (tx, conn) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            Held::H2(tx)
        } else {
            let (tx, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Held::H1(tx)
        }
    }

    /// An HTTP/1.1 and an HTTP/2 connection of `who`, each answered 200 once.
    async fn both(root: &Path, who: &Issued, addr: SocketAddr) -> [Held; 2] {
        let mut held = [
            Held::open(&client(root, &who.cert, &who.key), addr).await,
            Held::open(&client_h2(root, &who.cert, &who.key), addr).await,
        ];
        for h in &mut held {
            assert_eq!(h.get().await.map(|g| g.0), Ok(200));
        }
        held
    }

    /// GET / on this connection: status and body, or the error when it is closed.
    async fn get(&mut self) -> Result<(u16, String), String> {
        let empty = http_body_util::Full::new(bytes::Bytes::new());
        let resp = match self {
            Held::H1(tx) => {
                tx.ready().await.map_err(|e| e.to_string())?;
                let req = http::Request::get("/")
                    .header("host", "localhost")
                    .body(empty);
                tx.send_request(req.unwrap()).await
            }
            Held::H2(tx) => {
                tx.ready().await.map_err(|e| e.to_string())?;
                tx.send_request(
                    http::Request::get("https://localhost/")
                        .body(empty)
                        .unwrap(),
                )
                .await
            }
        }
        .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A refusal of a lapsed certificate: 403 OperationOutcome `REC_FORBIDDEN` naming `kind`.
fn assert_lapsed(got: Result<(u16, String), String>, kind: &str) {
    let (status, body) = got.unwrap();
    assert_eq!(status, 403, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        j["issue"][0]["details"]["coding"][0]["code"], "REC_FORBIDDEN",
        "{j}"
    );
    assert!(
        j["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains(kind),
        "{j}"
    );
}

// RFC 5280 §6.1.3 (a): "(2) The certificate validity period includes the current time.
// (3) At the current time, the certificate is not revoked." On a connection held open,
// the current time is each request's, and the CRLs are those in force then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_whose_certificate_expires_or_is_revoked_gets_no_more_answers() {
    let l = lapsing().await;
    let (n, seen, addr, brief) = (&l.n, &l.seen, l.addr, &l.brief);
    let root = &n.root.cert;

    // HTTP/1.1 and HTTP/2 connections of a certificate about to expire and of one about
    // to be revoked, each answered while its certificate is good.
    let mut held = Vec::new();
    for who in [brief, &n.good] {
        for c in [
            client(root, &who.cert, &who.key),
            client_h2(root, &who.cert, &who.key),
        ] {
            let mut h = Held::open(&c, addr).await;
            assert_eq!(h.get().await.map(|g| g.0), Ok(200));
            held.push(h);
        }
    }
    let [brief_h1, brief_h2, good_h1, good_h2] = &mut held[..] else {
        unreachable!()
    };
    assert_eq!(seen.count(), 4);

    // Revoked by a CRL that arrives on reload: the next request on each connection is
    // refused, HTTP/1.1's connection is closed after it, HTTP/2's keeps being refused.
    l.revoke_good_and_reload();
    assert_lapsed(good_h1.get().await, "revoked");
    assert!(
        good_h1.get().await.is_err(),
        "HTTP/1.1 closed after the refusal"
    );
    assert_lapsed(good_h2.get().await, "revoked");
    assert_lapsed(good_h2.get().await, "revoked");
    // The other client's connections were checked against the new CRL too, and pass.
    assert_eq!(brief_h1.get().await.map(|g| g.0), Ok(200));
    assert_eq!(brief_h2.get().await.map(|g| g.0), Ok(200));

    // Past notAfter, with nothing reloaded: refused on the connections it opened.
    l.past_not_after().await;
    assert_lapsed(brief_h1.get().await, "expired");
    assert_lapsed(brief_h2.get().await, "expired");
    assert_eq!(
        seen.count(),
        6,
        "nothing reached the upstream once a certificate lapsed"
    );
    wait_for(
        &l.gw,
        "fhirgate_rejections_total{kind=\"certificate_lapsed\"}",
        5.0,
    )
    .await;
    l.gw.shutdown(Duration::from_secs(2)).await;
}

// RFC 5280 §5.1.2.5: nextUpdate "indicates the date by which the next CRL will be issued".
// Where stale CRLs refuse handshakes (`expired_crl`, outside development), they refuse
// the requests of connections opened while the CRL was current, once it goes stale; and
// a CRL going stale that the connection's chain does not depend on changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_refused_once_its_crl_goes_stale_where_that_is_enforced() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let crl_until = |ca: &Ca, next: i64| {
        let last = now() - 60;
        n.pki.crl(ca, CrlTimes::At { last, next })
    };
    // SubCA B's CRL goes stale first, then A's (the client's).
    let (b_next, a_next) = (now() + 5, now() + 9);
    let b_crl = crl_until(&n.sub_b, b_next);
    let a_crl = crl_until(&n.sub_a, a_next);
    let cas = [&*n.root.cert, &*n.sub_a.cert, &*n.sub_b.cert];
    let crls = [&*n.root_crl, &*a_crl, &*b_crl];
    let y = yaml("integration", &n.server, &cas, &crls, "", "", up);
    let (gw, addr) = start(&y).await;
    let root = &n.root.cert;
    let mut h1 = Held::open(&client(root, &n.good.cert, &n.good.key), addr).await;
    let mut h2 = Held::open(&client_h2(root, &n.good.cert, &n.good.key), addr).await;
    assert_eq!(h1.get().await.map(|g| g.0), Ok(200));
    assert_eq!(h2.get().await.map(|g| g.0), Ok(200));
    past(b_next).await;
    // B's clients are refused in the handshake; A's connections are still served.
    assert!(status(addr, root, &n.other.cert, &n.other.key)
        .await
        .is_err());
    assert_eq!(h1.get().await.map(|g| g.0), Ok(200));
    assert_eq!(h2.get().await.map(|g| g.0), Ok(200));
    past(a_next).await;
    assert_lapsed(h1.get().await, "expired_crl");
    assert_lapsed(h2.get().await, "expired_crl");
    // And a new connection is refused in its handshake, as before.
    assert!(status(addr, root, &n.good.cert, &n.good.key).await.is_err());
    wait_for(&gw, EXPIRED_CRL, 2.0).await;
    assert_eq!(seen.count(), 4);
    gw.shutdown(Duration::from_secs(2)).await;
}

// RFC 9113 §6.8: GOAWAY "initiate[s] shutdown of a connection"; a client whose certificate
// lapsed is told to go and reconnect, where the handshake refuses it, rather than having
// every request on its connection refused for as long as it keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_whose_certificate_lapsed_is_sent_a_goaway() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    // A 2 s idle timeout: the connection's checks run every half second.
    let limits = "limits:\n  idle_timeout: 2s\n";
    let (gw, addr) = start(&(lapsing_yaml(&n, &n.a_crl, up) + limits)).await;
    let root = &n.root.cert;
    let mut h2 = Held::open(&client_h2(root, &n.good.cert, &n.good.key), addr).await;
    assert_eq!(h2.get().await.map(|g| g.0), Ok(200));
    revoke_good_and_reload(&n, &gw, up, limits);
    assert_lapsed(h2.get().await, "revoked");
    // Busy (a request every 200 ms), so never closed as idle: closed as lapsed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match h2.get().await {
            Err(_) => break,
            Ok((status, body)) => assert_eq!(status, 403, "{body}"),
        }
        assert!(Instant::now() < deadline, "the connection is still open");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen.count(), 1);
    gw.shutdown(Duration::from_secs(2)).await;
}

// A reload reaches connections already open at their next request: a client taken off a
// route in an incident is refused on the connection it holds, not only once it
// reconnects, and a new upstream or new identity header names apply to it at once. (Until
// this test, open connections kept the configuration they were accepted under, for as
// long as a client kept them open.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_open_connections_at_their_next_request() {
    let n = nhs();
    let (up1, seen1) = upstream(UpstreamMode::Echo).await;
    let (up2, seen2) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = start(&lapsing_yaml(&n, &n.a_crl, up1)).await;
    let root = &n.root.cert;
    let mut held = Held::both(root, &n.good, addr).await;
    assert_eq!(seen1.count(), 2);

    // The only route now allows someone else: refused on both connections, which stay
    // open (the refusal is the route's, not the connection's).
    reload(
        &gw,
        lapsing_yaml(&n, &n.a_crl, up1) + "    allow_subjects: ['CN=someone-else*']\n",
    );
    for h in &mut held {
        let (status, body) = h.get().await.expect("connection still open");
        assert_eq!(status, 403, "{body}");
        assert!(
            body.contains("REC_FORBIDDEN") && body.contains("route"),
            "{body}"
        );
    }
    assert_eq!(seen1.count(), 2, "nothing reached the upstream");

    // Allowed again, with another upstream and another subject header: the same
    // connections reach the new upstream with the new header.
    let renamed = "identity_headers:\n  subject: X-Verified-Subject\n";
    reload(&gw, lapsing_yaml(&n, &n.a_crl, up2) + renamed);
    for (i, h) in held.iter_mut().enumerate() {
        assert_eq!(h.get().await.map(|g| g.0), Ok(200));
        assert_eq!(seen2.count(), i + 1);
        let (_, headers, _) = seen2.last();
        assert!(
            headers["x-verified-subject"]
                .to_str()
                .unwrap()
                .contains("good-client"),
            "{headers:?}"
        );
        assert!(
            !headers.contains_key("x-client-cert-subject"),
            "{headers:?}"
        );
    }
    assert_eq!(seen1.count(), 2, "the old upstream gets nothing more");

    // A reload that brings only a new CRL (for another client) changes nothing for them.
    let another = n.pki.client(&n.sub_a, "another-client", Alg::Rsa2048);
    n.pki.revoke(&n.sub_a, &another.cert);
    let a_crl = n.pki.crl(&n.sub_a, CrlTimes::Hours(48));
    reload(&gw, lapsing_yaml(&n, &a_crl, up2) + renamed);
    for h in &mut held {
        assert_eq!(h.get().await.map(|g| g.0), Ok(200));
    }
    assert_eq!(seen2.count(), 4);
    gw.shutdown(Duration::from_secs(2)).await;
}

// RFC 5280 §6.1.3 (a)(2) holds for every certificate of the path, the SubCA included. A
// client that sends only its leaf (its SubCA coming from the bundle) is refused on the
// connections it holds once that SubCA expires, as its new handshakes are; the leaf
// itself is still within its validity period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_refused_once_the_configured_subca_it_chains_through_expires() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let until = now() + 8;
    let brief_ca = n
        .pki
        .sub_ca_until(&n.root, "Test NHS SubCA Brief", Alg::Rsa2048, until);
    let leaf = n.pki.client(&brief_ca, "leaf-only-client", Alg::Rsa2048);
    let brief_crl = n.pki.crl(&brief_ca, CrlTimes::Hours(48));
    let cas = [&*n.root.cert, &*n.sub_a.cert, &*brief_ca.cert];
    let crls = [&*n.root_crl, &*n.a_crl, &*brief_crl];
    let (gw, addr) = start(&yaml("development", &n.server, &cas, &crls, "", "", up)).await;
    let root = &n.root.cert;
    // The leaf alone (`cert`, not `chain`).
    let mut h1 = Held::open(&client(root, &leaf.cert, &leaf.key), addr).await;
    let mut h2 = Held::open(&client_h2(root, &leaf.cert, &leaf.key), addr).await;
    assert_eq!(h1.get().await.map(|g| g.0), Ok(200));
    assert_eq!(h2.get().await.map(|g| g.0), Ok(200));
    past(until).await;
    assert!(
        status(addr, root, &leaf.cert, &leaf.key).await.is_err(),
        "a new handshake through the expired SubCA is refused"
    );
    assert_lapsed(h1.get().await, "expired");
    assert_lapsed(h2.get().await, "expired");
    assert_eq!(
        seen.count(),
        2,
        "nothing reached the upstream after the SubCA expired"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Two bundles, `nhs-prod` with `prod` and `nhs-int` with `int` (SubCA certificates under
/// the shared root), and one route open to `nhs-prod` clients only.
fn two_bundles_yaml(n: &Nhs, prod: &Ca, int: &Ca, up: SocketAddr) -> String {
    let crls = list(&[&n.root_crl, &n.a_crl, &n.b_crl]);
    let bundle = |name: &str, sub: &Ca| {
        format!(
            "    - name: {name}\n      ca_files: [{}, {}]\n      crl_files: [{crls}]\n",
            p(&n.root.cert),
            p(&sub.cert)
        )
    };
    format!(
        "environment: development\n\
listeners:\n  - address: 127.0.0.1:0\n\
tls:\n  server_cert: {sc}\n  server_key: {sk}\n  handshake_timeout: 2s\n  trust_bundles:\n{prod}{int}  revocation:\n    scope: chain\n\
upstream:\n  url: http://{up}\n\
auth:\n  mode: development\n\
routes:\n  - name: prod-only\n    path_prefix: /\n    token: none\n    bundles: [nhs-prod]\n",
        sc = p(&n.server.chain),
        sk = p(&n.server.key),
        prod = bundle("nhs-prod", prod),
        int = bundle("nhs-int", int),
    )
}

// The bundle a connection was admitted under is part of its identity: routes allow by
// it and `X-Client-Cert-Bundle` tells the upstream. A reload that moves the client's SubCA
// from the PROD bundle to the INT one (an operator correcting a misfiled CA) must not
// leave its open connections on PROD routes as PROD clients until they reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_is_refused_once_its_subca_moves_to_another_bundle() {
    let n = nhs();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = start(&two_bundles_yaml(&n, &n.sub_a, &n.sub_b, up)).await;
    let root = &n.root.cert;
    let mut held = Held::both(root, &n.good, addr).await;
    assert_eq!(seen.last().1["x-client-cert-bundle"], "nhs-prod");

    // SubCA A now belongs to INT and SubCA B to PROD.
    reload(&gw, two_bundles_yaml(&n, &n.sub_b, &n.sub_a, up));
    for h in &mut held {
        assert_lapsed(h.get().await, "unknown_ca");
    }
    assert_eq!(seen.count(), 2, "nothing more reached the upstream");
    // A new connection is an INT client, which the route does not allow; SubCA B's
    // client is now the PROD one.
    let (status, body) = Held::open(&client(root, &n.good.cert, &n.good.key), addr)
        .await
        .get()
        .await
        .expect("answered");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("route"), "{body}");
    let mut other = Held::open(&client(root, &n.other.cert, &n.other.key), addr).await;
    assert_eq!(other.get().await.map(|g| g.0), Ok(200));
    assert_eq!(seen.last().1["x-client-cert-bundle"], "nhs-prod");
    gw.shutdown(Duration::from_secs(2)).await;
}
