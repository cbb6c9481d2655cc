//! Failing neighbours: an authorisation server that is down, slow, or answers nonsense;
//! an upstream that refuses, resets mid-body, answers garbage, is slow, or cannot be
//! resolved; CRL files replaced with garbage before a reload. The gateway answers with
//! the right status, never panics, never forwards what it could not authorise, and
//! completes every request that could have completed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::harness::*;
use fhirgate::config::Config;
use fhirgate::server::Running;
use http::StatusCode;

fn count(gw: &Running, sample: &str) -> f64 {
    metric(gw, sample)
}

const HS_REVOKED: &str = "fhirgate_tls_handshakes_total{result=\"revoked\"}";

/// Introspection calls that ended in an error, read from the registry's family directly.
fn introspection_errors(gw: &Running) -> u64 {
    gw.server()
        .metrics()
        .introspections
        .get_or_create(&fhirgate::metrics::ResultLabel {
            result: "error".into(),
        })
        .get()
}

#[tokio::test]
async fn authorisation_server_faults_fail_closed_and_recover() {
    watch_panics();
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, seen) = raw_upstream().await;
    let mut o = Opts::new(up);
    o.auth = stub.auth_yaml(&pki, "");
    let (gw, addr) = gateway(&pki, &o).await;
    let c = tls_client(&pki, Some("client"), H1);

    // A token verified while the server was well stays usable from the cache.
    assert_eq!(
        send(&c, addr, bearer("/metadata", "good-cached"))
            .await
            .expect("ok")
            .status,
        StatusCode::OK
    );
    let forwarded = seen.count();

    // (fault, introspection calls per request: 500s, resets and over-long bodies are
    // transport-level failures and retried once)
    let faults = [
        (AsFault::Status500, 2),
        (AsFault::Malformed, 1),
        (AsFault::ActiveAsString, 1),
        (AsFault::Html, 1),
        (AsFault::Huge, 2),
        (AsFault::Reset, 2),
        (AsFault::Slow, 1),
        (AsFault::Hang, 1),
    ];
    for (i, (fault, calls)) in faults.iter().enumerate() {
        stub.set(*fault);
        let errors = introspection_errors(&gw);
        let before = stub.calls();
        let t = Instant::now();
        let got = send(&c, addr, bearer("/metadata", &format!("good-{i}")))
            .await
            .expect("answered");
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{fault:?}");
        got.assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "{fault:?}: bounded by auth.timeout (1 s), took {:?}",
            t.elapsed()
        );
        assert_eq!(stub.calls() - before, *calls, "{fault:?}: calls");
        assert_eq!(introspection_errors(&gw), errors + 1, "{fault:?}: counted");
        // The cached token still works; nothing unverified went upstream.
        assert_eq!(
            send(&c, addr, bearer("/metadata", "good-cached"))
                .await
                .expect("ok")
                .status,
            StatusCode::OK,
            "{fault:?}"
        );
    }
    assert_eq!(
        seen.count(),
        forwarded + faults.len(),
        "only the cached token's requests"
    );
    assert_eq!(
        count(
            &gw,
            "fhirgate_rejections_total{kind=\"token_unverifiable\"}"
        ),
        faults.len() as f64
    );

    // Errors were not cached as verdicts: once the server is well, the same tokens pass.
    stub.set(AsFault::None);
    for i in 0..faults.len() {
        let got = send(&c, addr, bearer("/metadata", &format!("good-{i}")))
            .await
            .expect("ok");
        assert_eq!(got.status, StatusCode::OK, "good-{i} after recovery");
    }

    // Down: nothing listening any more.
    stub.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    send(&c, addr, bearer("/metadata", "good-new"))
        .await
        .expect("answered")
        .assert_outcome(503, "REC_SERVICE_UNAVAILABLE");
    still_serves_with_token(&pki, addr, "good-cached").await;
    gw.shutdown(Duration::from_secs(2)).await;
}

async fn still_serves_with_token(pki: &Pki, addr: SocketAddr, token: &str) {
    assert_eq!(panics(), 0);
    for alpn in [H1, H2] {
        let got = send(
            &tls_client(pki, Some("client"), alpn),
            addr,
            bearer("/metadata", token),
        )
        .await
        .expect("served");
        assert_eq!(got.status, StatusCode::OK);
    }
}

/// A listener whose accept queue is full, so connects to it hang (SYNs dropped).
async fn blackhole() -> (SocketAddr, Vec<tokio::net::TcpStream>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr");
    let listener = socket.listen(1).expect("listen");
    let mut fill = Vec::new();
    for _ in 0..8 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fill.push(s),
            _ => break,
        }
    }
    // Keep the listener alive (never accepting) for the whole test.
    std::mem::forget(listener);
    (addr, fill)
}

#[tokio::test]
async fn upstream_faults_get_the_right_status_and_nothing_is_lost() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = raw_upstream().await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await; // response_timeout: 2s
    let h1 = tls_client(&pki, Some("client"), H1);
    let h2 = tls_client(&pki, Some("client"), H2);

    // Unparsable response: 502.
    send(&h1, addr, get("/bad-response"))
        .await
        .expect("answered")
        .assert_outcome(502, "REC_SERVICE_UNAVAILABLE");
    // Response headers later than response_timeout: 504.
    send(&h1, addr, get("/slow-head"))
        .await
        .expect("answered")
        .assert_outcome(504, "REC_TIMEOUT");

    // Upstream dies half-way through a body: the client must see a broken response, on
    // either protocol, never a short body that looks complete.
    for path in [
        "/close-mid-body",
        "/reset-mid-body",
        "/chunked-close-mid-body",
    ] {
        for (proto, c) in [("h1", &h1), ("h2", &h2)] {
            let got = send(c, addr, get(path)).await;
            let err = got.expect_err(&format!("{path} over {proto}: truncation must show"));
            assert!(err.starts_with("body:"), "{path} over {proto}: {err}");
        }
    }

    // A slow but steady body arrives whole.
    for c in [&h1, &h2] {
        let got = send(c, addr, get("/trickle")).await.expect("trickle");
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body.len(), 1000);
    }

    // An upstream that closes every connection after one response (keep-alive shorter
    // than the gateway's pool idle time): no request may fail because of a stale
    // pooled connection.
    for i in 0..30 {
        let c = if i % 2 == 0 { &h1 } else { &h2 };
        let got = send(c, addr, get("/close-after")).await.expect("answered");
        assert_eq!(got.status, StatusCode::OK, "request {i} on a stale pool");
    }
    assert!(seen.count() >= 30 + 6 + 2);
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;

    // Refused (nothing listening), unresolvable name, and a connect that hangs.
    let (hole, _fill) = blackhole().await;
    let targets = [
        (
            format!("http://{}", dead_port().await),
            502,
            "REC_SERVICE_UNAVAILABLE",
        ),
        (
            "http://fhirgate-test.invalid:8080".to_owned(),
            502,
            "REC_SERVICE_UNAVAILABLE",
        ),
        (format!("http://{hole}"), 504, "REC_TIMEOUT"),
    ];
    for (url, status, code) in targets {
        let mut o = Opts::new(up);
        o.upstream_extra = String::new();
        let yaml = config_yaml(&pki, &o).replace(&format!("http://{up}"), &url);
        let cfg = Config::from_yaml(&yaml, Path::new("/")).expect("config");
        let gw = fhirgate::server::start(&cfg).await.expect("start");
        let addr = gw.addrs[0];
        let t = Instant::now();
        send(&h1, addr, get("/metadata"))
            .await
            .expect("answered")
            .assert_outcome(status, code);
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "{url}: {:?}",
            t.elapsed()
        );
        let kind = if status == 504 {
            "upstream_timeout"
        } else {
            "upstream_unavailable"
        };
        assert_eq!(
            count(
                &gw,
                &format!("fhirgate_upstream_errors_total{{kind=\"{kind}\"}}")
            ),
            1.0,
            "{url}"
        );
        assert_eq!(panics(), 0);
        gw.shutdown(Duration::from_secs(2)).await;
    }
}

/// `server.reload` (what SIGHUP calls) with a CRL replaced by garbage is refused with the
/// field named; the running configuration keeps serving and keeps refusing revoked
/// clients; requests in flight across the reloads complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crl_replaced_with_garbage_keeps_the_old_configuration() {
    watch_panics();
    let pki = Pki::new();
    let (up, _seen) = raw_upstream().await;
    let o = Opts::new(up);
    let yaml = config_yaml(&pki, &o);
    let (gw, addr) = gateway(&pki, &o).await;
    let good = tls_client(&pki, Some("client"), H1);
    let revoked = tls_client(&pki, Some("revoked-client"), H1);
    let second = tls_client(&pki, Some("second-client"), H1);

    // A slow response in flight during every reload below.
    let in_flight = tokio::spawn({
        let good = good.clone();
        async move { send(&good, addr, get("/trickle")).await }
    });

    let crl = pki.path("sub-ca.crl");
    let original = std::fs::read(&crl).expect("crl");
    let mut truncated = original.clone();
    truncated.truncate(original.len() / 2);
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        (
            "PEM armour around garbage",
            b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n".to_vec(),
        ),
        ("empty file", Vec::new()),
        ("truncated PEM", truncated),
        (
            "DER-looking garbage",
            vec![0x30, 0x82, 0x01, 0x00, 0xde, 0xad, 0xbe, 0xef],
        ),
        (
            "binary noise",
            (0..4096u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8)
                .collect(),
        ),
        (
            "a certificate instead of a CRL",
            pki.pki.client.cert.clone().into_bytes(),
        ),
    ];
    for (what, bytes) in &garbage {
        std::fs::write(&crl, bytes).expect("write");
        // What the binary does on SIGHUP: load the file again, then swap it in.
        let result =
            Config::from_yaml(&yaml, Path::new("/")).and_then(|cfg| gw.server().reload(&cfg));
        let err = result.expect_err(&format!("{what}: reload must be refused"));
        assert!(
            err.field.starts_with("tls.trust_bundles[0].crl_files[0]"),
            "{what}: {err}"
        );
        // Old configuration: good clients served, revoked ones still refused.
        assert_eq!(
            send(&good, addr, get("/metadata"))
                .await
                .expect("ok")
                .status,
            StatusCode::OK,
            "{what}"
        );
        let before = handshakes(&gw, "revoked");
        let refused = send(&revoked, addr, get("/metadata")).await;
        assert!(refused.is_err(), "{what}: revoked client served");
        wait_metric(&gw, HS_REVOKED, before + 1.0).await;
    }
    assert_eq!(
        count(&gw, "fhirgate_reloads_total{result=\"error\"}"),
        garbage.len() as f64
    );

    // A valid CRL from the wrong CA (the root's, in place of the SubCA's) loads, and
    // fails closed: SubCA clients now have no revocation status and are refused.
    std::fs::copy(pki.path("root-ca.crl"), &crl).expect("copy");
    let cfg = Config::from_yaml(&yaml, Path::new("/")).expect("config");
    gw.server().reload(&cfg).expect("a well-formed CRL reloads");
    let refused = send(&good, addr, get("/metadata")).await;
    assert!(refused.is_err(), "fail closed: {refused:?}");
    wait_metric(
        &gw,
        "fhirgate_tls_handshakes_total{result=\"unknown_revocation\"}",
        1.0,
    )
    .await;

    // Then a real update: reload works again and revokes the second client too.
    std::fs::copy(pki.path("sub-ca-update.crl"), &crl).expect("copy");
    let cfg = Config::from_yaml(&yaml, Path::new("/")).expect("config");
    gw.server().reload(&cfg).expect("good CRL reloads");
    assert_eq!(count(&gw, "fhirgate_reloads_total{result=\"ok\"}"), 2.0);
    let before = handshakes(&gw, "revoked");
    let refused = send(&second, addr, get("/metadata")).await;
    assert!(refused.is_err(), "second client revoked after the update");
    wait_metric(&gw, HS_REVOKED, before + 1.0).await;

    let got = in_flight
        .await
        .expect("task")
        .expect("in-flight request completes");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len(), 1000);
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A reload that rebuilds the request pipeline (here a new route) while the authorisation
/// server is down keeps the endpoints discovery found for the same issuer: every replica
/// gets a ConfigMap change at about the same time, and a pipeline that started discovery
/// afresh would fail `/readyz` (Kubernetes takes every pod out of the Service) and answer
/// every token it has not cached with 503 until the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_discovered_endpoints_while_the_authorisation_server_is_down() {
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, _) = upstream(UpstreamMode::Echo).await;
    std::fs::write(pki.path("gw-secret"), "s3cret\n").unwrap();
    let mut o = Opts::new(up);
    o.auth = format!(
        "auth:\n  mode: introspection\n  issuer: http://{}\n  client_auth:\n    method: client_secret_basic\n    client_id: fhirgate-gw\n    client_secret_file: {}\n  timeout: 1s\n",
        stub.addr,
        pki.path("gw-secret").display()
    );
    let (gw, _addr) = gateway(&pki, &o).await;
    let started = Instant::now();
    while !gw.server().auth_status().0 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.server().auth_status().0,
        "{:?}",
        gw.server().auth_status()
    );

    stub.stop();
    o.routes = format!(
        "  - name: metadata\n    path_prefix: /metadata\n    token: none\n{}",
        o.routes
    );
    let yaml = config_yaml(&pki, &o);
    let cfg = Config::from_yaml(&yaml, Path::new("/")).expect("config");
    gw.server().reload(&cfg).expect("reload");
    // Past the new pipeline's first discovery attempt, which fails.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, detail) = gw.server().auth_status();
    assert!(ok, "readiness lost at a reload: {detail}");
}
