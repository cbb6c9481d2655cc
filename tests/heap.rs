//! What connections hold on the gateway's heap, counted (issue 14's memory target: ≤ 24 KB
//! per idle TLS connection):
//!
//! - an idle HTTP/1.1 keep-alive connection, once parked, keeps its TLS session and the
//!   wait for the client's next bytes; hyper's connection, with its read buffer (8 KiB or
//!   more), is released. The bench measures this in RSS with 5,000 connections on every
//!   full run; this guards it in every `cargo test` run, with a count that does not
//!   depend on the page cache;
//! - an HTTP/2 connection keeps the response header fields its HPACK encoder indexed
//!   (RFC 7541 §2.3.2: the dynamic table lives as long as the connection). They must not
//!   keep alive the buffers they were parsed from: each upstream response's head is read
//!   into an upstream connection's read buffer (8 KiB and more), and a field that is new
//!   on each response (`Date` once a second, a `Last-Modified`, an upstream's own
//!   request id) would keep one such buffer per table entry.
//!
//! Its own test binary because it counts every allocation in the process: the gateway
//! runs here, the clients in separate processes (Python's `ssl` and `http.client`, and
//! curl, OpenSSL and nghttp2 underneath), so their memory is not counted. The tests take
//! turns ([`SERIAL`]) because the count is process-wide.

#[path = "it/harness/mod.rs"]
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fhirgate::server::Running;
use harness::*;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Bytes allocated and not yet freed, process-wide.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed to `System` unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// One measurement at a time: the count is process-wide.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Idle connections held by the client process.
const CONNECTIONS: usize = 200;
/// Heap per parked connection this test accepts. Measured (requested bytes, TLS 1.3) at
/// 11.4 KiB for the ECDSA leaf and 12.3 KiB for the RSA leaf + SubCA; one that kept
/// hyper's read buffer while parked held 19.5 KiB (ECDSA), so this fails for that.
const MAX_PER_CONNECTION: isize = 16 * 1024;

/// An upstream that records nothing (a recording one would grow with every request) and
/// counts what it answered: each answer carries a `Last-Modified` of its own, as a FHIR
/// server's reads of resources changed at different times do; `/slow` is answered after 5 s.
async fn quiet_upstream() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if req.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/fhir+json")
                                .header(
                                    "last-modified",
                                    format!(
                                        "Mon, 01 Jan 2024 {:02}:{:02}:{:02} GMT",
                                        n / 3600 % 24,
                                        n / 60 % 60,
                                        n % 60
                                    ),
                                )
                                .body(Full::new(Bytes::from_static(
                                    br#"{"resourceType":"Patient","id":"1"}"#,
                                )))
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Opens `n` keep-alive connections one after another, sends one GET on each, reads its
/// answer, prints `ready`, and holds them all until its stdin closes.
const CLIENT: &str = r#"
import http.client, ssl, sys
port, n, ca, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
held = []
for i in range(n):
    c = http.client.HTTPSConnection("localhost", port, context=ctx)
    c.request("GET", "/metadata")
    r = c.getresponse()
    r.read()
    if r.status != 200 or r.getheader("connection", "").lower() == "close":
        print("status", r.status, r.getheader("connection"), flush=True)
        sys.exit(1)
    held.append(c)
print("ready", flush=True)
sys.stdin.read()
"#;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// The heap once it has stopped moving (the gateway's ticks and timers settle).
async fn settled() -> isize {
    let mut last = live();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = live();
        if (now - last).abs() < 1024 {
            return now;
        }
        last = now;
    }
    last
}

/// Client files (PEM): the CA to trust, the chain to present (leaf first), its key.
struct ClientFiles {
    ca: String,
    chain: String,
    key: String,
}

/// A client process holding `n` idle connections, once it has said `ready`.
struct Clients(Child);

impl Clients {
    async fn open(files: &ClientFiles, port: u16, n: usize) -> Clients {
        let mut child = Command::new("python3")
            .args(["-c", CLIENT, &port.to_string(), &n.to_string()])
            .args([&files.ca, &files.chain, &files.key])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let out = child.stdout.take().expect("stdout");
        // Blocking read off the runtime's workers, which serve the gateway meanwhile.
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line).map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(60), line)
            .await
            .expect("client ready within 60 s")
            .expect("join")
            .expect("client output");
        assert_eq!(line.trim(), "ready", "client: {line}");
        Clients(child)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        // Closing its stdin ends the client; killed in case it does not.
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (up to 10 s) until the parked-connections gauge reads `want`.
async fn parked(gw: &Running, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(gw, "fhirgate_parked_connections") != want as f64 {
        assert!(
            Instant::now() < deadline,
            "{want} parked connections expected, gauge at {}",
            metric(gw, "fhirgate_parked_connections")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gateway's heap per parked connection, `CONNECTIONS` of them, checked against
/// `MAX_PER_CONNECTION`; and that closing them gives it back.
async fn per_parked_connection(what: &str, gw: &Running, port: u16, files: &ClientFiles) {
    // Warm-up: a first connection served and parked, so what is allocated once (the
    // upstream connection, the shared client chain, lazily built tables) is in the
    // baseline. It stays open throughout.
    let _warm = Clients::open(files, port, 1).await;
    parked(gw, 1).await;
    let before = settled().await;

    let clients = Clients::open(files, port, CONNECTIONS).await;
    parked(gw, CONNECTIONS + 1).await;
    let after = settled().await;
    let per_connection = (after - before) / CONNECTIONS as isize;
    eprintln!(
        "{what}: heap per parked connection {per_connection} bytes ({CONNECTIONS} connections)"
    );
    assert!(
        per_connection > 1024,
        "{what}: the count sees the connections ({per_connection} bytes each)"
    );
    assert!(
        per_connection <= MAX_PER_CONNECTION,
        "{what}: a parked connection holds {per_connection} bytes of heap, more than \
         {MAX_PER_CONNECTION}: is something hyper or the connection used for a request \
         still held while it waits?"
    );

    // Closing the clients gives it back: the connections end and nothing is kept.
    drop(clients);
    parked(gw, 1).await;
    let left = (settled().await - before) / CONNECTIONS as isize;
    eprintln!("{what}: heap per connection left after they closed {left} bytes");
    assert!(
        left < 512,
        "{what}: {left} bytes per connection left on the heap after {CONNECTIONS} connections closed"
    );
}

/// One test, not two: the count is process-wide, so the measurements must not overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_connection_holds_its_tls_session_not_hyper_buffers() {
    let _serial = SERIAL.lock().await;
    let (upstream, _) = quiet_upstream().await;
    let limits = "  idle_timeout: 120s\n";

    // The development PKI (rcgen): an ECDSA P-256 leaf issued by the SubCA, as bench/run's.
    let pki = Pki::new();
    let mut o = Opts::new(upstream);
    o.limits = limits.into();
    let (gw, addr) = gateway(&pki, &o).await;
    let file = |n: &str| pki.path(n).display().to_string();
    let files = ClientFiles {
        ca: file("root-ca.crt"),
        chain: file("client.crt"),
        key: file("client.key"),
    };
    per_parked_connection("ECDSA leaf", &gw, addr.port(), &files).await;
    drop(gw);

    // An NHS-shaped chain from the openssl CLI: RSA-2048 root, SubCA and leaf, the client
    // sending its leaf and the SubCA (held once for all its connections: shared).
    let os = OpensslPki::new();
    let root = os.root("Test NHS Root CA", Alg::Rsa2048);
    let sub = os.sub_ca(&root, "Test NHS SubCA", Alg::Rsa2048);
    let server = os.server(&sub, "server", Alg::Rsa2048);
    let client = os.client(&sub, "client", Alg::Rsa2048);
    let crls = [
        os.crl(&root, CrlTimes::Hours(48)),
        os.crl(&sub, CrlTimes::Hours(48)),
    ];
    let p = |x: &std::path::Path| x.display().to_string();
    let yaml = format!(
        "environment: development\n\
listeners:\n  - address: 127.0.0.1:0\n\
tls:\n  server_cert: {sc}\n  server_key: {sk}\n  trust_bundles:\n    - name: nhs-int\n      ca_files: [{root}, {sub}]\n      crl_files: [{c0}, {c1}]\n\
limits:\n{limits}\
upstream:\n  url: http://{upstream}\n\
auth:\n  mode: development\n\
routes:\n  - name: all\n    path_prefix: /\n",
        sc = p(&server.chain),
        sk = p(&server.key),
        root = p(&root.cert),
        sub = p(&sub.cert),
        c0 = p(&crls[0]),
        c1 = p(&crls[1]),
    );
    let cfg = fhirgate::config::Config::from_yaml(&yaml, std::path::Path::new("/"))
        .unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
    let gw = fhirgate::server::start(&cfg).await.expect("gateway starts");
    let files = ClientFiles {
        ca: p(&root.cert),
        chain: p(&client.chain),
        key: p(&client.key),
    };
    per_parked_connection("RSA-2048 leaf + SubCA", &gw, gw.addrs[0].port(), &files).await;
}

/// Requests on the one HTTP/2 connection of the curl test.
const H2_REQUESTS: usize = 300;
/// Heap the process may hold for that connection while its last request waits. Measured
/// at about 150 KiB: the connection (hyper's and h2's buffers, the TLS session, the
/// identity), the waiting request, its upstream connection and the in-process upstream's
/// end of it. With the response header values left in the upstream's read buffers, 575
/// KiB, and more with more requests until HPACK's table is full.
const MAX_H2_CONNECTION: isize = 300 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_response_headers_keep_no_upstream_buffer_alive() {
    let _serial = SERIAL.lock().await;
    let (upstream, seen) = quiet_upstream().await;
    let pki = Pki::new();
    let mut o = Opts::new(upstream);
    o.limits = "  idle_timeout: 120s\n".into();
    o.upstream_extra = "  response_timeout: 10s\n".into();
    let (gw, addr) = gateway(&pki, &o).await;
    let file = |n: &str| pki.path(n).display().to_string();

    // One curl run: H2_REQUESTS GETs one after another on one HTTP/2 connection, each
    // with an X-Request-ID of its own (which the gateway echoes, as BaRS asks),
    // then one whose answer takes 5 s, so the connection is still open when counted.
    let mut config = String::new();
    for i in 0..=H2_REQUESTS {
        let path = if i == H2_REQUESTS {
            "slow".to_owned()
        } else {
            format!("Patient/{i}")
        };
        config.push_str(&format!(
            "url = \"https://localhost:{port}/{path}\"\nhttp2\ncacert = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\nheader = \"X-Request-ID: {i:08x}-0000-4000-8000-{i:012x}\"\noutput = \"/dev/null\"\nsilent\nwrite-out = \"%{{http_code}} %{{http_version}} %{{num_connects}}\\n\"\nnext\n",
            port = addr.port(),
            ca = file("root-ca.crt"),
            cert = file("client.crt"),
            key = file("client.key"),
        ));
    }
    let cfg = pki.path("curl-h2.cfg");
    std::fs::write(&cfg, config).expect("write curl config");

    let before = settled().await;
    let curl = Command::new("curl")
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl runs");
    // Every request answered and the slow one at the upstream: count then.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.load(Ordering::SeqCst) < H2_REQUESTS + 1 {
        assert!(
            Instant::now() < deadline,
            "the upstream saw {} of {} requests",
            seen.load(Ordering::SeqCst),
            H2_REQUESTS + 1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let during = settled().await;
    let out = tokio::task::spawn_blocking(move || curl.wait_with_output())
        .await
        .expect("join")
        .expect("curl output");
    let out = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), H2_REQUESTS + 1, "one line per request: {out}");
    assert!(
        lines.iter().all(|l| l.starts_with("200 2 ")),
        "every request answered 200 over HTTP/2: {out}"
    );
    let connects: usize = lines
        .iter()
        .filter_map(|l| l.rsplit(' ').next()?.parse::<usize>().ok())
        .sum();
    assert_eq!(connects, 1, "all on one connection: {out}");

    let held = during - before;
    eprintln!("HTTP/2: heap held for one connection after {H2_REQUESTS} requests {held} bytes");
    assert!(
        held <= MAX_H2_CONNECTION,
        "one HTTP/2 connection holds {held} bytes of the gateway's heap after \
         {H2_REQUESTS} requests, more than {MAX_H2_CONNECTION}: are response header \
         values (kept by HPACK's table) keeping the buffers they were parsed from alive?"
    );
    drop(gw);
}
