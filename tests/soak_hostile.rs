//! Bounded soak of the real binary under mixed good and hostile traffic, with a SIGHUP
//! reload every 5 s (alternately a good configuration and a CRL replaced by garbage).
//! Records the gateway's RSS and open file descriptors after warm-up and after the run
//! and fails if either grew beyond the tolerance, if a good request failed, or if the
//! gateway logged a panic.
//!
//! Not part of `cargo test` (it is `#[ignore]`d). Run it with
//!
//! ```sh
//! cargo test --release --test soak_hostile -- --ignored --nocapture          # 120 s
//! SOAK_SECONDS=60 cargo test --release --test soak_hostile -- --ignored --nocapture
//! ```
//!
//! `SOAK_SECONDS` is capped at 600. Loopback only; every task stops by itself.

#[path = "it/harness/mod.rs"]
mod harness;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use harness::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// RSS may grow by this fraction or this many bytes, whichever is larger.
const RSS_TOLERANCE: f64 = 0.25;
const RSS_TOLERANCE_BYTES: u64 = 8 * 1024 * 1024;
/// Open file descriptors may grow by this many.
const FD_TOLERANCE: usize = 10;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

fn admin_get(addr: SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("admin");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// A small non-recording upstream: 200 with a FHIR body; `/big` sends 1 MiB.
async fn quiet_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path() == "/big" {
                        Bytes::from(vec![b'z'; 1024 * 1024])
                    } else {
                        Bytes::from_static(br#"{"resourceType":"Parameters"}"#)
                    };
                    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

#[derive(Default)]
struct Tally {
    good: AtomicU64,
    good_failed: AtomicU64,
    refused_http: AtomicU64,
    refused_tls: AtomicU64,
    hostile: AtomicU64,
    reloads: AtomicU64,
}

fn nhsd_request(path: &str, token: &str, break_nhsd: bool) -> Request<Full<Bytes>> {
    let mut b = Request::get(path).header("authorization", format!("Bearer {token}"));
    for (name, value) in fhirgate::pipeline::nhsd::example_headers() {
        let v = if break_nhsd && name == fhirgate::pipeline::nhsd::END_USER_ORGANISATION {
            "bm90IGpzb24=".to_owned() // "not json"
        } else {
            value
        };
        b = b.header(name, v);
    }
    b.body(Full::new(Bytes::new())).expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run with --ignored (see the file header)"]
async fn soak_hostile() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120)
        .clamp(10, 600);
    let pki = Pki::new();
    let up = quiet_upstream().await;
    let stub = StubAs::start().await;
    let gw_addr = free_addr();
    let admin = free_addr();
    let mut o = Opts::new(up);
    o.auth = stub.auth_yaml(&pki, "");
    o.limits =
        "  idle_timeout: 3s\n  header_read_timeout: 2s\n  max_concurrent_streams: 8\n".into();
    o.routes = format!(
        "  - name: capabilities\n    path_prefix: /metadata\n    token: none\n  - name: all\n    path_prefix: /\nnhsd: {{}}\nadmin:\n  address: {admin}\n"
    );
    let cfg = pki.path("config.yaml");
    std::fs::write(
        &cfg,
        config_yaml(&pki, &o).replace("127.0.0.1:0", &gw_addr.to_string()),
    )
    .expect("config");
    let log = pki.path("gateway.log");
    let child = run_gateway(&cfg, &log, &[("FHIRGATE_LOG", "warn")]);
    let pid = child.0.id();
    let mut up_ok = false;
    for _ in 0..100 {
        if std::net::TcpStream::connect(admin).is_ok() {
            up_ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up_ok, "gateway did not start");

    let tally = Arc::new(Tally::default());
    let pki = Arc::new(pki);

    // Warm-up: some of every kind of traffic, then measure at rest.
    run_traffic(
        pki.clone(),
        gw_addr,
        tally.clone(),
        Duration::from_secs(5),
        pid,
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (rss0, fd0) = (rss_bytes(pid), fds(pid));
    println!(
        "soak: after warm-up RSS {:.1} MB, {fd0} fds",
        rss0 as f64 / 1e6
    );

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    run_traffic(
        pki.clone(),
        gw_addr,
        tally.clone(),
        Duration::from_secs(seconds),
        pid,
        Some(pki.path("sub-ca.crl")),
    )
    .await;
    let ran = started.elapsed();
    // Let idle and stalled connections time out (idle_timeout 3 s, twice).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (rss1, fd1) = (rss_bytes(pid), fds(pid));
    let metrics = admin_get(admin, "/metrics");
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let t = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "soak: {:.0} s; good {} (failed {}), refused HTTP {}, refused TLS {}, hostile exchanges {}, reloads {} (ok {}, refused {})",
        ran.as_secs_f64(),
        t(&tally.good),
        t(&tally.good_failed),
        t(&tally.refused_http),
        t(&tally.refused_tls),
        t(&tally.hostile),
        t(&tally.reloads),
        sample("fhirgate_reloads_total{result=\"ok\"}"),
        sample("fhirgate_reloads_total{result=\"error\"}"),
    );
    println!(
        "soak: gateway counted {} requests, {} refused handshakes, {} connection errors",
        sample("fhirgate_requests_total"),
        sample("fhirgate_tls_handshakes_total")
            - sample("fhirgate_tls_handshakes_total{result=\"ok\"}"),
        sample("fhirgate_connection_errors_total"),
    );
    println!(
        "soak: RSS {:.1} MB -> {:.1} MB, fds {fd0} -> {fd1} (tolerance: RSS +{:.0}% or +{} MB, fds +{FD_TOLERANCE})",
        rss0 as f64 / 1e6,
        rss1 as f64 / 1e6,
        RSS_TOLERANCE * 100.0,
        RSS_TOLERANCE_BYTES / 1024 / 1024
    );

    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains("panicked"),
        "gateway panicked:\n{log_text}"
    );
    assert!(child.0.id() == pid && admin_get(admin, "/healthz").contains("200 OK"));
    assert_eq!(t(&tally.good_failed), 0, "good requests failed");
    assert!(
        t(&tally.good) > seconds * 10,
        "too little good traffic to mean anything"
    );
    assert!(sample("fhirgate_reloads_total{result=\"error\"}") >= 1.0);
    assert!(sample("fhirgate_reloads_total{result=\"ok\"}") >= 1.0);
    let allowed = (rss0 as f64 * RSS_TOLERANCE).max(RSS_TOLERANCE_BYTES as f64);
    assert!(
        (rss1 as f64) <= rss0 as f64 + allowed,
        "RSS grew from {rss0} to {rss1}"
    );
    assert!(fd1 <= fd0 + FD_TOLERANCE, "fds grew from {fd0} to {fd1}");
}

/// Runs every traffic kind until `duration` passes. With `crl`, also sends SIGHUP every
/// 5 s, alternating a good configuration and the CRL replaced by garbage.
async fn run_traffic(
    pki: Arc<Pki>,
    addr: SocketAddr,
    tally: Arc<Tally>,
    duration: Duration,
    pid: u32,
    crl: Option<std::path::PathBuf>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let spawn =
        |tasks: &mut Vec<tokio::task::JoinHandle<()>>,
         f: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            tasks.push(tokio::spawn(f));
        };
    let on = |stop: &Arc<AtomicBool>| !stop.load(Ordering::Relaxed);

    // Good traffic: HTTP/1.1 keep-alive (100 requests a connection) and HTTP/2.
    for alpn in [H1, H2] {
        let (pki, tally, stop) = (pki.clone(), tally.clone(), stop.clone());
        spawn(
            &mut tasks,
            Box::pin(async move {
                let c = tls_client(&pki, Some("client"), alpn);
                let mut n = 0u64;
                while on(&stop) {
                    n += 1;
                    let req = nhsd_request("/Patient/1", &format!("good-{}", n % 50), false);
                    match send(&c, addr, req).await {
                        Ok(g) if g.status == StatusCode::OK => {
                            tally.good.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            eprintln!("good request failed: {other:?}");
                            tally.good_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }),
        );
    }
    {
        let (pki, tally, stop) = (pki.clone(), tally.clone(), stop.clone());
        spawn(
            &mut tasks,
            Box::pin(async move {
                let c = tls_client(&pki, Some("client"), H1);
                while on(&stop) {
                    let Ok((mut tx, _task)) = open_h1(&c, addr).await else {
                        tally.good_failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    for i in 0..100 {
                        if !on(&stop) {
                            break;
                        }
                        let mut req =
                            nhsd_request("/Patient/1", &format!("good-ka-{}", i % 10), false);
                        req.headers_mut()
                            .insert("host", http::HeaderValue::from_static("localhost"));
                        match tx.send_request(req).await {
                            Ok(r) if r.status() == StatusCode::OK => {
                                let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                                tally.good.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                eprintln!("keep-alive request failed: {other:?}");
                                tally.good_failed.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            }),
        );
    }
    // Refused at the HTTP layer: bad tokens, broken NHSD headers, path escapes.
    {
        let (pki, tally, stop) = (pki.clone(), tally.clone(), stop.clone());
        spawn(
            &mut tasks,
            Box::pin(async move {
                let c = tls_client(&pki, Some("client"), H2);
                let mut n = 0u64;
                while on(&stop) {
                    n += 1;
                    let (req, want) = match n % 3 {
                        0 => (nhsd_request("/Patient/1", &format!("bad-{n}"), false), 403),
                        1 => (nhsd_request("/Patient/1", "good-1", true), 400),
                        _ => (
                            nhsd_request("/metadata/..;/Patient/1", "good-1", false),
                            400,
                        ),
                    };
                    match send(&c, addr, req).await {
                        Ok(g) if g.status.as_u16() == want => {
                            tally.refused_http.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            eprintln!("refusal {n} wrong: {other:?}");
                            tally.good_failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }),
        );
    }
    // Refused in the handshake.
    {
        let (pki, tally, stop) = (pki.clone(), tally.clone(), stop.clone());
        spawn(
            &mut tasks,
            Box::pin(async move {
                let bad = [
                    tls_client(&pki, Some("revoked-client"), H1),
                    tls_client(&pki, Some("expired-client"), H1),
                    tls_client(&pki, Some("foreign-client"), H1),
                    tls_client(&pki, Some("server-only-client"), H1),
                    tls_client(&pki, None, H1),
                ];
                let mut n = 0;
                while on(&stop) {
                    n += 1;
                    if send(&bad[n % bad.len()], addr, get("/metadata"))
                        .await
                        .is_ok()
                    {
                        eprintln!("bad certificate served");
                        tally.good_failed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        tally.refused_tls.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }),
        );
    }
    // Hostile exchanges, one after another: garbage instead of TLS, request smuggling,
    // HTTP/2 rapid reset and CONTINUATION flood, slowloris, a client that never reads.
    {
        let (pki, tally, stop) = (pki.clone(), tally.clone(), stop.clone());
        spawn(
            &mut tasks,
            Box::pin(async move {
                let mut n = 0u32;
                while on(&stop) {
                    n += 1;
                    match n % 6 {
                        0 => {
                            let mut s = tcp(addr).await;
                            write_quietly(&mut s, b"GET / HTTP/1.1\r\n\r\n").await;
                            let _ = read_for(&mut s, Duration::from_millis(500)).await;
                        }
                        1 => {
                            let req = b"POST /metadata HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /metadata HTTP/1.1\r\nHost: x\r\n\r\n";
                            let _ = raw_h1(&pki, addr, req, Duration::from_millis(500)).await;
                        }
                        2 => {
                            let mut s = raw_h2(&pki, addr).await;
                            let mut b = Vec::new();
                            for i in 0..200u32 {
                                let id = 1 + 2 * i;
                                b.extend(frame(
                                    HEADERS,
                                    END_HEADERS | END_STREAM,
                                    id,
                                    &hpack_get("/metadata"),
                                ));
                                b.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
                            }
                            write_quietly(&mut s, &b).await;
                            let _ = read_for(&mut s, Duration::from_millis(500)).await;
                        }
                        3 => {
                            let mut s = raw_h2(&pki, addr).await;
                            let mut b = frame(HEADERS, 0, 1, &hpack_get("/metadata"));
                            let block = hpack_literal("x-junk", &[b'j'; 100]);
                            for _ in 0..500 {
                                b.extend(frame(CONTINUATION, 0, 1, &block));
                            }
                            write_quietly(&mut s, &b).await;
                            let _ = read_for(&mut s, Duration::from_millis(500)).await;
                        }
                        4 => {
                            // Slowloris left to the header-read timeout, in the background.
                            let pki = pki.clone();
                            tokio::spawn(async move {
                                let c = tls_client(&pki, Some("client"), H1);
                                if let Ok(mut s) = connect(&c, addr).await {
                                    let _ =
                                        s.write_all(b"GET /metadata HTTP/1.1\r\nHost: x\r\n").await;
                                    let _ = read_for(&mut s, Duration::from_secs(4)).await;
                                }
                            });
                        }
                        _ => {
                            // Asks for 1 MiB, reads nothing, holds on until dropped.
                            let pki = pki.clone();
                            tokio::spawn(async move {
                                let c = tls_client(&pki, Some("client"), H1);
                                if let Ok(mut s) = connect(&c, addr).await {
                                    let _ = s.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer good-1\r\n\r\n").await;
                                    tokio::time::sleep(Duration::from_secs(8)).await;
                                }
                            });
                        }
                    }
                    tally.hostile.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }),
        );
    }
    // Reloads.
    if let Some(crl) = crl {
        let (tally, stop) = (tally.clone(), stop.clone());
        spawn(
            &mut tasks,
            Box::pin(async move {
                let good = std::fs::read(&crl).expect("crl");
                let mut n = 0u32;
                while on(&stop) {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    n += 1;
                    if n % 2 == 0 {
                        std::fs::write(
                            &crl,
                            b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n",
                        )
                        .expect("write");
                    } else {
                        std::fs::write(&crl, &good).expect("write");
                    }
                    let ok = Command::new("kill")
                        .args(["-HUP", &pid.to_string()])
                        .status()
                        .map(|s| s.success())
                        .unwrap_or(false);
                    assert!(ok, "SIGHUP");
                    tally.reloads.fetch_add(1, Ordering::Relaxed);
                }
                std::fs::write(&crl, &good).expect("restore");
            }),
        );
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
}
