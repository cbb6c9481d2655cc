//! Accept loop, TLS handshake and HTTP connection serving.
//!
//! Handshakes run in their own task under a timeout, so a stalled client never blocks
//! the accept loop. A semaphore caps open connections: when it is exhausted the gateway
//! stops accepting and lets the kernel backlog absorb the burst.
//!
//! Idle connections (nothing being handled or sent, and no request started or finished
//! for `limits.idle_timeout`; HTTP/2 PINGs and other control frames do not count) are
//! closed gracefully. With no request being handled, a connection on which no byte
//! moved for `idle_timeout` (a client that stopped reading its response, a stalled
//! stream), or that was asked to close an `idle_timeout` ago and has not, is dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError, Limits};
use crate::gateway::{ConnInfo, Gateway};
use crate::identity::ClientIdentity;
use crate::metrics::{FileLabel, Metrics};
use crate::outcome::Rejection;
use crate::revocation::CrlStore;
use crate::service::{ClientConnections, Limiters};
use crate::tls::{
    handshake_failure_kind, server_tls, BundleVerifier, PresentedCert, ServerTls, TrustInventory,
    REFUSED_CERT,
};
use arc_swap::ArcSwap;

/// Everything built from one version of the config. A reload builds a new snapshot and
/// swaps it in: new connections use it, open connections keep the one they started with.
pub struct Snapshot {
    gateway: Arc<Gateway>,
    acceptor: TlsAcceptor,
    verifier: Arc<BundleVerifier>,
    limits: Limits,
    handshake_timeout: Duration,
    http: auto::Builder<TokioExecutor>,
    /// CAs, server certificate and CRLs of this configuration, for expiry reports.
    inventory: Arc<TrustInventory>,
    /// `tls.revocation.warn_before`, in seconds.
    warn_before: i64,
}

impl Snapshot {
    pub fn build(cfg: &Config, metrics: &Arc<Metrics>) -> Result<Self, ConfigError> {
        Self::build_with(cfg, metrics, &Limiters::default())
    }

    /// As [`Snapshot::build`], with rate limiters that outlive this snapshot.
    pub fn build_with(
        cfg: &Config,
        metrics: &Arc<Metrics>,
        limiters: &Limiters,
    ) -> Result<Self, ConfigError> {
        let tls = server_tls(&cfg.tls)?;
        let gateway = Arc::new(Gateway::with_limiters(cfg, metrics.clone(), limiters)?);
        let limits = cfg.limits.clone();
        let mut http = auto::Builder::new(TokioExecutor::new());
        // The HTTP libraries' own limits are twice the configured ones: a request a little
        // over `limits.max_header_bytes` / `max_headers` still reaches the gateway, which
        // refuses it with an OperationOutcome (hyper would answer a bare 431, h2 a 431
        // and a stream reset). Only grossly oversized header sections are refused by the
        // libraries themselves, still with 431.
        let lib_header_bytes = limits.max_header_bytes.saturating_mul(2);
        http.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(lib_header_bytes)
            .max_headers(limits.max_headers.saturating_mul(2))
            .keep_alive(true);
        http.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(lib_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256));
        if let Some(t) = tls.server_not_after {
            metrics.server_cert_not_after.set(t);
        }
        for (file, next) in &tls.crl_next_updates {
            metrics
                .crl_next_update
                .get_or_create(&FileLabel { file: file.clone() })
                .set(*next);
        }
        metrics.set_cert_not_after(
            tls.inventory
                .certs
                .iter()
                .filter(|c| c.bundle != "server")
                .map(|c| (c.bundle.as_str(), c.subject.as_str(), c.not_after)),
        );
        Ok(Snapshot {
            gateway,
            acceptor: TlsAcceptor::from(tls.config),
            verifier: tls.verifier,
            handshake_timeout: cfg.tls.handshake_timeout,
            limits,
            http,
            inventory: Arc::new(tls.inventory),
            warn_before: i64::try_from(cfg.tls.revocation.warn_before.as_secs())
                .unwrap_or(i64::MAX),
        })
    }

    /// Every CA, the server certificate, every CRL and configuration warnings.
    pub fn inventory(&self) -> &TrustInventory {
        &self.inventory
    }

    /// `tls.revocation.warn_before` in seconds.
    pub fn warn_before(&self) -> i64 {
        self.warn_before
    }
}

impl Snapshot {
    /// The same snapshot with a new TLS context (new fetched CRLs): the gateway, with its
    /// token cache, is shared.
    fn with_tls(&self, tls: ServerTls) -> Snapshot {
        Snapshot {
            gateway: self.gateway.clone(),
            acceptor: TlsAcceptor::from(tls.config),
            verifier: tls.verifier,
            limits: self.limits.clone(),
            handshake_timeout: self.handshake_timeout,
            http: self.http.clone(),
            inventory: Arc::new(tls.inventory),
            warn_before: self.warn_before,
        }
    }
}

/// The serving state shared by all listeners.
pub struct Server {
    current: ArcSwap<Snapshot>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    metrics: Arc<Metrics>,
    /// CRLs fetched over HTTP (see [`crate::revocation`]).
    crls: CrlStore,
    /// The configuration of the current snapshot, to rebuild its TLS context when a
    /// fetched CRL changes; the lock also keeps that rebuild and a reload from crossing.
    config: std::sync::Mutex<Arc<Config>>,
    /// Wakes the CRL fetcher after a reload (new URLs are fetched at once).
    crl_wake: tokio::sync::Notify,
    /// Kept across reloads: rate-limit buckets and per-client connection counts.
    limiters: Limiters,
    client_connections: Arc<ClientConnections>,
}

impl Server {
    pub fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, ConfigError> {
        let crls = CrlStore::new(metrics.clone());
        crls.load_cache(&cfg.tls)?;
        let limiters = Limiters::default();
        let snapshot = Snapshot::build_with(&crls.apply(cfg), &metrics, &limiters)?;
        Ok(Arc::new(Server {
            limiters,
            client_connections: Arc::default(),
            current: ArcSwap::from_pointee(snapshot),
            connections: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            max_connections: cfg.limits.max_connections,
            metrics,
            crls,
            config: std::sync::Mutex::new(Arc::new(cfg.clone())),
            crl_wake: tokio::sync::Notify::new(),
        }))
    }

    /// Swaps in a new configuration. Listener addresses and `limits.max_connections` are
    /// fixed at start; everything else (certificates, trust bundles, CRLs, routes,
    /// upstream, limits) takes effect for new connections.
    pub fn reload(&self, cfg: &Config) -> Result<(), ConfigError> {
        let mut held = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let result = self.crls.load_cache(&cfg.tls).and_then(|()| {
            Snapshot::build_with(&self.crls.apply(cfg), &self.metrics, &self.limiters)
        });
        self.metrics.reload(result.is_ok());
        self.current.store(Arc::new(result?));
        *held = Arc::new(cfg.clone());
        drop(held);
        self.crl_wake.notify_one();
        // A changed limits.max_connections (fixed at start) is reported by the caller
        // with the other settings that need a restart.
        Ok(())
    }

    /// Fetches the CRLs that are due (all with `all`) and, if one changed, swaps in a TLS
    /// context built with it. Returns when the next fetch is due.
    pub async fn refresh_crls(&self, all: bool) -> Instant {
        let cfg = self
            .config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (changed, next) = self.crls.round(&cfg.tls, all).await;
        if changed {
            let held = self.config.lock().unwrap_or_else(|p| p.into_inner());
            // Built from the configuration in force now (a reload may have come meanwhile).
            match server_tls(&self.crls.apply(&held).tls) {
                Ok(tls) => {
                    for (source, next) in &tls.crl_next_updates {
                        self.metrics
                            .crl_next_update
                            .get_or_create(&FileLabel {
                                file: source.clone(),
                            })
                            .set(*next);
                    }
                    self.current
                        .store(Arc::new(self.current.load().with_tls(tls)));
                    tracing::info!("fetched CRLs in force for new connections");
                }
                Err(e) => tracing::error!(
                    error = %e,
                    "cannot use the fetched CRLs; previous TLS configuration still serving"
                ),
            }
        }
        next
    }

    /// Refreshes CRLs when due until `shutdown` turns true.
    async fn crl_fetcher(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut next = Instant::now() + Duration::from_secs(3600);
        let mut first = true;
        loop {
            if !first {
                tokio::select! {
                    _ = tokio::time::sleep_until(next.into()) => {}
                    _ = self.crl_wake.notified() => {}
                    _ = self.crls.learned() => {}
                    _ = shutdown.changed() => return,
                }
            }
            first = false;
            next = tokio::select! {
                n = self.refresh_crls(false) => n,
                _ = shutdown.changed() => return,
            };
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stale or soon-stale CRLs and certificates of the current configuration, one line
    /// each (empty when all is current).
    pub fn trust_stale(&self) -> Vec<String> {
        let s = self.current.load();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        s.inventory.stale(now, s.warn_before)
    }

    /// Logs a WARN line per stale item and per configuration warning (at start, after a
    /// reload and periodically).
    pub fn log_trust_warnings(&self) {
        let s = self.current.load();
        for w in &s.inventory.warnings {
            tracing::warn!(target: "fhirgate::tls", warning = %w, "trust configuration");
        }
        for line in self.trust_stale() {
            tracing::warn!(target: "fhirgate::tls", item = %line, "certificate or CRL expiring or stale");
        }
    }

    /// Whether the current configuration can verify tokens: `(ok, detail)`.
    pub fn auth_status(&self) -> (bool, String) {
        self.current.load().gateway.auth_status()
    }

    /// Accepts connections on `listener` until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let permit = tokio::select! {
                p = self.connections.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.changed() => return,
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => return,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    let snapshot = self.current.load_full();
                    let metrics = self.metrics.clone();
                    let shutdown = shutdown.clone();
                    let clients = self.client_connections.clone();
                    tokio::spawn(async move {
                        metrics.open_connections.inc();
                        snapshot
                            .connection(tcp, peer, &metrics, shutdown, &clients)
                            .await;
                        metrics.open_connections.dec();
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Waits until every connection has closed, or `timeout` passes. Returns the number of
    /// connections still open at the end.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        match tokio::time::timeout(timeout, self.connections.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => self.max_connections - self.connections.available_permits(),
        }
    }
}

impl Snapshot {
    async fn connection(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        metrics: &Metrics,
        mut shutdown: watch::Receiver<bool>,
        clients: &Arc<ClientConnections>,
    ) {
        let _ = tcp.set_nodelay(true);
        // The verifier leaves a refused client certificate here (task-local: the
        // handshake runs inside this future), so the refusal line can name it.
        let refused: Arc<std::sync::Mutex<Option<PresentedCert>>> = Arc::default();
        let handshake = REFUSED_CERT.scope(
            refused.clone(),
            tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp)),
        );
        let tls = match handshake.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let kind = handshake_failure_kind(&e);
                metrics.handshake(kind);
                let cert = refused.lock().ok().and_then(|mut c| c.take());
                match cert {
                    Some(c) => tracing::warn!(
                        target: "fhirgate::tls",
                        %peer,
                        kind,
                        error = %e,
                        subject = %c.subject,
                        issuer = %c.issuer,
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
                metrics.handshake("timeout");
                tracing::warn!(target: "fhirgate::tls", %peer, kind = "timeout", "handshake timed out");
                return;
            }
        };
        let identity = {
            let session = tls.get_ref().1;
            let Some((leaf, intermediates)) =
                session.peer_certificates().and_then(|c| c.split_first())
            else {
                // The verifier makes a certificate mandatory; this is defence in depth.
                metrics.handshake("no_cert");
                tracing::warn!(target: "fhirgate::tls", %peer, kind = "no_cert", "no client certificate after handshake");
                return;
            };
            let Some(bundle) = self.verifier.bundle_of(leaf, intermediates) else {
                metrics.handshake("unknown_ca");
                let c = PresentedCert::from_der(leaf).unwrap_or_default();
                tracing::warn!(target: "fhirgate::tls", %peer, kind = "unknown_ca", subject = %c.subject, issuer = %c.issuer, serial = %c.serial, not_after = %c.not_after, "verified chain matches no bundle");
                return;
            };
            match ClientIdentity::from_der(leaf, bundle) {
                Ok(id) => id,
                Err(e) => {
                    metrics.handshake("bad_certificate");
                    tracing::warn!(target: "fhirgate::tls", %peer, kind = "bad_certificate", error = %e, "client certificate unreadable");
                    return;
                }
            }
        };
        metrics.handshake("ok");
        tracing::debug!(target: "fhirgate::tls", %peer, subject = %identity.subject, bundle = %identity.bundle, "handshake ok");
        let max_per_client = self.limits.max_connections_per_client;
        let Some(_slot) = clients.open(&identity.fingerprint_sha256, max_per_client) else {
            metrics.connections_over_client_cap.inc();
            tracing::warn!(target: "fhirgate::tls", %peer, subject = %identity.subject, fingerprint = %identity.fingerprint_sha256, max_per_client, "client over its connection cap: answering 429 and closing");
            self.refuse_over_cap(tls, max_per_client).await;
            return;
        };

        let conn = Arc::new(ConnInfo { identity, peer });
        let activity = Arc::new(Activity::new());
        let io = TokioIo::new(TrackedIo {
            inner: tls,
            activity: activity.clone(),
        });
        let gateway = self.gateway.clone();
        let svc_activity = activity.clone();
        let svc = service_fn(move |req| {
            let gateway = gateway.clone();
            let conn = conn.clone();
            let activity = svc_activity.clone();
            let guard = InFlight::new(activity.clone());
            async move {
                let resp = gateway.handle(req, &conn).await;
                drop(guard);
                // The response body still has to be sent; track it until it is dropped.
                let streaming = Streaming::new(activity);
                Ok::<_, Infallible>(resp.map(|inner| {
                    http_body_util::BodyExt::boxed(Tracked {
                        inner,
                        _streaming: streaming,
                    })
                }))
            }
        });
        let served = self.http.serve_connection(io, svc);
        tokio::pin!(served);
        let idle = self.limits.idle_timeout;
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(50)));
        let mut closing: Option<Instant> = None;
        loop {
            tokio::select! {
                res = served.as_mut() => {
                    if let Err(e) = res {
                        let kind = connection_error_kind(&*e);
                        metrics.connection_error(kind);
                        tracing::debug!(%peer, kind, error = %e, "connection ended with error");
                    }
                    break;
                }
                _ = tick.tick() => {
                    // A request being handled is bounded by the upstream timeouts.
                    if activity.handling() > 0 {
                        continue;
                    }
                    let quiet = activity.streaming() == 0;
                    if closing.is_none() && quiet && activity.requests_idle_for() >= idle {
                        served.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    } else if activity.idle_for() >= idle {
                        // No byte moved for a whole idle period with no request being
                        // handled: a peer that stopped reading, or a stalled stream.
                        tracing::debug!(%peer, "dropping a stalled connection");
                        break;
                    } else if quiet && closing.is_some_and(|t| t.elapsed() >= idle) {
                        // Asked to close an idle period ago and still open (e.g. an
                        // HTTP/2 peer that keeps pinging but never finishes the GOAWAY).
                        tracing::debug!(%peer, "dropping a connection that did not close");
                        break;
                    }
                }
                _ = shutdown.changed(), if closing.is_none() => {
                    served.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                }
            }
        }
    }
}

impl Snapshot {
    /// Answers every request on a connection over the per-client cap with 429
    /// `REC_TOO_MANY_REQUESTS` (`Connection: close` on HTTP/1.1), for at most the
    /// handshake timeout: the sender gets an answer BaRS tells it to retry on, rather
    /// than a reset it might report as a TLS failure.
    async fn refuse_over_cap<T>(&self, tls: T, max: usize)
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
        let served = self.http.serve_connection(TokioIo::new(tls), svc);
        let _ = tokio::time::timeout(self.handshake_timeout, served).await;
    }
}

/// A short, fixed label for why hyper ended a connection with an error.
fn connection_error_kind(e: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(h) = c.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return "headers_too_large";
            }
            if h.is_parse() {
                return "bad_request";
            }
            if h.is_timeout() {
                return "header_timeout";
            }
            if h.is_incomplete_message() {
                return "incomplete";
            }
        }
        if let Some(h) = c.downcast_ref::<h2::Error>() {
            if h.is_remote() {
                return "h2_remote";
            }
            return match h.reason().map(u32::from) {
                Some(0x1) => "h2_protocol_error",
                Some(0x6) => "h2_frame_size_error",
                Some(0x9) => "h2_compression_error",
                Some(0xb) => "h2_enhance_your_calm",
                _ => "h2_error",
            };
        }
        cur = c.source();
    }
    "io"
}

/// Last I/O time, last request start or end, requests being handled and responses
/// being sent on one connection.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    last_request_ms: AtomicU64,
    handling: AtomicUsize,
    streaming: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            last_request_ms: AtomicU64::new(0),
            handling: AtomicUsize::new(0),
            streaming: AtomicUsize::new(0),
        }
    }
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }
    fn touch_request(&self) {
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        self.last_request_ms.store(now, Ordering::Relaxed);
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

pin_project_lite::pin_project! {
    /// A response body carrying its [`Streaming`] guard.
    struct Tracked<B> {
        #[pin]
        inner: B,
        _streaming: Streaming,
    }
}

impl<B: hyper::body::Body> hyper::body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An I/O wrapper that records when bytes last moved.
    struct TrackedIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T: AsyncRead> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// A running gateway: bound listeners and the means to stop them.
pub struct Running {
    pub addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: Arc<Server>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// Stops accepting, asks open connections to finish, and waits for them up to
    /// `drain`. Returns how many connections were still open.
    pub async fn shutdown(self, drain: Duration) -> usize {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.server.drain(drain).await
    }
}

/// Binds every configured listener and starts serving.
pub async fn start(cfg: &Config) -> anyhow::Result<Running> {
    let server = Server::from_config(cfg, Arc::new(Metrics::new()))?;
    // Fetch CRLs before serving (each fetch is bounded by fetch_timeout), so that the
    // first clients are judged on fresh revocation data.
    server.refresh_crls(true).await;
    let (tx, rx) = watch::channel(false);
    let mut addrs = Vec::new();
    let mut tasks = vec![tokio::spawn(server.clone().crl_fetcher(rx.clone()))];
    for (i, l) in cfg.listeners.iter().enumerate() {
        let listener = TcpListener::bind(l.address).await.map_err(|e| {
            anyhow::anyhow!("listeners[{i}].address: cannot bind {}: {e}", l.address)
        })?;
        addrs.push(listener.local_addr()?);
        tasks.push(tokio::spawn(server.clone().serve(listener, rx.clone())));
    }
    Ok(Running {
        addrs,
        shutdown: tx,
        server,
        tasks,
    })
}
