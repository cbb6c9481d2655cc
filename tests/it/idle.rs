//! Idle HTTP/1.1 keep-alive connections are parked: after a quarter of a second with
//! nothing to do, hyper's connection (its 8 KiB read and write buffers, its state) is
//! released and only the TLS session is kept until the client's next bytes. What a
//! client sees must not change: the next request on the connection is served, a request
//! that was only partly sent (or partly read by hyper) is never cut at the park, a parked connection still closes
//! at `idle_timeout` with a TLS close_notify, and a draining gateway closes it at once.
//! The connection stays persistent across a park (RFC 9112 §9.3), and RFC 8446 §6.1:
//! "Each party MUST send a "close_notify" alert before closing its write side of the
//! connection, unless it has already sent some error alert."

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;
use fhirgate::server::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARKED: &str = "fhirgate_parked_connections";
/// Long enough for the gateway to park a quiet connection (250 ms quiet, checked every
/// 250 ms), with room for a slow CI machine.
const PARK_WAIT: Duration = Duration::from_millis(1200);

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").into_bytes()
}

/// A POST head declaring `len` body bytes, followed by `then` (part or all of the body,
/// and perhaps more).
fn post(path: &str, len: usize, then: &[u8]) -> Vec<u8> {
    let mut r = format!("POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/fhir+json\r\nContent-Length: {len}\r\n\r\n").into_bytes();
    r.extend_from_slice(then);
    r
}

/// The parked-connections gauge after long enough for a quiet connection to be parked.
async fn parked_after_quiet(gw: &Running) -> f64 {
    tokio::time::sleep(PARK_WAIT).await;
    metric(gw, PARKED)
}

/// Reads one response's worth (until 300 ms pass with the connection open).
async fn answer<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Raw {
    read_for(s, Duration::from_millis(300)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_connections_are_parked_and_resumed_without_changing_the_exchange() {
    let pki = Pki::new();
    let (up, seen) = raw_upstream().await;
    let mut o = Opts::new(up);
    o.limits = "  idle_timeout: 4s\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let connector = connector_h1(&pki);

    // Parked after a request, resumed by the next one, twice over on one connection.
    let mut s = connect(&connector, addr).await.expect("tls");
    for i in 0..3 {
        s.write_all(&get(&format!("/metadata/{i}")))
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            metric(&gw, PARKED),
            0.0,
            "a request resumes a parked connection"
        );
        let r = answer(&mut s).await;
        assert_eq!(r.status(), Some(200), "request {i}: {}", r.text());
        assert!(!r.closed, "request {i}: the connection stays open");
        if i < 2 {
            assert_eq!(
                parked_after_quiet(&gw).await,
                1.0,
                "quiet connection parked ({i})"
            );
        }
    }

    // A request head sent in part is not a quiet connection: never parked, and its end
    // completes it.
    assert_eq!(parked_after_quiet(&gw).await, 1.0);
    s.write_all(b"GET /metadata/split HTTP/1.1\r\nHo")
        .await
        .expect("write");
    assert_eq!(
        parked_after_quiet(&gw).await,
        0.0,
        "a started request is not parked"
    );
    s.write_all(b"st: localhost\r\n\r\n").await.expect("write");
    assert_eq!(answer(&mut s).await.status(), Some(200));

    // A body stalled half way: not parked either, and the message boundary holds (the
    // request after it is its own request, not the rest of a body).
    s.write_all(&post("/metadata/body", 10, b"01234"))
        .await
        .expect("write");
    assert_eq!(
        parked_after_quiet(&gw).await,
        0.0,
        "a request with half its body is not parked"
    );
    s.write_all(b"56789").await.expect("write");
    assert_eq!(answer(&mut s).await.status(), Some(200));
    // Two pipelined requests across a park.
    assert_eq!(parked_after_quiet(&gw).await, 1.0);
    let mut two = get("/metadata/p1");
    two.extend(get("/metadata/p2"));
    s.write_all(&two).await.expect("write");
    assert_eq!(answer(&mut s).await.statuses(), vec![200, 200]);
    // A body and the start of the next request in one write: hyper holds those bytes
    // when the connection goes quiet; they are served, not dropped and not parked.
    tokio::time::sleep(PARK_WAIT).await;
    s.write_all(&post(
        "/metadata/with-next",
        2,
        b"{}GET /metadata/next HTTP/1.1\r\nHo",
    ))
    .await
    .expect("write");
    assert_eq!(answer(&mut s).await.status(), Some(200));
    assert_eq!(
        parked_after_quiet(&gw).await,
        0.0,
        "held bytes of a request: not parked"
    );
    s.write_all(b"st: localhost\r\n\r\n").await.expect("write");
    assert_eq!(answer(&mut s).await.status(), Some(200));

    let lines: Vec<String> = seen
        .complete()
        .iter()
        .map(|q| q.request_line().to_owned())
        .collect();
    assert_eq!(
        lines,
        [
            "GET /metadata/0 HTTP/1.1",
            "GET /metadata/1 HTTP/1.1",
            "GET /metadata/2 HTTP/1.1",
            "GET /metadata/split HTTP/1.1",
            "POST /metadata/body HTTP/1.1",
            "GET /metadata/p1 HTTP/1.1",
            "GET /metadata/p2 HTTP/1.1",
            "POST /metadata/with-next HTTP/1.1",
            "GET /metadata/next HTTP/1.1",
        ],
        "every request reached the upstream once, whole"
    );
    let body = seen.complete()[4].body.clone();
    assert_eq!(body, b"0123456789", "the stalled body arrived whole");

    // A parked connection still ends at idle_timeout (4 s after its last request), with
    // a TLS close_notify (a clean end of stream), not a bare FIN or a reset.
    let t = Instant::now();
    assert_eq!(parked_after_quiet(&gw).await, 1.0);
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(Duration::from_secs(8), s.read(&mut buf)).await;
    let took = t.elapsed();
    assert!(
        matches!(end, Ok(Ok(0))),
        "closed with close_notify: {end:?}"
    );
    assert!(
        took > Duration::from_secs(3) && took < Duration::from_secs(6),
        "closed at idle_timeout (4 s), took {took:?}"
    );
    assert_eq!(metric(&gw, PARKED), 0.0);

    // HTTP/2 connections are not parked (h2 keeps its own, smaller state).
    let h2 = tls_client(&pki, Some("client"), H2);
    let mut h2s = connect(&h2, addr).await.expect("tls h2");
    assert_eq!(parked_after_quiet(&gw).await, 0.0, "HTTP/2 is not parked");
    drop(h2s.shutdown().await);

    // A draining gateway closes a parked connection at once rather than waiting for it.
    let mut s = connect(&connector, addr).await.expect("tls");
    s.write_all(&get("/metadata/last")).await.expect("write");
    assert_eq!(answer(&mut s).await.status(), Some(200));
    assert_eq!(parked_after_quiet(&gw).await, 1.0);
    let t = Instant::now();
    let (left, end) = tokio::join!(
        gw.shutdown(Duration::from_secs(5)),
        tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
    );
    assert_eq!(left, 0, "no connection left open by the drain");
    assert!(
        matches!(end, Ok(Ok(0))),
        "closed with close_notify: {end:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "closed at once when draining, took {:?}",
        t.elapsed()
    );
}

/// An upstream that answers each request as soon as its head arrives, then reads the
/// body and records it (a server may answer before it has read the whole request).
async fn early_answering_upstream() -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let seen = bodies.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    buf.drain(..end);
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 2\r\n\r\n{}";
                    if tcp.write_all(answer).await.is_err() {
                        return;
                    }
                    while buf.len() < len {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..len).collect();
                    seen.lock().expect("lock").push(body);
                }
            });
        }
    });
    (addr, bodies)
}

/// The upstream answered before the client finished its body, and the client pauses:
/// the response is sent, but the request is not over, so the connection is not parked;
/// the rest of the body reaches the upstream and the connection serves the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_request_body_is_unfinished_is_not_parked() {
    let pki = Pki::new();
    let (up, bodies) = early_answering_upstream().await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let mut s = connect(&connector_h1(&pki), addr).await.expect("tls");
    s.write_all(&post("/metadata/early", 10, b"01234"))
        .await
        .expect("write");
    let r = answer(&mut s).await;
    assert_eq!(r.status(), Some(200), "answered early: {}", r.text());
    assert_eq!(
        parked_after_quiet(&gw).await,
        0.0,
        "request body unfinished: not parked"
    );
    s.write_all(b"56789").await.expect("write");
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.write_all(&get("/metadata/after")).await.expect("write");
    let r = answer(&mut s).await;
    assert_eq!(
        r.status(),
        Some(200),
        "the connection still serves: {}",
        r.text()
    );
    assert_eq!(
        bodies.lock().expect("lock").first().map(Vec::as_slice),
        Some(&b"0123456789"[..]),
        "the whole body reached the upstream"
    );
}
