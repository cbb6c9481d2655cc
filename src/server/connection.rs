//! One connection: TLS handshake under a timeout, the identity stage (verified client
//! certificate to [`ClientIdentity`]), per-client connection cap, then HTTP/1.1 or HTTP/2
//! into the request pipeline.
//!
//! Idle connections (nothing being handled or sent, and no request started or finished
//! for `limits.idle_timeout`; HTTP/2 PINGs and other control frames do not count) are
//! closed gracefully. With no request being handled, a connection on which no byte
//! moved for `idle_timeout` (a client that stopped reading its response, a stalled
//! stream), or that was asked to close an `idle_timeout` ago and has not, is dropped.
//! All of these are checked on the connection's tick (a quarter of `idle_timeout`, at
//! most 250 ms for HTTP/1.1 and for HTTP/2 while it holds upstream connections of its
//! own), so they happen up to a tick after the time is up, never before it. A client
//! connection quiet for 250 ms gives its own upstream connections up: HTTP/1.1 by
//! parking, HTTP/2 on that tick.

use super::Snapshot;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use std::future::Future;

use arc_swap::ArcSwap;
use bytes::Bytes;

use http::Request;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::rt::bounds::Http2ServerConnExec;
use hyper::server::conn::{http1, http2};
use hyper::service::{service_fn, HttpService};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::logging::Escaped;
use crate::metrics::Metrics;
use crate::pipeline::identity::{ClientChain, ClientIdentity, TrustInForce};
use crate::pipeline::outcome::Rejection;
use crate::pipeline::service::ClientConnections;
use crate::pipeline::upstream::PinnedSlot;
use crate::pipeline::{ConnInfo, Gateway};
use crate::tls::{handshake_failure_kind, HandshakeKind, PresentedCert, REFUSED_CERT};

impl Snapshot {
    pub(super) async fn connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        metrics: &Metrics,
        mut shutdown: watch::Receiver<bool>,
        clients: &Arc<ClientConnections>,
        in_force: InForce,
    ) {
        let InForce {
            trust,
            generation,
            snapshot: in_force,
        } = in_force;
        let _ = tcp.set_nodelay(true);
        // The verifier leaves a refused client certificate here (task-local: the
        // handshake runs inside this future), so the refusal line can name it.
        let refused: Arc<std::sync::Mutex<Option<PresentedCert>>> = Arc::default();
        // Boxed, so its space is freed once the handshake is done instead of being kept
        // in the connection's task for its whole life (see bench/README.md, memory).
        let handshake = Box::pin(REFUSED_CERT.scope(
            refused.clone(),
            tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp)),
        ));
        let tls = match handshake.await {
            // Boxed: the TLS session (1.2 KB) would otherwise take several slots in this
            // task (it moves from here to hyper and back when parked), for its whole life.
            Ok(Ok(s)) => Box::new(s),
            Ok(Err(e)) => {
                let kind = handshake_failure_kind(&e).as_str();
                metrics.handshake(kind);
                let cert = refused.lock().ok().and_then(|mut c| c.take());
                match cert {
                    Some(c) => tracing::warn!(
                        target: "fhirgate::tls",
                        %peer,
                        kind,
                        error = %e,
                        subject = %Escaped(&c.subject),
                        issuer = %Escaped(&c.issuer),
                        serial = %c.serial,
                        not_after = %c.not_after,
                        "handshake refused"
                    ),
                    None => {
                        tracing::warn!(target: "fhirgate::tls", %peer, kind, error = %e, "handshake refused")
                    }
                }
                return;
            }
            Err(_) => {
                metrics.handshake(HandshakeKind::Timeout.as_str());
                tracing::warn!(target: "fhirgate::tls", %peer, kind = HandshakeKind::Timeout.as_str(), "handshake timed out");
                return;
            }
        };
        let (identity, chain) = {
            let session = tls.get_ref().1;
            let Some((leaf, intermediates)) =
                session.peer_certificates().and_then(|c| c.split_first())
            else {
                // The verifier makes a certificate mandatory; this is defence in depth.
                metrics.handshake(HandshakeKind::NoCert.as_str());
                tracing::warn!(target: "fhirgate::tls", %peer, kind = HandshakeKind::NoCert.as_str(), "no client certificate after handshake");
                return;
            };
            // rustls takes a resumed session's certificate from the ticket or session
            // cache without checking it again, and tickets chain (each resumption gets a
            // new one), so its chain starts unverified and is checked here as in a full
            // handshake, against the trust in force: one that has expired since, or that
            // the CRLs now in force revoke, ends the connection before any HTTP (RFC 8446
            // §4.6.1). The handshake is over, so the client sees the connection close
            // rather than an alert.
            let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            let all = session.peer_certificates().unwrap_or_default();
            // The leaf parsed once, for the identity and the chain's notAfter; its bundle
            // is named below, once the chain is placed in one.
            let mut identity = match ClientIdentity::from_der(leaf, "") {
                Ok(id) => id,
                Err(e) => {
                    metrics.handshake(HandshakeKind::BadCertificate.as_str());
                    tracing::warn!(target: "fhirgate::tls", %peer, kind = HandshakeKind::BadCertificate.as_str(), error = %e, "client certificate unreadable");
                    return;
                }
            };
            let mut chain = ClientChain::new(
                all,
                identity.not_after,
                trust,
                (!resumed).then_some(generation),
            );
            if resumed {
                if let Err((lapsed, _)) = chain.check() {
                    let kind = lapsed.0.as_str();
                    metrics.handshake(kind);
                    let c = PresentedCert::from_der(leaf).unwrap_or_default();
                    tracing::warn!(target: "fhirgate::tls", %peer, kind, subject = %Escaped(&c.subject), issuer = %Escaped(&c.issuer), serial = %c.serial, not_after = %c.not_after, "resumed session refused: its certificate no longer verifies");
                    return;
                }
            }
            // A resumed session was checked against the trust in force just above, so its
            // bundle comes from there too, not from this connection's snapshot.
            let in_force;
            let bundle = if resumed {
                in_force = chain.bundle_in_force();
                in_force.as_deref()
            } else {
                self.verifier.bundle_of(leaf, intermediates)
            };
            let Some(bundle) = bundle else {
                metrics.handshake(HandshakeKind::UnknownCa.as_str());
                let c = PresentedCert::from_der(leaf).unwrap_or_default();
                tracing::warn!(target: "fhirgate::tls", %peer, kind = HandshakeKind::UnknownCa.as_str(), subject = %Escaped(&c.subject), issuer = %Escaped(&c.issuer), serial = %c.serial, not_after = %c.not_after, "verified chain matches no bundle");
                return;
            };
            chain.admit(bundle);
            bundle.clone_into(&mut identity.bundle);
            (identity, chain)
        };
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        metrics.handshake(HandshakeKind::Ok.as_str());
        tracing::debug!(target: "fhirgate::tls", %peer, subject = %Escaped(&identity.subject), bundle = %identity.bundle, "handshake ok");
        let max_per_client = self.limits.max_connections_per_client;
        let Some(_slot) = clients.open(&identity.fingerprint_sha256, max_per_client) else {
            metrics.connections_over_client_cap.inc();
            tracing::warn!(target: "fhirgate::tls", %peer, subject = %Escaped(&identity.subject), fingerprint = %identity.fingerprint_sha256, max_per_client, "client over its connection cap: answering 429 and closing");
            Box::pin(self.refuse_over_cap(h2, tls, max_per_client)).await;
            return;
        };

        // The gateway in force now, not the snapshot's: a reload during the handshake
        // applies from the first request.
        let gateway = in_force.load().gateway.clone();
        let bound = Bound::to(gateway, identity, peer, Arc::new(chain), h2);
        let lapse = bound.conn.clone();
        let binding = Arc::new(ArcSwap::from_pointee(bound));
        let activity = Arc::new(Activity::new());
        let mut io = TokioIo::new(TrackedIo {
            inner: tls,
            activity: activity.clone(),
            unread: Bytes::new(),
        });
        let svc_binding = binding.clone();
        let svc_activity = activity.clone();
        let handle = move |req: Request<Incoming>| {
            let bound = Bound::current(&svc_binding, &in_force, h2);
            let activity = svc_activity.clone();
            let guard = InFlight::new(activity.clone());
            let req = if h2 || req.body().is_end_stream() {
                req.map(BodyExt::boxed)
            } else {
                // Parking needs to know the body was read to its end (`Activity::parkable`).
                let guard = ReadingBody::new(activity.clone());
                req.map(|inner| Guarded { inner, guard }.boxed())
            };
            async move {
                let resp = bound.gateway.handle(req, &bound.conn).await;
                drop(guard);
                // The response body still has to be sent; track it until it is dropped.
                let streaming = Streaming::new(activity);
                Ok::<_, Infallible>(resp.map(|inner| Guarded {
                    inner,
                    guard: streaming,
                }))
            }
        };
        let idle = self.limits.idle_timeout;
        let slow = (idle / 4).max(Duration::from_millis(50));
        let fast = slow.min(PARK_AFTER);
        // HTTP/1.1 ticks fast (it parks); HTTP/2 only while it holds upstream connections
        // of its own, so an idle HTTP/2 connection does not wake four times a second.
        let mut every = if h2 { slow } else { fast };
        let mut tick = tokio::time::interval(every);
        let mut closing: Option<Instant> = None;
        // HTTP/2 if the TLS handshake chose `h2` by ALPN (RFC 9113 §3.2), HTTP/1.1 otherwise.
        // HTTP/2 streams get the request's future boxed: hyper and tokio move a stream's
        // future (about 5 KB) several times to spawn it, a pointer is cheaper (bench/README.md,
        // eleventh pass). HTTP/1.1 keeps it inline: hyper holds one per connection, and a
        // box per request measured worse there.
        let mut served = if h2 {
            let svc = service_fn(move |req| Box::pin(handle(req)));
            Served::H2(Box::pin(self.http2.serve_connection(io, svc)))
        } else {
            Served::H1(Box::pin(
                self.http1.serve_connection(io, service_fn(handle)),
            ))
        };
        let close_gracefully = |s: &mut Served<_, _, _>| match s {
            Served::H1(c) => c.as_mut().graceful_shutdown(),
            Served::H2(c) => c.as_mut().graceful_shutdown(),
        };
        loop {
            // Serve until the connection ends, or (HTTP/1.1) until it is quiet enough to park.
            let park = loop {
                tokio::select! {
                    res = &mut served => {
                        if let Err(e) = res {
                            ended_with_error(metrics, peer, &e);
                        }
                        break false;
                    }
                    _ = tick.tick() => {
                        activity.stamp();
                        // Its requests are refused once its certificate lapsed; an HTTP/2
                        // client is also sent a GOAWAY, so it reconnects and meets the
                        // handshake (HTTP/1.1 closes after the refusal itself).
                        if closing.is_none() && lapse.chain.has_lapsed() {
                            close_gracefully(&mut served);
                            closing = Some(Instant::now());
                        }
                        if h2 {
                            let want = release_when_quiet(&binding.load(), &activity, fast, slow);
                            retick(&mut tick, &mut every, want);
                        }
                        // A request being handled is bounded by the upstream timeouts.
                        if activity.handling() > 0 {
                            continue;
                        }
                        let quiet = activity.streaming() == 0;
                        if closing.is_none() && quiet && activity.requests_idle_for() >= idle {
                            close_gracefully(&mut served);
                            closing = Some(Instant::now());
                        } else if activity.idle_for() >= idle {
                            // No byte moved for a whole idle period with no request being
                            // handled: a peer that stopped reading, or a stalled stream.
                            tracing::debug!(%peer, "dropping a stalled connection");
                            break false;
                        } else if quiet && closing.is_some_and(|t| t.elapsed() >= idle) {
                            // Asked to close an idle period ago and still open (e.g. an
                            // HTTP/2 peer that keeps pinging but never finishes the GOAWAY).
                            tracing::debug!(%peer, "dropping a connection that did not close");
                            break false;
                        } else if !h2 && closing.is_none() && activity.parkable() {
                            break true;
                        }
                    }
                    _ = shutdown.changed(), if closing.is_none() => {
                        close_gracefully(&mut served);
                        closing = Some(Instant::now());
                    }
                    // An HTTP/2 connection that just opened an upstream connection of its
                    // own ticks fast from now, to give it up soon after going quiet.
                    () = opened(binding.load().conn.upstream.clone()), if h2 && every != fast => {
                        retick(&mut tick, &mut every, fast);
                    }
                }
            };
            let Served::H1(mut h1) = served else { break };
            if !park {
                break;
            }
            // An idle client holds no upstream connection.
            if let Some(p) = &binding.load().conn.upstream {
                p.release();
            }
            // Parking: hyper closes an idle connection at once on a graceful shutdown,
            // and hands back the still-open TLS stream and the service. Boxed, like the
            // wait below, so the connection's task is not sized for them.
            h1.as_mut().graceful_shutdown();
            let mut parting = Box::pin(Pin::into_inner(h1).without_shutdown());
            let parts =
                match std::future::poll_fn(|cx| Poll::Ready(parting.as_mut().poll(cx))).await {
                    Poll::Ready(Ok(parts)) => parts,
                    Poll::Ready(Err(e)) => {
                        ended_with_error(metrics, peer, &e);
                        break;
                    }
                    // `parkable` rules this out: hyper was not between requests after all
                    // and would finish the exchange with keep-alive off. Closed rather
                    // than risk reading the rest of a request as a new one.
                    Poll::Pending => {
                        tracing::debug!(%peer, "connection not idle when parked: closed");
                        break;
                    }
                };
            drop(parting);
            let hyper::server::conn::http1::Parts {
                io: parted,
                read_buf,
                service: svc,
                ..
            } = parts;
            io = parted;
            if read_buf.is_empty() {
                // Empty, but it still holds hyper's whole read buffer (8 KiB or more):
                // dropped here, or the parked connection would keep it while it waits.
                drop(read_buf);
                metrics.parked_connections.inc();
                activity.stamp();
                let left = idle.saturating_sub(activity.requests_idle_for());
                let resume = Box::pin(next_request(&io, left, &mut shutdown)).await;
                metrics.parked_connections.dec();
                if !resume {
                    // Idle for `idle_timeout`, or the gateway is draining: close as hyper
                    // would close an idle connection (TLS close_notify, then FIN).
                    let _ = tokio::time::timeout(Duration::from_secs(1), io.inner_mut().shutdown())
                        .await;
                    break;
                }
            } else {
                // The start of a next request that hyper had read (pipelined after a body
                // read to its end): served at once by a fresh connection, which reads
                // these bytes first, and not parked again before that request starts.
                activity.read_since_request.store(true, Ordering::Relaxed);
                io.inner_mut().unread = read_buf;
            }
            tick.reset();
            served = Served::H1(Box::pin(self.http1.serve_connection(io, svc)));
        }
    }
}

/// The connection's tick changed to every `want`, the first one `want` from now.
fn retick(tick: &mut tokio::time::Interval, every: &mut Duration, want: Duration) {
    if *every != want {
        *every = want;
        *tick = tokio::time::interval_at(tokio::time::Instant::now() + want, want);
    }
}

/// Completes when `slot` opens a connection; never without a slot.
async fn opened(slot: Option<Arc<PinnedSlot>>) {
    match slot {
        Some(s) => s.opened().await,
        None => std::future::pending().await,
    }
}

/// An HTTP/2 connection's own upstream connections, on its tick: given up once no request
/// started or ended for `PARK_AFTER` and none is being handled or sent, as a parked
/// HTTP/1.1 connection's are. Returns the tick the connection needs next: `fast` while it
/// still holds some, so they are given up within a tick of going quiet, else `slow`
/// (until it opens one again: [`PinnedSlot::opened`]).
fn release_when_quiet(
    bound: &Bound,
    activity: &Activity,
    fast: Duration,
    slow: Duration,
) -> Duration {
    let Some(pinned) = &bound.conn.upstream else {
        return slow;
    };
    if activity.handling() == 0
        && activity.streaming() == 0
        && activity.requests_idle_for() + STAMP_SLACK >= PARK_AFTER
    {
        pinned.release();
    }
    if pinned.holds() {
        fast
    } else {
        slow
    }
}

/// What the server has in force, which open connections follow.
pub(super) struct InForce {
    /// The verifier in force, and its generation when the connection was accepted.
    pub trust: Arc<TrustInForce>,
    pub generation: u64,
    /// The snapshot in force, whose gateway the connection's requests go to.
    pub snapshot: Arc<ArcSwap<Snapshot>>,
}

/// The gateway a connection's requests go to, and what the connection holds that the
/// gateway built: its identity headers and (HTTP/1.1) its place for a pinned upstream
/// connection.
struct Bound {
    gateway: Arc<Gateway>,
    conn: Arc<ConnInfo>,
}

impl Bound {
    fn to(
        gateway: Arc<Gateway>,
        identity: ClientIdentity,
        peer: SocketAddr,
        chain: Arc<ClientChain>,
        h2: bool,
    ) -> Bound {
        let headers = gateway.connection_headers(&identity, peer);
        let upstream = gateway.pinned_slot(h2);
        let conn = Arc::new(ConnInfo {
            identity,
            peer,
            headers,
            upstream,
            chain,
        });
        Bound { gateway, conn }
    }

    /// Per request: the binding, moved to the gateway in force if a reload replaced the
    /// one it was made with, so routes, allow-lists, token and NHSD checks and the
    /// upstream apply to open connections from their next request (an operator taking a
    /// client off a route in an incident does not wait for it to reconnect). Only the
    /// connection's task calls this, so the load and store do not race.
    fn current(binding: &ArcSwap<Bound>, in_force: &ArcSwap<Snapshot>, h2: bool) -> Arc<Bound> {
        let bound = binding.load_full();
        let snapshot = in_force.load();
        if Arc::ptr_eq(&bound.gateway, &snapshot.gateway) {
            return bound;
        }
        // The old upstream's pinned connection is not used again: let it go.
        if let Some(p) = &bound.conn.upstream {
            p.release();
        }
        let c = &bound.conn;
        let rebound = Arc::new(Bound::to(
            snapshot.gateway.clone(),
            c.identity.clone(),
            c.peer,
            c.chain.clone(),
            h2,
        ));
        binding.store(rebound.clone());
        rebound
    }
}

/// Counts and logs a connection hyper ended with an error.
fn ended_with_error(metrics: &Metrics, peer: SocketAddr, e: &hyper::Error) {
    let kind = connection_error_kind(e).as_str();
    metrics.connection_error(kind);
    tracing::debug!(%peer, kind, error = %e, "connection ended with error");
}

/// A parked connection's wait: true when the client's next bytes (or its close, which
/// hyper then reads) arrive, false after `left` or when the gateway starts draining.
async fn next_request(
    io: &TokioIo<TrackedIo<Box<tokio_rustls::server::TlsStream<TcpStream>>>>,
    left: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        r = io.inner().inner.get_ref().0.readable() => r.is_ok(),
        _ = tokio::time::sleep(left) => false,
        _ = shutdown.changed() => false,
    }
}

impl Snapshot {
    /// Answers every request on a connection over the per-client cap with 429
    /// `REC_TOO_MANY_REQUESTS` (`Connection: close` on HTTP/1.1), for at most the
    /// handshake timeout: the sender gets an answer BaRS tells it to retry on, rather
    /// than a reset it might report as a TLS failure.
    async fn refuse_over_cap<T>(&self, h2: bool, tls: T, max: usize)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = service_fn(move |_req| async move {
            let mut resp = Rejection::too_many_connections(max, 1).into_response();
            resp.headers_mut().insert(
                http::header::CONNECTION,
                http::HeaderValue::from_static("close"),
            );
            Ok::<_, Infallible>(resp)
        });
        let io = TokioIo::new(tls);
        let served = if h2 {
            Served::H2(Box::pin(self.http2.serve_connection(io, svc)))
        } else {
            Served::H1(Box::pin(self.http1.serve_connection(io, svc)))
        };
        let _ = tokio::time::timeout(self.handshake_timeout, served).await;
    }
}

/// One connection's HTTP server. Each protocol's connection is boxed, so the connection's
/// task is not sized for the larger one: hyper-util's `auto` connection, an enum of both
/// kept inline, made every HTTP/1.1 connection carry HTTP/2's size (880 bytes more).
/// `S` serves HTTP/1.1, `S2` HTTP/2 (a service of its own: its futures are boxed).
enum Served<I, S, S2>
where
    S: HttpService<Incoming>,
    S2: HttpService<Incoming>,
{
    H1(Pin<Box<http1::Connection<I, S>>>),
    H2(Pin<Box<http2::Connection<I, S2, TokioExecutor>>>),
}

impl<I, S, S2> Future for Served<I, S, S2>
where
    S: HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: http_body::Body + 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S2: HttpService<Incoming, ResBody = S::ResBody>,
    S2::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    TokioExecutor: Http2ServerConnExec<S2::Future, S::ResBody>,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Served::H1(c) => c.as_mut().poll(cx),
            Served::H2(c) => c.as_mut().poll(cx),
        }
    }
}

/// Why hyper ended a connection with an error: the `kind` label of
/// `fhirgate_connection_errors_total`. A closed set: new labels are added here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    HeadersTooLarge,
    BadRequest,
    HeaderTimeout,
    Incomplete,
    H2Remote,
    H2ProtocolError,
    H2FrameSizeError,
    H2CompressionError,
    H2EnhanceYourCalm,
    H2Error,
    Io,
}

impl ConnectionKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [ConnectionKind; 11] = [
        ConnectionKind::HeadersTooLarge,
        ConnectionKind::BadRequest,
        ConnectionKind::HeaderTimeout,
        ConnectionKind::Incomplete,
        ConnectionKind::H2Remote,
        ConnectionKind::H2ProtocolError,
        ConnectionKind::H2FrameSizeError,
        ConnectionKind::H2CompressionError,
        ConnectionKind::H2EnhanceYourCalm,
        ConnectionKind::H2Error,
        ConnectionKind::Io,
    ];

    /// The label, byte-identical to the strings used before this enum existed.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionKind::HeadersTooLarge => "headers_too_large",
            ConnectionKind::BadRequest => "bad_request",
            ConnectionKind::HeaderTimeout => "header_timeout",
            ConnectionKind::Incomplete => "incomplete",
            ConnectionKind::H2Remote => "h2_remote",
            ConnectionKind::H2ProtocolError => "h2_protocol_error",
            ConnectionKind::H2FrameSizeError => "h2_frame_size_error",
            ConnectionKind::H2CompressionError => "h2_compression_error",
            ConnectionKind::H2EnhanceYourCalm => "h2_enhance_your_calm",
            ConnectionKind::H2Error => "h2_error",
            ConnectionKind::Io => "io",
        }
    }
}

/// A short, fixed label for why hyper ended a connection with an error.
fn connection_error_kind(e: &(dyn std::error::Error + 'static)) -> ConnectionKind {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return ConnectionKind::HeadersTooLarge;
            }
            if h.is_parse() {
                return ConnectionKind::BadRequest;
            }
            if h.is_timeout() {
                return ConnectionKind::HeaderTimeout;
            }
            if h.is_incomplete_message() {
                return ConnectionKind::Incomplete;
            }
        }
        if let Some(h) = c.downcast_ref::<h2::Error>() {
            if h.is_remote() {
                return ConnectionKind::H2Remote;
            }
            return match h.reason().map(u32::from) {
                Some(0x1) => ConnectionKind::H2ProtocolError,
                Some(0x6) => ConnectionKind::H2FrameSizeError,
                Some(0x9) => ConnectionKind::H2CompressionError,
                Some(0xb) => ConnectionKind::H2EnhanceYourCalm,
                _ => ConnectionKind::H2Error,
            };
        }
        cur = c.source();
    }
    ConnectionKind::Io
}

/// How long an HTTP/1.1 connection must be quiet before it is parked: hyper keeps its
/// read and write buffers (8 KiB each), its connection state and room for a request
/// future for a connection's whole life, idle or not, and has no setting to release
/// them. Parked, the connection keeps only its TLS session and waits for the socket to
/// become readable; the next request gets a fresh hyper connection. nginx frees its
/// buffers as soon as a keep-alive connection goes idle; this short delay spares busy
/// connections the rebuild between back-to-back requests.
const PARK_AFTER: Duration = Duration::from_millis(250);

/// Activity times are stamped at ticks, give or take the timer's millisecond: a time
/// compared with PARK_AFTER gets this much slack, so one quiet tick period is enough.
const STAMP_SLACK: Duration = Duration::from_millis(10);

/// Last I/O time, last request start or end, requests being handled and responses
/// being sent on one connection, and what parking needs to know about hyper's state.
///
/// The I/O path only raises flags (`moved`, `request_moved`); the connection's tick turns
/// them into times ([`Activity::stamp`]), so a request costs no clock read here. The
/// times are those of the tick that saw the movement, at most one tick late, and every
/// decision made from them is made on a tick anyway.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    last_request_ms: AtomicU64,
    /// A byte moved since the last tick.
    moved: AtomicBool,
    /// A request started or ended since the last tick.
    request_moved: AtomicBool,
    handling: AtomicUsize,
    streaming: AtomicUsize,
    /// Request bodies not yet read to their end.
    reading: AtomicUsize,
    /// A request body was dropped before its end: hyper closes such a connection itself.
    abandoned: AtomicBool,
    /// Bytes were read since the last request started or ended (the start of another).
    read_since_request: AtomicBool,
    /// The last write or flush could not finish: hyper may still hold bytes to send.
    write_blocked: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            last_request_ms: AtomicU64::new(0),
            moved: AtomicBool::new(false),
            request_moved: AtomicBool::new(false),
            handling: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
            reading: AtomicUsize::new(0),
            abandoned: AtomicBool::new(false),
            read_since_request: AtomicBool::new(false),
            write_blocked: AtomicBool::new(false),
        }
    }
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }
    fn touch_request(&self) {
        self.moved.store(true, Ordering::Relaxed);
        self.request_moved.store(true, Ordering::Relaxed);
        self.read_since_request.store(false, Ordering::Relaxed);
    }
    /// On each tick, before the times are read: what moved since the last one moved now.
    fn stamp(&self) {
        let now = self.now_ms();
        if self.moved.swap(false, Ordering::Relaxed) {
            self.last_ms.store(now, Ordering::Relaxed);
        }
        if self.request_moved.swap(false, Ordering::Relaxed) {
            self.last_request_ms.store(now, Ordering::Relaxed);
        }
    }
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self.touch(),
            Poll::Pending => self.write_blocked.store(true, Ordering::Relaxed),
            _ => {}
        }
    }
    fn since(&self, at: &AtomicU64) -> Duration {
        let last = Duration::from_millis(at.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
    /// Time since any byte moved.
    fn idle_for(&self) -> Duration {
        self.since(&self.last_ms)
    }
    /// Time since a request started or a response finished.
    fn requests_idle_for(&self) -> Duration {
        self.since(&self.last_request_ms)
    }
    fn handling(&self) -> usize {
        self.handling.load(Ordering::Relaxed)
    }
    fn streaming(&self) -> usize {
        self.streaming.load(Ordering::Relaxed)
    }
    /// Whether hyper's HTTP/1.1 connection is between requests with nothing buffered,
    /// so a graceful shutdown closes it at once and leaves the TLS stream at a message
    /// boundary: no request in the gateway, every response body sent and flushed, every
    /// request body read to its end, no byte of a next request read, and nothing moved
    /// for `PARK_AFTER`.
    fn parkable(&self) -> bool {
        self.handling() == 0
            && self.streaming() == 0
            && self.reading.load(Ordering::Relaxed) == 0
            && !self.abandoned.load(Ordering::Relaxed)
            && !self.read_since_request.load(Ordering::Relaxed)
            && !self.write_blocked.load(Ordering::Relaxed)
            // Ticks are PARK_AFTER apart: one quiet tick period is enough.
            && self.idle_for() + STAMP_SLACK >= PARK_AFTER
    }
}

/// A request in the gateway's hands (until its response headers are ready).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: Arc<Activity>) -> Self {
        a.handling.fetch_add(1, Ordering::Relaxed);
        a.touch_request();
        InFlight(a)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.handling.fetch_sub(1, Ordering::Relaxed);
        self.0.touch_request();
    }
}

/// A response body being sent (until hyper drops it: finished, reset or failed).
struct Streaming(Arc<Activity>);

impl Streaming {
    fn new(a: Arc<Activity>) -> Self {
        a.streaming.fetch_add(1, Ordering::Relaxed);
        Streaming(a)
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.0.streaming.fetch_sub(1, Ordering::Relaxed);
        self.0.touch_request();
    }
}

/// A request body not yet read to its end.
struct ReadingBody {
    activity: Arc<Activity>,
    ended: bool,
}

impl ReadingBody {
    fn new(activity: Arc<Activity>) -> Self {
        activity.reading.fetch_add(1, Ordering::Relaxed);
        ReadingBody {
            activity,
            ended: false,
        }
    }
}

impl Drop for ReadingBody {
    fn drop(&mut self) {
        if !self.ended {
            self.activity.reading.fetch_sub(1, Ordering::Relaxed);
            self.activity.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// What a [`Guarded`] body's guard hears of the body.
trait BodyGuard {
    /// The body has ended: no more frames, or (what a forwarding client checks after
    /// each frame) it says it has ended.
    fn ended(&mut self) {}
}

impl BodyGuard for ReadingBody {
    fn ended(&mut self) {
        if !self.ended {
            self.ended = true;
            self.activity.reading.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A response body's guard counts until hyper drops the body (finished, reset or failed).
impl BodyGuard for Streaming {}

pin_project_lite::pin_project! {
    /// A body carrying its guard: [`Streaming`] on a response, [`ReadingBody`] on an
    /// HTTP/1.1 request.
    struct Guarded<B, G> {
        #[pin]
        inner: B,
        guard: G,
    }
}

impl<B: hyper::body::Body, G: BodyGuard> hyper::body::Body for Guarded<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let r = this.inner.as_mut().poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.guard.ended();
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An I/O wrapper that records when bytes last moved, and gives back first the bytes
    /// a parked hyper connection had read but not used.
    struct TrackedIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
        unread: Bytes,
    }
}

impl<T: AsyncRead> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
            this.activity
                .read_since_request
                .store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, data);
        this.activity.wrote(&r);
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        this.activity.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let r = this.inner.poll_flush(cx);
        this.activity
            .write_blocked
            .store(!matches!(r, Poll::Ready(Ok(()))), Ordering::Relaxed);
        r
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection-error labels are the metric's label values: fixed and distinct.
    #[test]
    fn connection_kinds_are_the_documented_labels() {
        let labels: Vec<&str> = ConnectionKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels.join(","), "headers_too_large,bad_request,header_timeout,incomplete,h2_remote,h2_protocol_error,h2_frame_size_error,h2_compression_error,h2_enhance_your_calm,h2_error,io");
    }
}
