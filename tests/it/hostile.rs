//! Hostile clients and failing neighbours (issue 8): raw bytes over real mTLS, HTTP/1.1
//! smuggling and header abuse, HTTP/2 rapid reset, certificates the handshake must
//! refuse, and upstreams that break mid-answer. Each case checks the answer (an
//! OperationOutcome, a 4xx from the HTTP parser, or a closed connection), that the
//! upstream saw nothing the gateway refused, that refusals are counted in the metrics,
//! and that a good client is still served afterwards.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Writes `raw` over a fresh mTLS connection (HTTP/1.1) and returns everything the
/// gateway sends back before it closes or `wait` passes.
async fn raw_exchange(pki: &Pki, addr: SocketAddr, raw: &[u8], wait: Duration) -> String {
    let c = tls_client(pki, Some("client"), H1);
    let mut tls = connect(&c, addr).await.expect("handshake");
    tls.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn still_serves(pki: &Pki, addr: SocketAddr) {
    let got = send(&tls_client(pki, Some("client"), H1), addr, get("/metadata"))
        .await
        .expect("a good client is still served");
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_and_malformed_framing_never_reach_the_upstream() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let w = Duration::from_secs(2);

    let cases: &[(&str, &[u8])] = &[
        // CL.TE: a front end honouring Content-Length would pass "G..." as a second request.
        (
            "CL and TE together",
            b"POST /Patient HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "two different Content-Lengths",
            b"POST /Patient HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhello",
        ),
        (
            "obs-fold header continuation",
            b"GET /Patient/1 HTTP/1.1\r\nHost: x\r\nX-Client-Cert-Subject: a\r\n CN=spoof\r\n\r\n",
        ),
        (
            "TE with an unknown coding",
            b"POST /Patient HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked, identity\r\n\r\n0\r\n\r\n",
        ),
        (
            "invalid chunk size",
            b"POST /Patient HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET /Patient/1 HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
        ),
        ("NUL in the request line", b"GET /Pat\0ient/1 HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("HTTP/0.9 style request", b"GET /Patient/1\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let resp = raw_exchange(&pki, addr, raw, w).await;
        let status = status_of(&resp);
        if *name == "CL and TE together" && status == 200 {
            // hyper frames by Transfer-Encoding alone, drops Content-Length and closes
            // the connection after answering (RFC 9112 §6.1), so the bytes after the
            // chunked body are never read as a request.
            assert!(resp.contains("connection: close"), "{resp}");
            continue;
        }
        assert!(
            status == 0 || (400..500).contains(&status) || status == 501,
            "{name}: expected a refusal or a closed connection, got:\n{resp}"
        );
        assert!(
            !resp.contains("\"received\""),
            "{name}: answered by the upstream"
        );
    }
    // Nothing smuggled, nothing with a broken frame, reached the upstream as a request.
    let paths: Vec<String> = seen
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _, _)| p.clone())
        .collect();
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "smuggled request reached the upstream: {paths:?}"
    );
    assert!(
        paths.len() <= 2,
        "only the TE-framed POST (and at most a chunked body that broke mid-way) started upstream: {paths:?}"
    );
    // The CL.TE request went upstream framed by its chunked body (empty), not by the
    // 6 bytes its Content-Length claimed.
    for (path, _, body) in seen.0.lock().unwrap().iter() {
        assert!(
            !String::from_utf8_lossy(body).contains("GET"),
            "{path}: smuggled bytes forwarded as body"
        );
    }
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_targets_that_try_to_escape_a_route() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    // /metadata is open to every client; /Patient only to a SAN nobody has.
    o.routes = "  - name: capabilities\n    path_prefix: /metadata\n  - name: locked\n    path_prefix: /\n    allow_sans: [\"nobody.example\"]\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let w = Duration::from_secs(2);
    for target in [
        "/metadata/../Patient/1",
        "/metadata/%2e%2e/Patient/1",
        "/metadata/%2E%2E/Patient/1",
        "/metadata/.%2e/Patient/1",
        "/metadata%2F..%2FPatient/1",
        "/metadata/..%2FPatient/1",
        "/metadata/..%5CPatient/1",
        "/metadata/%252e%252e/Patient/1",
        "/metadata//../Patient/1",
        "/metadata/./../Patient/1",
        "/metadata/%00/../Patient",
    ] {
        let raw = format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let resp = raw_exchange(&pki, addr, raw.as_bytes(), w).await;
        assert_eq!(status_of(&resp), 400, "{target}:\n{resp}");
        assert!(resp.contains("OperationOutcome"), "{target}:\n{resp}");
    }
    // Absolute-form: the gateway forwards only to its configured upstream, on the same
    // route policy as origin-form; it is never an open proxy.
    let raw = b"GET https://evil.example/metadata HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    let resp = raw_exchange(&pki, addr, raw, w).await;
    assert_eq!(status_of(&resp), 200, "{resp}");
    let raw = b"GET https://evil.example/Patient/1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n";
    let resp = raw_exchange(&pki, addr, raw, w).await;
    assert_eq!(status_of(&resp), 403, "{resp}");
    // CONNECT is refused, not tunnelled.
    let raw = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n";
    let resp = raw_exchange(&pki, addr, raw, w).await;
    let status = status_of(&resp);
    assert!(status == 405 || status == 400, "{resp}");
    let paths: Vec<String> = seen
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(p, _, _)| p.clone())
        .collect();
    assert_eq!(
        paths,
        vec!["/metadata".to_string()],
        "only the allowed request went upstream"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_oversized_headers() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.limits = "  header_read_timeout: 1s\n  max_header_bytes: 8192\n  max_headers: 20\n".into();
    let (gw, addr) = gateway(&pki, &o).await;

    // Slowloris: headers trickle in and never finish; the connection is closed once the
    // header-read timeout passes, while other clients are served.
    let c = tls_client(&pki, Some("client"), H1);
    let mut slow = connect(&c, addr).await.expect("handshake");
    slow.write_all(b"GET /metadata HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let trickle = async {
        for i in 0..20 {
            if slow
                .write_all(format!("X-{i}: y\r\n").as_bytes())
                .await
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut buf = Vec::new();
        let _ = slow.read_to_end(&mut buf).await;
        buf
    };
    let (answer, _) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(8), trickle),
        still_serves(&pki, addr)
    );
    let answer = answer.expect("slowloris connection closed by the gateway");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed near the 1s timeout"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.is_empty() || status_of(&text) == 408, "{text}");

    let w = Duration::from_secs(2);
    // One header over the byte limit.
    let big = format!(
        "GET /metadata HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(9000)
    );
    let resp = raw_exchange(&pki, addr, big.as_bytes(), w).await;
    let status = status_of(&resp);
    assert!(status == 431 || status == 0, "oversized header: {resp}");
    // More header fields than max_headers.
    let mut many = String::from("GET /metadata HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let resp = raw_exchange(&pki, addr, many.as_bytes(), w).await;
    let status = status_of(&resp);
    assert!(status == 431 || status == 0, "too many headers: {resp}");
    assert_eq!(
        seen.count(),
        1,
        "only the good client's request went upstream"
    );
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_is_cut_off_and_others_are_served() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let c = tls_client(&pki, Some("client"), H2);
    let tls = connect(&c, addr).await.expect("handshake");
    let (client, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let mut client = client;
    // CVE-2023-44487 pattern: open a stream and reset it at once, thousands of times.
    let mut sent = 0;
    for _ in 0..5000 {
        let ready = tokio::time::timeout(Duration::from_secs(2), client.clone().ready()).await;
        let Ok(Ok(mut ready)) = ready else { break };
        let req = http::Request::get("https://localhost/slow-metadata")
            .body(())
            .unwrap();
        match ready.send_request(req, true) {
            Ok((resp, _)) => {
                drop(resp); // dropping the response future resets the stream
                sent += 1;
            }
            Err(_) => break,
        }
        client = ready;
    }
    // The gateway answers the flood with GOAWAY: the connection ends well before 5,000
    // streams were served (each /slow request takes a second upstream).
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    assert!(
        ended.is_ok(),
        "connection closed by the gateway after {sent} resets"
    );
    still_serves(&pki, addr).await;
    let ok = send(&c, addr, get("/metadata"))
        .await
        .expect("h2 still served");
    assert_eq!(ok.status, StatusCode::OK);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// An upstream that sends headers and half a body, then resets the connection.
async fn breaking_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n{\"resourceType\":\"Bundle\",")
                    .await;
                // Dropped with the body incomplete: the gateway sees EOF mid-body.
                drop(s);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_body_and_unresolvable_upstream() {
    let pki = Pki::new();
    let (gw, addr) = gateway(&pki, &Opts::new(breaking_upstream().await)).await;
    let c = tls_client(&pki, Some("client"), H1);
    // Headers were already sent: the client sees the body cut short, not a fake success.
    let got = send(&c, addr, get("/metadata")).await;
    assert!(
        got.is_err() || got.as_ref().is_ok_and(|g| g.body.len() < 1000),
        "{got:?}"
    );
    // The gateway itself is unharmed.
    let again = send(&c, addr, get("/metadata")).await;
    assert!(again.is_err() || again.is_ok_and(|g| g.body.len() < 1000));
    gw.shutdown(Duration::from_secs(2)).await;

    // DNS failure: a name that cannot resolve is a 502 OperationOutcome.
    let mut o = Opts::new(dead_port().await);
    o.upstream_extra = String::new();
    let yaml = config_yaml(&pki, &o).replace(
        &format!("url: http://{}", o.upstream),
        "url: http://no-such-host.invalid:8080",
    );
    let cfg = fhirgate::config::Config::from_yaml(&yaml, std::path::Path::new("/")).unwrap();
    let gw = fhirgate::server::start(&cfg).await.unwrap();
    let addr = gw.addrs[0];
    send(&c, addr, get("/metadata"))
        .await
        .unwrap()
        .assert_outcome(502, "REC_SERVICE_UNAVAILABLE");
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_certificate_is_refused_and_every_refusal_is_counted() {
    let pki = Pki::new();
    // future-client: from the right SubCA, but valid only from tomorrow.
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    // (TLS 1.3 verifies the client after the client's Finished, so the alert may only
    // show on the first read; the metrics below say why it was refused.)
    send(
        &tls_client(&pki, Some("future-client"), H1),
        addr,
        get("/metadata"),
    )
    .await
    .expect_err("not-yet-valid certificate refused");
    for who in [
        Some("revoked-client"),
        Some("expired-client"),
        Some("foreign-client"),
        Some("server-only-client"),
        None,
    ] {
        assert!(send(&tls_client(&pki, who, H1), addr, get("/metadata"))
            .await
            .is_err());
    }
    // Garbage instead of a ClientHello.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef])
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), raw.read_to_end(&mut sink)).await;
    // A TLS 1.0 ClientHello (record and hello version 0x0301): refused.
    let mut old = tokio::net::TcpStream::connect(addr).await.unwrap();
    old.write_all(&tls10_client_hello()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), old.read_to_end(&mut reply)).await;
    assert!(
        reply.is_empty() || reply[0] == 0x15,
        "TLS 1.0 must get an alert or a close, got {reply:02x?}"
    );
    still_serves(&pki, addr).await;
    assert_eq!(seen.count(), 1);

    let metrics = gw.server().metrics().encode();
    for kind in [
        "not_yet_valid",
        "revoked",
        "expired",
        "unknown_ca",
        "bad_purpose",
        "no_cert",
    ] {
        assert!(
            metrics.contains(&format!(
                "fhirgate_tls_handshakes_total{{result=\"{kind}\"}} "
            )),
            "{kind} not counted:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("fhirgate_tls_handshakes_total{result=\"ok\"}"),
        "{metrics}"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

/// A minimal TLS 1.0 ClientHello with one cipher suite (TLS_RSA_WITH_AES_128_CBC_SHA).
fn tls10_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x01]; // client_version TLS 1.0
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // cipher suites
    hello.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut hs = vec![0x01, 0x00];
    hs.extend_from_slice(&(hello.len() as u16).to_be_bytes());
    hs.extend_from_slice(&hello);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}
