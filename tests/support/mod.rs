//! Helpers for the hostile-input and fault tests (tests/hostile_*.rs, tests/faults.rs):
//! a raw HTTP/1.1 upstream that records the exact bytes it receives and can misbehave,
//! raw request/response exchanges over a real mTLS stream, hand-made HTTP/2 frames, and
//! metric reads through the library API.
#![allow(dead_code)]

pub mod openssl_pki;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fhirgate::server::Running;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::common::{get, send, tls_client, Pki, H1};

/// Value of one sample in the gateway's Prometheus text, e.g.
/// `fhirgate_tls_handshakes_total{result="revoked"}`; 0 when absent.
pub fn metric(gw: &Running, sample: &str) -> f64 {
    let text = gw.server().metrics().encode();
    text.lines()
        .find_map(|l| {
            let rest = l.strip_prefix(sample)?;
            rest.strip_prefix(' ')?.trim().parse::<f64>().ok()
        })
        .unwrap_or(0.0)
}

/// Waits (up to 5 s) until `sample` reaches at least `want`: the server records a
/// refusal a moment after the client has seen it.
pub async fn wait_metric(gw: &Running, sample: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(gw, sample);
        if v >= want {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{sample} is {v}, expected at least {want}\n{}",
                gw.server().metrics().encode()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts panics outside test code, on any thread, from now on (the gateway runs in-process; a panic in
/// one of its tasks would otherwise go unnoticed). Call at the start of a test.
pub fn watch_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // A failing assertion in a test is the test's business; anything else (the
            // gateway, hyper, h2, rustls) is a panic the hostile input caused.
            let in_test = info
                .location()
                .is_some_and(|l| l.file().starts_with("tests/"));
            if !in_test {
                PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Panics outside test code seen since [`watch_panics`].
pub fn panics() -> usize {
    PANICS.load(std::sync::atomic::Ordering::SeqCst)
}

/// The gateway still serves a good client, over HTTP/1.1 and HTTP/2, and nothing has
/// panicked.
pub async fn still_serves(pki: &Pki, addr: SocketAddr) {
    assert_eq!(panics(), 0, "a panic happened (see the output above)");
    for alpn in [H1, crate::common::H2] {
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
    let mut tls = crate::common::connect(&connector, addr)
        .await
        .expect("handshake");
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
// Raw upstream
// ---------------------------------------------------------------------------------------

/// One request as the upstream received it, byte for byte.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub head: String,
    pub body: Vec<u8>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }
    pub fn request_line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or("")
    }
}

/// What a [`RawUpstream`] saw: complete requests, and requests whose body never finished.
#[derive(Clone, Default)]
pub struct RawSeen {
    pub complete: Arc<Mutex<Vec<RawRequest>>>,
    pub aborted: Arc<Mutex<Vec<String>>>,
    pub connections: Arc<Mutex<usize>>,
}

impl RawSeen {
    pub fn complete(&self) -> Vec<RawRequest> {
        self.complete.lock().expect("lock").clone()
    }
    pub fn count(&self) -> usize {
        self.complete.lock().expect("lock").len()
    }
    pub fn aborted(&self) -> usize {
        self.aborted.lock().expect("lock").len()
    }
}

/// A hand-written HTTP/1.1 upstream on 127.0.0.1:0. It frames requests itself (so it
/// sees exactly what the gateway wrote, conflicting headers included) and answers by
/// path:
/// - `/close-mid-body`: `Content-Length: 100000`, 1000 bytes, then FIN;
/// - `/reset-mid-body`: the same, then a TCP reset (SO_LINGER 0);
/// - `/chunked-close-mid-body`: chunked, two chunks, then FIN without the last chunk;
/// - `/trickle`: chunked, five 200-byte chunks 200 ms apart (about 1 s in all);
/// - `/bad-response`: a response the gateway cannot parse;
/// - `/big`: 200 with an 8 MiB body;
/// - `/slow-head`: 200 after 3 s;
/// - `/close-after`: 200, then the connection is closed without `Connection: close`
///   (an upstream with a very short keep-alive);
/// - anything else: 200 with a small FHIR JSON body.
pub async fn raw_upstream() -> (SocketAddr, RawSeen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = RawSeen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            *s.connections.lock().expect("lock") += 1;
            tokio::spawn(serve_raw(tcp, s.clone()));
        }
    });
    (addr, seen)
}

async fn serve_raw(mut tcp: TcpStream, seen: RawSeen) {
    let mut buf = Vec::new();
    loop {
        let req = match read_request(&mut tcp, &mut buf).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(head) => {
                seen.aborted.lock().expect("lock").push(head);
                return;
            }
        };
        let path = req
            .request_line()
            .split(' ')
            .nth(1)
            .unwrap_or("")
            .to_owned();
        seen.complete.lock().expect("lock").push(req);
        let ok_body = br#"{"resourceType":"Parameters"}"#;
        match path.as_str() {
            "/close-mid-body" | "/reset-mid-body" => {
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 100000\r\n\r\n")
                    .await;
                let _ = tcp.write_all(&[b'x'; 1000]).await;
                let _ = tcp.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                if path == "/reset-mid-body" {
                    let _ = tcp.set_zero_linger();
                }
                return;
            }
            "/chunked-close-mid-body" => {
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n")
                    .await;
                let _ = tcp.flush().await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
            "/trickle" => {
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ntransfer-encoding: chunked\r\n\r\n")
                    .await;
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let mut chunk = b"c8\r\n".to_vec();
                    chunk.extend_from_slice(&[b'y'; 200]);
                    chunk.extend_from_slice(b"\r\n");
                    if tcp.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = tcp.write_all(b"0\r\n\r\n").await;
            }
            "/big" => {
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 8388608\r\n\r\n";
                if tcp.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let block = vec![b'z'; 64 * 1024];
                for _ in 0..128 {
                    if tcp.write_all(&block).await.is_err() {
                        return;
                    }
                }
            }
            "/slow-head" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    .await;
            }
            "/close-after" => {
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: 2\r\n\r\n{}")
                    .await;
                let _ = tcp.flush().await;
                return;
            }
            "/bad-response" => {
                let _ = tcp.write_all(b"HTTP/1.1 2OO OK\r\n\r\n").await;
                return;
            }
            _ => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n",
                    ok_body.len()
                );
                if tcp.write_all(head.as_bytes()).await.is_err()
                    || tcp.write_all(ok_body).await.is_err()
                {
                    return;
                }
            }
        }
    }
}

/// Reads one request. `Ok(None)`: clean EOF between requests; `Err(head)`: the
/// connection ended inside a request (its head, or what there was of it).
async fn read_request(
    tcp: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<RawRequest>, String> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        if !fill(tcp, buf).await {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(String::from_utf8_lossy(buf).into_owned())
            };
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let req = RawRequest {
        head: head.clone(),
        body: Vec::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("chunked"));
    let length: Option<usize> = req
        .header("content-length")
        .first()
        .and_then(|v| v.parse().ok());
    buf.drain(..head_end);
    let mut body = Vec::new();
    if chunked {
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n") {
                    break i;
                }
                if !fill(tcp, buf).await {
                    return Err(head);
                }
            };
            let line = String::from_utf8_lossy(&buf[..line_end]).into_owned();
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_text, 16).map_err(|_| head.clone())?;
            buf.drain(..line_end + 2);
            if size == 0 {
                // No trailers from the gateway: just the final CRLF.
                while buf.len() < 2 {
                    if !fill(tcp, buf).await {
                        return Err(head);
                    }
                }
                buf.drain(..2);
                break;
            }
            while buf.len() < size + 2 {
                if !fill(tcp, buf).await {
                    return Err(head);
                }
            }
            body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    } else if let Some(n) = length {
        while buf.len() < n {
            if !fill(tcp, buf).await {
                return Err(head);
            }
        }
        body.extend(buf.drain(..n));
    }
    Ok(Some(RawRequest { head, body }))
}

async fn fill(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 8192];
    match tcp.read(&mut chunk).await {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
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
    let connector = tls_client(pki, Some("client"), crate::common::H2);
    let mut tls = crate::common::connect(&connector, addr)
        .await
        .expect("handshake");
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

// ---------------------------------------------------------------------------------------
// A stub authorisation server (RFC 7662 introspection) that can be made to misbehave
// ---------------------------------------------------------------------------------------

/// How the stub answers introspection calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AsFault {
    /// `good*` tokens are active with `system/*.*`, anything else inactive.
    None,
    Status500,
    /// `{"active":` and nothing more.
    Malformed,
    /// `{"active":"true"}`: JSON, but not RFC 7662.
    ActiveAsString,
    /// A 200 HTML page.
    Html,
    /// 200 with a 1 MiB JSON body (the gateway reads at most 64 KiB).
    Huge,
    /// Answers after 5 s.
    Slow,
    /// Half a status line, then a TCP reset.
    Reset,
    /// Reads the request and never answers.
    Hang,
}

pub struct StubAs {
    pub addr: SocketAddr,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    fault: Arc<Mutex<AsFault>>,
    task: tokio::task::JoinHandle<()>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl StubAs {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let fault = Arc::new(Mutex::new(AsFault::None));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (c, f, k) = (calls.clone(), fault.clone(), conns.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let t = tokio::spawn(serve_as(tcp, c.clone(), f.clone()));
                k.lock().expect("lock").push(t.abort_handle());
            }
        });
        StubAs {
            addr,
            calls,
            fault,
            task,
            conns,
        }
    }
    pub fn set(&self, f: AsFault) {
        *self.fault.lock().expect("lock") = f;
    }
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
    /// Stops listening and drops every open connection: the server is down.
    pub fn stop(&self) {
        self.task.abort();
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }
    /// The `auth:` section for a gateway using this stub.
    pub fn auth_yaml(&self, pki: &Pki, extra: &str) -> String {
        let secret = pki.path("as-client-secret");
        std::fs::write(&secret, "s3cret\n").expect("secret");
        format!(
            "auth:\n  mode: introspection\n  introspection_endpoint: http://{}/introspect\n  \
             client_auth:\n    method: client_secret_basic\n    client_id: fhirgate-gw\n    \
             client_secret_file: {}\n  timeout: 1s\n  retries: 1\n  retry_backoff: 50ms\n{extra}",
            self.addr,
            secret.display()
        )
    }
}

impl Drop for StubAs {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn serve_as(
    mut tcp: TcpStream,
    calls: Arc<std::sync::atomic::AtomicUsize>,
    fault: Arc<Mutex<AsFault>>,
) {
    let mut buf = Vec::new();
    while let Ok(Some(req)) = read_request(&mut tcp, &mut buf).await {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let token = form_urlencoded::parse(&req.body)
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let f = *fault.lock().expect("lock");
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() + 3600)
            .unwrap_or(0);
        let good = if token.starts_with("good") {
            format!(
                r#"{{"active":true,"scope":"system/*.*","client_id":"sender-1","sub":"sender-1","exp":{exp}}}"#
            )
        } else {
            r#"{"active":false}"#.to_owned()
        };
        let (status, ctype, body): (&str, &str, Vec<u8>) = match f {
            AsFault::None => ("200 OK", "application/json", good.into_bytes()),
            AsFault::Status500 => ("500 Internal Server Error", "text/plain", b"oops".to_vec()),
            AsFault::Malformed => ("200 OK", "application/json", b"{\"active\":".to_vec()),
            AsFault::ActiveAsString => (
                "200 OK",
                "application/json",
                b"{\"active\":\"true\",\"scope\":\"system/*.*\"}".to_vec(),
            ),
            AsFault::Html => (
                "200 OK",
                "text/html",
                b"<html><body>Sign in</body></html>".to_vec(),
            ),
            AsFault::Huge => {
                let mut b = vec![b' '; 1024 * 1024];
                b.extend_from_slice(good.as_bytes());
                ("200 OK", "application/json", b)
            }
            AsFault::Slow => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                ("200 OK", "application/json", good.into_bytes())
            }
            AsFault::Reset => {
                let _ = tcp.write_all(b"HTTP/1.1 20").await;
                let _ = tcp.flush().await;
                let _ = tcp.set_zero_linger();
                return;
            }
            AsFault::Hang => {
                tokio::time::sleep(Duration::from_secs(60)).await;
                return;
            }
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        if tcp.write_all(head.as_bytes()).await.is_err() || tcp.write_all(&body).await.is_err() {
            return;
        }
    }
}
