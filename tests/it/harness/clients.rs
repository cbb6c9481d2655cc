//! Clients: real rustls + hyper clients ([`tls_client`], [`send`]), raw HTTP/1.1
//! exchanges over mTLS ([`raw_h1`]), hand-made HTTP/2 frames (RFC 9113) for abuse a
//! well-behaved client library will not send, and the good-client check [`still_serves`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use super::*;

/// A TLS client presenting `name.crt`/`name.key` from the PKI dir (or no cert).
pub fn tls_client(pki: &Pki, cert: Option<&str>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.pki.root.cert.as_bytes()).expect("root pem"))
        .expect("root");
    // The gateway's own provider, so client and server share one crypto library.
    let provider = fhirgate::tls::provider();
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
    // Every exchange ends by itself: a peer that never answers fails the test here
    // instead of stalling the whole suite.
    let exchange = async {
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
    };
    tokio::time::timeout(SEND_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {addr} within {SEND_TIMEOUT:?}")))
}

/// Longest a [`send`] may take, handshake to the last body byte.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A GET for `path`; [`send`] puts it in the right form for HTTP/1.1 or HTTP/2.
pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .body(Full::new(Bytes::new()))
        .expect("request")
}

/// GET `path` with `Authorization: Bearer TOKEN`.
pub fn bearer(path: &str, token: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("authorization", format!("Bearer {token}"))
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

/// An open HTTP/2 connection over mTLS (ALPN `h2`), for tests that need streams on one
/// connection.
pub async fn open_h2(
    connector: &TlsConnector,
    addr: SocketAddr,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<()>,
    ),
    String,
> {
    let tls = connect(connector, addr).await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err("the server did not choose h2".into());
    }
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
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

/// The gateway still serves a good client, over HTTP/1.1 and HTTP/2, and nothing has
/// panicked.
pub async fn still_serves(pki: &Pki, addr: SocketAddr) {
    assert_eq!(panics(), 0, "a panic happened (see the output above)");
    for alpn in [H1, H2] {
        let got = send(
            &tls_client(pki, Some("client"), alpn),
            addr,
            get("/metadata"),
        )
        .await
        .expect("good client still served");
        assert_eq!(
            got.status,
            StatusCode::OK,
            "good client after hostile input"
        );
    }
}

/// What came back on a raw connection.
#[derive(Debug)]
pub struct Raw {
    pub bytes: Vec<u8>,
    /// The gateway closed the connection (EOF or reset) within the wait.
    pub closed: bool,
    pub elapsed: Duration,
}

impl Raw {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
    /// Status codes of every HTTP/1.1 response in the bytes, in order.
    pub fn statuses(&self) -> Vec<u16> {
        let t = self.text();
        t.match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| t.get(i + 9..i + 12)?.parse().ok())
            .collect()
    }
    pub fn status(&self) -> Option<u16> {
        self.statuses().first().copied()
    }
    /// Whether the first response is an `OperationOutcome` with this NHS code.
    pub fn is_outcome(&self, code: &str) -> bool {
        let t = self.text();
        t.contains("application/fhir+json")
            && t.contains("\"resourceType\":\"OperationOutcome\"")
            && t.contains(&format!("\"code\":\"{code}\""))
    }
}

/// Reads until EOF, a read error, or `wait` passes.
pub async fn read_for<S: AsyncRead + Unpin>(s: &mut S, wait: Duration) -> Raw {
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut closed = false;
    loop {
        let left = wait.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    Raw {
        bytes,
        closed,
        elapsed: start.elapsed(),
    }
}

/// Opens an mTLS connection as the good client (ALPN http/1.1), writes `request` as is,
/// and reads for up to `wait`.
pub async fn raw_h1(pki: &Pki, addr: SocketAddr, request: &[u8], wait: Duration) -> Raw {
    let connector = tls_client(pki, Some("client"), H1);
    let mut tls = connect(&connector, addr).await.expect("handshake");
    // A write may fail once the gateway has answered and closed: that is a result too.
    let _ = tls.write_all(request).await;
    let _ = tls.flush().await;
    read_for(&mut tls, wait).await
}

/// A TCP connection with nothing else on it (for pre-TLS tests).
pub async fn tcp(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("tcp connect")
}

pub fn connector_h1(pki: &Pki) -> TlsConnector {
    tls_client(pki, Some("client"), H1)
}

// ---------------------------------------------------------------------------------------
// HTTP/2 frames by hand (RFC 9113), for abuse a well-behaved client library won't send
// ---------------------------------------------------------------------------------------

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK literal header field without indexing, new name (RFC 7541 §6.2.2); names and
/// values shorter than 127 bytes.
pub fn hpack_literal(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    out.extend(hpack_string(name.as_bytes()));
    out.extend(hpack_string(value));
    out
}

/// An HPACK string literal (no Huffman) with the 7-bit prefix integer length.
pub fn hpack_string(s: &[u8]) -> Vec<u8> {
    let mut out = hpack_int(s.len(), 7, 0x00);
    out.extend_from_slice(s);
    out
}

/// RFC 7541 §5.1 integer with an `n`-bit prefix and the given high bits.
pub fn hpack_int(mut v: usize, n: u8, high: u8) -> Vec<u8> {
    let max = (1usize << n) - 1;
    if v < max {
        return vec![high | v as u8];
    }
    let mut out = vec![high | max as u8];
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
    out
}

/// A GET header block for `path` on authority `localhost`: `:method GET` and
/// `:scheme https` from the static table, `:path` and `:authority` as literals with
/// indexed names.
pub fn hpack_get(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x87];
    b.push(0x04); // literal without indexing, name = static index 4 (:path)
    b.extend(hpack_string(path.as_bytes()));
    b.push(0x01); // :authority
    b.extend(hpack_string(b"localhost"));
    b
}

/// One frame read from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Error code of a GOAWAY or RST_STREAM frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            GOAWAY => 4,
            RST_STREAM => 0,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// (identifier, value) pairs of a SETTINGS frame.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|c| {
                (
                    u16::from_be_bytes([c[0], c[1]]),
                    u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                )
            })
            .collect()
    }
}

pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Parses every complete frame in `bytes`.
pub fn parse_frames(bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() >= at + 9 {
        let len = (usize::from(bytes[at]) << 16)
            | (usize::from(bytes[at + 1]) << 8)
            | usize::from(bytes[at + 2]);
        if bytes.len() < at + 9 + len {
            break;
        }
        let stream =
            u32::from_be_bytes([bytes[at + 5], bytes[at + 6], bytes[at + 7], bytes[at + 8]])
                & 0x7fff_ffff;
        out.push(Frame {
            kind: bytes[at + 3],
            flags: bytes[at + 4],
            stream,
            payload: bytes[at + 9..at + 9 + len].to_vec(),
        });
        at += 9 + len;
    }
    out
}

/// An mTLS connection as the good client with ALPN `h2`, the client preface and an empty
/// SETTINGS frame already sent.
pub async fn raw_h2(pki: &Pki, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = tls_client(pki, Some("client"), H2);
    let mut tls = connect(&connector, addr).await.expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    tls.write_all(&hello).await.expect("preface");
    tls
}

/// Writes `bytes`, ignoring a failure (the gateway may already have closed).
pub async fn write_quietly<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) {
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
}

/// Writes `raw` over a fresh mTLS connection (HTTP/1.1) and returns everything the
/// gateway sends back before it closes or `wait` passes.
pub async fn raw_exchange(pki: &Pki, addr: SocketAddr, raw: &[u8], wait: Duration) -> String {
    let c = tls_client(pki, Some("client"), H1);
    let mut tls = connect(&c, addr).await.expect("handshake");
    tls.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The good client is still served over HTTP/1.1 (one request upstream; see
/// [`still_serves`] for both protocols and the panic check).
pub async fn still_serves_h1(pki: &Pki, addr: SocketAddr) {
    let got = send(&tls_client(pki, Some("client"), H1), addr, get("/metadata"))
        .await
        .expect("a good client is still served");
    assert_eq!(got.status, StatusCode::OK);
}
