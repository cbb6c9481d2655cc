//! Upstreams the gateway forwards to: a recording hyper upstream ([`upstream`]), a
//! hand-framed raw upstream that records exact bytes and can misbehave by path
//! ([`raw_upstream`]), and a port with nothing listening ([`dead_port`]).

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

/// Requests an [`h2c_upstream`] received: headers, body and trailers.
pub type H2Seen = Arc<Mutex<Vec<(HeaderMap, Bytes, Option<HeaderMap>)>>>;

/// A cleartext HTTP/2 upstream (hyper) on 127.0.0.1:0 recording each request's
/// headers, body and trailers, answering 200 with a small FHIR JSON body.
pub async fn h2c_upstream() -> (SocketAddr, H2Seen) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    let seen = H2Seen::default();
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
                        let (parts, body) = req.into_parts();
                        let (body, trailers) = match body.collect().await {
                            Ok(c) => {
                                let trailers = c.trailers().cloned();
                                (c.to_bytes(), trailers)
                            }
                            Err(_) => (Bytes::new(), None),
                        };
                        s.lock()
                            .expect("lock")
                            .push((parts.headers, body, trailers));
                        let mut r = Response::new(Full::new(Bytes::from_static(
                            b"{\"resourceType\":\"Parameters\"}",
                        )));
                        r.headers_mut()
                            .insert("content-type", "application/fhir+json".parse().expect("hv"));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
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
pub async fn read_request(
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
