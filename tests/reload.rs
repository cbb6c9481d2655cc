//! Hot reload and shutdown of the real binary: SIGHUP swaps certificates and CRLs without
//! failing a request; a broken config is refused and the old one keeps serving; SIGTERM
//! drains and exits 0. Also checks the admin listener's probes and metrics.

mod common;

use std::io::Read;
use std::net::{SocketAddr, TcpStream as StdTcp};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use fhirgate::pki::DevPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Kills the gateway if the test fails half-way, so no process outlives the test.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &KillOnDrop, sig: &str) {
    let child = &child.0;
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// GET on the plain-HTTP admin listener.
fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = StdTcp::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

/// A client trusting both the old and the new server PKI, that reports which server
/// certificate it was shown.
/// `tls12` pins TLS 1.2, where a refused client certificate fails the handshake itself.
fn client(pki: &Pki, extra_root: &str, name: &str, tls12: bool) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for pem in [pki.pki.root.cert.as_str(), extra_root] {
        roots
            .add(CertificateDer::from_pem_slice(pem.as_bytes()).unwrap())
            .unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(pki.path(&format!("{name}.crt")))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key"))).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        rustls::DEFAULT_VERSIONS
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    // Full handshakes every time, so each connection shows the current server cert.
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn server_cert_of(
    c: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> Result<Vec<u8>, String> {
    let tls = connect(c, addr).await?;
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or("no server cert")?;
    Ok(certs[0].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certs_and_crls_without_dropping_requests() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let gw_addr = free_addr();
    let admin_addr = free_addr();
    let mut o = Opts::new(up);
    o.routes
        .push_str(&format!("admin:\n  address: {admin_addr}\n"));
    // This test counts SIGHUP reloads; file-change reloads are tested in crl_fetch.rs.
    o.routes.push_str("reload:\n  watch_files: false\n");
    let cfg_path = pki.path("config.yaml");
    let yaml = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw_addr.to_string());
    std::fs::write(&cfg_path, &yaml).unwrap();

    // A stand-in for systemd's notification socket, collecting what the gateway says.
    let notify_path = pki.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notes: Arc<Mutex<Vec<String>>> = Arc::default();
    let collector = {
        let notes = notes.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(60) {
                if let Ok(n) = notify.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).to_string();
                    let stop = text.contains("STOPPING=1");
                    notes.lock().unwrap().push(text);
                    if stop {
                        return;
                    }
                }
            }
        })
    };

    // Logs go to a file: a pipe nobody reads would fill up and block the gateway.
    let log_path = pki.path("gateway.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fhirgate"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let mut up_ok = false;
    for _ in 0..100 {
        if StdTcp::connect(admin_addr).is_ok() {
            up_ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up_ok, "gateway did not start");
    assert_eq!(admin_get(admin_addr, "/healthz").0, 200);
    let (status, body) = admin_get(admin_addr, "/readyz");
    assert_eq!(status, 200, "{body}");

    let new_pki = DevPki::generate().unwrap();
    let good = client(&pki, &new_pki.root.cert, "client", false);
    let second = client(&pki, &new_pki.root.cert, "second-client", true);
    let old_cert = server_cert_of(&good, gw_addr).await.unwrap();
    assert!(
        server_cert_of(&second, gw_addr).await.is_ok(),
        "second client valid before reload"
    );

    // A steady stream of requests on fresh connections across every reload below.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let stream = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        let c = client(&pki, &new_pki.root.cert, "client", false);
        tokio::spawn(async move {
            for _ in 0..5000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match send(&c, gw_addr, get("/metadata")).await {
                    Ok(g) if g.status == http::StatusCode::OK => {}
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // New server certificate + a CRL that also revokes the second client.
    std::fs::write(pki.path("server.crt"), &new_pki.server.cert).unwrap();
    std::fs::write(pki.path("server.key"), &new_pki.server.key).unwrap();
    std::fs::copy(pki.path("sub-ca-update.crl"), pki.path("sub-ca.crl")).unwrap();
    signal(&child, "-HUP");
    tokio::time::sleep(Duration::from_millis(700)).await;

    let new_cert = server_cert_of(&good, gw_addr).await.unwrap();
    assert_ne!(
        new_cert, old_cert,
        "new handshakes must use the new server certificate"
    );
    let expected = CertificateDer::from_pem_slice(new_pki.server.cert.as_bytes()).unwrap();
    assert_eq!(new_cert, expected.to_vec());
    let refused = server_cert_of(&second, gw_addr).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRevoked")),
        "revoked after reload: {refused:?}"
    );

    // A broken config is refused and the previous one keeps serving.
    std::fs::write(
        pki.path("sub-ca.crl"),
        "-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
    )
    .unwrap();
    signal(&child, "-HUP");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(server_cert_of(&good, gw_addr).await.unwrap(), new_cert);
    let refused = server_cert_of(&second, gw_addr).await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("CertificateRevoked")),
        "still revoked: {refused:?}"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    stream.await.unwrap();
    let failures = failed.lock().unwrap().clone();
    assert!(
        done.load(Ordering::Relaxed) >= 20,
        "stream too short to mean anything"
    );
    assert!(
        failures.is_empty(),
        "requests failed during reload: {failures:?}"
    );

    let (_, metrics) = admin_get(admin_addr, "/metrics");
    assert!(
        metrics.contains("fhirgate_reloads_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fhirgate_reloads_total{result=\"error\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fhirgate_tls_handshakes_total{result=\"revoked\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fhirgate_server_cert_not_after_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fhirgate_crl_next_update_seconds{file="),
        "{metrics}"
    );

    // Shutdown: a slow request in flight when SIGTERM arrives still completes; new
    // connections are refused afterwards; the exit code is 0.
    let in_flight = tokio::spawn({
        let good = good.clone();
        async move { send(&good, gw_addr, get("/slow")).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "-TERM");
    let got = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(got.status, http::StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        server_cert_of(&good, gw_addr).await.is_err(),
        "no new connections after SIGTERM"
    );
    let status = child.0.wait().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(status.success(), "exit status {status:?}\n{log}");
    assert!(log.contains("configuration reloaded"), "{log}");
    assert!(log.contains("reload refused"), "{log}");
    assert!(log.contains("tls.trust_bundles[0].crl_files[0]"), "{log}");

    // systemd protocol: READY=1 once serving, watchdog pings, RELOADING=1 around each
    // reload, STOPPING=1 at shutdown, in that order.
    collector.join().unwrap();
    let notes = notes.lock().unwrap().join("|");
    let pos = |s: &str| {
        notes
            .find(s)
            .unwrap_or_else(|| panic!("{s} not sent: {notes}"))
    };
    assert!(pos("READY=1") < pos("RELOADING=1"), "{notes}");
    assert!(pos("RELOADING=1") < pos("STOPPING=1"), "{notes}");
    assert!(notes.contains("MONOTONIC_USEC="), "{notes}");
    assert!(
        notes.matches("WATCHDOG=1").count() >= 3,
        "watchdog pings every 100 ms: {notes}"
    );
}
