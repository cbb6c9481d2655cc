//! What an idle HTTP/1.1 keep-alive connection holds on the gateway's heap once it is
//! parked (issue 14's memory target: ≤ 24 KB per idle TLS connection). A parked
//! connection keeps its TLS session and the wait for the client's next bytes; hyper's
//! connection, with its read buffer (8 KiB or more), is released. The bench measures
//! this in RSS with 5,000 connections on every full run; this test guards it in every
//! `cargo test` run, with a heap count that does not depend on the page cache.
//!
//! Its own test binary because it counts every allocation in the process: the gateway
//! runs here, the clients in a separate process (Python's `ssl` and `http.client`,
//! OpenSSL underneath), so their memory is not counted.

#[path = "it/harness/mod.rs"]
mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicIsize, Ordering};
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

/// Idle connections held by the client process.
const CONNECTIONS: usize = 200;
/// Heap per parked connection this test accepts. Measured (requested bytes, TLS 1.3) at
/// 11.4 KiB for the ECDSA leaf and 12.3 KiB for the RSA leaf + SubCA; one that kept
/// hyper's read buffer while parked held 19.5 KiB (ECDSA), so this fails for that.
const MAX_PER_CONNECTION: isize = 16 * 1024;

/// An upstream that records nothing (a recording one would grow with every request).
async fn quiet_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/fhir+json")
                            .body(Full::new(Bytes::from_static(
                                br#"{"resourceType":"CapabilityStatement"}"#,
                            )))
                            .expect("response"),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
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
        drop(self.0.stdin.take().map(|mut s| s.flush()));
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
    let upstream = quiet_upstream().await;
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
