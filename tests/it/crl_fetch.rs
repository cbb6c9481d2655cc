//! CRLs fetched over HTTP from where the CA publishes them, and reload on file change.
//!
//! The PKI is made with the openssl CLI as a CA would (RSA, `openssl ca`, DER CRLs from
//! `openssl ca -gencrl`); CRLs are served by a small HTTP server on 127.0.0.1 written
//! here, so each refusal case (garbage, another CA's signature, an older CRL, too large,
//! an HTTP error) can be served on demand.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use bytes::Bytes;
use fhirgate::config::Config;
use fhirgate::server;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Root → SubCA → clients alice and bob, and a server certificate, made with the openssl
/// CLI (harness `OpensslPki`, RSA 2048).
struct CrlPki {
    pki: OpensslPki,
    root: Ca,
    sub: Ca,
    server: Issued,
    alice: Issued,
    bob: Issued,
}

impl CrlPki {
    /// The SubCA certificate names `root_crl_url` in its CRL Distribution Points, the
    /// client certificates name `sub_crl_url`, as NHS certificates do.
    fn new(root_crl_url: &str, sub_crl_url: &str) -> Self {
        let pki = OpensslPki::new();
        let root = pki.root("Test Root CA", Alg::Rsa2048);
        pki.publish_crls_at(&root, root_crl_url);
        let sub = pki.sub_ca(&root, "Test SubCA", Alg::Rsa2048);
        pki.publish_crls_at(&sub, sub_crl_url);
        let server = pki.server(&root, "server", Alg::Rsa2048);
        let alice = pki.client(&sub, "alice", Alg::Rsa2048);
        let bob = pki.client(&sub, "bob", Alg::Rsa2048);
        CrlPki {
            pki,
            root,
            sub,
            server,
            alice,
            bob,
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.pki.path(name)
    }
    /// `ca`'s current CRL, DER, valid a week.
    fn crl(&self, ca: &Ca) -> Vec<u8> {
        self.pki.crl_der(ca, 24 * 7)
    }
    /// A TLS client presenting only its leaf, as NHS clients commonly do.
    fn client(&self, cert: &Path) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&self.root.cert).unwrap())
            .unwrap();
        let chain = vec![CertificateDer::from_pem_file(cert).unwrap()];
        let key = PrivateKeyDer::from_pem_file(cert.with_extension("key")).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(fhirgate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        // Every connection is a full handshake, judged on the CRLs in force.
        cfg.resumption = rustls::client::Resumption::disabled();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
    }
}

/// What the CRL server answers for each path: status and body (for a 3xx, the Location).
type Routes = Arc<Mutex<HashMap<String, (u16, Vec<u8>)>>>;

/// A plain HTTP/1.1 server on 127.0.0.1 serving `routes`; counts requests. Stops when the
/// returned handle is aborted.
async fn crl_server(
    listener: tokio::net::TcpListener,
    routes: Routes,
    hits: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let routes = routes.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    hits.fetch_add(1, Ordering::Relaxed);
                    let (status, body) = routes
                        .lock()
                        .unwrap()
                        .get(req.uri().path())
                        .cloned()
                        .unwrap_or((404, Vec::new()));
                    // A 3xx carries its Location as the body.
                    let mut resp = hyper::Response::builder().status(status);
                    resp = if (300..400).contains(&status) {
                        resp.header("location", String::from_utf8_lossy(&body).to_string())
                    } else {
                        resp.header("content-type", "application/pkix-crl")
                    };
                    let resp = resp.body(Full::new(Bytes::from(body))).unwrap();
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

fn gateway_yaml(pki: &CrlPki, up: SocketAddr, bundle_extra: &str, tls_extra: &str) -> String {
    format!(
        "environment: development\n\
listeners:\n  - address: 127.0.0.1:0\n\
tls:\n  server_cert: {sc}\n  server_key: {sk}\n  handshake_timeout: 2s\n{tls_extra}  trust_bundles:\n    - name: test-int\n      ca_files: [{root}, {sub}]\n{bundle_extra}\
upstream:\n  url: http://{up}\n  connect_timeout: 1s\n  response_timeout: 2s\n\
auth:\n  mode: development\n\
routes:\n  - name: all\n    path_prefix: /\n",
        sc = pki.server.cert.display(),
        sk = pki.server.key.display(),
        root = pki.root.cert.display(),
        sub = pki.sub.cert.display(),
    )
}

async fn accepted(c: &tokio_rustls::TlsConnector, addr: SocketAddr) -> bool {
    matches!(send(c, addr, get("/metadata")).await, Ok(g) if g.status == http::StatusCode::OK)
}

/// Polls `cond` every 50 ms for at most `limit`; returns how long it took.
async fn within(limit: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {limit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetched_crls_revoke_refuse_bad_ones_and_survive_a_restart() {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let crl_addr = http.local_addr().unwrap();
    let root_url = format!("http://{crl_addr}/root.crl");
    let sub_url = format!("http://{crl_addr}/sub.crl");
    let pki = CrlPki::new(&root_url, &sub_url);
    let routes: Routes = Arc::default();
    let hits = Arc::new(AtomicUsize::new(0));
    let first_sub_crl = pki.crl(&pki.sub);
    // The root's CRL sits behind a redirect, as on a CDN.
    routes
        .lock()
        .unwrap()
        .insert("/root.crl".into(), (302, b"/cdn/root.crl".to_vec()));
    routes
        .lock()
        .unwrap()
        .insert("/cdn/root.crl".into(), (200, pki.crl(&pki.root)));
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (200, first_sub_crl.clone()));
    let server = crl_server(http, routes.clone(), hits.clone()).await;

    let (up, _) = upstream(UpstreamMode::Echo).await;
    let cache = pki.path("crl-cache");
    // No crl_files at all: the SubCA's CRL comes from crl_urls, the root's from the
    // SubCA certificate's CRL Distribution Points. With the default unknown_status: deny
    // a client is served only once both have been fetched and verified.
    let yaml = gateway_yaml(
        &pki,
        up,
        &format!("      crl_urls: [\"{sub_url}\"]\n"),
        &format!(
            "  revocation:\n    fetch_distribution_points: true\n    refresh_interval: 1s\n    \
fetch_timeout: 2s\n    max_crl_bytes: 100000\n    cache_dir: {}\n",
            cache.display()
        ),
    );
    let cfg = Config::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    // First deployment: nothing cached yet. `check --strict` (the systemd unit's
    // ExecStartPre) must let the gateway start and fetch, and says what is missing.
    let cfg_path = pki.path("config.yaml");
    std::fs::write(&cfg_path, &yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["check", "--strict", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("not cached yet"), "{stdout}");
    assert_eq!(hits.load(Ordering::Relaxed), 0, "check fetched nothing");
    assert!(!cache.exists(), "check wrote nothing");
    let running = server::start(&cfg).await.unwrap();
    let addr = running.addrs[0];
    let metrics = running.server().metrics().clone();
    let alice = pki.client(&pki.alice.cert);
    let bob = pki.client(&pki.bob.cert);
    assert!(
        accepted(&alice, addr).await,
        "alice served after the first fetch"
    );
    assert!(accepted(&bob, addr).await, "bob not revoked yet");
    let text = metrics.encode();
    for url in [&sub_url, &root_url] {
        let label = format!("{{bundle=\"test-int\",url=\"{url}\"}}");
        assert!(
            metric_in(
                &text,
                &format!("fhirgate_crl_fetch_success_timestamp_seconds{label}")
            ) > 1.7e9,
            "{text}"
        );
        assert!(
            metric_in(
                &text,
                &format!("fhirgate_crl_fetched_next_update_seconds{label}")
            ) > 1.7e9,
            "{text}"
        );
    }

    // A request on a connection opened before the CRL changes still completes.
    let (mut open, _task) = open_h1(&alice, addr).await.unwrap();

    // The CA revokes bob and publishes a new CRL. RFC 5280 §5: "When a conforming CA
    // issues a CRL, ... the CRL number MUST be monotonically increasing".
    pki.pki.revoke(&pki.sub, &pki.bob.cert);
    let revoked_crl = pki.crl(&pki.sub);
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (200, revoked_crl));
    let took = within(Duration::from_secs(5), "bob refused", async || {
        !accepted(&bob, addr).await
    })
    .await;
    // One refresh interval (1 s) plus a fetch and the rebuild.
    eprintln!("revoked client refused {took:?} after the new CRL was published");
    assert!(took < Duration::from_millis(2500), "took {took:?}");
    // A connection whose handshake began just before the new CRL came into force is
    // refused at its first request instead (403 `certificate_lapsed`), which can end the
    // wait above; one opened now meets the new CRL in its handshake.
    assert!(
        send(&bob, addr, get("/metadata")).await.is_err(),
        "bob refused in the handshake"
    );
    assert!(accepted(&alice, addr).await);
    let got = open.send_request(h1_get("/metadata")).await.unwrap();
    assert_eq!(
        got.status(),
        http::StatusCode::OK,
        "open connection unaffected"
    );
    let text = metrics.encode();
    assert!(
        text.contains("fhirgate_tls_handshakes_total{result=\"revoked\"}"),
        "{text}"
    );
    assert_eq!(
        metric_in(
            &text,
            &format!("fhirgate_crl_revoked_certificates{{bundle=\"test-int\",url=\"{sub_url}\"}}")
        ),
        1.0,
        "{text}"
    );

    // Impostors: a CA with the SubCA's name but another key, and an unrelated CA. Their
    // CRLs revoke nothing, so were one accepted, bob would be served again.
    let evil = pki.pki.impostor(&pki.sub);
    let other = pki.pki.root("Some Other CA", Alg::Rsa2048);
    // 150 kB that start like a DER SEQUENCE: too large whatever they hold.
    let mut oversize = vec![0x30, 0x83, 0x02, 0x49, 0xf0];
    oversize.resize(150_000, 0);
    // A roll-back in two steps: the root's own, validly signed CRL served at the SubCA's
    // URL (were it taken, the SubCA's CRL held for that URL would be gone), then the
    // SubCA's older CRL, which must not un-revoke bob. RFC 5280 §5.2.3: CRL numbers are
    // "monotonically increasing"; a URL's issuer does not change under it.
    // A delta CRL of the SubCA, the newest by number: it holds only the changes since a
    // base CRL (RFC 5280 §5.2.4), so taken as the URL's CRL it would stand in for the
    // base; the verifier cannot use one, and the fetch refuses it as unparseable.
    let delta = {
        use crate::harness::pki::{CrlTimes, Kind};
        let pem = pki.pki.crl_with(
            &pki.sub,
            CrlTimes::Hours(24 * 7),
            "2.5.29.27 = critical, DER:02:01:01",
            "",
        );
        std::fs::read(pki.pki.der(&pem, Kind::Crl)).unwrap()
    };
    let cases: [(&str, (u16, Vec<u8>)); 8] = [
        ("parse", (200, b"this is not a CRL".to_vec())),
        ("parse", (200, delta)),
        ("bad_signature", (200, pki.crl(&evil))),
        ("unknown_issuer", (200, pki.crl(&other))),
        ("issuer_changed", (200, pki.crl(&pki.root))),
        ("older", (200, first_sub_crl.clone())),
        ("http_status", (503, Vec::new())),
        ("too_large", (200, oversize)),
    ];
    for (reason, answer) in cases {
        let key = format!(
            "fhirgate_crl_fetch_failures_total{{bundle=\"test-int\",url=\"{sub_url}\",reason=\"{reason}\"}}"
        );
        let before = metric_in(&metrics.encode(), &key);
        routes.lock().unwrap().insert("/sub.crl".into(), answer);
        within(Duration::from_secs(5), reason, async || {
            metric_in(&metrics.encode(), &key) > before
        })
        .await;
        assert!(!accepted(&bob, addr).await, "{reason}: bob still revoked");
        assert!(accepted(&alice, addr).await, "{reason}: alice still served");
    }

    // Restart while the CRL host is down: the cached copies are used.
    running.shutdown(Duration::from_secs(2)).await;
    server.abort();
    let _ = server.await;
    let cached = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(cached, 2, "one cache file per CRL URL");

    // `fhirgate check` lists the URLs and the cache, without a single request.
    let hits_before = hits.load(Ordering::Relaxed);
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["check", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("CRL URL {sub_url}")), "{stdout}");
    assert!(stdout.contains(&format!("CRL URL {root_url}")), "{stdout}");
    assert!(stdout.contains("CRL distribution point of"), "{stdout}");
    assert!(stdout.contains("1 revoked"), "{stdout}");
    // The cached fetched CRLs are judged like CRL files (nextUpdate, stale flags).
    assert!(
        stdout.contains(&format!("CRL [test-int] {sub_url} issuer")),
        "{stdout}"
    );
    // inspect-cert shows where a certificate's issuer publishes its CRL, and with
    // --config judges with the cached CRLs, as the handshake does.
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .arg("inspect-cert")
        .arg(&pki.sub.cert)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("CRL at:      {root_url}")),
        "{stdout}"
    );
    for (who, verdict) in [
        (&pki.alice.cert, "bundle test-int: ACCEPTED"),
        (&pki.bob.cert, "refused (revoked"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
            .arg("inspect-cert")
            .arg(who)
            .arg("--config")
            .arg(&cfg_path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains(verdict),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        hits.load(Ordering::Relaxed),
        hits_before,
        "check fetched nothing"
    );

    let running = server::start(&cfg).await.unwrap();
    let addr = running.addrs[0];
    let text = running.server().metrics().encode();
    assert!(
        text.contains("fhirgate_crl_fetch_failures_total{bundle=\"test-int\",url=")
            && text.contains("reason=\"connect\""),
        "the CRL host is down: {text}"
    );
    assert!(
        accepted(&alice, addr).await,
        "alice served from cached CRLs"
    );
    assert!(
        !accepted(&bob, addr).await,
        "bob still revoked from the cache"
    );
    running.shutdown(Duration::from_secs(2)).await;

    // Without the cache nothing is known about the issuers: unknown status, refused.
    let empty = yaml.replace(
        &cache.display().to_string(),
        &pki.path("empty-cache").display().to_string(),
    );
    let cfg = Config::from_yaml(&empty, Path::new("/")).unwrap();
    let running = server::start(&cfg).await.unwrap();
    // (webpki alone would check nothing with no CRL at all: that must not fail open.)
    assert!(
        !accepted(&alice, running.addrs[0]).await,
        "no CRL, no service"
    );
    let m = running.server().metrics().clone();
    within(
        Duration::from_secs(2),
        "unknown_revocation counted",
        async || {
            m.encode()
                .contains("fhirgate_tls_handshakes_total{result=\"unknown_revocation\"}")
        },
    )
    .await;
    running.shutdown(Duration::from_secs(2)).await;
}

/// How a CRL file is replaced on disk.
#[derive(Clone, Copy, Debug)]
enum Swap {
    /// New CRL written to a temp file, renamed over the old one.
    Rename,
    /// Kubernetes Secret/ConfigMap volume: `sub.crl -> ..data/sub.crl`, `..data ->
    /// ..<timestamp>`; an update writes a new timestamped dir and renames a new `..data`
    /// symlink over the old one.
    KubernetesSymlink,
}

async fn revoked_after_file_swap(swap: Swap) {
    let pki = CrlPki::new(
        "http://127.0.0.1:1/unused.crl",
        "http://127.0.0.1:1/unused.crl",
    );
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let root_crl = pki.path("root.crl");
    std::fs::write(&root_crl, pki.crl(&pki.root)).unwrap();
    let vol = pki.path("secret");
    std::fs::create_dir(&vol).unwrap();
    let sub_crl = vol.join("sub.crl");
    match swap {
        Swap::Rename => std::fs::write(&sub_crl, pki.crl(&pki.sub)).unwrap(),
        Swap::KubernetesSymlink => {
            std::fs::create_dir(vol.join("..2026_01")).unwrap();
            std::fs::write(vol.join("..2026_01/sub.crl"), pki.crl(&pki.sub)).unwrap();
            std::os::unix::fs::symlink("..2026_01", vol.join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/sub.crl", &sub_crl).unwrap();
        }
    }
    let gw = free_addr();
    let admin = free_addr();
    let yaml = gateway_yaml(
        &pki,
        up,
        &format!(
            "      crl_files: [{}, {}]\n",
            root_crl.display(),
            sub_crl.display()
        ),
        "",
    )
    .replace("127.0.0.1:0", &gw.to_string())
        + &format!("admin:\n  address: {admin}\nreload:\n  debounce: 300ms\n");
    let cfg_path = pki.path("config.yaml");
    std::fs::write(&cfg_path, &yaml).unwrap();
    let log_path = pki.path("gateway.log");
    let _child = run_gateway(&cfg_path, &log_path, &[]);
    let alice = pki.client(&pki.alice.cert);
    let bob = pki.client(&pki.bob.cert);
    within(Duration::from_secs(10), "gateway up", async || {
        accepted(&alice, gw).await
    })
    .await;
    assert!(accepted(&bob, gw).await);

    pki.pki.revoke(&pki.sub, &pki.bob.cert);
    let new_crl = pki.crl(&pki.sub);
    match swap {
        Swap::Rename => {
            let tmp = vol.join(".sub.crl.tmp");
            std::fs::write(&tmp, &new_crl).unwrap();
            std::fs::rename(&tmp, &sub_crl).unwrap();
        }
        Swap::KubernetesSymlink => {
            std::fs::create_dir(vol.join("..2026_02")).unwrap();
            std::fs::write(vol.join("..2026_02/sub.crl"), &new_crl).unwrap();
            std::os::unix::fs::symlink("..2026_02", vol.join("..data_tmp")).unwrap();
            std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
            std::fs::remove_dir_all(vol.join("..2026_01")).unwrap();
        }
    }
    // No SIGHUP is sent.
    let took = within(
        Duration::from_secs(5),
        "bob refused after the file swap",
        async || !accepted(&bob, gw).await,
    )
    .await;
    eprintln!("{swap:?}: revoked client refused {took:?} after the file swap");
    assert!(accepted(&alice, gw).await);
    let log = log_once_it_has(&log_path, "configuration reloaded", Duration::from_secs(5)).await;
    assert!(log.contains("watched file changed"), "{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_file_renamed_over_is_picked_up_without_sighup() {
    revoked_after_file_swap(Swap::Rename).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_secret_symlink_swap_is_picked_up_without_sighup() {
    revoked_after_file_swap(Swap::KubernetesSymlink).await;
}

/// SECURITY.md: "a bundle whose CRLs have not been fetched yet and are not cached is
/// refused, never waved through unchecked". Also when its CA certificates name no
/// distribution point, so that every CRL URL is still to be learned from a client's
/// certificate: while the CRL is withheld a revoked client is refused, not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_learning_all_its_crl_urls_from_clients_fails_closed_until_one_arrives() {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let crl_addr = http.local_addr().unwrap();
    let sub_url = format!("http://{crl_addr}/sub.crl");
    let openssl_pki = OpensslPki::new();
    // The root publishes no CRL URL, so the SubCA names none; its leaves name the SubCA's.
    let root = openssl_pki.root("Test Root CA", Alg::Rsa2048);
    let sub = openssl_pki.sub_ca(&root, "Test SubCA", Alg::Rsa2048);
    openssl_pki.publish_crls_at(&sub, &sub_url);
    let server_cert = openssl_pki.server(&root, "server", Alg::Rsa2048);
    let alice = openssl_pki.client(&sub, "alice", Alg::Rsa2048);
    let bob = openssl_pki.client(&sub, "bob", Alg::Rsa2048);
    openssl_pki.revoke(&sub, &bob.cert);
    let pki = CrlPki {
        pki: openssl_pki,
        root,
        sub,
        server: server_cert,
        alice,
        bob,
    };
    let routes: Routes = Arc::default();
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (503, Vec::new()));
    let _server = crl_server(http, routes.clone(), Arc::default()).await;
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let yaml = gateway_yaml(
        &pki,
        up,
        "",
        "  revocation:\n    scope: end_entity\n    fetch_distribution_points: true\n    refresh_interval: 1h\n",
    );
    let cfg = Config::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let running = server::start(&cfg).await.unwrap();
    let addr = running.addrs[0];
    let (alice, bob) = (pki.client(&pki.alice.cert), pki.client(&pki.bob.cert));
    for _ in 0..3 {
        assert!(
            !accepted(&bob, addr).await,
            "revoked bob served while its CRL is withheld"
        );
        assert!(!accepted(&alice, addr).await, "alice served unchecked");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(seen.count(), 0, "nothing reached the upstream unchecked");
    // The CRL arrives: alice in, bob still out, with no fetch held for the URL retried
    // as a stale one is (every 30 s), not once per `refresh_interval` (1 h here). The
    // window allows a busy host (the whole suite at once took 45-100 s here).
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (200, pki.crl(&pki.sub)));
    within(
        Duration::from_secs(100),
        "alice served once the CRL arrives",
        async || accepted(&alice, addr).await,
    )
    .await;
    assert!(!accepted(&bob, addr).await, "bob revoked");
    running.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subca_crl_url_is_learned_from_client_certificates_it_issued() {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let crl_addr = http.local_addr().unwrap();
    let root_url = format!("http://{crl_addr}/root.crl");
    let sub_url = format!("http://{crl_addr}/sub.crl");
    let pki = CrlPki::new(&root_url, &sub_url);
    let routes: Routes = Arc::default();
    let hits = Arc::new(AtomicUsize::new(0));
    routes
        .lock()
        .unwrap()
        .insert("/root.crl".into(), (200, pki.crl(&pki.root)));
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (200, pki.crl(&pki.sub)));
    routes
        .lock()
        .unwrap()
        .insert("/forged.crl".into(), (200, b"never asked for".to_vec()));
    let _server = crl_server(http, routes.clone(), hits.clone()).await;

    // A forger's self-signed leaf that claims the SubCA as issuer and names its own URL.
    let forged = pki.path("forged.crt");
    let forged_key = pki.path("forged.key");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        forged_key.to_str().unwrap(),
        "-out",
        forged.to_str().unwrap(),
        "-days",
        "30",
        "-subj",
        &pki.sub.subject(),
        "-addext",
        &format!("crlDistributionPoints=URI:http://{crl_addr}/forged.crl"),
    ]);

    let (up, _) = upstream(UpstreamMode::Echo).await;
    let cache = pki.path("crl-cache");
    // No crl_urls: only distribution points (the SubCA's, naming the root's CRL; the
    // clients', naming the SubCA's).
    let yaml = gateway_yaml(
        &pki,
        up,
        "",
        &format!(
            "  revocation:\n    fetch_distribution_points: true\n    refresh_interval: 1h\n    \
cache_dir: {}\n",
            cache.display()
        ),
    );
    let cfg = Config::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let running = server::start(&cfg).await.unwrap();
    let addr = running.addrs[0];
    let alice = pki.client(&pki.alice.cert);

    let forger = pki.client(&forged);
    assert!(!accepted(&forger, addr).await, "forged leaf refused");
    // The first client of the SubCA is refused (no CRL from its issuer yet: fail closed)
    // but teaches the gateway the URL; the SubCA's CRL is fetched at once, not after the
    // 1 h refresh interval.
    assert!(
        !accepted(&alice, addr).await,
        "no SubCA CRL yet: unknown status, refused"
    );
    let took = within(
        Duration::from_secs(5),
        "alice served once the SubCA CRL is learned",
        async || accepted(&alice, addr).await,
    )
    .await;
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let text = running.server().metrics().encode();
    assert!(
        text.contains(&format!(
            "fhirgate_crl_fetch_success_timestamp_seconds{{bundle=\"test-int\",url=\"{sub_url}\"}}"
        )),
        "{text}"
    );
    running.shutdown(Duration::from_secs(2)).await;

    // Only a certificate a bundle CA really signed may point the gateway somewhere.
    let learned = std::fs::read_to_string(cache.join("learned-urls")).unwrap();
    assert_eq!(learned, format!("test-int\t{sub_url}\n"));
    assert!(
        !text.contains("forged.crl"),
        "the forged URL was never fetched: {text}"
    );

    // Kept for restarts: check lists it.
    let cfg_path = pki.path("config.yaml");
    std::fs::write(&cfg_path, &yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["check", "--config"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "CRL URL {sub_url} (bundle \"test-int\", learned from a client certificate): cached"
        )),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_added_on_reload_is_fetched_at_once_and_beats_an_older_crl_file() {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let crl_addr = http.local_addr().unwrap();
    let sub_url = format!("http://{crl_addr}/sub.crl");
    let pki = CrlPki::new(
        "http://127.0.0.1:1/unused.crl",
        "http://127.0.0.1:1/unused.crl",
    );
    // Seed files: the root's CRL and the SubCA's first CRL (number 1, nothing revoked).
    let root_crl = pki.path("root.crl");
    let sub_crl = pki.path("sub.crl");
    std::fs::write(&root_crl, pki.crl(&pki.root)).unwrap();
    std::fs::write(&sub_crl, pki.crl(&pki.sub)).unwrap();
    pki.pki.revoke(&pki.sub, &pki.bob.cert);
    let routes: Routes = Arc::default();
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (200, pki.crl(&pki.sub)));
    let _server = crl_server(http, routes, Arc::default()).await;

    let (up, _) = upstream(UpstreamMode::Echo).await;
    let files = format!(
        "      crl_files: [{}, {}]\n",
        root_crl.display(),
        sub_crl.display()
    );
    let tls_extra = "  revocation:\n    refresh_interval: 1h\n";
    let yaml = gateway_yaml(&pki, up, &files, tls_extra);
    let cfg = Config::from_yaml(&yaml, Path::new("/")).unwrap();
    let running = server::start(&cfg).await.unwrap();
    let addr = running.addrs[0];
    let bob = pki.client(&pki.bob.cert);
    assert!(
        accepted(&bob, addr).await,
        "the seed file does not revoke bob"
    );

    // The operator adds the CA's URL. With a 1 h refresh interval, only the reload's own
    // wake-up explains a fetch within seconds; the fetched CRL (number 2) is newer than
    // the file (number 1) for the same issuer, so it is the one used.
    let yaml2 = gateway_yaml(
        &pki,
        up,
        &format!("{files}      crl_urls: [\"{sub_url}\"]\n"),
        tls_extra,
    );
    let cfg2 = Config::from_yaml(&yaml2, Path::new("/")).unwrap();
    running.server().reload(&cfg2).unwrap();
    within(
        Duration::from_secs(5),
        "bob refused by the fetched CRL",
        async || !accepted(&bob, addr).await,
    )
    .await;
    assert!(accepted(&pki.client(&pki.alice.cert), addr).await);
    running.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subca_replaced_on_reload_may_publish_at_its_predecessors_url() {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let crl_addr = http.local_addr().unwrap();
    let sub_url = format!("http://{crl_addr}/sub.crl");
    let pki = CrlPki::new("http://127.0.0.1:1/unused.crl", &sub_url);
    // The CA replaces its SubCA with one of another name, publishing at the same URL.
    let sub_b = pki.pki.sub_ca(&pki.root, "Test SubCA B", Alg::Rsa2048);
    pki.pki.publish_crls_at(&sub_b, &sub_url);
    let carol = pki.pki.client(&sub_b, "carol", Alg::Rsa2048);
    let routes: Routes = Arc::default();
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (200, pki.crl(&pki.sub)));
    let _server = crl_server(http, routes.clone(), Arc::default()).await;
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let bundle = format!("      crl_urls: [\"{sub_url}\"]\n");
    let tls_extra = "  revocation:\n    scope: end_entity\n    refresh_interval: 1h\n";
    let yaml = gateway_yaml(&pki, up, &bundle, tls_extra);
    let cfg = Config::from_yaml(&yaml, Path::new("/")).unwrap();
    let running = server::start(&cfg).await.unwrap();
    let addr = running.addrs[0];
    let (alice, carol) = (pki.client(&pki.alice.cert), pki.client(&carol.cert));
    assert!(accepted(&alice, addr).await, "alice: the first SubCA's CRL");

    // The operator swaps the SubCA in the bundle and reloads; the URL now serves the new
    // SubCA's CRL. The held CRL's issuer left the bundle, so it is dropped and the new
    // issuer's taken (`issuer_changed` refuses one only while the old issuer is still
    // trusted), and the URL is fetched at once as its CAs changed: not after the 1 h
    // interval, with carol refused meanwhile for want of a CRL.
    routes
        .lock()
        .unwrap()
        .insert("/sub.crl".into(), (200, pki.crl(&sub_b)));
    let yaml2 = yaml.replace(
        &pki.sub.cert.display().to_string(),
        &sub_b.cert.display().to_string(),
    );
    assert_ne!(yaml, yaml2);
    running
        .server()
        .reload(&Config::from_yaml(&yaml2, Path::new("/")).unwrap())
        .unwrap();
    within(
        Duration::from_secs(5),
        "carol served on the new SubCA's CRL",
        async || accepted(&carol, addr).await,
    )
    .await;
    assert!(
        !accepted(&alice, addr).await,
        "alice's SubCA left the bundle"
    );
    running.shutdown(Duration::from_secs(2)).await;
}
