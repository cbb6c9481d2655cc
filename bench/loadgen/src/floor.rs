//! `loadgen floor`: the least a TLS-terminating HTTP/1.1 proxy on fhirgate's own TLS stack
//! (rustls 0.23 + aws-lc-rs through tokio-rustls, one current-thread tokio runtime) costs
//! per request on bench/run's proxy job: client certificates checked against the same CAs
//! and CRLs, identity headers added, keep-alive forwarding on one upstream connection per
//! client connection (as fhirgate's pinned connections), an access line per request.
//!
//! A measurement aid, not a gateway: it trusts Content-Length, knows no chunked bodies,
//! checks no route, token or header, and closes the connection on anything else. It puts
//! a lower bound under what any gateway on this stack can reach, so a target it cannot
//! meet is not the gateway's code (bench/README.md, thirty-second pass). Two shapes:
//! `raw` parses heads with httparse and moves bytes itself; `hyper` is hyper's server and
//! client around a handler that only adds the headers.

use std::cell::RefCell;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::{HeaderName, HeaderValue, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::AnyErr;

#[derive(clap::Args)]
pub struct FloorArgs {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    upstream: SocketAddr,
    #[arg(long)]
    cert: PathBuf,
    #[arg(long)]
    key: PathBuf,
    /// Trusted CA certificates, PEM (repeatable).
    #[arg(long = "client-ca")]
    client_ca: Vec<PathBuf>,
    /// CRLs, PEM (repeatable).
    #[arg(long)]
    crl: Vec<PathBuf>,
    #[arg(long)]
    access_log: PathBuf,
    #[arg(long, value_enum, default_value_t = Shape::Raw)]
    shape: Shape,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq)]
enum Shape {
    Raw,
    Hyper,
}

fn acceptor(a: &FloorArgs) -> Result<TlsAcceptor, AnyErr> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for f in &a.client_ca {
        for c in CertificateDer::pem_file_iter(f)? {
            roots.add(c?)?;
        }
    }
    let mut crls = Vec::new();
    for f in &a.crl {
        for c in CertificateRevocationListDer::pem_file_iter(f)? {
            crls.push(c?);
        }
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .with_crls(crls)
    .build()?;
    let chain: Vec<_> = CertificateDer::pem_file_iter(&a.cert)?.collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&a.key)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The identity and forwarding headers, built once per connection from the verified leaf,
/// as fhirgate builds its own (their values here come from the certificate's signature
/// bytes, not its names: the floor has no X.509 parser, and per request the cost is the
/// same bytes copied).
fn identity(
    c: &tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
) -> Result<Vec<(HeaderName, HeaderValue)>, AnyErr> {
    let leaf = c
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|p| p.first())
        .ok_or("no client certificate")?;
    // The signature's last 32 bytes: unique per certificate, and no hash crate needed.
    let tail = &leaf[leaf.len().saturating_sub(32)..];
    let hex: String = tail.iter().map(|b| format!("{b:02x}")).collect();
    let short = &hex[..hex.len().min(16)];
    let v = |s: &str| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("-"));
    Ok(vec![
        (
            HeaderName::from_static("x-client-cert-subject"),
            v(&format!("CN={short}")),
        ),
        (
            HeaderName::from_static("x-client-cert-issuer"),
            v("CN=bench-sub-ca"),
        ),
        (
            HeaderName::from_static("x-client-cert-fingerprint"),
            v(&hex),
        ),
        (
            HeaderName::from_static("x-client-cert-serial"),
            v(&hex[..hex.len().min(32)]),
        ),
        (HeaderName::from_static("x-client-cert-cn"), v(short)),
        (
            HeaderName::from_static("x-client-cert-bundle"),
            v("nhs-int"),
        ),
        (
            HeaderName::from_static("x-forwarded-for"),
            v(&peer.ip().to_string()),
        ),
        (HeaderName::from_static("x-forwarded-proto"), v("https")),
    ])
}

thread_local! {
    /// The access log's buffer: written to the file in 64 KiB pieces, on this thread.
    static LOG: RefCell<(Vec<u8>, Option<std::fs::File>)> = const { RefCell::new((Vec::new(), None)) };
}

fn access(method: &str, path: &str, status: u16, bytes: usize, started: Instant) {
    LOG.with(|l| {
        let (buf, file) = &mut *l.borrow_mut();
        let _ = writeln!(
            buf,
            "{{\"method\":\"{method}\",\"path\":\"{path}\",\"status\":{status},\"bytes\":{bytes},\"latency_us\":{}}}",
            started.elapsed().as_micros()
        );
        if buf.len() >= 64 * 1024 {
            if let Some(f) = file {
                let _ = f.write_all(buf);
            }
            buf.clear();
        }
    });
}

pub fn run(a: FloorArgs) -> Result<(), AnyErr> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.access_log)?;
    LOG.with(|l| l.borrow_mut().1 = Some(file));
    let tls = acceptor(&a)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let l = TcpListener::bind(a.listen).await?;
        loop {
            let (tcp, peer) = l.accept().await?;
            let _ = tcp.set_nodelay(true);
            let (tls, up, shape) = (tls.clone(), a.upstream, a.shape);
            // A connection's error ends that connection only.
            tokio::task::spawn_local(async move {
                let _ = match shape {
                    Shape::Raw => raw(tls, tcp, peer, up).await,
                    Shape::Hyper => via_hyper(tls, tcp, peer, up).await,
                };
            });
        }
    })
}

/// Reads until `buf` holds a whole head; returns its length, or None at a clean EOF.
async fn read_head<R: AsyncReadExt + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Option<usize>, AnyErr> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(i + 4));
        }
        if buf.len() > 64 * 1024 {
            return Err("head too large".into());
        }
        buf.reserve(16 * 1024);
        if r.read_buf(buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("eof in head".into())
            };
        }
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, AnyErr> {
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            return Ok(std::str::from_utf8(h.value)?.trim().parse()?);
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked bodies are not in the floor".into());
        }
    }
    Ok(0)
}

/// Reads until `buf` holds `need` bytes.
async fn fill<R: AsyncReadExt + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    need: usize,
) -> Result<(), AnyErr> {
    while buf.len() < need {
        buf.reserve(need - buf.len());
        if r.read_buf(buf).await? == 0 {
            return Err("eof in body".into());
        }
    }
    Ok(())
}

/// Writes `a` then `b` with as few `writev` calls as the socket allows.
async fn write2(w: &mut TcpStream, a: &[u8], b: &[u8]) -> std::io::Result<()> {
    let mut chain = Buf::chain(a, b);
    while chain.has_remaining() {
        let mut io = [std::io::IoSlice::new(&[]); 2];
        let n = chain.chunks_vectored(&mut io);
        let k = w.write_vectored(&io[..n]).await?;
        if k == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        chain.advance(k);
    }
    Ok(())
}

async fn raw(
    tls: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    up: SocketAddr,
) -> Result<(), AnyErr> {
    let mut c = tls.accept(tcp).await?;
    let mut extra = Vec::new();
    for (n, v) in identity(&c, peer)? {
        extra.extend_from_slice(n.as_str().as_bytes());
        extra.extend_from_slice(b": ");
        extra.extend_from_slice(v.as_bytes());
        extra.extend_from_slice(b"\r\n");
    }
    let mut u = TcpStream::connect(up).await?;
    let _ = u.set_nodelay(true);
    let (mut buf, mut ubuf, mut head) =
        (BytesMut::new(), BytesMut::new(), Vec::with_capacity(1024));
    loop {
        let Some(hlen) = read_head(&mut c, &mut buf).await? else {
            return Ok(());
        };
        let started = Instant::now();
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hs);
        req.parse(&buf[..hlen])?;
        let (method, path) = (
            req.method.unwrap_or("GET").to_owned(),
            req.path.unwrap_or("/").to_owned(),
        );
        let blen = content_length(req.headers)?;
        head.clear();
        let _ = write!(head, "{method} {path} HTTP/1.1\r\n");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("connection")
                || h.name.eq_ignore_ascii_case("authorization")
            {
                continue;
            }
            head.extend_from_slice(h.name.as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(h.value);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(&extra);
        head.extend_from_slice(b"\r\n");
        buf.advance(hlen);
        fill(&mut c, &mut buf, blen).await?;
        write2(&mut u, &head, &buf[..blen]).await?;
        buf.advance(blen);

        let Some(rlen) = read_head(&mut u, &mut ubuf).await? else {
            return Err("upstream closed".into());
        };
        let mut rhs = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut rhs);
        resp.parse(&ubuf[..rlen])?;
        let status = resp.code.unwrap_or(502);
        let rblen = content_length(resp.headers)?;
        fill(&mut u, &mut ubuf, rlen + rblen).await?;
        c.write_all(&ubuf[..rlen + rblen]).await?;
        c.flush().await?;
        ubuf.advance(rlen + rblen);
        access(&method, &path, status, rblen, started);
    }
}

async fn via_hyper(
    tls: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    up: SocketAddr,
) -> Result<(), AnyErr> {
    let c = tls.accept(tcp).await?;
    let extra = std::rc::Rc::new(identity(&c, peer)?);
    let u = TcpStream::connect(up).await?;
    let _ = u.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(u)).await?;
    tokio::task::spawn_local(conn);
    // One request at a time per HTTP/1.1 connection, so this lock is never contended.
    let tx = std::rc::Rc::new(tokio::sync::Mutex::new(tx));
    let svc = service_fn(move |mut req: Request<Incoming>| {
        let (tx, extra) = (tx.clone(), extra.clone());
        async move {
            let started = Instant::now();
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            let h = req.headers_mut();
            h.remove(http::header::AUTHORIZATION);
            for (n, v) in extra.iter() {
                h.insert(n.clone(), v.clone());
            }
            let r = tx.lock().await.send_request(req).await?;
            let len = r
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            access(method.as_str(), &path, r.status().as_u16(), len, started);
            Ok::<_, hyper::Error>(r)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(c), svc)
        .await?;
    Ok(())
}
