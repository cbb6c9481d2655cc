//! The client to the internal FHIR endpoint.
//!
//! One hyper-util client per gateway: keep-alive pooling, a connect timeout in the
//! connector, and a response-header timeout around each request. TLS to the upstream uses
//! only the CA bundle named in the config (internal services rarely chain to public CAs).
//!
//! A busy client connection also gets upstream connections of its own ([`PinnedSlot`]),
//! each driven inside the task of the request using it, as nginx runs an upstream socket
//! in the client's event loop: hyper-util's pool drives each connection in a task of its
//! own, so every request and its response cross between tasks (bench/README.md, eighth
//! pass: 8–16% of CPU per request on keep-alive GET; nineteenth pass: 9–12% on HTTP/2).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpStream;
use tower_service::Service;

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::error::{err, ConfigError};
use crate::pipeline::outcome::{Body, ErrorSource, Refuse, Rejection};
use crate::tls::client_connector;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of a request sent upstream: the client's body, streamed through a size limit.
pub type UpstreamBody = BoxBody<Bytes, BoxError>;

pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, UpstreamBody>,
    /// The pool's connector, also used for pinned connections (same TLS, timeouts).
    connector: HttpsConnector<HttpConnector>,
    scheme: Scheme,
    authority: http::uri::Authority,
    /// `Host` for HTTP/1.1 upstream requests, on either path: the value the pool's client
    /// would format from the URI for every request.
    host: HeaderValue,
    /// The upstream's origin, what a pinned connection connects to.
    origin: Uri,
    /// Path of the configured base URL without trailing '/', e.g. `/fhir` or ``.
    base_path: String,
    response_timeout: Duration,
    /// `upstream.max_pinned_connections`, 0 with an HTTP/2 upstream (its pool multiplexes).
    max_pinned: usize,
    pinned: Gauge,
    /// `upstream.http2`: the pool speaks HTTP/2 upstream (`:authority`, no `Host`).
    http2: bool,
}

impl Upstream {
    /// `pinned`: the gauge counting pinned connections, shared with the gateways that
    /// replace this one on reload, so the cap holds across them.
    pub fn from_config(cfg: &UpstreamConfig, pinned: Gauge) -> Result<Self, ConfigError> {
        let uri: Uri = cfg
            .url
            .parse()
            .map_err(|e| err("upstream.url", format!("not a valid URL: {e}")))?;
        let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| err("upstream.url", "must include a host"))?;
        let base_path = uri.path().trim_end_matches('/').to_owned();

        let client_cert = match (&cfg.client_cert, &cfg.client_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let https = client_connector(
            "upstream",
            cfg.ca_file.as_deref(),
            client_cert,
            cfg.connect_timeout,
            cfg.http2,
        )?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(cfg.http2)
            .build(https.clone());
        let host = HeaderValue::from_str(&host_header(&scheme, &authority))
            .map_err(|_| err("upstream.url", "the host is not usable as a Host header"))?;
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| err("upstream.url", format!("not a valid URL: {e}")))?;
        Ok(Upstream {
            client,
            connector: https,
            scheme,
            authority,
            host,
            origin,
            base_path,
            response_timeout: cfg.response_timeout,
            max_pinned: if cfg.http2 {
                0
            } else {
                cfg.max_pinned_connections
            },
            pinned,
            http2: cfg.http2,
        })
    }

    /// A slot for a client connection's own upstream connections, or `None` when pinning
    /// is off. HTTP/2 clients get one only on tokio's current-thread runtime (one CPU):
    /// there each stream's task drives its upstream connection on the thread that runs
    /// everything else, 9–12% less CPU per request than the pool; on the multi-thread
    /// runtime the streams' tasks move between workers and pinning measured 3% worse
    /// (bench/README.md, nineteenth pass), so they keep the pool.
    pub fn pinned_slot(&self, h2: bool) -> Option<Arc<PinnedSlot>> {
        if self.max_pinned == 0 {
            return None;
        }
        let one_thread = || {
            tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
        };
        (!h2 || one_thread()).then(|| Arc::new(PinnedSlot::default()))
    }

    /// The upstream URI for a request path (+ query) as the client sent it.
    pub fn target(&self, pq: Option<&PathAndQuery>) -> Result<Uri, Rejection> {
        let refused = || Rejection::bad_path("The request target cannot be forwarded");
        let pq = match pq {
            // Most upstreams have no base path: the client's path goes as it is, uncopied.
            Some(p) if self.base_path.is_empty() => p.clone(),
            None if self.base_path.is_empty() => PathAndQuery::from_static("/"),
            _ => {
                let pq = pq.map(PathAndQuery::as_str).unwrap_or("/");
                PathAndQuery::try_from(format!("{}{}", self.base_path, pq))
                    .map_err(|_| refused())?
            }
        };
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).map_err(|_| refused())
    }

    /// Sends a request and waits for the response headers, mapping failures to the
    /// refusal a client should see: timeouts are 504, a body over the limit is 413, any
    /// other failure to reach the upstream is 502.
    ///
    /// `slot` is the client connection's [`PinnedSlot`]: one of its own upstream
    /// connections when it has one free or may open one, else the shared pool.
    /// `sent`: when the caller started sending, which the response timeout counts from
    /// (the caller's clock read, not a second one).
    pub async fn send(
        &self,
        req: Request<UpstreamBody>,
        sent: std::time::Instant,
        body_limit: u64,
        slot: Option<&Arc<PinnedSlot>>,
    ) -> Result<Response<Body>, (UpstreamError, String)> {
        let mut req = req;
        // HTTP/1.1 (pinned connections always are): set once here for both paths.
        if !self.http2 {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }
        let deadline = tokio::time::Instant::from_std(sent) + self.response_timeout;
        let answered = tokio::time::timeout_at(deadline, async {
            let req = match slot {
                Some(slot) => match self.send_pinned(slot, req, body_limit).await {
                    Pinned::Answered(r) => return r,
                    Pinned::NotSent(req) => req,
                },
                None => req,
            };
            match self.client.request(req).await {
                Ok(resp) => Ok(resp.map(BodyExt::boxed)),
                Err(e) => {
                    let connect = e.is_connect();
                    Err((classify(&e, connect, body_limit), error_chain(&e)))
                }
            }
        });
        match answered.await {
            Err(_) => Err((UpstreamError::Timeout, "response timeout".into())),
            Ok(r) => r,
        }
    }

    /// The request on one of the client connection's own upstream connections: a free
    /// one it keeps, or a new one for a client connection's second and later requests
    /// since it was last idle (the first goes through the pool, whose warm connection
    /// costs no connect), while fewer than `max_pinned` are open.
    async fn send_pinned(
        &self,
        slot: &Arc<PinnedSlot>,
        req: Request<UpstreamBody>,
        body_limit: u64,
    ) -> Pinned {
        let (kept, burst) = slot.take();
        let kept = kept.and_then(|mut c| c.ready().then_some(c));
        let conn = match kept {
            Some(c) => c,
            None if burst < 2 => return Pinned::NotSent(req),
            _ => {
                let Some(count) = PinnedCount::acquire(&self.pinned, self.max_pinned) else {
                    return Pinned::NotSent(req);
                };
                // Boxed: rare (a connection's first burst), and its connect future would
                // otherwise take 2.4 KB of every request's future, which hyper moves per
                // request (and tokio allocates per HTTP/2 stream).
                match Box::pin(self.open_pinned(count)).await {
                    Ok(c) => {
                        slot.opened.notify_one();
                        c
                    }
                    // A timeout is answered (the pool would wait as long again); any
                    // other failure goes to the pool, whose warm connections may still
                    // work when an upstream at its connection limit refuses new ones.
                    Err(r) if r.0 == UpstreamError::Timeout => return Pinned::Answered(Err(r)),
                    Err((_, detail)) => {
                        tracing::debug!(target: "fhirgate::upstream", error = %detail, "no pinned connection: the pool serves the request");
                        return Pinned::NotSent(req);
                    }
                }
            }
        };
        conn.send(req, slot, body_limit).await
    }

    async fn open_pinned(&self, count: PinnedCount) -> Result<PinnedConn, (UpstreamError, String)> {
        let io = self
            .connector
            .clone()
            .call(self.origin.clone())
            .await
            .map_err(|e| (classify(&*e, true, 0), error_chain(&*e)))?;
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| (UpstreamError::Unavailable, error_chain(&e)))?;
        Ok(PinnedConn {
            sender,
            conn: Box::pin(conn),
            _count: count,
        })
    }
}

/// `Host` as the pool's client writes it (RFC 9110 §7.2: uri-host, and the port unless
/// it is the scheme's default), so a request carries the same `Host` on either path.
fn host_header(scheme: &Scheme, authority: &http::uri::Authority) -> String {
    let default = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    match authority.port_u16() {
        Some(port) if port != default => format!("{}:{port}", authority.host()),
        _ => authority.host().to_owned(),
    }
}

/// Which refusal an error forwarding a request earns: timeouts 504, a client body over
/// `limit` 413, a failing client body 400, any other failure to reach the upstream 502.
/// `connect`: it happened opening a connection.
fn classify(e: &(dyn std::error::Error + 'static), connect: bool, limit: u64) -> UpstreamError {
    if chain_has::<http_body_util::LengthLimitError>(e) {
        UpstreamError::BodyTooLarge { limit }
    } else if chain_any(e, |c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    }) {
        UpstreamError::Timeout
    } else if !connect && client_body_failed(e) {
        UpstreamError::ClientBody
    } else {
        UpstreamError::Unavailable
    }
}

type UpstreamIo = MaybeHttpsStream<TokioIo<TcpStream>>;

/// What trying a client connection's own upstream connection came to.
enum Pinned {
    Answered(Result<Response<Body>, (UpstreamError, String)>),
    /// Not sent (no connection, none to spare, or one found closed before the request
    /// was written): the request goes to the pool as it is.
    NotSent(Request<UpstreamBody>),
}

/// One client connection's place for its own upstream connections, free ones waiting
/// here between requests. Requests on an HTTP/1.1 connection come one at a time, so one
/// upstream connection serves them all; an HTTP/2 client's concurrent streams take one
/// each, a connection serving one request at a time and coming back when its response
/// body ends. Nothing is shared between client connections, so a response can only
/// ever reach the client connection that asked for it.
#[derive(Default)]
pub struct PinnedSlot {
    state: Mutex<SlotState>,
    /// Told when a connection is opened, so an HTTP/2 client connection starts watching
    /// for the quiet that gives its connections up ([`PinnedSlot::opened`]).
    opened: tokio::sync::Notify,
}

impl std::fmt::Debug for PinnedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinnedSlot")
    }
}

#[derive(Default)]
struct SlotState {
    /// Free connections, the last one back on top (the likeliest to be warm).
    free: Vec<PinnedConn>,
    /// Requests since the client connection opened or was last idle.
    burst: u32,
}

impl PinnedSlot {
    fn take(&self) -> (Option<PinnedConn>, u32) {
        match self.state.lock() {
            Ok(mut s) => {
                s.burst = s.burst.saturating_add(1);
                (s.free.pop(), s.burst)
            }
            Err(_) => (None, 0),
        }
    }

    fn put(&self, conn: PinnedConn) {
        if let Ok(mut s) = self.state.lock() {
            s.free.push(conn);
        }
    }

    /// The client connection went idle: its free upstream connections are closed, so
    /// idle clients hold none (the next burst starts on the pool again). A connection
    /// still in use by a request comes back afterwards and waits for the next release.
    pub fn release(&self) {
        let free = match self.state.lock() {
            Ok(mut s) => {
                s.burst = 0;
                std::mem::take(&mut s.free)
            }
            Err(_) => Vec::new(),
        };
        drop(free);
    }

    /// Completes once a connection has been opened since the last call (or ever).
    pub async fn opened(&self) {
        self.opened.notified().await;
    }

    /// Whether it holds a free connection (what [`PinnedSlot::release`] would close).
    pub fn holds(&self) -> bool {
        self.state.lock().is_ok_and(|s| !s.free.is_empty())
    }
}

/// Counts a pinned connection for `upstream.max_pinned_connections` while it lives.
struct PinnedCount(Gauge);

impl PinnedCount {
    fn acquire(open: &Gauge, max: usize) -> Option<Self> {
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        open.inner()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PinnedCount(open.clone()))
    }
}

impl Drop for PinnedCount {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An upstream connection driven by whoever holds it: the request being sent, then the
/// response body ([`PinnedBody`]); unpolled while it waits in its slot between requests.
struct PinnedConn {
    sender: http1::SendRequest<UpstreamBody>,
    conn: Pin<Box<http1::Connection<UpstreamIo, UpstreamBody>>>,
    _count: PinnedCount,
}

impl PinnedConn {
    /// Whether it can take a request now: polled once, it reads what arrived while it
    /// waited (an upstream's close ends it) and turns ready if it is between messages.
    fn ready(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        if self.conn.as_mut().poll(&mut cx).is_ready() {
            return false;
        }
        matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }

    async fn send(
        mut self,
        mut req: Request<UpstreamBody>,
        slot: &Arc<PinnedSlot>,
        body_limit: u64,
    ) -> Pinned {
        // HTTP/1.1 to an origin server: origin-form target, as the pool's client writes
        // it (`Host` is already set, by `Upstream::send`).
        let absolute = std::mem::take(req.uri_mut());
        if let Some(pq) = absolute.path_and_query() {
            *req.uri_mut() = Uri::from(pq.clone());
        }
        // Written after the runtime's other ready tasks have run: their requests then
        // reach the upstream together and wake it once, not once each, as the pool's
        // connection tasks write (less CPU per request for the gateway and the upstream;
        // bench/README.md, twenty-third pass).
        tokio::task::yield_now().await;
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        let mut open = true;
        let result = std::future::poll_fn(|cx| {
            if open && self.conn.as_mut().poll(cx).is_ready() {
                // Closed: the request's callback gets the reason.
                open = false;
            }
            response.as_mut().poll(cx)
        })
        .await;
        match result {
            Ok(resp) => {
                let keep = open.then_some(self);
                Pinned::Answered(Ok(
                    resp.map(|inner| PinnedBody::boxed_for(inner, keep, slot))
                ))
            }
            Err(mut e) => match e.take_message() {
                // Never written (the connection closed while it waited): retried on the
                // pool, which is what the pool itself does for a request it could not
                // send on a reused connection.
                Some(mut req) => {
                    *req.uri_mut() = absolute;
                    Pinned::NotSent(req)
                }
                None => {
                    let e = e.into_error();
                    Pinned::Answered(Err((classify(&e, false, body_limit), error_chain(&e))))
                }
            },
        }
    }
}

/// A response body from a pinned connection: polling it drives the connection, and once
/// it has been read to its end the connection goes back to its slot for the next
/// request. Dropped before its end, it closes the connection.
struct PinnedBody {
    inner: Incoming,
    conn: Option<PinnedConn>,
    slot: Arc<PinnedSlot>,
}

impl PinnedBody {
    fn boxed_for(inner: Incoming, conn: Option<PinnedConn>, slot: &Arc<PinnedSlot>) -> Body {
        let mut body = PinnedBody {
            inner,
            conn,
            slot: slot.clone(),
        };
        // An empty body may never be polled.
        if http_body::Body::is_end_stream(&body.inner) {
            body.finish();
        }
        body.boxed()
    }

    fn finish(&mut self) {
        if let Some(c) = self.conn.take() {
            self.slot.put(c);
        }
    }
}

impl http_body::Body for PinnedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(c) = this.conn.as_mut() {
            if c.conn.as_mut().poll(cx).is_ready() {
                // Closed while the body streamed: what it delivered is in `inner`.
                this.conn = None;
            }
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why forwarding a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamError {
    /// Connect or response-header timeout (504).
    Timeout,
    /// The client's body grew past `limits.max_body_bytes` while streaming (413).
    BodyTooLarge { limit: u64 },
    /// Reading the client's body failed (client reset or malformed framing).
    ClientBody,
    /// Unreachable, refused or reset (502).
    Unavailable,
}

impl Refuse for UpstreamError {
    fn rejection(&self) -> Rejection {
        match self {
            UpstreamError::Timeout => Rejection::upstream_timeout(),
            UpstreamError::BodyTooLarge { limit } => Rejection::body_too_large(*limit),
            UpstreamError::ClientBody => Rejection::bad_request_body(),
            UpstreamError::Unavailable => Rejection::upstream_unavailable(),
        }
    }

    fn source(&self) -> ErrorSource {
        match self {
            UpstreamError::Timeout | UpstreamError::Unavailable => ErrorSource::Upstream,
            UpstreamError::BodyTooLarge { .. } | UpstreamError::ClientBody => ErrorSource::Client,
        }
    }
}

/// Whether the failure came from reading the client's request body.
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    chain_any(e, |c| {
        c.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_user() || h.is_body_write_aborted())
    })
}

fn chain_any(
    e: &(dyn std::error::Error + 'static),
    mut f: impl FnMut(&(dyn std::error::Error + 'static)) -> bool,
) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if f(c) {
            return true;
        }
        cur = c.source();
    }
    false
}

fn chain_has<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    chain_any(e, |c| c.is::<T>())
}

/// The error and its causes on one line, for logs.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// `upstream:` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the internal FHIR endpoint; its path is prefixed to every request path.
    pub url: String,
    /// PEM CA bundle to verify an `https` upstream.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) the gateway presents to an `https` upstream.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    #[serde(default = "default_connect_timeout", with = "crate::config::duration")]
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response headers arrive.
    #[serde(default = "default_response_timeout", with = "crate::config::duration")]
    pub response_timeout: Duration,
    #[serde(default = "default_pool_idle", with = "crate::config::duration")]
    pub pool_idle_timeout: Duration,
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
    /// Speak HTTP/2 (prior knowledge for http, ALPN for https) to the upstream.
    #[serde(default)]
    pub http2: bool,
    /// Most upstream connections held by busy client connections for their own use (see
    /// [`PinnedSlot`]; HTTP/2 clients only on the current-thread runtime, see
    /// [`Upstream::pinned_slot`]); beyond it, the shared pool. 0 turns pinning off. Not
    /// used with `http2: true`.
    #[serde(default = "default_max_pinned")]
    pub max_pinned_connections: usize,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_response_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(90)
}
fn default_pool_max_idle() -> usize {
    64
}
fn default_max_pinned() -> usize {
    128
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_host_header_is_the_pools() {
        let host = |url: &str| {
            let uri: Uri = url.parse().expect("url");
            host_header(
                uri.scheme().expect("scheme"),
                uri.authority().expect("authority"),
            )
        };
        assert_eq!(host("http://fhir.example.nhs.uk"), "fhir.example.nhs.uk");
        assert_eq!(
            host("http://fhir.example.nhs.uk:80/fhir"),
            "fhir.example.nhs.uk"
        );
        assert_eq!(
            host("https://fhir.example.nhs.uk:443"),
            "fhir.example.nhs.uk"
        );
        assert_eq!(host("https://10.0.0.5:8443"), "10.0.0.5:8443");
        assert_eq!(host("http://127.0.0.1:8081"), "127.0.0.1:8081");
        assert_eq!(host("http://[::1]:8081"), "[::1]:8081");
    }
}
