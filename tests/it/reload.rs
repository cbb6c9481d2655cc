//! Hot reload and shutdown of the real binary: SIGHUP swaps certificates and CRLs without
//! failing a request; a broken config is refused and the old one keeps serving; SIGTERM
//! drains and exits 0. Also checks the admin listener's probes and metrics.

use std::io::Read;
use std::net::{SocketAddr, TcpStream as StdTcp};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::*;
use fhirgate::tools::pki::DevPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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
    let provider = fhirgate::tls::provider();
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

/// On two CPUs (`TOKIO_WORKER_THREADS=2`): one runtime per CPU serves connections, the
/// process's own runtime reloads and drains them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certs_and_crls_without_dropping_requests() {
    sighup_reload_and_drain("2", "scheduler=\"current-thread\" runtimes=2 workers=1").await;
}

/// The same on one CPU (`TOKIO_WORKER_THREADS=1`, as `available_parallelism` gives a
/// sidecar limited to one CPU): one runtime for everything, where a reload runs beside
/// the connections on tokio's blocking threads and must not fail a request either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_one_cpu_the_current_thread_runtime_reloads_and_drains_the_same_way() {
    sighup_reload_and_drain("1", "scheduler=\"current-thread\" runtimes=1 workers=1").await;
}

/// SIGHUP swaps certificates and CRLs while a stream of requests runs, a broken config is
/// refused, SIGTERM drains; `workers` is TOKIO_WORKER_THREADS, `runtime_line` what the
/// start-up log must say of the runtime.
async fn sighup_reload_and_drain(workers: &str, runtime_line: &str) {
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

    let log_path = pki.path("gateway.log");
    let notify = notify_path.to_str().expect("UTF-8 temp path");
    let mut child = run_gateway(
        &cfg_path,
        &log_path,
        &[
            ("NOTIFY_SOCKET", notify),
            ("WATCHDOG_USEC", "200000"),
            ("TOKIO_WORKER_THREADS", workers),
        ],
    );
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
    signal(&child.0, "-HUP");
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
    signal(&child.0, "-HUP");
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
    signal(&child.0, "-TERM");
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
    assert!(log.contains(runtime_line), "{log}");
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

/// `/metrics` with a real HTTP client (curl): `(content-type, body)`.
fn curl_metrics(admin: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-D", "-"]);
    if let Some(a) = accept {
        cmd.args(["-H", &format!("Accept: {a}")]);
    }
    let out = cmd
        .arg(format!("http://{admin}/metrics"))
        .output()
        .expect("curl is required (installed by .ci/run)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("headers and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let ct = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .expect("content-type");
    (ct, body.to_owned())
}

/// Parses exposition text with the Python `prometheus_client` parsers (the reference
/// implementation): one `family type` line per family, then `sample value` lines.
/// `None` when python3 or the package is missing, unless FHIRGATE_REQUIRE_PROMETHEUS_PARSER
/// is set (as .ci/run does), in which case that is a failure.
fn python_parse(text: &str, openmetrics: bool) -> Option<String> {
    let parser = if openmetrics {
        "prometheus_client.openmetrics.parser"
    } else {
        "prometheus_client.parser"
    };
    let script = format!(
        "import sys\nfrom {parser} import text_string_to_metric_families as p\n\
         for f in p(sys.stdin.read()):\n    print('FAMILY', f.name, f.type)\n    \
         for s in f.samples:\n        print('SAMPLE', s.name, sorted(s.labels.items()), s.value)\n"
    );
    let required = std::env::var_os("FHIRGATE_REQUIRE_PROMETHEUS_PARSER").is_some();
    let child = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if !required => {
            eprintln!("python3 not available ({e}): parser check skipped");
            return None;
        }
        Err(e) => panic!("python3 is required: {e}"),
    };
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && stderr.contains("No module named 'prometheus_client'") && !required
    {
        eprintln!("prometheus_client not installed: parser check skipped");
        return None;
    }
    assert!(
        out.status.success(),
        "{parser} refused the text: {stderr}\n{text}"
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

/// A SIGHUP with a YAML typo or a missing file is refused *and counted* in
/// `fhirgate_reloads_total{result="error"}` (an alert on it must not miss the common
/// case). A reload that changes settings fixed at start applies the rest and names each
/// such field in a WARN. `/metrics` negotiates: Prometheus text 0.0.4 by default and for
/// `text/plain`, OpenMetrics 1.0 when asked for, both accepted by the reference parsers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_failures_are_counted_and_restart_only_changes_named() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let gw_addr = free_addr();
    let admin_addr = free_addr();
    let mut o = Opts::new(up);
    o.routes
        .push_str(&format!("admin:\n  address: {admin_addr}\n"));
    let cfg_path = pki.path("config.yaml");
    let yaml = config_yaml(&pki, &o).replace("127.0.0.1:0", &gw_addr.to_string());
    std::fs::write(&cfg_path, &yaml).unwrap();
    let log_path = pki.path("gateway.log");
    let mut child = run_gateway(&cfg_path, &log_path, &[]);
    let mut up_ok = false;
    for _ in 0..100 {
        if StdTcp::connect(admin_addr).is_ok() {
            up_ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up_ok, "gateway did not start");
    let errors = || {
        let (_, m) = curl_metrics(admin_addr, None);
        m.lines()
            .find_map(|l| {
                l.strip_prefix("fhirgate_reloads_total{result=\"error\"} ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let wait_errors = |want: f64| {
        for _ in 0..50 {
            if errors() >= want {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("reload errors never reached {want}");
    };
    assert_eq!(errors(), 0.0);

    // A YAML typo.
    std::fs::write(&cfg_path, yaml.replace("routes:", "routes: [")).unwrap();
    signal(&child.0, "-HUP");
    wait_errors(1.0);
    // A missing file.
    std::fs::remove_file(&cfg_path).unwrap();
    signal(&child.0, "-HUP");
    wait_errors(2.0);
    // The old configuration still serves.
    let c = tls_client(&pki, Some("client"), H1);
    assert_eq!(
        send(&c, gw_addr, get("/metadata")).await.unwrap().status,
        http::StatusCode::OK
    );

    // Settings that need a restart change along with one that does not (idle_timeout).
    let moved = free_addr();
    let changed = yaml
        .replace(&gw_addr.to_string(), &moved.to_string())
        .replace(
            "idle_timeout: 5s",
            "idle_timeout: 7s\n  max_connections: 77",
        )
        + "logging:\n  format: json\nreload:\n  watch_files: false\n  debounce: 2s\n";
    std::fs::write(&cfg_path, changed).unwrap();
    signal(&child.0, "-HUP");
    let log = log_once_it_has(&log_path, "need a restart", Duration::from_millis(2500)).await;
    let warn = log
        .lines()
        .find(|l| l.contains("need a restart"))
        .unwrap_or_else(|| panic!("no restart warning:\n{log}"));
    assert!(warn.contains("WARN"), "{warn}");
    // The file watch is started once, with its debounce: turning it off (or on) at a
    // reload would otherwise say "reloaded" and keep watching (or not).
    for field in [
        "listeners",
        "logging.format",
        "limits.max_connections",
        "reload.watch_files",
        "reload.debounce",
    ] {
        assert!(warn.contains(field), "{field} not named: {warn}");
    }
    assert!(!warn.contains("admin.address"), "{warn}");
    assert_eq!(errors(), 2.0, "applied, not an error");
    // The listener stays where it was until a restart.
    assert_eq!(
        send(&c, gw_addr, get("/metadata")).await.unwrap().status,
        http::StatusCode::OK
    );
    assert!(StdTcp::connect(moved).is_err());

    // Content negotiation on /metrics.
    let (ct, text) = curl_metrics(admin_addr, None);
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    assert!(!text.contains("# EOF"), "{text}");
    assert!(
        text.contains("# TYPE fhirgate_reloads_total counter\n"),
        "{text}"
    );
    let (ct_plain, _) = curl_metrics(admin_addr, Some("text/plain;version=0.0.4"));
    assert_eq!(ct_plain, ct);
    // What Prometheus itself sends.
    let (om_ct, om) = curl_metrics(
        admin_addr,
        Some("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"),
    );
    assert_eq!(
        om_ct,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE fhirgate_reloads counter\n"), "{om}");

    if let Some(parsed) = python_parse(&text, false) {
        assert!(
            parsed.contains("FAMILY fhirgate_reloads counter"),
            "{parsed}"
        );
        assert!(
            parsed.contains("FAMILY fhirgate_request_duration_seconds histogram"),
            "{parsed}"
        );
        assert!(
            parsed.contains("SAMPLE fhirgate_reloads_total [('result', 'error')] 2"),
            "{parsed}"
        );
        let om_parsed = python_parse(&om, true).expect("parser present");
        assert!(
            om_parsed.contains("FAMILY fhirgate_reloads counter"),
            "{om_parsed}"
        );
        assert!(
            om_parsed.contains("SAMPLE fhirgate_reloads_total [('result', 'error')] 2"),
            "{om_parsed}"
        );
    }

    signal(&child.0, "-TERM");
    let status = child.0.wait().unwrap();
    assert!(status.success());
}

/// The server certificate the gateway at `addr` shows, once it serves (within 5 s).
async fn serving_cert(c: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Vec<u8> {
    for _ in 0..100 {
        if let Ok(cert) = server_cert_of(c, addr).await {
            return cert;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gateway serves while discovery is pending");
}

/// A config whose start-up waits for OAuth discovery at `issuer` (nothing listens there
/// yet), on a free port, with `reload` lines, written to `config.yaml`: its path and
/// the gateway's address.
fn awaiting_discovery(
    pki: &Pki,
    up: SocketAddr,
    issuer: SocketAddr,
    reload: &str,
) -> (std::path::PathBuf, SocketAddr) {
    let gw_addr = free_addr();
    std::fs::write(pki.path("gw-secret"), "secret\n").unwrap();
    let mut o = Opts::new(up);
    o.auth = format!(
        "auth:\n  mode: introspection\n  issuer: http://{issuer}\n  client_auth:\n    method: client_secret_basic\n    client_id: gw\n    client_secret_file: {}\n",
        pki.path("gw-secret").display()
    );
    o.routes.push_str(reload);
    let cfg_path = pki.path("config.yaml");
    let yaml = config_yaml(pki, &o).replace("127.0.0.1:0", &gw_addr.to_string());
    std::fs::write(&cfg_path, &yaml).unwrap();
    (cfg_path, gw_addr)
}

/// A file that changes while the gateway starts (a Secret rotated while a pod comes up,
/// here while it waits for OAuth discovery) is reloaded: the file watch starts before
/// anything is read, so the change is not folded into its first reading and lost,
/// leaving the old server certificate in force until the next change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_during_start_up_is_reloaded() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    // The authorisation server is not up yet: start-up waits for discovery.
    let as_addr = free_addr();
    let (cfg_path, gw_addr) = awaiting_discovery(&pki, up, as_addr, "reload:\n  debounce: 100ms\n");
    let log_path = pki.path("gateway.log");
    let _child = run_gateway(&cfg_path, &log_path, &[]);
    let new_pki = DevPki::generate().unwrap();
    let good = client(&pki, &new_pki.root.cert, "client", false);
    let old_cert = serving_cert(&good, gw_addr).await;

    // Rotated during start-up.
    std::fs::write(pki.path("server.crt"), &new_pki.server.cert).unwrap();
    std::fs::write(pki.path("server.key"), &new_pki.server.key).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Now the authorisation server comes up and start-up completes.
    let listener = tokio::net::TcpListener::bind(as_addr).await.unwrap();
    let meta = serde_json::json!({
        "issuer": format!("http://{as_addr}"),
        "introspection_endpoint": format!("http://{as_addr}/introspect"),
    })
    .to_string();
    let as_task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            let meta = meta.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = 0;
                while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{meta}",
                    meta.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });

    let expected = CertificateDer::from_pem_slice(new_pki.server.cert.as_bytes())
        .unwrap()
        .to_vec();
    let log = log_once_it_has(
        &log_path,
        "discovered authorisation server endpoints",
        Duration::from_secs(10),
    )
    .await;
    assert!(
        log.contains("discovered authorisation server endpoints"),
        "start-up completed: {log}"
    );
    let mut shown = old_cert.clone();
    for _ in 0..30 {
        shown = server_cert_of(&good, gw_addr).await.unwrap_or_default();
        if shown == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    as_task.abort();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert_ne!(shown, old_cert, "the rotation was lost: {log}");
    assert_eq!(shown, expected, "{log}");
}

/// SIGHUP while start-up waits (up to a minute) for OAuth discovery is applied at once,
/// not when the wait ends: an operator revoking a partner or rotating the certificate
/// during an authorisation-server outage should not wait on that server. systemd is not
/// told READY=1 by it: RELOADING=1 / READY=1 are for a service that has started
/// (sd_notify(3)), and READY=1 would end the start-up early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_the_discovery_wait_is_applied_at_once() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let dead = free_addr();
    let (cfg_path, gw_addr) = awaiting_discovery(&pki, up, dead, "reload:\n  watch_files: false\n");

    // Read as it comes (the gateway's sends block on a full socket queue).
    let notify_path = pki.path("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let collector = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut notes = Vec::new();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok(n) = notify.recv(&mut buf) {
                    notes.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            notes.join("|")
        })
    };
    let log_path = pki.path("gateway.log");
    let notify_env = notify_path.to_str().expect("UTF-8 temp path");
    let child = run_gateway(&cfg_path, &log_path, &[("NOTIFY_SOCKET", notify_env)]);
    let new_pki = DevPki::generate().unwrap();
    let good = client(&pki, &new_pki.root.cert, "client", false);
    let old_cert = serving_cert(&good, gw_addr).await;

    std::fs::write(pki.path("server.crt"), &new_pki.server.cert).unwrap();
    std::fs::write(pki.path("server.key"), &new_pki.server.key).unwrap();
    signal(&child.0, "-HUP");
    let expected = CertificateDer::from_pem_slice(new_pki.server.cert.as_bytes())
        .unwrap()
        .to_vec();
    let mut shown = old_cert.clone();
    for _ in 0..50 {
        shown = server_cert_of(&good, gw_addr).await.unwrap_or_default();
        if shown == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = log_once_it_has(&log_path, "configuration reloaded", Duration::from_secs(5)).await;
    assert_eq!(shown, expected, "not applied within 5 s: {log}");
    assert!(log.contains("configuration reloaded"), "{log}");

    stop.store(true, Ordering::Relaxed);
    let notes = collector.join().unwrap();
    assert!(notes.contains("waiting for OAuth discovery"), "{notes}");
    assert!(!notes.contains("READY=1"), "start-up is not over: {notes}");
    assert!(!notes.contains("RELOADING=1"), "{notes}");
}

/// The admin listener answers a method it does not serve with 405 and the `Allow` header
/// RFC 9110 §15.5.6 requires ("The origin server MUST generate an Allow header field in
/// a 405 response"), as the gateway's own 405 does.
#[tokio::test]
async fn admin_405_names_the_allowed_methods() {
    use fhirgate::server::admin;
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let addr = admin::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(admin::Readiness::default()),
        Arc::new(fhirgate::metrics::Metrics::new()),
        rx,
    )
    .await
    .unwrap();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut s = StdTcp::connect(addr).unwrap();
        s.write_all(
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .await
    .unwrap();
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    let allow = out
        .lines()
        .find_map(|l| l.strip_prefix("allow: "))
        .unwrap_or_else(|| panic!("no Allow header: {out}"));
    assert_eq!(allow.trim(), "GET, HEAD");
}
