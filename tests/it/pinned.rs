//! A busy client connection's own upstream connections
//! (`upstream.max_pinned_connections`, src/pipeline/upstream.rs): which upstream
//! connection each request arrives on, what happens when the upstream closes one, that
//! a response only ever reaches the client connection (and HTTP/2 stream) that asked
//! for it, and that a quiet client gives them up.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::harness::*;

/// One request as the upstream saw it: the gateway's port on that connection, the path,
/// the verified client's CN the gateway sent, and the Host header.
#[derive(Clone, Debug)]
struct Hit {
    port: u16,
    path: String,
    cn: String,
    host: String,
}

#[derive(Clone, Default)]
struct Log {
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Upstream connections currently open.
    open: Arc<AtomicUsize>,
}

impl Log {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }
    fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

async fn recording_upstream() -> (SocketAddr, Log) {
    recording_upstream_on(None).await
}

/// An HTTP/1.1 upstream that answers with the client CN and the path it was sent (so
/// each client and stream can check the answer is its own), and by path: `/close…` with
/// `Connection: close`, `/empty…` 204 with no body, `/big…` a 256 KiB body, `/slow…`
/// after 3 s, `/lag…` after 50 ms. With `tls`, over TLS.
async fn recording_upstream_on(tls: Option<tokio_rustls::TlsAcceptor>) -> (SocketAddr, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = Log::default();
    let l = log.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let l = l.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(t) => {
                        if let Ok(s) = t.accept(tcp).await {
                            serve_recorded(s, peer, l).await;
                        }
                    }
                    None => serve_recorded(tcp, peer, l).await,
                }
            });
        }
    });
    (addr, log)
}

/// One upstream connection of [`recording_upstream_on`], plain or TLS.
async fn serve_recorded<I>(io: I, peer: SocketAddr, l: Log)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    l.open.fetch_add(1, Ordering::SeqCst);
    let hits = l.hits.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let hits = hits.clone();
        async move {
            let header = |n: &str| {
                req.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            };
            let hit = Hit {
                port: peer.port(),
                path: req.uri().to_string(),
                cn: header("x-client-cert-cn"),
                host: header("host"),
            };
            let _ = req.into_body().collect().await;
            hits.lock().expect("lock").push(hit.clone());
            if hit.path.starts_with("/slow") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            } else if hit.path.starts_with("/lag") {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let body = if hit.path.starts_with("/big") {
                Bytes::from(vec![b'b'; 256 * 1024])
            } else if hit.path.starts_with("/empty") {
                Bytes::new()
            } else {
                Bytes::from(format!(
                    "{{\"cn\":\"{}\",\"path\":\"{}\"}}",
                    hit.cn, hit.path
                ))
            };
            let mut r = Response::new(Full::new(body));
            if hit.path.starts_with("/empty") {
                *r.status_mut() = StatusCode::NO_CONTENT;
            }
            if hit.path.starts_with("/close") {
                r.headers_mut()
                    .insert("connection", "close".parse().expect("hv"));
            }
            Ok::<_, Infallible>(r)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), svc)
        .await;
    l.open.fetch_sub(1, Ordering::SeqCst);
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 client connection presenting `cert`.
async fn client_h1(
    pki: &Pki,
    cert: &str,
    addr: SocketAddr,
) -> (Sender, tokio::task::JoinHandle<()>) {
    open_h1(&tls_client(pki, Some(cert), H1), addr)
        .await
        .unwrap_or_else(|e| panic!("{cert}: {e}"))
}

/// A gateway in front of a [`recording_upstream`], with these `upstream:` and `limits:`
/// lines.
async fn recorded_gateway(
    pki: &Pki,
    upstream_extra: &str,
    limits: &str,
) -> (fhirgate::server::Running, SocketAddr, Log) {
    let (up, log) = recording_upstream().await;
    let mut o = Opts::new(up);
    o.upstream_extra = upstream_extra.into();
    o.limits = limits.into();
    let (gw, addr) = gateway(pki, &o).await;
    (gw, addr, log)
}

async fn get_on(tx: &mut Sender, path: &str) -> (StatusCode, Bytes) {
    let resp = tokio::time::timeout(Duration::from_secs(20), async {
        tx.ready().await.expect("client connection ready");
        let resp = tx.send_request(h1_get(path)).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    });
    resp.await.expect("answered in time")
}

fn ports(hits: &[Hit]) -> Vec<u16> {
    hits.iter().map(|h| h.port).collect()
}

#[tokio::test]
async fn a_busy_connection_gets_its_own_upstream_connection_and_only_its_own_answers() {
    let pki = Pki::new();
    let (up, log) = recording_upstream().await;
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let (mut a, _ta) = client_h1(&pki, "client", addr).await;
    let (mut b, _tb) = client_h1(&pki, "second-client", addr).await;

    // Interleaved, so both clients' connections are busy at once.
    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(("a", get_on(&mut a, &format!("/a/{i}")).await));
        answers.push(("b", get_on(&mut b, &format!("/b/{i}")).await));
    }
    let hits = log.hits();
    assert_eq!(hits.len(), 8, "{hits:?}");
    let of = |prefix: &str| -> Vec<Hit> {
        hits.iter()
            .filter(|h| h.path.starts_with(prefix))
            .cloned()
            .collect()
    };
    let (ha, hb) = (of("/a/"), of("/b/"));
    // The first request after connecting goes through the shared pool (a warm
    // connection, no connect); the rest of the burst on one upstream connection that
    // is that client connection's alone.
    let pa = ports(&ha[1..]);
    let pb = ports(&hb[1..]);
    assert!(pa.iter().all(|p| *p == pa[0]), "a's burst moved: {ha:?}");
    assert!(pb.iter().all(|p| *p == pb[0]), "b's burst moved: {hb:?}");
    assert_ne!(pa[0], pb[0], "two clients shared a pinned connection");
    assert_ne!(ha[0].port, pa[0], "a's first request was not on the pool");
    assert_eq!(
        metric(&gw, "fhirgate_upstream_pinned_connections"),
        2.0,
        "two busy clients, two pinned connections"
    );

    // Every answer is the asking client's: the upstream echoes the CN it was sent.
    for (who, (status, body)) in &answers {
        assert_eq!(*status, StatusCode::OK);
        let want = if *who == "a" {
            "BaRS-X26.fhirgate-dev.nhs.uk"
        } else {
            "BaRS-RX1.other-trust-dev.nhs.uk"
        };
        let text = String::from_utf8_lossy(body);
        assert!(text.contains(want), "{who} got {text}");
    }
    // RFC 9112 §3.2: "A client MUST send a Host header field in all HTTP/1.1 request
    // messages"; §3.2.1: "When making a request directly to an origin server, other than
    // a CONNECT or server-wide OPTIONS request, a client MUST send only the absolute
    // path and query components of the target URI as the request-target." As the pool
    // sends them, the upstream's own Host.
    for h in &hits {
        assert!(h.path.starts_with('/'), "{h:?}");
        assert_eq!(h.host, up.to_string(), "{h:?}");
    }
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_pinned_connection_survives_empty_and_large_bodies_and_the_upstream_closing_it() {
    let pki = Pki::new();
    let (gw, addr, log) = recorded_gateway(&pki, "", "").await;
    let (mut c, _t) = client_h1(&pki, "client", addr).await;
    for path in [
        "/1", "/2", "/empty/3", "/4", "/big/5", "/6", "/close/7", "/8", "/9",
    ] {
        let (status, body) = get_on(&mut c, path).await;
        let want = if path.starts_with("/empty") {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::OK
        };
        assert_eq!(status, want, "{path}");
        if path.starts_with("/big") {
            assert_eq!(body.len(), 256 * 1024, "the whole large body");
        }
    }
    let hits = log.hits();
    let port = |p: &str| {
        hits.iter()
            .find(|h| h.path == p)
            .map(|h| h.port)
            .unwrap_or_else(|| panic!("{p} not seen: {hits:?}"))
    };
    // Pinned from the second request on ...
    assert_ne!(port("/1"), port("/2"), "the burst did not pin");
    assert_eq!(metric(&gw, "fhirgate_upstream_pinned_connections"), 1.0);
    // ... kept across an empty body and a large one (each read to its end) ...
    for p in ["/empty/3", "/4", "/big/5", "/6", "/close/7"] {
        assert_eq!(port(p), port("/2"), "{p} not on the pinned connection");
    }
    // ... and replaced when the upstream closes it.
    assert_ne!(port("/8"), port("/close/7"));
    assert_eq!(port("/9"), port("/8"));
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn an_idle_client_holds_no_upstream_connection_and_the_cap_holds() {
    let pki = Pki::new();
    let (gw, addr, log) = recorded_gateway(&pki, "  max_pinned_connections: 1\n", "").await;
    let (mut a, _ta) = client_h1(&pki, "client", addr).await;
    let (mut b, _tb) = client_h1(&pki, "second-client", addr).await;
    for i in 0..3 {
        get_on(&mut a, &format!("/a/{i}")).await;
        get_on(&mut b, &format!("/b/{i}")).await;
    }
    let pinned = "fhirgate_upstream_pinned_connections";
    assert_eq!(metric(&gw, pinned), 1.0, "capped at one");
    // The pool's connection(s) and the one pinned: b's burst stayed on the pool.
    let open = log.open();
    assert!((2..=3).contains(&open), "{open} upstream connections");

    // Both clients go quiet: parked, they give their pinned connection up.
    wait_metric(&gw, "fhirgate_parked_connections", 2.0).await;
    assert_eq!(metric(&gw, pinned), 0.0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while log.open() >= open && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(log.open(), open - 1, "the pinned connection was closed");
    // And the next burst starts on the pool again, then pins.
    get_on(&mut a, "/a/again").await;
    get_on(&mut a, "/a/again2").await;
    assert_eq!(metric(&gw, pinned), 1.0);
    gw.shutdown(Duration::from_secs(2)).await;

    // Off: every request through the pool.
    let (gw, addr, log) = recorded_gateway(&pki, "  max_pinned_connections: 0\n", "").await;
    let (mut a, _ta) = client_h1(&pki, "client", addr).await;
    for i in 0..4 {
        get_on(&mut a, &format!("/a/{i}")).await;
    }
    let hits = log.hits();
    assert!(ports(&hits).iter().all(|p| *p == hits[0].port), "{hits:?}");
    assert_eq!(metric(&gw, pinned), 0.0);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn refusals_on_a_pinned_connection_are_the_pools_refusals() {
    let pki = Pki::new();
    let (gw, addr, _log) = recorded_gateway(&pki, "", "  max_body_bytes: 1024\n").await;
    let (mut c, _t) = client_h1(&pki, "client", addr).await;
    get_on(&mut c, "/1").await;
    get_on(&mut c, "/2").await;
    assert_eq!(metric(&gw, "fhirgate_upstream_pinned_connections"), 1.0);

    // Slower than response_timeout (2 s): 504, and the connection it was on is dropped.
    let (status, body) = get_on(&mut c, "/slow/3").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(String::from_utf8_lossy(&body).contains("REC_TIMEOUT"));
    assert_eq!(metric(&gw, "fhirgate_upstream_pinned_connections"), 0.0);

    // A body streamed past max_body_bytes (no Content-Length, so only counting finds
    // it) on a pinned connection: 413, as on the pool.
    let (status, _) = get_on(&mut c, "/4").await;
    assert_eq!(status, StatusCode::OK);
    let tls = connect(&tls_client(&pki, Some("client"), H1), addr)
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    for i in 0..2 {
        let resp = tx
            .send_request(h1_get(&format!("/warm/{i}")).map(|_| {
                http_body_util::Either::Left::<_, http_body_util::StreamBody<_>>(Full::new(
                    Bytes::new(),
                ))
            }))
            .await
            .expect("warm-up");
        let _ = resp.into_body().collect().await;
        tx.ready().await.expect("ready");
    }
    let frames =
        (0..8).map(|_| Ok::<_, Infallible>(http_body::Frame::data(Bytes::from(vec![b'y'; 512]))));
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    let req = Request::post("/process")
        .header("host", "localhost")
        .body(http_body_util::Either::Right(body))
        .expect("request");
    let resp = tx.send_request(req).await.expect("answer");
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // The upstream gone: 502 for the next request of a busy connection.
    gw.shutdown(Duration::from_secs(2)).await;
    let (gw, addr) = gateway(&pki, &Opts::new(dead_port().await)).await;
    let (mut c, _t) = client_h1(&pki, "client", addr).await;
    for path in ["/1", "/2"] {
        let (status, body) = get_on(&mut c, path).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}");
        assert!(String::from_utf8_lossy(&body).contains("REC_SERVICE_UNAVAILABLE"));
    }
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn pinned_connections_to_an_https_upstream_verify_it_and_present_the_gateways_certificate() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pki = Pki::new();
    let mut roots = rustls::RootCertStore::empty();
    for f in ["root-ca.crt", "sub-ca.crt"] {
        for c in CertificateDer::pem_file_iter(pki.path(f)).expect("ca file") {
            roots.add(c.expect("ca pem")).expect("ca");
        }
    }
    let provider = fhirgate::tls::provider();
    // The upstream requires a client certificate: the gateway's upstream.client_cert.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .expect("verifier");
    let chain: Vec<_> = CertificateDer::pem_file_iter(pki.path("server.crt"))
        .expect("server cert")
        .collect::<Result<_, _>>()
        .expect("pem");
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).expect("server key");
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .expect("server config");
    let (up, log) =
        recording_upstream_on(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))).await;

    let mut o = Opts::new(up);
    o.upstream_extra = format!(
        "  ca_file: {}\n  client_cert: {}\n  client_key: {}\n",
        pki.path("root-ca.crt").display(),
        pki.path("client.crt").display(),
        pki.path("client.key").display()
    );
    let yaml = config_yaml(&pki, &o).replace(
        &format!("url: http://{up}"),
        &format!("url: https://localhost:{}", up.port()),
    );
    let cfg = fhirgate::config::Config::from_yaml(&yaml, std::path::Path::new("/"))
        .unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
    let gw = fhirgate::server::start(&cfg).await.expect("start gateway");
    let addr = gw.addrs[0];
    let (mut c, _t) = client_h1(&pki, "client", addr).await;
    for i in 0..4 {
        let (status, body) = get_on(&mut c, &format!("/{i}")).await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    }
    let hits = log.hits();
    assert_eq!(hits.len(), 4);
    assert!(
        ports(&hits[1..]).iter().all(|p| *p == hits[1].port),
        "{hits:?}"
    );
    assert_ne!(hits[0].port, hits[1].port);
    assert_eq!(hits[1].host, format!("localhost:{}", up.port()));
    assert_eq!(metric(&gw, "fhirgate_upstream_pinned_connections"), 1.0);
    gw.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn an_upstream_refusing_new_connections_is_still_reached_through_the_pool() {
    // An upstream at its connection limit: it serves the connection it accepted first
    // (the pool's) and refuses any other, here by closing its listening socket.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = listener.local_addr().expect("addr");
    let served = Arc::new(AtomicUsize::new(0));
    let s = served.clone();
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        drop(listener);
        let svc = service_fn(move |_req: Request<Incoming>| {
            s.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{}")))) }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    });
    let pki = Pki::new();
    let (gw, addr) = gateway(&pki, &Opts::new(up)).await;
    let (mut c, _t) = client_h1(&pki, "client", addr).await;
    for path in ["/1", "/2", "/3"] {
        let (status, _) = get_on(&mut c, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    assert_eq!(served.load(Ordering::SeqCst), 3);
    assert_eq!(metric(&gw, "fhirgate_upstream_pinned_connections"), 0.0);
    gw.shutdown(Duration::from_secs(2)).await;
}

type Sender2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 client connection presenting `cert`.
async fn client_h2(
    pki: &Pki,
    cert: &str,
    addr: SocketAddr,
) -> (Sender2, tokio::task::JoinHandle<()>) {
    open_h2(&tls_client(pki, Some(cert), H2), addr)
        .await
        .unwrap_or_else(|e| panic!("{cert}: {e}"))
}

/// `n` GETs at once on one HTTP/2 connection (`{prefix}/{i}`, each held 50 ms by the
/// upstream so they overlap): each answer with the path it asked for.
async fn streams(tx: &Sender2, prefix: &str, n: usize) -> Vec<(String, StatusCode, String)> {
    let all = (0..n).map(|i| {
        let mut tx = tx.clone();
        let path = format!("/lag{prefix}/{i}");
        async move {
            let req = Request::get(format!("https://localhost{path}"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let answer = tokio::time::timeout(Duration::from_secs(20), async {
                tx.ready().await.expect("client connection ready");
                let resp = tx.send_request(req).await.expect("response");
                let status = resp.status();
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            })
            .await
            .expect("answered in time");
            (path, answer.0, answer.1)
        }
    });
    futures_util::future::join_all(all).await
}

const CN_A: &str = "BaRS-X26.fhirgate-dev.nhs.uk";
const CN_B: &str = "BaRS-RX1.other-trust-dev.nhs.uk";

/// One round of 8 streams at once on each of two HTTP/2 clients (`a` presenting
/// [`CN_A`], `b` [`CN_B`]): every answer is OK, its own client's and its own stream's.
async fn both_clients_round(a: &Sender2, b: &Sender2, round: usize) {
    let (pa, pb) = (format!("/a/{round}"), format!("/b/{round}"));
    let (ra, rb) = tokio::join!(streams(a, &pa, 8), streams(b, &pb, 8));
    for ((path, status, body), cn) in ra
        .iter()
        .map(|r| (r, CN_A))
        .chain(rb.iter().map(|r| (r, CN_B)))
    {
        assert_eq!(*status, StatusCode::OK, "{path}: {body}");
        assert!(
            body.contains(&format!("\"cn\":\"{cn}\"")),
            "{path} got another client's answer: {body}"
        );
        assert!(
            body.contains(&format!("\"path\":\"{path}\"")),
            "{path} got another stream's answer: {body}"
        );
    }
}

/// HTTP/2 streams on tokio's current-thread runtime (what `fhirgate run` serves every
/// connection on, and `#[tokio::test]`'s runtime, which the in-process gateway runs on): each
/// stream in flight takes one of its client connection's own upstream connections,
/// which serve the next streams once their responses end, and answers never cross
/// streams or clients.
#[tokio::test]
async fn http2_streams_get_upstream_connections_of_their_own_and_only_their_own_answers() {
    let pki = Pki::new();
    let (gw, addr, log) = recorded_gateway(&pki, "", "").await;
    let (a, _ta) = client_h2(&pki, "client", addr).await;
    let (b, _tb) = client_h2(&pki, "second-client", addr).await;
    for round in 0..4 {
        both_clients_round(&a, &b, round).await;
    }
    let hits = log.hits();
    assert_eq!(hits.len(), 64, "{hits:?}");
    // After the first round (whose first stream took the pool's warm connection), every
    // request is on its client connection's own upstream connections: none of a's is
    // ever b's, and they are reused (8 streams at a time need at most 8 each).
    let later = |p: &str| -> std::collections::BTreeSet<u16> {
        hits.iter()
            .filter(|h| h.path.starts_with(p) && !h.path.contains("/0/"))
            .map(|h| h.port)
            .collect()
    };
    let (pa, pb) = (later("/lag/a/"), later("/lag/b/"));
    assert!(
        pa.is_disjoint(&pb),
        "clients shared a connection: {pa:?} {pb:?}"
    );
    assert!((1..=8).contains(&pa.len()), "a used {pa:?}");
    assert!((1..=8).contains(&pb.len()), "b used {pb:?}");
    let pinned = metric(&gw, "fhirgate_upstream_pinned_connections");
    assert!((2.0..=16.0).contains(&pinned), "{pinned} pinned");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// HTTP/2 connections are not parked, but a quiet one gives its own upstream
/// connections up within a tick (250 ms) of going quiet, as a parked HTTP/1.1 one does
/// (with the default `idle_timeout` of 60 s its tick is otherwise 15 s), and keeps its
/// client connection: its next burst starts on the pool and pins again.
#[tokio::test]
async fn a_quiet_http2_client_gives_its_upstream_connections_up_and_keeps_its_connection() {
    let pki = Pki::new();
    // The default idle timeout (the harness's is 5 s), so the slow tick is 15 s.
    let (gw, addr, log) = recorded_gateway(&pki, "", "  idle_timeout: 60s\n").await;
    let (a, _ta) = client_h2(&pki, "client", addr).await;
    let pinned = "fhirgate_upstream_pinned_connections";
    streams(&a, "/a/0", 4).await;
    streams(&a, "/a/1", 4).await;
    let held = metric(&gw, pinned);
    assert!(held >= 1.0, "{held} pinned after two bursts");
    let open = log.open();
    assert!(
        open as f64 > held,
        "{open} upstream connections, {held} pinned"
    );

    let quiet = tokio::time::Instant::now();
    while metric(&gw, pinned) > 0.0 && quiet.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        metric(&gw, pinned),
        0.0,
        "still held {:?} after going quiet",
        quiet.elapsed()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while log.open() > open - held as usize && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        log.open(),
        open - held as usize,
        "pinned connections closed"
    );

    // The same client connection goes on, and pins again in its next burst.
    for (path, status, body) in streams(&a, "/a/2", 4).await {
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    assert!(metric(&gw, pinned) >= 1.0, "the next burst pinned again");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// On a multi-thread runtime (a library user's; `fhirgate run` serves connections on
/// current-thread runtimes) an HTTP/2 stream's task may run on any worker, and pinning
/// measured slower than the pool there (bench/README.md, nineteenth pass): HTTP/2
/// clients keep the pool, HTTP/1.1 ones still pin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_multi_thread_runtime_http2_clients_use_the_pool() {
    let pki = Pki::new();
    let (gw, addr, _log) = recorded_gateway(&pki, "", "").await;
    let (a, _ta) = client_h2(&pki, "client", addr).await;
    for round in 0..3 {
        for (path, status, body) in streams(&a, &format!("/a/{round}"), 4).await {
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            assert!(body.contains(CN_A), "{path}: {body}");
        }
    }
    let pinned = "fhirgate_upstream_pinned_connections";
    assert_eq!(
        metric(&gw, pinned),
        0.0,
        "HTTP/2 pinned on the multi-thread runtime"
    );
    let (mut h1, _t1) = client_h1(&pki, "client", addr).await;
    get_on(&mut h1, "/h1/0").await;
    get_on(&mut h1, "/h1/1").await;
    assert_eq!(metric(&gw, pinned), 1.0, "HTTP/1.1 still pins");
    gw.shutdown(Duration::from_secs(2)).await;
}

/// `fhirgate run` on more than one CPU serves connections on one current-thread runtime
/// per CPU (`server::Shards`; bench/README.md, twentieth pass). A new connection goes to
/// the runtime with the fewest open; each HTTP/2 client's streams pin upstream
/// connections on its own runtime and get only their own answers, as HTTP/1.1 clients
/// do; a closed connection leaves its runtime's count; the drain and the runtimes' stop
/// then end promptly.
#[tokio::test]
async fn on_one_runtime_per_cpu_connections_spread_evenly_and_answers_stay_their_own() {
    let pki = Pki::new();
    let (up, log) = recording_upstream().await;
    let shards = fhirgate::server::Shards::start(2).expect("runtimes");
    let (gw, addr) = gateway_on(&pki, &Opts::new(up), Some(shards.clone())).await;
    let (a, ta) = client_h2(&pki, "client", addr).await;
    let (b, tb) = client_h2(&pki, "second-client", addr).await;
    assert_eq!(shards.open(), vec![1, 1], "two clients, two runtimes");
    let mut h1 = Vec::new();
    for _ in 0..4 {
        h1.push(client_h1(&pki, "client", addr).await);
    }
    assert_eq!(shards.open(), vec![3, 3]);
    for r in 0..2 {
        let sample = format!("fhirgate_runtime_connections{{runtime=\"{r}\"}}");
        wait_metric(&gw, &sample, 3.0).await;
        assert_eq!(metric(&gw, &sample), 3.0, "{sample}");
    }
    for round in 0..3 {
        both_clients_round(&a, &b, round).await;
    }
    // Both HTTP/2 clients pinned upstream connections on their runtimes.
    let pinned = metric(&gw, "fhirgate_upstream_pinned_connections");
    assert!((2.0..=16.0).contains(&pinned), "{pinned} pinned");
    for (i, (tx, _)) in h1.iter_mut().enumerate() {
        for j in 0..2 {
            let (status, body) = get_on(tx, &format!("/h1/{i}/{j}")).await;
            assert_eq!(status, StatusCode::OK);
            let body = String::from_utf8_lossy(&body);
            assert!(
                body.contains(&format!("\"path\":\"/h1/{i}/{j}\"")),
                "{body}"
            );
        }
    }
    assert_eq!(log.hits().len(), 3 * 16 + 4 * 2);
    drop((a, b));
    ta.abort();
    tb.abort();
    h1.clear();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while shards.open() != vec![0, 0] {
        assert!(
            std::time::Instant::now() < deadline,
            "closed connections still counted: {:?}",
            shards.open()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in 0..2 {
        let sample = format!("fhirgate_runtime_connections{{runtime=\"{r}\"}}");
        assert_eq!(metric(&gw, &sample), 0.0, "{sample}");
    }
    assert_eq!(gw.shutdown(Duration::from_secs(2)).await, 0);
    let stopping = std::time::Instant::now();
    shards.stop();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "runtimes stopped"
    );
}
