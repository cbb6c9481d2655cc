//! Hostile HTTP from an authenticated client (a valid certificate): request smuggling,
//! malformed framing, oversized and slow requests, absolute-form and CONNECT, route
//! escapes, spoofed identity and authorisation headers, and HTTP/2 abuse. Each gets an
//! OperationOutcome or a closed connection, is counted in metrics, reaches the upstream
//! only as policy allows (checked byte for byte by a hand-written upstream), and leaves
//! the gateway serving.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::harness::*;
use bytes::Bytes;
use fhirgate::server::Running;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// `/metadata` is open to the good client; `/Patient` is a route it may not use, so a
/// request that escapes from one to the other would show up as a forwarded `/Patient`.
const ROUTES: &str = "  - name: capabilities\n    path_prefix: /metadata\n  - name: patients\n    path_prefix: /Patient\n    allow_subjects: [\"*CN=nobody*\"]\n";

const LIMITS: &str = "  header_read_timeout: 1s\n  max_header_bytes: 8192\n  max_headers: 16\n  max_body_bytes: 1024\n  max_concurrent_streams: 4\n";

async fn hostile_gateway(pki: &Pki) -> (Running, SocketAddr, RawSeen) {
    gateway_with(pki, LIMITS).await
}

async fn gateway_with(pki: &Pki, limits: &str) -> (Running, SocketAddr, RawSeen) {
    let (up, seen) = raw_upstream().await;
    let mut o = Opts::new(up);
    o.limits = limits.into();
    o.routes = ROUTES.into();
    let (gw, addr) = gateway(pki, &o).await;
    (gw, addr, seen)
}

fn rejections(gw: &Running, kind: &str) -> f64 {
    metric(gw, &format!("fhirgate_rejections_total{{kind=\"{kind}\"}}"))
}

fn conn_errors(gw: &Running, kind: &str) -> f64 {
    metric(
        gw,
        &format!("fhirgate_connection_errors_total{{kind=\"{kind}\"}}"),
    )
}

/// What the gateway must do with a raw HTTP/1.1 request.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Refused by the HTTP/1.1 parser: 400 and the connection closed.
    ParserRefuses(u16),
    /// Refused by the gateway with an OperationOutcome (status, NHS code, rejection kind).
    Outcome(u16, &'static str, &'static str),
}

const SMUGGLED: &str = "GET /metadata/smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";

#[tokio::test]
async fn smuggling_and_malformed_framing_never_reach_the_upstream() {
    watch_panics();
    let pki = Pki::new();
    let (gw, addr, seen) = hostile_gateway(&pki).await;
    let post = |headers: &str, body: &str| {
        format!("POST /metadata HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n{body}")
    };
    let cases: Vec<(&str, String, Want)> = vec![
        (
            "two different Content-Length",
            post("Content-Length: 4\r\nContent-Length: 5\r\n", "abcde"),
            Want::ParserRefuses(400),
        ),
        (
            "Content-Length list",
            post("Content-Length: 4, 5\r\n", "abcde"),
            Want::ParserRefuses(400),
        ),
        (
            "Content-Length with a sign",
            post("Content-Length: +4\r\n", "abcd"),
            Want::ParserRefuses(400),
        ),
        (
            "Transfer-Encoding not ending in chunked",
            post("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"),
            Want::ParserRefuses(400),
        ),
        (
            "Transfer-Encoding: identity",
            post("Transfer-Encoding: identity\r\n", "abcd"),
            Want::ParserRefuses(400),
        ),
        (
            "two Transfer-Encoding headers",
            post(
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
                "0\r\n\r\n",
            ),
            Want::ParserRefuses(400),
        ),
        (
            "Transfer-Encoding: xchunked",
            post("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"),
            Want::ParserRefuses(400),
        ),
        (
            "space before the colon",
            post("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"),
            Want::ParserRefuses(400),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            "POST /metadata HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .into(),
            Want::ParserRefuses(400),
        ),
        (
            "obs-fold",
            "GET /metadata HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n".into(),
            Want::ParserRefuses(400),
        ),
        (
            "obs-fold hiding Transfer-Encoding",
            post("Transfer-Encoding:\r\n chunked\r\n", "0\r\n\r\n"),
            Want::ParserRefuses(400),
        ),
        (
            "NUL in a header value",
            "GET /metadata HTTP/1.1\r\nHost: localhost\r\nX-A: a\0b\r\n\r\n".into(),
            Want::ParserRefuses(400),
        ),
        (
            "bare CR in a header value",
            "GET /metadata HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n".into(),
            Want::ParserRefuses(400),
        ),
        (
            "two spaces in the request line",
            "GET  /metadata HTTP/1.1\r\nHost: localhost\r\n\r\n".into(),
            Want::ParserRefuses(400),
        ),
        (
            "chunk size not hex",
            post("Transfer-Encoding: chunked\r\n", "zz\r\nabcd\r\n0\r\n\r\n"),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_body"),
        ),
        (
            "negative chunk size",
            post("Transfer-Encoding: chunked\r\n", "-1\r\nabcd\r\n0\r\n\r\n"),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_body"),
        ),
        (
            "chunk size overflowing 64 bits",
            post(
                "Transfer-Encoding: chunked\r\n",
                "fffffffffffffffff\r\nabcd\r\n0\r\n\r\n",
            ),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_body"),
        ),
        (
            "chunk shorter than its size line says",
            post("Transfer-Encoding: chunked\r\n", "2\r\nabcd\r\n0\r\n\r\n"),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_body"),
        ),
        (
            "chunk lines ended by bare LF",
            post("Transfer-Encoding: chunked\r\n", "4\nabcd\n0\n\n"),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_body"),
        ),
        (
            "chunked body over max_body_bytes",
            post(
                "Transfer-Encoding: chunked\r\n",
                &format!("400\r\n{0}\r\n400\r\n{0}\r\n0\r\n\r\n", "a".repeat(1024)),
            ),
            Want::Outcome(413, "REC_BAD_REQUEST", "body_too_large"),
        ),
        (
            "declared body over max_body_bytes with Expect: 100-continue",
            post("Content-Length: 5000\r\nExpect: 100-continue\r\n", ""),
            Want::Outcome(413, "REC_BAD_REQUEST", "body_too_large"),
        ),
        (
            "no Host",
            "GET /metadata HTTP/1.1\r\n\r\n".into(),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_host"),
        ),
        (
            "two Host headers",
            "GET /metadata HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n\r\n".into(),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_host"),
        ),
        (
            "Host with userinfo",
            "GET /metadata HTTP/1.1\r\nHost: user@evil.example\r\n\r\n".into(),
            Want::Outcome(400, "REC_BAD_REQUEST", "bad_host"),
        ),
    ];
    let mut parser_refusals = 0.0;
    for (what, req, want) in &cases {
        let complete = seen.count();
        let before = match want {
            Want::Outcome(_, _, kind) => rejections(&gw, kind),
            Want::ParserRefuses(_) => 0.0,
        };
        let r = raw_h1(&pki, addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert!(r.closed, "{what}: connection must be closed: {}", r.text());
        assert_eq!(
            r.statuses().len(),
            1,
            "{what}: exactly one response: {}",
            r.text()
        );
        match want {
            Want::ParserRefuses(status) => {
                parser_refusals += 1.0;
                assert_eq!(r.status(), Some(*status), "{what}: {}", r.text());
            }
            Want::Outcome(status, code, kind) => {
                assert_eq!(r.status(), Some(*status), "{what}: {}", r.text());
                assert!(r.is_outcome(code), "{what}: {}", r.text());
                assert!(
                    !r.text().contains("100 Continue"),
                    "{what}: no 100 Continue for a refused body"
                );
                wait_metric(
                    &gw,
                    &format!("fhirgate_rejections_total{{kind=\"{kind}\"}}"),
                    before + 1.0,
                )
                .await;
            }
        }
        assert_eq!(
            seen.count(),
            complete,
            "{what}: no complete request may reach the upstream: {:?}",
            seen.complete().last()
        );
    }
    wait_metric(
        &gw,
        "fhirgate_connection_errors_total{kind=\"bad_request\"}",
        parser_refusals,
    )
    .await;

    // Content-Length and Transfer-Encoding together, in either order, with a second
    // request hidden in what Content-Length would call the body. Transfer-Encoding wins
    // (RFC 9112 §6.3), the connection is closed after the response, and the hidden
    // request is never processed.
    for order in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 40\r\n",
    ] {
        let before = seen.count();
        let req = format!("{}{SMUGGLED}", post(order, "0\r\n\r\n"));
        let r = raw_h1(&pki, addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(r.statuses(), vec![200], "{order:?}: {}", r.text());
        assert!(r.closed, "{order:?}: connection closed after the response");
        let got = seen.complete();
        assert_eq!(got.len(), before + 1, "{order:?}: one request forwarded");
        let fwd = &got[before];
        assert_eq!(fwd.request_line(), "POST /metadata HTTP/1.1");
        assert!(
            fwd.header("content-length").is_empty(),
            "{order:?}: no Content-Length next to chunked: {}",
            fwd.head
        );
        assert!(fwd.body.is_empty());
        assert!(got.iter().all(|q| !q.head.contains("smuggled")));
    }

    // Bodies the gateway streamed but could not finish are cut off, never completed.
    assert!(seen.complete().iter().all(|q| q.body.len() <= 1024));
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

/// curl over HTTP/2 with one `X-Big` header of `n` bytes: (exit ok, status, body, stderr).
fn curl_h2_big_header(pki: &Pki, addr: SocketAddr, n: usize) -> (bool, u16, String, String) {
    let p = |f: &str| pki.path(f).display().to_string();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-v",
            "--http2",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
        ])
        .args([
            "--cacert",
            &p("root-ca.crt"),
            "--cert",
            &p("client.crt"),
            "--key",
            &p("client.key"),
        ])
        .args(["-H", &format!("X-Big: {}", "a".repeat(n))])
        .arg(format!("https://localhost:{}/metadata", addr.port()))
        .output()
        .expect("curl is required (installed by .ci/run)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", "0"));
    (
        out.status.success(),
        code.trim().parse().unwrap_or(0),
        body.to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A header section over `limits.max_header_bytes` / `max_headers` is refused with 431.
/// Up to twice the limits the gateway sees the request and answers with an
/// OperationOutcome (on HTTP/1.1 closing the connection, as the parser would); beyond
/// that the HTTP libraries answer a bare 431 themselves. Never `REFUSED_STREAM`: that
/// tells an HTTP/2 client the request was not processed and may be retried, and curl
/// retried such a request five times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_sections_are_refused_on_both_protocols() {
    watch_panics();
    let pki = Pki::new();
    let (gw, addr, seen) = hostile_gateway(&pki).await;

    // HTTP/1.1, within twice the limits: one 9000-byte header (max_header_bytes 8192),
    // or 20 headers (max 16). The gateway answers.
    let h1 = |fields: String| format!("GET /metadata HTTP/1.1\r\nHost: localhost\r\n{fields}\r\n");
    let many = |n: usize| (0..n).map(|i| format!("X-H{i}: v\r\n")).collect::<String>();
    let big = |n: usize| format!("X-Big: {}\r\n", "a".repeat(n));
    for (what, req, kind) in [
        ("one big header", h1(big(9000)), "headers_too_large"),
        ("too many headers", h1(many(20)), "too_many_headers"),
    ] {
        let r = raw_h1(&pki, addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(r.status(), Some(431), "{what}: {}", r.text());
        assert!(r.is_outcome("REC_BAD_REQUEST"), "{what}: {}", r.text());
        assert!(r.text().contains("\"code\":\"too-long\""), "{what}");
        assert!(r.closed, "{what}");
        wait_metric(
            &gw,
            &format!("fhirgate_rejections_total{{kind=\"{kind}\"}}"),
            1.0,
        )
        .await;
    }
    // Beyond twice the limits the parser refuses on its own: still 431, connection closed.
    for (what, req) in [
        ("a huge header", h1(big(20_000))),
        ("far too many headers", h1(many(40))),
    ] {
        let r = raw_h1(&pki, addr, req.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(r.status(), Some(431), "{what}: {}", r.text());
        assert!(r.closed, "{what}");
    }
    wait_metric(
        &gw,
        "fhirgate_connection_errors_total{kind=\"headers_too_large\"}",
        2.0,
    )
    .await;

    // HTTP/2: more fields than max_headers gets the same 431, as an OperationOutcome.
    let h2 = tls_client(&pki, Some("client"), H2);
    let mut req = Request::get("/metadata");
    for i in 0..20 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let got = send(&h2, addr, req.body(Full::new(Bytes::new())).expect("req"))
        .await
        .expect("h2 request");
    got.assert_outcome(431, "REC_BAD_REQUEST");
    wait_metric(
        &gw,
        "fhirgate_rejections_total{kind=\"too_many_headers\"}",
        2.0,
    )
    .await;

    // HTTP/2: a header list over max_header_bytes (RFC 7541 §4.1 size ~10.5 KB in 10
    // fields) gets the OperationOutcome: HEADERS with 431, DATA with the body, no reset.
    let mut s = raw_h2(&pki, addr).await;
    let mut block = hpack_get("/metadata");
    for i in 0..10 {
        block.extend(hpack_literal(&format!("x-h{i}"), &[b'v'; 1000]));
    }
    write_quietly(&mut s, &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)).await;
    let frames = parse_frames(&read_for(&mut s, Duration::from_millis(800)).await.bytes);
    let on_stream = |frames: &[Frame], kind: u8| -> Vec<Frame> {
        frames
            .iter()
            .filter(|f| f.stream == 1 && f.kind == kind)
            .cloned()
            .collect()
    };
    let headers = on_stream(&frames, HEADERS);
    assert_eq!(headers.len(), 1, "{frames:?}");
    // `:status: 431`, literal with incremental indexing of static entry 8, Huffman.
    assert_eq!(&headers[0].payload[..2], &[0x48, 0x83], "{frames:?}");
    let body: Vec<u8> = on_stream(&frames, DATA)
        .iter()
        .flat_map(|f| f.payload.clone())
        .collect();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("\"resourceType\":\"OperationOutcome\""),
        "{body}"
    );
    assert!(body.contains("REC_BAD_REQUEST"), "{body}");
    assert!(on_stream(&frames, RST_STREAM).is_empty(), "{frames:?}");
    wait_metric(
        &gw,
        "fhirgate_rejections_total{kind=\"headers_too_large\"}",
        2.0,
    )
    .await;

    // Beyond twice the limit (~20 KB in one frame) the HTTP/2 layer answers 431 itself;
    // whatever reset follows, it is not REFUSED_STREAM.
    let mut s = raw_h2(&pki, addr).await;
    let mut block = hpack_get("/metadata");
    for i in 0..150 {
        block.extend(hpack_literal(&format!("x-h{i}"), &[b'v'; 100]));
    }
    assert!(block.len() < 16_384, "fits one frame");
    write_quietly(&mut s, &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)).await;
    let frames = parse_frames(&read_for(&mut s, Duration::from_millis(800)).await.bytes);
    let headers = on_stream(&frames, HEADERS);
    assert_eq!(headers.len(), 1, "{frames:?}");
    assert_eq!(&headers[0].payload[..2], &[0x48, 0x83], "{frames:?}");
    assert!(
        !frames
            .iter()
            .any(|f| f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM)),
        "{frames:?}"
    );

    // A real HTTP/2 client: one attempt each, 431, the OperationOutcome where the
    // gateway saw the request.
    let before = metric(&gw, "fhirgate_requests_total{route=\"-\",status=\"431\"}");
    let (_, status, body, stderr) = curl_h2_big_header(&pki, addr, 12_000);
    assert_eq!(status, 431, "{stderr}");
    assert!(body.contains("OperationOutcome"), "{body}");
    assert_eq!(
        metric(&gw, "fhirgate_requests_total{route=\"-\",status=\"431\"}") - before,
        1.0,
        "one request, no retries"
    );
    let (_, status, _, stderr) = curl_h2_big_header(&pki, addr, 20_000);
    assert_eq!(status, 431, "{stderr}");
    assert!(!stderr.contains("REFUSED_STREAM"), "{stderr}");
    assert!(!stderr.to_ascii_lowercase().contains("retry"), "{stderr}");

    assert_eq!(seen.count(), 0, "nothing reached the upstream");
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_clients_are_cut_off() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = raw_upstream().await;
    let mut o = Opts::new(up);
    o.limits = "  header_read_timeout: 1s\n  idle_timeout: 2s\n  max_body_bytes: 100000\n".into();
    let (gw, addr) = gateway(&pki, &o).await; // upstream response_timeout: 2s

    // Slowloris: one header line every 250 ms never completes the header section.
    let slowloris = async {
        let t = Instant::now();
        let mut s = connect(&connector_h1(&pki), addr).await.expect("tls");
        write_quietly(&mut s, b"GET /metadata HTTP/1.1\r\nHost: localhost\r\n").await;
        for i in 0..40 {
            write_quietly(&mut s, format!("X-{i}: v\r\n").as_bytes()).await;
            if read_for(&mut s, Duration::from_millis(250)).await.closed {
                return t.elapsed();
            }
        }
        panic!("slowloris connection never closed");
    };
    // A body trickled one byte every 250 ms: 408 once the upstream deadline passes.
    let slow_body_h1 = async {
        let t = Instant::now();
        let mut s = connect(&connector_h1(&pki), addr).await.expect("tls");
        write_quietly(
            &mut s,
            b"POST /metadata HTTP/1.1\r\nHost: localhost\r\nContent-Length: 40\r\n\r\n",
        )
        .await;
        for _ in 0..40 {
            write_quietly(&mut s, b"a").await;
            let r = read_for(&mut s, Duration::from_millis(250)).await;
            if !r.bytes.is_empty() || r.closed {
                return (r, t.elapsed());
            }
        }
        panic!("slow body never answered");
    };
    let slow_body_h2 = async {
        let chunks = futures_util::stream::unfold(0, |i| async move {
            if i == 40 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            Some((
                Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(b"a"))),
                i + 1,
            ))
        });
        let req = Request::post("/metadata")
            .header("content-length", "40")
            .body(http_body_util::StreamBody::new(Box::pin(chunks)))
            .expect("req");
        let t = Instant::now();
        let got = send(&tls_client(&pki, Some("client"), H2), addr, req).await;
        (got, t.elapsed())
    };
    // A client that asks for 8 MiB and never reads: dropped once nothing has moved for
    // idle_timeout, instead of holding the connection (and its buffers) for ever.
    let slow_reader = async {
        let mut s = connect(&connector_h1(&pki), addr).await.expect("tls");
        write_quietly(&mut s, b"GET /big HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
        tokio::time::sleep(Duration::from_secs(7)).await;
        read_for(&mut s, Duration::from_secs(3)).await
    };
    // HTTP/2 PINGs every 300 ms without a request: not activity, so the connection is
    // closed after idle_timeout, and dropped when the peer ignores the GOAWAY.
    let pinger = async {
        let t = Instant::now();
        let mut s = raw_h2(&pki, addr).await;
        for i in 0..40u64 {
            if read_for(&mut s, Duration::from_millis(300)).await.closed {
                return t.elapsed();
            }
            write_quietly(&mut s, &frame(PING, 0, 0, &i.to_be_bytes())).await;
        }
        panic!("pinging connection never closed");
    };
    // HTTP/2 header block dribbled in CONTINUATION frames.
    let continuation = async {
        let t = Instant::now();
        let mut s = raw_h2(&pki, addr).await;
        write_quietly(&mut s, &frame(HEADERS, 0, 1, &hpack_get("/metadata"))).await;
        for i in 0..40 {
            if read_for(&mut s, Duration::from_millis(300)).await.closed {
                return t.elapsed();
            }
            let f = frame(CONTINUATION, 0, 1, &hpack_literal(&format!("x{i}"), b"v"));
            write_quietly(&mut s, &f).await;
        }
        panic!("dribbled header block never refused");
    };

    let (loris, (h1, h1_took), (h2, h2_took), unread, pinged, continued) = tokio::join!(
        slowloris,
        slow_body_h1,
        slow_body_h2,
        slow_reader,
        pinger,
        continuation
    );
    assert!(
        loris < Duration::from_millis(2000),
        "slowloris cut at header_read_timeout (1 s), took {loris:?}"
    );
    assert_eq!(h1.status(), Some(408), "{}", h1.text());
    assert!(h1.is_outcome("REC_TIMEOUT"), "{}", h1.text());
    assert!(h1_took < Duration::from_secs(4), "{h1_took:?}");
    h2.expect("h2 slow body answered")
        .assert_outcome(408, "REC_TIMEOUT");
    assert!(h2_took < Duration::from_secs(4), "{h2_took:?}");
    assert!(unread.closed, "non-reading client dropped");
    assert!(
        unread.bytes.len() < 8 * 1024 * 1024,
        "dropped before the whole response was sent ({} bytes)",
        unread.bytes.len()
    );
    assert!(
        pinged < Duration::from_secs(8),
        "pinging connection closed after about 2 x idle_timeout, took {pinged:?}"
    );
    assert!(continued < Duration::from_secs(4), "{continued:?}");

    assert_eq!(conn_errors(&gw, "header_timeout"), 1.0);
    assert_eq!(rejections(&gw, "body_timeout"), 2.0);
    assert_eq!(
        metric(
            &gw,
            "fhirgate_upstream_errors_total{kind=\"upstream_timeout\"}"
        ),
        0.0,
        "a slow client is not an upstream failure"
    );
    // Only the slow reader's request was complete when forwarded; slow bodies were cut.
    let paths: Vec<String> = seen
        .complete()
        .iter()
        .map(|q| q.request_line().to_owned())
        .collect();
    assert_eq!(paths, vec!["GET /big HTTP/1.1".to_owned()]);
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn absolute_form_connect_and_upgrade_cannot_redirect_or_tunnel() {
    watch_panics();
    let pki = Pki::new();
    let (gw, addr, seen) = hostile_gateway(&pki).await;
    // A "foreign" host that must never see a connection.
    let (elsewhere, elsewhere_seen) = raw_upstream().await;

    // Absolute-form naming another host: forwarded to the configured upstream only, in
    // origin-form, and the path policy applies as usual.
    let r = raw_h1(
        &pki,
        addr,
        format!("GET http://{elsewhere}/metadata HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    let fwd = seen.complete().pop().expect("forwarded");
    assert_eq!(fwd.request_line(), "GET /metadata HTTP/1.1");
    assert_ne!(fwd.header("host"), vec![elsewhere.to_string()]);
    let r = raw_h1(
        &pki,
        addr,
        format!("GET http://{elsewhere}/Patient/1 HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        r.is_outcome("REC_FORBIDDEN") && r.status() == Some(403),
        "{}",
        r.text()
    );
    let r = raw_h1(
        &pki,
        addr,
        b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        r.is_outcome("REC_BAD_REQUEST") && r.status() == Some(400),
        "{}",
        r.text()
    );

    // CONNECT, over HTTP/1.1 and HTTP/2: 405, no tunnel.
    let r = raw_h1(
        &pki,
        addr,
        format!("CONNECT {elsewhere} HTTP/1.1\r\nHost: {elsewhere}\r\n\r\nGET /metadata HTTP/1.1\r\nHost: x\r\n\r\n")
            .as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(r.status(), Some(405), "{}", r.text());
    assert!(r.is_outcome("REC_METHOD_NOT_ALLOWED"), "{}", r.text());
    // RFC 9110 §15.5.6: "The origin server MUST generate an Allow header field in a 405
    // response containing a list of the target resource's currently supported methods."
    assert!(
        r.text()
            .to_ascii_lowercase()
            .contains("\r\nallow: get, head, post, put, patch, delete, options\r\n"),
        "{}",
        r.text()
    );
    let mut s = raw_h2(&pki, addr).await;
    let mut block = vec![0x02]; // :method, literal value
    block.extend(hpack_string(b"CONNECT"));
    block.push(0x01);
    block.extend(hpack_string(elsewhere.to_string().as_bytes()));
    write_quietly(&mut s, &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)).await;
    let frames = parse_frames(&read_for(&mut s, Duration::from_millis(800)).await.bytes);
    let data: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == DATA && f.stream == 1)
        .flat_map(|f| f.payload.clone())
        .collect();
    assert!(
        String::from_utf8_lossy(&data).contains("REC_METHOD_NOT_ALLOWED"),
        "{frames:?}"
    );
    assert_eq!(rejections(&gw, "method_not_allowed"), 2.0);

    // Upgrade requests (WebSocket, h2c) are plain requests: no 101, nothing passed on.
    for (what, headers) in [
        ("websocket", "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"),
        ("h2c", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
    ] {
        let r = raw_h1(
            &pki,
            addr,
            format!("GET /metadata HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").as_bytes(),
            Duration::from_millis(1500),
        )
        .await;
        assert_eq!(r.statuses(), vec![200], "{what}: {}", r.text());
        let fwd = seen.complete().pop().expect("forwarded");
        for h in ["upgrade", "connection", "http2-settings"] {
            assert!(fwd.header(h).is_empty(), "{what}: {h} forwarded: {}", fwd.head);
        }
    }
    assert_eq!(*elsewhere_seen.connections.lock().expect("lock"), 0);
    assert!(
        seen.complete()
            .iter()
            .all(|q| !q.request_line().contains("Patient")
                && !q.request_line().starts_with("CONNECT"))
    );
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 3986 §6.2.2.2: "URIs that differ in the replacement of an unreserved character
/// with its corresponding percent-encoded US-ASCII octet are equivalent"; servlet
/// containers drop `;parameters` from a segment; ASP.NET matches paths without regard to
/// case. Each would let `/P%61tient/1`, `/Patient;x=1/1` or `/PATIENT/1` miss the
/// `/Patient` route (closed to this client) for the open `/` route while the upstream
/// serves Patient/1. The gateway refuses them instead (400): it never guesses which kind
/// of upstream it fronts.
#[tokio::test]
async fn route_choice_does_not_depend_on_encoding_parameters_or_case() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = raw_upstream().await;
    let mut o = Opts::new(up);
    o.routes = "  - name: patients\n    path_prefix: /Patient\n    token: none\n    \
                allow_subjects: [\"*CN=nobody*\"]\n  - name: rest\n    path_prefix: /\n    \
                token: none\n"
        .into();
    let (gw, addr) = gateway(&pki, &o).await;
    for (c, version) in [
        (tls_client(&pki, Some("client"), H1), "HTTP/1.1"),
        (tls_client(&pki, Some("client"), H2), "HTTP/2"),
    ] {
        // Control: the route itself refuses this client.
        send(&c, addr, get("/Patient/1"))
            .await
            .expect("refused")
            .assert_outcome(403, "REC_FORBIDDEN");
        for p in [
            "/P%61tient/1",
            "/%50atient/1",
            "/Patient%2D/1",
            "/%24process-message",
            "/Patient;x=1/1",
            "/Patient/1;jsessionid=x",
            "/patient/1",
            "/PATIENT",
        ] {
            send(&c, addr, get(p))
                .await
                .unwrap_or_else(|e| panic!("{version} {p}: {e}"))
                .assert_outcome(400, "REC_BAD_REQUEST");
        }
        // What the open route is for still works, encodings that have no literal form
        // included.
        for p in ["/Observation/1", "/Binary/a%20b", "/Binary/%C3%A9"] {
            let got = send(&c, addr, get(p)).await.expect("served");
            assert_eq!(got.status, StatusCode::OK, "{version} {p}");
        }
    }
    assert!(
        seen.complete().iter().all(
            |q| !q.request_line().to_ascii_lowercase().contains("atient")
                && !q.request_line().contains("process")
        ),
        "nothing but the controls reached the upstream"
    );
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn path_tricks_cannot_escape_a_route() {
    watch_panics();
    let pki = Pki::new();
    let (gw, addr, seen) = hostile_gateway(&pki).await;
    let paths = [
        "/metadata/../Patient/1",
        "/metadata/./../Patient/1",
        "/metadata/%2e%2e/Patient/1",
        "/metadata/%2E%2E/Patient/1",
        "/metadata/.%2e/Patient/1",
        "/metadata%2F..%2FPatient/1",
        "/metadata/..%2fPatient/1",
        "/metadata/..;/Patient/1",
        "/metadata/..;jsessionid=x/Patient/1",
        "/metadata/..%3b/Patient/1",
        "/metadata/%252e%252e/Patient/1",
        "/metadata/..%2FPatient/1",
        "/metadata/..%5CPatient/1",
        "/metadata//../Patient/1",
        "/metadata/%c0%ae%c0%ae/Patient/1",
        "/metadata/%e0%80%ae%e0%80%ae/Patient/1",
        "/metadata/%5c..%5cPatient/1",
        "/metadata\\..\\Patient\\1",
        "/metadata/%00/../Patient",
        "/metadata/%zz",
        "/metadata/%+0",
        "/metadata/\u{e9}",
        "//Patient/1",
        "/metadata//Patient/1",
    ];
    let control_before = seen.count();
    let mut refused = 0.0;
    for p in paths {
        let r = raw_h1(
            &pki,
            addr,
            format!("GET {p} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(r.status(), Some(400), "{p}: {}", r.text());
        assert!(r.is_outcome("REC_BAD_REQUEST"), "{p}: {}", r.text());
        refused += 1.0;
        // HTTP/2 where the path is representable as a URI.
        if let Ok(uri) = p.parse::<http::Uri>() {
            let req = Request::get(uri)
                .body(Full::new(Bytes::new()))
                .expect("req");
            let got = send(&tls_client(&pki, Some("client"), H2), addr, req)
                .await
                .expect("h2");
            got.assert_outcome(400, "REC_BAD_REQUEST");
            refused += 1.0;
        }
    }
    assert_eq!(rejections(&gw, "bad_path"), refused);
    assert_eq!(
        seen.count(),
        control_before,
        "no escape reached the upstream"
    );
    // Controls: the route itself works, the other route is refused by policy.
    let c = tls_client(&pki, Some("client"), H1);
    assert_eq!(
        send(&c, addr, get("/metadata")).await.expect("ok").status,
        StatusCode::OK
    );
    send(&c, addr, get("/Patient/1"))
        .await
        .expect("refused")
        .assert_outcome(403, "REC_FORBIDDEN");
    assert!(seen
        .complete()
        .iter()
        .all(|q| !q.request_line().contains("Patient")));
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

/// Headers only the gateway may set, sent by the client: repeated, in other cases,
/// named in `Connection`, over both protocols. The upstream sees each identity header
/// exactly once, with the gateway's value.
#[tokio::test]
async fn identity_headers_cannot_be_spoofed_or_duplicated() {
    watch_panics();
    let pki = Pki::new();
    let (gw, addr, seen) = gateway_with(&pki, "").await;
    let spoofs = [
        ("X-Client-Cert-Subject", "CN=attacker"),
        ("x-client-cert-subject", "CN=attacker-2"),
        ("X-CLIENT-CERT-CN", "attacker"),
        ("X-Client-Cert-Fingerprint", "00"),
        ("X-Client-Cert-Serial", "01"),
        ("X-Client-Cert-Issuer", "CN=evil CA"),
        ("X-Client-Cert-Bundle", "nhs-prod"),
        ("X-Fhirgate-Client-Id", "admin"),
        ("X-Fhirgate-Scopes", "system/*.*"),
        ("x-fhirgate-ods-code", "EVIL1"),
        ("X-Fhirgate-Auth", "checked"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-For", "10.0.0.2"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=10.0.0.1;host=evil.example"),
        ("X-Real-IP", "10.0.0.1"),
        // Naming an identity header as hop-by-hop must not remove the gateway's own.
        ("Connection", "X-Client-Cert-Subject, X-Client-Cert-CN"),
    ];
    let head: String = spoofs
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let raw =
        format!("GET /metadata HTTP/1.1\r\nHost: localhost\r\n{head}Connection: close\r\n\r\n");
    let r = raw_h1(&pki, addr, raw.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    let h1 = seen.complete().pop().expect("forwarded");

    let mut req = Request::get("/metadata");
    for (n, v) in spoofs.iter().filter(|(n, _)| *n != "Connection") {
        req = req.header(*n, *v);
    }
    let got = send(
        &tls_client(&pki, Some("client"), H2),
        addr,
        req.body(Full::new(Bytes::new())).expect("req"),
    )
    .await
    .expect("h2");
    assert_eq!(got.status, StatusCode::OK);
    let h2 = seen.complete().pop().expect("forwarded");

    for fwd in [h1, h2] {
        let one = |name: &str| {
            let v = fwd.header(name);
            assert_eq!(v.len(), 1, "{name} exactly once: {}", fwd.head);
            v[0].clone()
        };
        assert!(one("x-client-cert-subject").ends_with("CN=BaRS-X26.fhirgate-dev.nhs.uk"));
        assert_eq!(one("x-client-cert-cn"), "BaRS-X26.fhirgate-dev.nhs.uk");
        assert_eq!(one("x-client-cert-bundle"), "nhs-int");
        assert_eq!(one("x-client-cert-serial"), "20:01");
        assert_eq!(one("x-client-cert-fingerprint").len(), 64);
        assert!(one("x-client-cert-issuer").contains("fhirgate DEV SubCA"));
        assert_eq!(one("x-forwarded-for"), "127.0.0.1");
        assert_eq!(one("x-forwarded-proto"), "https");
        assert_eq!(one("x-forwarded-host"), "localhost");
        assert_eq!(one("x-fhirgate-auth"), "development");
        for gone in [
            "x-fhirgate-client-id",
            "x-fhirgate-scopes",
            "x-fhirgate-ods-code",
            "forwarded",
            "x-real-ip",
            "connection",
        ] {
            assert!(
                fwd.header(gone).is_empty(),
                "{gone} forwarded: {}",
                fwd.head
            );
        }
        assert!(!fwd.head.contains("attacker") && !fwd.head.contains("evil"));
    }
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 9113 §8.3.1: "A server SHOULD treat a request as malformed if it contains a Host
/// header field that identifies an entity that differs from the entity in the
/// ':authority' pseudo-header field." Such an HTTP/2 request is refused like any bad
/// `Host` (400, `bad_host`) and never forwarded; the same host in other letters or with
/// https's default port (RFC 9110 §4.2.3: such URIs are equivalent), or no `Host` at
/// all, is served.
#[tokio::test]
async fn http2_host_differing_from_authority_is_refused() {
    watch_panics();
    let pki = Pki::new();
    let (up, seen) = raw_upstream().await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let c = tls_client(&pki, Some("client"), H2);
    // `send` gives every HTTP/2 request `:authority: localhost`.
    let with_host = |host: Option<&'static str>| {
        let mut req = Request::get("/Patient/1");
        if let Some(h) = host {
            req = req.header("host", h);
        }
        req.body(Full::new(Bytes::new())).expect("req")
    };
    for host in ["evil.example", "localhost:8443", "localhost.evil.example"] {
        let got = send(&c, addr, with_host(Some(host))).await.expect("h2");
        assert_eq!(got.version, http::Version::HTTP_2);
        got.assert_outcome(400, "REC_BAD_REQUEST");
    }
    assert_eq!(rejections(&gw, "bad_host"), 3.0);
    assert_eq!(seen.count(), 0, "refused requests were forwarded");
    let same = [
        Some("LocalHost"),
        Some("localhost:443"),
        Some("localhost:"),
        None,
    ];
    for host in same {
        let got = send(&c, addr, with_host(host)).await.expect("h2");
        assert_eq!(got.status, StatusCode::OK, "{host:?}");
    }
    assert_eq!(seen.count(), same.len());
    gw.shutdown(Duration::from_secs(2)).await;
}

/// RFC 9112 §7.1.2: "A recipient that removes the chunked coding from a message MAY
/// selectively retain or discard the received trailer fields." A trailer section is a
/// header section the header checks never saw, so the gateway discards it: sent over
/// HTTP/2 and over HTTP/1.1 (chunked), to an HTTP/2 upstream (which would pass it on
/// as trailers) and an HTTP/1.1 one, identity names included, and the request is
/// still served with its body.
#[tokio::test]
async fn request_trailers_never_reach_the_upstream() {
    use hyper::body::Frame;
    watch_panics();
    let pki = Pki::new();
    let spoof = [
        ("x-client-cert-subject", "CN=evil"),
        ("x-fhirgate-ods-code", "EVIL1"),
        ("x-checksum", "abc"),
    ];
    let h1_raw = {
        let tr: String = spoof.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
        format!(
            "POST /Patient HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\n\
             Transfer-Encoding: chunked\r\nTrailer: x-client-cert-subject, x-fhirgate-ods-code, \
             x-checksum\r\nConnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n{tr}\r\n"
        )
    };
    let h2_send = |addr: SocketAddr| {
        let mut tr = http::HeaderMap::new();
        for (n, v) in spoof {
            tr.insert(n, http::HeaderValue::from_static(v));
        }
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from_static(b"{}"))),
            Ok(Frame::trailers(tr)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let req = Request::post("/Patient")
            .header("content-type", "application/fhir+json")
            .body(body)
            .expect("req");
        let c = tls_client(&pki, Some("client"), H2);
        async move { send(&c, addr, req).await.expect("h2 response") }
    };

    // An HTTP/2 upstream.
    let (up, seen) = h2c_upstream().await;
    let mut o = Opts::new(up);
    o.upstream_extra = "  http2: true\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let got = h2_send(addr).await;
    assert_eq!(got.status, StatusCode::OK);
    let r = raw_h1(&pki, addr, h1_raw.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen.len(), 2);
    for (i, (headers, body, trailers)) in seen.iter().enumerate() {
        assert_eq!(body.as_ref(), b"{}", "request {i}");
        assert!(trailers.is_none(), "request {i}: trailers {trailers:?}");
        assert!(
            headers.get("trailer").is_none()
                && headers.get_all("x-client-cert-subject").iter().count() == 1
                && headers.get("x-fhirgate-ods-code").is_none(),
            "request {i}: {headers:?}"
        );
    }
    gw.shutdown(Duration::from_secs(2)).await;

    // An HTTP/1.1 upstream, which sees the exact bytes: one complete request each, no
    // trailer section after the last chunk (it would be read as garbage), no spoof.
    let (up, raw_seen) = raw_upstream().await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let got = h2_send(addr).await;
    assert_eq!(got.status, StatusCode::OK);
    let r = raw_h1(&pki, addr, h1_raw.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    still_serves(&pki, addr).await;
    let reqs = raw_seen.complete();
    assert_eq!(raw_seen.aborted(), 0);
    for q in reqs.iter().filter(|q| q.request_line().starts_with("POST")) {
        assert_eq!(q.body, b"{}", "{}", q.head);
        assert!(
            !q.head.contains("evil") && !q.head.contains("EVIL"),
            "{}",
            q.head
        );
    }
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn authorization_with_several_schemes_or_values_is_refused_before_introspection() {
    watch_panics();
    let pki = Pki::new();
    let stub = StubAs::start().await;
    let (up, seen) = raw_upstream().await;
    let mut o = Opts::new(up);
    o.auth = stub.auth_yaml(&pki, "");
    o.limits = LIMITS.into();
    let (gw, addr) = gateway(&pki, &o).await;

    // (Authorization values, status, NHS code). RFC 6750 §3.1: a request that "repeats
    // the same parameter ... or is otherwise malformed" is `invalid_request`, 400.
    let cases: &[(&[&str], u16, &str)] = &[
        (&["Basic dXNlcjpwYXNz"], 401, "REC_UNAUTHORIZED"),
        (&["Negotiate YIIGhgYGKwYBBQUCoII="], 401, "REC_UNAUTHORIZED"),
        (
            &["Basic dXNlcjpwYXNz, Bearer good-1"],
            401,
            "REC_UNAUTHORIZED",
        ),
        (
            &["Bearer good-1, Basic dXNlcjpwYXNz"],
            400,
            "REC_BAD_REQUEST",
        ),
        (&["Bearer good-1 good-2"], 400, "REC_BAD_REQUEST"),
        (&["Bearer\tgood-1"], 400, "REC_BAD_REQUEST"),
        (&["Bearer good-1", "Bearer good-1"], 400, "REC_BAD_REQUEST"),
        (
            &["Bearer good-1", "Basic dXNlcjpwYXNz"],
            400,
            "REC_BAD_REQUEST",
        ),
        (
            &["Basic dXNlcjpwYXNz", "Bearer good-1"],
            400,
            "REC_BAD_REQUEST",
        ),
    ];
    for alpn in [H1, H2] {
        let c = tls_client(&pki, Some("client"), alpn);
        for (values, status, code) in cases {
            let mut req = Request::get("/metadata");
            for v in *values {
                req = req.header("authorization", *v);
            }
            let got = send(&c, addr, req.body(Full::new(Bytes::new())).expect("req"))
                .await
                .expect("answered");
            got.assert_outcome(*status, code);
            assert!(got.headers.contains_key("www-authenticate"), "{values:?}");
        }
        // A token only in Proxy-Authorization is no token, and is not passed on.
        let req = Request::get("/metadata")
            .header("proxy-authorization", "Bearer good-1")
            .body(Full::new(Bytes::new()))
            .expect("req");
        send(&c, addr, req)
            .await
            .expect("answered")
            .assert_outcome(401, "REC_UNAUTHORIZED");
    }
    assert_eq!(
        stub.calls(),
        0,
        "malformed credentials never cost an introspection"
    );
    assert_eq!(seen.count(), 0);
    assert_eq!(rejections(&gw, "token_missing"), 8.0);
    assert_eq!(rejections(&gw, "token_invalid_request"), 12.0);

    // The control: one well-formed bearer token is introspected once and forwarded.
    let req = Request::get("/metadata")
        .header("authorization", "Bearer good-1")
        .header("proxy-authorization", "Basic eA==")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let got = send(&tls_client(&pki, Some("client"), H1), addr, req)
        .await
        .expect("ok");
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(stub.calls(), 1);
    let fwd = seen.complete().pop().expect("forwarded");
    assert!(fwd.header("proxy-authorization").is_empty());
    assert_eq!(
        fwd.header("x-fhirgate-client-id"),
        vec!["sender-1".to_owned()]
    );
    assert_eq!(panics(), 0);
    gw.shutdown(Duration::from_secs(2)).await;
}

/// HTTP/2 abuse with hand-made frames: the limits advertised in SETTINGS hold, and
/// rapid reset, CONTINUATION floods, HPACK bombs, stream-error floods and streams over
/// the concurrency limit end the stream or the connection without reaching the
/// upstream in bulk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_abuse_is_contained() {
    watch_panics();
    let pki = Pki::new();
    let (gw, addr, seen) = hostile_gateway(&pki).await;

    // SETTINGS: MAX_CONCURRENT_STREAMS (3) and MAX_HEADER_LIST_SIZE (6) from the limits.
    let mut s = raw_h2(&pki, addr).await;
    let frames = parse_frames(&read_for(&mut s, Duration::from_millis(300)).await.bytes);
    let settings = frames
        .iter()
        .find(|f| f.kind == SETTINGS && f.flags & ACK == 0)
        .expect("server SETTINGS")
        .settings();
    assert!(settings.contains(&(3, 4)), "{settings:?}");
    // Twice limits.max_header_bytes: up to there the gateway itself refuses with an
    // OperationOutcome (see oversized_header_sections_are_refused_on_both_protocols).
    assert!(settings.contains(&(6, 16384)), "{settings:?}");
    drop(s);

    let goaway = |frames: &[Frame]| {
        frames
            .iter()
            .find(|f| f.kind == GOAWAY)
            .and_then(|f| f.error_code())
    };

    // Rapid reset (CVE-2023-44487): 2000 requests each cancelled at once.
    let before = seen.count();
    let mut s = raw_h2(&pki, addr).await;
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        burst.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &hpack_get("/metadata"),
        ));
        burst.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
    }
    write_quietly(&mut s, &burst).await;
    let r = read_for(&mut s, Duration::from_secs(3)).await;
    assert!(r.closed, "rapid reset: connection closed");
    assert_eq!(goaway(&parse_frames(&r.bytes)), Some(ENHANCE_YOUR_CALM));
    let reached = seen.count() - before;
    assert!(
        reached <= 25,
        "rapid reset: {reached} of 2000 reached the upstream"
    );

    // Streams over MAX_CONCURRENT_STREAMS are refused, not queued.
    let before = seen.count();
    let mut s = raw_h2(&pki, addr).await;
    let mut b = Vec::new();
    for i in 0..10u32 {
        b.extend(frame(
            HEADERS,
            END_HEADERS,
            1 + 2 * i,
            &hpack_get("/metadata"),
        ));
    }
    write_quietly(&mut s, &b).await;
    let frames = parse_frames(&read_for(&mut s, Duration::from_millis(1500)).await.bytes);
    let refused = frames
        .iter()
        .filter(|f| f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM))
        .count();
    assert_eq!(refused, 6, "{frames:?}");
    assert!(seen.count() - before <= 4);
    drop(s);

    // CONTINUATION flood (CVE-2024-27316 style): an endless header block.
    let mut s = raw_h2(&pki, addr).await;
    let mut b = frame(HEADERS, 0, 1, &hpack_get("/metadata"));
    let block: Vec<u8> = (0..9)
        .flat_map(|_| hpack_literal("x-junk", &[b'j'; 100]))
        .collect();
    for _ in 0..5000 {
        b.extend(frame(CONTINUATION, 0, 1, &block));
    }
    write_quietly(&mut s, &b).await;
    let r = read_for(&mut s, Duration::from_secs(3)).await;
    assert!(r.closed, "CONTINUATION flood: connection closed");
    assert_eq!(goaway(&parse_frames(&r.bytes)), Some(ENHANCE_YOUR_CALM));

    // HPACK bomb: a 4000-byte dynamic-table entry referenced 2000 times (8 MB decoded).
    let mut s = raw_h2(&pki, addr).await;
    let mut block = hpack_get("/metadata");
    block.push(0x40);
    block.extend(hpack_string(b"x-bomb"));
    block.extend(hpack_string(&[b'b'; 4000]));
    block.extend(std::iter::repeat_n(0x80 | 62, 2000));
    write_quietly(&mut s, &frame(HEADERS, END_HEADERS | END_STREAM, 1, &block)).await;
    let r = read_for(&mut s, Duration::from_secs(3)).await;
    assert!(r.closed, "HPACK bomb: connection closed");
    let code = goaway(&parse_frames(&r.bytes));
    assert!(
        code == Some(ENHANCE_YOUR_CALM) || code == Some(COMPRESSION_ERROR),
        "{code:?}"
    );

    // Stream errors provoked on purpose ("MadeYouReset", CVE-2025-8671): a zero
    // WINDOW_UPDATE on each new stream.
    let before = seen.count();
    let mut s = raw_h2(&pki, addr).await;
    let mut b = Vec::new();
    for i in 0..1000u32 {
        let id = 1 + 2 * i;
        b.extend(frame(HEADERS, END_HEADERS, id, &hpack_get("/metadata")));
        b.extend(frame(WINDOW_UPDATE, 0, id, &0u32.to_be_bytes()));
    }
    write_quietly(&mut s, &b).await;
    let r = read_for(&mut s, Duration::from_secs(3)).await;
    assert!(r.closed, "stream-error flood: connection closed");
    assert!(goaway(&parse_frames(&r.bytes)).is_some());
    assert!(seen.count() - before <= 4);

    // Malformed single requests reset just their stream: a connection-specific header,
    // and a body longer than its content-length.
    let before = seen.count();
    let mut s = raw_h2(&pki, addr).await;
    let mut te = hpack_get("/metadata");
    te.extend(hpack_literal("transfer-encoding", b"chunked"));
    let mut b = frame(HEADERS, END_HEADERS | END_STREAM, 1, &te);
    let mut post = vec![0x83, 0x87, 0x04]; // POST, https, :path literal
    post.extend(hpack_string(b"/metadata"));
    post.push(0x01);
    post.extend(hpack_string(b"localhost"));
    post.extend(hpack_literal("content-length", b"3"));
    b.extend(frame(HEADERS, END_HEADERS, 3, &post));
    b.extend(frame(DATA, END_STREAM, 3, b"abcdefgh"));
    write_quietly(&mut s, &b).await;
    let frames = parse_frames(&read_for(&mut s, Duration::from_millis(800)).await.bytes);
    for id in [1, 3] {
        assert!(
            frames.iter().any(|f| f.stream == id
                && f.kind == RST_STREAM
                && f.error_code() == Some(PROTOCOL_ERROR)),
            "stream {id} reset: {frames:?}"
        );
    }
    assert_eq!(
        seen.count(),
        before,
        "no malformed stream completed upstream"
    );

    // PING and SETTINGS floods from a peer that does not read its answers.
    for kind in [PING, SETTINGS] {
        let mut s = raw_h2(&pki, addr).await;
        let mut b = Vec::new();
        for i in 0..20_000u64 {
            if kind == PING {
                b.extend(frame(PING, 0, 0, &i.to_be_bytes()));
            } else {
                b.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
            }
        }
        let write = tokio::time::timeout(Duration::from_secs(3), s.write_all(&b)).await;
        still_serves(&pki, addr).await;
        drop(write);
    }

    wait_metric(
        &gw,
        "fhirgate_connection_errors_total{kind=\"h2_enhance_your_calm\"}",
        2.0,
    )
    .await;
    still_serves(&pki, addr).await;
    gw.shutdown(Duration::from_secs(2)).await;
}

// ---------------------------------------------------------------------------------------
// The first hostile suite (issue 8), folded in: its cases that no table above has.
// ---------------------------------------------------------------------------------------

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
    still_serves_h1(&pki, addr).await;
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
    // The path tricks this test used to send are in path_tricks_cannot_escape_a_route
    // (HTTP/1.1 and HTTP/2, with the NHS code and the bad_path metric).
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
        still_serves_h1(&pki, addr)
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
    still_serves_h1(&pki, addr).await;
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
    still_serves_h1(&pki, addr).await;
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
