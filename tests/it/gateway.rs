//! End-to-end tests of the core gateway over real mTLS on 127.0.0.1.

use std::time::Duration;

use crate::harness::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn valid_client_is_forwarded_with_verified_identity_and_spoofs_removed() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let client = tls_client(&pki, Some("client"), H1);
    let req = Request::get("/Patient/9000000009?_format=json")
        .header("X-Client-Cert-Subject", "CN=attacker")
        .header("x-client-cert-fingerprint", "00")
        .header("X-Fhirgate-Ods-Code", "EVIL1")
        .header("X-Forwarded-For", "10.9.9.9")
        .header("Connection", "keep-alive, x-hop")
        .header("x-hop", "secret")
        .header("accept", "application/fhir+json")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&client, addr, req).await.expect("request");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.version, http::Version::HTTP_11);
    assert_eq!(got.json()["resourceType"], "Parameters");

    let (pq, h, _) = seen.last();
    assert_eq!(pq, "/Patient/9000000009?_format=json");
    let subjects: Vec<_> = h.get_all("x-client-cert-subject").iter().collect();
    assert_eq!(subjects.len(), 1);
    assert!(subjects[0]
        .to_str()
        .unwrap()
        .ends_with("CN=BaRS-X26.fhirgate-dev.nhs.uk"));
    assert_eq!(h["x-client-cert-cn"], "BaRS-X26.fhirgate-dev.nhs.uk");
    assert_eq!(h["x-client-cert-bundle"], "nhs-int");
    assert_eq!(h["x-client-cert-serial"], "20:01");
    assert_eq!(h["x-client-cert-fingerprint"].len(), 64);
    assert!(h["x-client-cert-issuer"]
        .to_str()
        .unwrap()
        .contains("fhirgate DEV SubCA"));
    assert!(h.get("x-fhirgate-ods-code").is_none());
    assert!(h.get("x-hop").is_none());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "localhost");
    assert_eq!(h["accept"], "application/fhir+json");
    // Hop-by-hop headers from the upstream response are not passed on.
    assert!(got.headers.get("connection").is_none());
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn http2_is_negotiated_and_forwarded() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let client = tls_client(&pki, Some("client"), H2);
    let body = Bytes::from_static(br#"{"resourceType":"Bundle","type":"message"}"#);
    let req = Request::post("/$process-message")
        .header("content-type", "application/fhir+json")
        .body(Full::new(body.clone()))
        .unwrap();
    let got = send(&client, addr, req).await.expect("request");
    assert_eq!(got.version, http::Version::HTTP_2);
    assert_eq!(got.status, StatusCode::OK);
    let (pq, h, received) = seen.last();
    assert_eq!(pq, "/$process-message");
    assert_eq!(received, body);
    assert_eq!(h["x-client-cert-cn"], "BaRS-X26.fhirgate-dev.nhs.uk");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 9113 §8.2.3: "If there are multiple Cookie header fields after decompression,
/// these MUST be concatenated into a single octet string using the two-octet delimiter
/// of 0x3B, 0x20 ("; ") before being passed into a non-HTTP/2 context, such as an
/// HTTP/1.1 connection." The HTTP/1.1 upstream records the exact bytes it receives.
#[tokio::test]
async fn http2_cookie_crumbs_reach_an_http1_upstream_as_one_cookie_line() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = raw_upstream().await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let client = tls_client(&pki, Some("client"), H2);
    let req = Request::get("/Patient/1")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&client, addr, req).await.expect("request");
    assert_eq!(got.version, http::Version::HTTP_2);
    assert_eq!(got.status, StatusCode::OK);
    let q = seen.complete().pop().expect("forwarded");
    assert_eq!(q.header("cookie"), ["a=1; b=2; c=3"], "{}", q.head);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Each bad client is refused during the handshake with the matching TLS alert, nothing
/// reaches the upstream, and the gateway keeps serving good clients.
#[tokio::test]
async fn bad_client_certificates_are_refused_in_the_handshake() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let cases: &[(Option<&str>, &str)] = &[
        (Some("revoked-client"), "CertificateRevoked"),
        (Some("expired-client"), "CertificateExpired"),
        (Some("foreign-client"), "UnknownCA"),
        (Some("server-only-client"), "UnsupportedCertificate"),
        (None, "CertificateRequired"),
    ];
    for (cert, alert) in cases {
        for alpn in [H1, H2] {
            let client = tls_client(&pki, *cert, alpn);
            let err = send(&client, addr, get("/metadata"))
                .await
                .expect_err("bad client must be refused");
            assert!(
                err.contains(alert),
                "{cert:?}: expected alert {alert}, got {err}"
            );
        }
    }
    assert_eq!(seen.count(), 0, "no refused request may reach the upstream");
    let ok = send(
        &tls_client(&pki, Some("client"), H1),
        addr,
        get("/metadata"),
    )
    .await;
    assert_eq!(ok.expect("good client still served").status, StatusCode::OK);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn route_policy_checks_bundle_subject_and_san() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.extra_bundle = true;
    o.routes = [
        "  - name: capabilities",
        "    path_prefix: /metadata",
        "  - name: patients",
        "    path_prefix: /Patient",
        "    bundles: [nhs-int]",
        "    allow_sans: [\"bars-x26.*.nhs.uk\"]",
        "  - name: messaging",
        "    path_prefix: /$process-message",
        "    bundles: [nhs-int]",
        "    allow_subjects: [\"*CN=BaRS-RX1.*\"]",
        "",
    ]
    .join("\n");
    let (gw, addr) = gateway(&pki, &o).await;
    let x26 = tls_client(&pki, Some("client"), H1);
    let rx1 = tls_client(&pki, Some("second-client"), H1);
    let foreign = tls_client(&pki, Some("foreign-client"), H1);

    assert_eq!(
        send(&x26, addr, get("/Patient/1")).await.unwrap().status,
        StatusCode::OK
    );
    send(&rx1, addr, get("/Patient/1"))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    send(&x26, addr, get("/$process-message"))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    assert_eq!(
        send(&rx1, addr, get("/$process-message"))
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    // The second bundle's client gets in, but only where its bundle is allowed.
    let got = send(&foreign, addr, get("/metadata")).await.unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(seen.last().1["x-client-cert-bundle"], "foreign");
    send(&foreign, addr, get("/Patient/1"))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    // No route covers it: default deny.
    send(&x26, addr, get("/Observation"))
        .await
        .unwrap()
        .assert_outcome(403, "REC_FORBIDDEN");
    // Path tricks that try to escape /metadata into /Patient.
    for p in [
        "/metadata/../Patient/1",
        "/metadata/%2e%2e/Patient/1",
        "/metadata%2F..%2FPatient",
    ] {
        send(&rx1, addr, get(p))
            .await
            .unwrap()
            .assert_outcome(400, "REC_BAD_REQUEST");
    }
    let before = seen.count();
    send(&rx1, addr, get("/Patient/1")).await.unwrap();
    assert_eq!(seen.count(), before, "refused request reached the upstream");
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn upstream_failures_are_operation_outcomes() {
    let pki = Pki::new();
    // Nothing listening: 502.
    let (gw, addr) = gateway(&pki, &Opts::new(dead_port().await)).await;
    let client = tls_client(&pki, Some("client"), H1);
    send(&client, addr, get("/metadata"))
        .await
        .unwrap()
        .assert_outcome(502, "REC_SERVICE_UNAVAILABLE");
    gw.shutdown(Duration::from_secs(2)).await;

    // Slower than response_timeout (2s): 504.
    let (up, _) = upstream(UpstreamMode::Slow(Duration::from_secs(4))).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    send(&client, addr, get("/metadata"))
        .await
        .unwrap()
        .assert_outcome(504, "REC_TIMEOUT");
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_streamed() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.limits = "  max_body_bytes: 1024\n".into();
    let (gw, addr) = gateway(&pki, &o).await;

    // Declared too large: refused before anything is forwarded.
    let h1 = tls_client(&pki, Some("client"), H1);
    let req = Request::post("/$process-message")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    send(&h1, addr, req)
        .await
        .unwrap()
        .assert_outcome(413, "REC_BAD_REQUEST");
    assert_eq!(seen.count(), 0);

    // HTTP/2 without content-length: the limit is enforced while streaming.
    let h2 = tls_client(&pki, Some("client"), H2);
    let frames = (0..8).map(|_| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![b'y'; 512])))
    });
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let req = Request::post("/$process-message").body(body).unwrap();
    send(&h2, addr, req)
        .await
        .unwrap()
        .assert_outcome(413, "REC_BAD_REQUEST");

    // Within the limit: forwarded intact.
    let req = Request::post("/$process-message")
        .body(Full::new(Bytes::from(vec![b'z'; 1000])))
        .unwrap();
    assert_eq!(send(&h1, addr, req).await.unwrap().status, StatusCode::OK);
    assert_eq!(seen.last().2.len(), 1000);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn chain_longer_than_verify_depth_is_refused() {
    let pki = Pki::new();
    // A client that sends leaf + SubCA: two certificates.
    let chained = format!("{}{}", pki.pki.client.cert, pki.pki.sub_ca.cert);
    std::fs::write(pki.path("chained-client.crt"), chained).unwrap();
    std::fs::copy(pki.path("client.key"), pki.path("chained-client.key")).unwrap();
    let (up, _) = upstream(UpstreamMode::Echo).await;

    let mut o = Opts::new(up);
    o.tls_extra = "  verify_depth: 1\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let err = send(
        &tls_client(&pki, Some("chained-client"), H1),
        addr,
        get("/metadata"),
    )
    .await
    .expect_err("too deep");
    assert!(err.contains("AlertReceived(CertificateUnknown)"), "{err}");
    // The same leaf alone is fine.
    let ok = send(
        &tls_client(&pki, Some("client"), H1),
        addr,
        get("/metadata"),
    )
    .await;
    assert_eq!(ok.unwrap().status, StatusCode::OK);
    gw.shutdown(Duration::from_secs(2)).await;

    // With the default depth the chained client is accepted too.
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let ok = send(
        &tls_client(&pki, Some("chained-client"), H1),
        addr,
        get("/metadata"),
    )
    .await;
    assert_eq!(ok.unwrap().status, StatusCode::OK);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn stalled_handshakes_and_garbage_are_dropped_without_blocking_others() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;

    // A client that connects and says nothing holds no one up...
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ok = send(
        &tls_client(&pki, Some("client"), H1),
        addr,
        get("/metadata"),
    )
    .await;
    assert_eq!(ok.unwrap().status, StatusCode::OK);
    // ...and is disconnected once the 2s handshake timeout passes.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf))
        .await
        .expect("gateway must close a stalled handshake")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Plain HTTP / garbage instead of a ClientHello.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("200"),
        "plaintext must not be served"
    );

    let ok = send(
        &tls_client(&pki, Some("client"), H2),
        addr,
        get("/metadata"),
    )
    .await;
    assert_eq!(ok.unwrap().status, StatusCode::OK);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn tls_sessions_resume() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let client = tls_client(&pki, Some("client"), H1);
    let first = send(&client, addr, get("/metadata")).await.unwrap();
    assert!(!first.resumed);
    let second = send(&client, addr, get("/metadata")).await.unwrap();
    assert_eq!(second.status, StatusCode::OK);
    assert!(
        second.resumed,
        "second connection should resume the TLS session"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let pki = Pki::new();
    let (up, _) = upstream(UpstreamMode::Echo).await;
    let mut o = Opts::new(up);
    o.limits = "  max_connections: 2\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let client = tls_client(&pki, Some("client"), H1);

    // Two connections fill max_connections; a third waits in the backlog...
    let (mut a, a_task) = open_h1(&client, addr).await.unwrap();
    let (mut b, _b_task) = open_h1(&client, addr).await.unwrap();
    let third = tokio::spawn({
        let client = client.clone();
        async move { send(&client, addr, get("/metadata")).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !third.is_finished(),
        "third connection must wait for a free slot"
    );
    // ...until one is released.
    drop(b.send_request(h1_get("/metadata")).await.unwrap());
    drop(b);
    let got = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.status, StatusCode::OK);

    // The 5s idle timeout closes a connection that does nothing.
    assert_eq!(
        a.send_request(h1_get("/metadata")).await.unwrap().status(),
        StatusCode::OK
    );
    tokio::time::timeout(Duration::from_secs(15), a_task)
        .await
        .expect("idle connection must be closed by the gateway")
        .unwrap();
    assert!(a.is_closed() || a.send_request(h1_get("/metadata")).await.is_err());
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let pki = Pki::new();
    let (up, seen) = upstream(UpstreamMode::Slow(Duration::from_millis(800))).await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let client = tls_client(&pki, Some("client"), H2);
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { send(&client, addr, get("/metadata")).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let open = gw.shutdown(Duration::from_secs(5)).await;
    assert_eq!(open, 0, "every connection closed within the drain timeout");
    let got = in_flight
        .await
        .unwrap()
        .expect("in-flight request completes");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(seen.count(), 1);
    // After shutdown nothing is accepted any more.
    assert!(send(&client, addr, get("/metadata")).await.is_err());
}
