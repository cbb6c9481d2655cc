//! Benchmark driver for `bench/run`: an HTTP/1.1 load generator that presents a client
//! certificate (wrk and h2load cannot), plus the small fast upstream and the
//! introspection stub the benchmark puts behind fhirgate and nginx.
//!
//! Written in Rust on the same hyper/rustls stack as the gateway so one `cargo build`
//! gives everything and the driver is never the bottleneck's unknown: its own cost is the
//! same for both gateways. Latencies are recorded in an HDR histogram (microseconds).
//! Open-loop runs (`--rate`) measure from each request's *scheduled* send time, so a
//! stalled server cannot hide its queueing (no coordinated omission).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

mod floor;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Tls {
    #[arg(long)]
    cacert: PathBuf,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
}

#[derive(clap::Args)]
struct LoadArgs {
    /// https://127.0.0.1:PORT/path
    #[arg(long)]
    url: String,
    #[command(flatten)]
    tls: Tls,
    #[arg(long)]
    token: Option<String>,
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Requests per second in total (open loop); closed loop when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// A new TCP connection and full TLS handshake (no resumption) per request.
    #[arg(long)]
    new_conn: bool,
    /// POST a body of this many bytes instead of a GET.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Extra header `Name: value` on every request (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Count any HTTP answer as done (for traffic that is meant to be refused).
    #[arg(long)]
    any_status: bool,
    /// HTTP/2 (ALPN h2): `--concurrency` streams in flight over concurrency/streams
    /// connections.
    #[arg(long)]
    http2: bool,
    /// Concurrent streams per HTTP/2 connection.
    #[arg(long, default_value_t = 8)]
    streams: usize,
}

#[derive(Subcommand)]
enum Cmd {
    /// A fast upstream: 200 with a small FHIR JSON body, request bodies drained.
    /// `GET /_headers` answers with the names of the request's headers instead, one per
    /// line, so bench/run can check that every gateway forwards the same set.
    Upstream {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Introspection stub: RFC 7662 `POST /introspect` (fhirgate) and `GET /auth` with the
    /// token in `Authorization` (nginx `auth_request`); tokens starting `bench` are
    /// active. `GET /count` returns the number of checks answered.
    Introspect {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Closed-loop (fixed concurrency) or open-loop (`--rate`) load; prints one JSON line.
    Load(LoadArgs),
    /// Opens N idle mTLS connections (one request each), prints `ready`, holds them.
    Idle {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        token: Option<String>,
        #[arg(long)]
        conns: usize,
        #[arg(long, default_value_t = 15)]
        hold_seconds: u64,
        /// HTTP/2 (ALPN h2): one connection per `--conns`, each with one request made.
        #[arg(long)]
        http2: bool,
    },
    /// A bare TLS-terminating proxy on the gateway's TLS stack, one current-thread
    /// runtime: a lower bound for the proxy job (bench/README.md, thirty-second pass).
    Floor(floor::FloorArgs),
    /// N connections, then N concurrent requests at once with one token; prints statuses.
    Burst {
        #[arg(long)]
        url: String,
        #[command(flatten)]
        tls: Tls,
        #[arg(long)]
        token: String,
        #[arg(long, default_value_t = 1000)]
        n: usize,
    },
}

type AnyErr = Box<dyn std::error::Error + Send + Sync>;

struct Target {
    addr: SocketAddr,
    path: String,
    host: String,
    /// `http://`: plain TCP (the direct path to the upstream).
    plain: bool,
    /// HTTP/2 over TLS (ALPN h2).
    h2: bool,
}

fn parse_url(url: &str) -> Result<Target, AnyErr> {
    let u: http::Uri = url.parse()?;
    let host = u.host().ok_or("url without host")?.to_owned();
    let port = u.port_u16().unwrap_or(443);
    let ip = if host == "localhost" {
        "127.0.0.1".to_owned()
    } else {
        host.clone()
    };
    Ok(Target {
        addr: format!("{ip}:{port}").parse()?,
        path: u
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or("/".into()),
        host,
        plain: u.scheme_str() == Some("http"),
        h2: false,
    })
}

fn connector(t: &Tls, resumption: bool, h2: bool) -> Result<TlsConnector, AnyErr> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&t.cacert)? {
        roots.add(c?)?;
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(&t.cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&t.key)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    if !resumption {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(TlsConnector::from(Arc::new(cfg)))
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    /// Cloneable: several workers share one HTTP/2 connection.
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    fn share(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }
}

async fn open(c: &TlsConnector, t: &Target) -> Result<Sender, AnyErr> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    if t.plain {
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(Sender::H1(tx));
    }
    let name = ServerName::try_from("localhost")?.to_owned();
    let tls = c.connect(name, tcp).await?;
    if t.h2 {
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("the server did not negotiate h2".into());
        }
        let (tx, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(tls),
        )
        .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok(Sender::H2(tx));
    }
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Sender::H1(tx))
}

fn request(t: &Target, token: Option<&str>, body: &Bytes, close: bool) -> Request<Full<Bytes>> {
    let b = Request::builder().method(if body.is_empty() { "GET" } else { "POST" });
    // HTTP/2 carries the authority in the URI (`:authority`), HTTP/1.1 in `Host`.
    let mut b = if t.h2 {
        b.uri(format!("https://{}:{}{}", t.host, t.addr.port(), t.path))
    } else {
        b.uri(&t.path).header("host", &t.host)
    };
    if let Some(tok) = token {
        b = b.header("authorization", format!("Bearer {tok}"));
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/fhir+json");
    }
    if close {
        b = b.header("connection", "close");
    }
    b.body(Full::new(body.clone()))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

async fn exchange(tx: &mut Sender, req: Request<Full<Bytes>>) -> Result<StatusCode, AnyErr> {
    let resp = match tx {
        Sender::H1(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
        Sender::H2(s) => {
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let status = resp.status();
    resp.into_body().collect().await?;
    Ok(status)
}

struct Stats {
    hist: Histogram<u64>,
    ok: u64,
    errors: u64,
}

impl Stats {
    fn new() -> Self {
        Stats {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|_| unreachable!("valid sigfig"))
            }),
            ok: 0,
            errors: 0,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    c: TlsConnector,
    t: Arc<Target>,
    token: Option<String>,
    body: Bytes,
    end: Instant,
    new_conn: bool,
    mut slots: Option<tokio::sync::mpsc::UnboundedReceiver<Instant>>,
    (extra, any_status): (Arc<Vec<(String, String)>>, bool),
    shared: Option<Sender>,
) -> Stats {
    let mut s = Stats::new();
    let mut tx: Option<Sender> = shared;
    loop {
        // Open loop: this worker's slots of the global schedule, each handed over by the
        // pacer at its time; one that comes while a request is still out waits, and its
        // latency counts from its slot.
        let scheduled = match slots.as_mut() {
            Some(rx) => match rx.recv().await {
                Some(at) => at,
                None => break,
            },
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            }
        };
        if new_conn || tx.is_none() {
            match open(&c, &t).await {
                Ok(x) => tx = Some(x),
                Err(_) => {
                    s.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(sender) = tx.as_mut() else { continue };
        let mut req = request(&t, token.as_deref(), &body, new_conn);
        for (k, v) in extra.iter() {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                req.headers_mut().append(k, v);
            }
        }
        match exchange(sender, req).await {
            Ok(st) if st.is_success() || any_status => {
                s.ok += 1;
                let us = scheduled.elapsed().as_micros() as u64;
                let _ = s.hist.record(us.max(1));
            }
            Ok(_) => s.errors += 1,
            Err(_) => {
                s.errors += 1;
                tx = None;
            }
        }
        if new_conn {
            tx = None;
        }
    }
    s
}

async fn load(a: LoadArgs) -> Result<(), AnyErr> {
    let LoadArgs {
        url,
        tls,
        token,
        concurrency,
        seconds,
        rate,
        new_conn,
        body_bytes,
        headers,
        any_status,
        http2,
        streams,
    } = a;
    if http2 && new_conn {
        return Err("--http2 and --new-conn together are not supported".into());
    }
    let extra: Arc<Vec<(String, String)>> = Arc::new(
        headers
            .iter()
            .filter_map(|h| h.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect(),
    );
    let mut target = parse_url(&url)?;
    target.h2 = http2 && !target.plain;
    let t = Arc::new(target);
    let c = connector(&tls, !new_conn, t.h2)?;
    let body = Bytes::from(vec![b'x'; body_bytes]);
    let concurrency = concurrency.max(1);
    // HTTP/2: workers share connections, `streams` workers each.
    let mut conns = Vec::new();
    if t.h2 {
        for _ in 0..concurrency.div_ceil(streams.max(1)) {
            conns.push(open(&c, &t).await?);
        }
    }
    // HTTP/1.1 keep-alive: one connection per worker, opened before the clock starts, so
    // an open-loop p99 measures requests, not the burst of opening handshakes (those have
    // their own `--new-conn` phase).
    let mut own = if !t.h2 && !new_conn {
        open_many(&t, &c, None, concurrency, false).await?
    } else {
        Vec::new()
    };
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + Duration::from_secs_f64(seconds);
    // Open loop: one channel per worker, fed by the pacer thread.
    let mut slots = match rate {
        Some(r) => {
            let (txs, rxs): (Vec<_>, Vec<_>) = (0..concurrency)
                .map(|_| tokio::sync::mpsc::unbounded_channel())
                .unzip();
            let interval = Duration::from_secs_f64(1.0 / r.max(1.0));
            std::thread::spawn(move || pace(&txs, start, end, interval));
            rxs
        }
        None => Vec::new(),
    }
    .into_iter();
    let mut tasks = Vec::new();
    for id in 0..concurrency {
        tasks.push(tokio::spawn(worker(
            c.clone(),
            t.clone(),
            token.clone(),
            body.clone(),
            end,
            new_conn,
            slots.next(),
            (extra.clone(), any_status),
            own.pop()
                .or_else(|| conns.get(id % conns.len().max(1)).and_then(Sender::share)),
        )));
    }
    let mut all = Stats::new();
    for task in tasks {
        let s = task.await?;
        all.hist.add(&s.hist)?;
        all.ok += s.ok;
        all.errors += s.errors;
    }
    let secs = seconds.max(1e-9);
    println!(
        "{{\"ok\":{},\"errors\":{},\"rps\":{:.1},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\"max_us\":{}}}",
        all.ok,
        all.errors,
        all.ok as f64 / secs,
        all.hist.value_at_quantile(0.5),
        all.hist.value_at_quantile(0.99),
        all.hist.value_at_quantile(0.999),
        all.hist.max()
    );
    Ok(())
}

/// The open loop's clock: slot k is due at `start + k * interval` and belongs to worker
/// k mod n. tokio's timer wakes on millisecond ticks, which would send a millisecond's
/// slots at once (26 requests in one burst at 26,000 req/s) and measure the queue that
/// burst makes; a thread of its own sleeps to each slot (to within the kernel's timer
/// slack, 50 µs) instead.
fn pace(
    workers: &[tokio::sync::mpsc::UnboundedSender<Instant>],
    start: Instant,
    end: Instant,
    interval: Duration,
) {
    let mut k: u64 = 0;
    loop {
        let at = start + interval.mul_f64(k as f64);
        if at >= end {
            return;
        }
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        let _ = workers[(k % workers.len() as u64) as usize].send(at);
        k += 1;
    }
}

async fn open_many(
    t: &Arc<Target>,
    c: &TlsConnector,
    token: Option<&str>,
    n: usize,
    first_request: bool,
) -> Result<Vec<Sender>, AnyErr> {
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for _ in 0..n {
        let (t, c, sem) = (t.clone(), c.clone(), sem.clone());
        let token = token.map(str::to_owned);
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire_owned().await?;
            let mut tx = open(&c, &t).await?;
            if first_request {
                exchange(&mut tx, request(&t, token.as_deref(), &Bytes::new(), false)).await?;
            }
            Ok::<_, AnyErr>(tx)
        }));
    }
    let mut out = Vec::new();
    for task in tasks {
        out.push(task.await??);
    }
    Ok(out)
}

async fn stub_service(req: Request<Incoming>, calls: Arc<AtomicU64>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let json = |status: StatusCode, v: String| {
        let mut r = Response::new(Full::new(Bytes::from(v)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/json"),
        );
        r
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    match path.as_str() {
        "/introspect" => {
            calls.fetch_add(1, Ordering::Relaxed);
            let token = form_urlencoded::parse(&body)
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let active = token.starts_with("bench");
            json(
                StatusCode::OK,
                if active {
                    format!("{{\"active\":true,\"scope\":\"system/*.*\",\"client_id\":\"bench-sender\",\"exp\":{exp}}}")
                } else {
                    "{\"active\":false}".into()
                },
            )
        }
        "/auth" => {
            calls.fetch_add(1, Ordering::Relaxed);
            let ok = auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|t| t.starts_with("bench"));
            if ok {
                json(StatusCode::OK, String::new())
            } else {
                json(StatusCode::FORBIDDEN, String::new())
            }
        }
        "/count" => json(
            StatusCode::OK,
            format!("{{\"count\":{}}}", calls.load(Ordering::Relaxed)),
        ),
        _ => json(StatusCode::NOT_FOUND, String::new()),
    }
}

async fn serve(listen: SocketAddr, introspect: bool) -> Result<(), AnyErr> {
    let l = TcpListener::bind(listen).await?;
    let calls = Arc::new(AtomicU64::new(0));
    let patient = Bytes::from_static(
        b"{\"resourceType\":\"Patient\",\"id\":\"1\",\"name\":[{\"family\":\"Smith\"}]}",
    );
    loop {
        let (tcp, _) = l.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (calls, patient) = (calls.clone(), patient.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (calls, patient) = (calls.clone(), patient.clone());
                async move {
                    if introspect {
                        return Ok::<_, Infallible>(stub_service(req, calls).await);
                    }
                    if req.uri().path() == "/_headers" {
                        let names: String =
                            req.headers().keys().map(|k| format!("{k}\n")).collect();
                        return Ok(Response::new(Full::new(Bytes::from(names))));
                    }
                    let _ = req.into_body().collect().await;
                    let mut r = Response::new(Full::new(patient));
                    r.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/fhir+json"),
                    );
                    Ok(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn main() -> Result<(), AnyErr> {
    let cli = Cli::parse();
    let cli = match cli.cmd {
        Cmd::Floor(a) => return floor::run(a),
        cmd => Cli { cmd },
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Upstream { listen } => serve(listen, false).await,
            Cmd::Introspect { listen } => serve(listen, true).await,
            Cmd::Load(a) => load(a).await,
            // Run above, on a current-thread runtime of its own.
            Cmd::Floor(_) => Ok(()),
            Cmd::Idle {
                url,
                tls,
                token,
                conns,
                hold_seconds,
                http2,
            } => {
                let mut t = parse_url(&url)?;
                t.h2 = http2;
                let t = Arc::new(t);
                let c = connector(&tls, true, http2)?;
                let held = open_many(&t, &c, token.as_deref(), conns, true).await?;
                println!("ready {}", held.len());
                tokio::time::sleep(Duration::from_secs(hold_seconds)).await;
                drop(held);
                Ok(())
            }
            Cmd::Burst { url, tls, token, n } => {
                let t = Arc::new(parse_url(&url)?);
                let c = connector(&tls, true, false)?;
                let conns = open_many(&t, &c, None, n, false).await?;
                let gate = Arc::new(tokio::sync::Barrier::new(n));
                let mut tasks = Vec::new();
                for mut tx in conns {
                    let (t, gate, token) = (t.clone(), gate.clone(), token.clone());
                    tasks.push(tokio::spawn(async move {
                        gate.wait().await;
                        exchange(&mut tx, request(&t, Some(&token), &Bytes::new(), false))
                            .await
                            .map(|s| s.as_u16())
                            .unwrap_or(0)
                    }));
                }
                let mut ok = 0;
                for task in tasks {
                    if task.await? == 200 {
                        ok += 1;
                    }
                }
                println!("{{\"sent\":{n},\"ok\":{ok}}}");
                Ok(())
            }
        }
    })
}
