//! Shared test harness: a generated PKI on disk, an in-process recording upstream, the
//! gateway on 127.0.0.1:0, and real rustls + hyper clients.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fhirgate::config::Config;
use fhirgate::server::{self, Running};
use fhirgate::tools::pki::DevPki;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = DevPki::generate().expect("generate pki");
        pki.write_to(dir.path()).expect("write pki");
        Pki { dir, pki }
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// What the upstream saw.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>);

impl Seen {
    pub fn count(&self) -> usize {
        self.0.lock().map(|v| v.len()).unwrap_or(0)
    }
    pub fn last(&self) -> (String, HeaderMap, Bytes) {
        self.0
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("upstream saw a request")
    }
}

#[derive(Clone, Copy)]
pub enum UpstreamMode {
    /// Answers 200 with a small FHIR JSON body after reading the request body (after a
    /// second for paths starting `/slow`).
    Echo,
    /// Waits this long before answering.
    Slow(Duration),
}

/// Starts a recording HTTP/1.1 upstream on 127.0.0.1:0.
pub async fn upstream(mode: UpstreamMode) -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let pq = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let headers = req.headers().clone();
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let UpstreamMode::Slow(d) = mode {
                            tokio::time::sleep(d).await;
                        } else if pq.starts_with("/slow") {
                            // Any mode: `/slow…` paths answer after a second.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        let len = body.len();
                        s.0.lock().expect("lock").push((pq, headers, body));
                        let mut r = Response::new(Full::new(Bytes::from(format!(
                            "{{\"resourceType\":\"Parameters\",\"received\":{len}}}"
                        ))));
                        r.headers_mut()
                            .insert("content-type", "application/fhir+json".parse().expect("hv"));
                        r.headers_mut()
                            .insert("connection", "keep-alive".parse().expect("hv"));
                        Ok::<_, Infallible>(r)
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

/// A loopback port with nothing listening.
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    drop(l);
    a
}

pub struct Opts {
    pub upstream: SocketAddr,
    /// The `auth:` section (default: development mode, no token checks).
    pub auth: String,
    pub extra_bundle: bool,
    pub routes: String,
    pub limits: String,
    pub tls_extra: String,
    pub upstream_extra: String,
}

impl Opts {
    pub fn new(upstream: SocketAddr) -> Self {
        Opts {
            upstream,
            auth: "auth:\n  mode: development\n".into(),
            extra_bundle: false,
            routes: "  - name: all\n    path_prefix: /\n".into(),
            limits: String::new(),
            tls_extra: String::new(),
            upstream_extra: String::new(),
        }
    }
}

pub fn config_yaml(pki: &Pki, o: &Opts) -> String {
    let p = |n: &str| pki.path(n).display().to_string();
    let extra = if o.extra_bundle {
        format!(
            "    - name: foreign\n      ca_files: [{}]\n",
            p("foreign-root-ca.crt")
        )
    } else {
        String::new()
    };
    format!(
        "environment: development\n\
listeners:\n  - address: 127.0.0.1:0\n\
tls:\n  server_cert: {sc}\n  server_key: {sk}\n  handshake_timeout: 2s\n{tls_extra}  trust_bundles:\n    - name: nhs-int\n      ca_files: [{root}, {sub}]\n      crl_files: [{crl}, {rcrl}]\n{extra}\
limits:\n{idle}{limits}\
upstream:\n  url: http://{up}\n  connect_timeout: 1s\n  response_timeout: 2s\n{up_extra}\
{auth}\
routes:\n{routes}",
        sc = p("server.crt"),
        sk = p("server.key"),
        root = p("root-ca.crt"),
        sub = p("sub-ca.crt"),
        crl = p("sub-ca.crl"),
        rcrl = p("root-ca.crl"),
        tls_extra = o.tls_extra,
        // 5 s unless the test sets its own.
        idle = if o.limits.contains("idle_timeout:") {
            ""
        } else {
            "  idle_timeout: 5s\n"
        },
        limits = o.limits,
        up = o.upstream,
        up_extra = o.upstream_extra,
        auth = o.auth,
        routes = o.routes,
    )
}

pub async fn gateway(pki: &Pki, o: &Opts) -> (Running, SocketAddr) {
    let yaml = config_yaml(pki, o);
    let cfg =
        Config::from_yaml(&yaml, Path::new("/")).unwrap_or_else(|e| panic!("config: {e}\n{yaml}"));
    let running = server::start(&cfg).await.expect("start gateway");
    let addr = running.addrs[0];
    (running, addr)
}

/// A TLS client presenting `name.crt`/`name.key` from the PKI dir (or no cert).
pub fn tls_client(pki: &Pki, cert: Option<&str>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.pki.root.cert.as_bytes()).expect("root pem"))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match cert {
        Some(name) => {
            let chain: Vec<_> = CertificateDer::pem_file_iter(pki.path(&format!("{name}.crt")))
                .expect("cert file")
                .collect::<Result<_, _>>()
                .expect("cert pem");
            let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key"))).expect("key");
            b.with_client_auth_cert(chain, key).expect("client auth")
        }
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}

/// Response seen by a test client.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Whether the TLS session was resumed rather than fully negotiated.
    pub resumed: bool,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    /// Asserts a `WWW-Authenticate` challenge carrying `error` (RFC 6750 §3).
    pub fn assert_challenge(&self, error: &str) {
        let v = self.headers["www-authenticate"]
            .to_str()
            .expect("ASCII challenge");
        assert!(v.contains(&format!("error=\"{error}\"")), "{v}");
    }

    /// Asserts an OperationOutcome with the given NHS code.
    pub fn assert_outcome(&self, status: u16, nhs_code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(
            self.headers["content-type"],
            "application/fhir+json; charset=utf-8"
        );
        let j = self.json();
        assert_eq!(j["resourceType"], "OperationOutcome");
        assert_eq!(
            j["issue"][0]["details"]["coding"][0]["code"], nhs_code,
            "{j}"
        );
    }
}

/// Retries `make()` every 100 ms until the gateway answers 200 (background discovery),
/// for at most `tries` attempts; panics with `what` otherwise.
pub async fn wait_until_ok(
    connector: &TlsConnector,
    addr: SocketAddr,
    tries: usize,
    what: &str,
    make: impl Fn() -> Request<Full<Bytes>>,
) {
    for _ in 0..tries {
        if send(connector, addr, make()).await.map(|g| g.status) == Ok(StatusCode::OK) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}");
}

/// TCP connect and TLS handshake to the gateway as `localhost`.
pub async fn connect(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))
}

/// Sends one request over a fresh mTLS connection, HTTP/1.1 or HTTP/2 per ALPN.
/// Errors (handshake refusals included) come back as text.
pub async fn send<B>(
    connector: &TlsConnector,
    addr: SocketAddr,
    req: Request<B>,
) -> Result<Got, String>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = connect(connector, addr).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let io = TokioIo::new(tls);
    let mut req = req;
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_else(|| "/".into());
    if h2 {
        *req.uri_mut() = format!("https://localhost{pq}")
            .parse()
            .map_err(|e| format!("uri: {e}"))?;
    } else {
        *req.uri_mut() = pq.parse().map_err(|e| format!("uri: {e}"))?;
        req.headers_mut()
            .insert("host", http::HeaderValue::from_static("localhost"));
    }
    let resp = if h2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(conn);
        tx.send_request(req).await
    } else {
        let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("h1 handshake: {e}"))?;
        tokio::spawn(conn);
        tx.send_request(req).await
    }
    .map_err(|e| format!("request: {e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Got {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
        resumed,
    })
}

/// A GET for `path`; [`send`] puts it in the right form for HTTP/1.1 or HTTP/2.
pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

pub const H1: &[&[u8]] = &[b"http/1.1"];
pub const H2: &[&[u8]] = &[b"h2"];

/// An open HTTP/1.1 connection over mTLS, for tests that need to hold one.
pub async fn open_h1(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let tls = connect(connector, addr).await?;
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("h1 handshake: {e}"))?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((tx, task))
}

pub fn h1_get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request")
}
