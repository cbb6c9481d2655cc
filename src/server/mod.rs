//! Accept loop, TLS handshake and HTTP connection serving.
//!
//! Handshakes run in their own task under a timeout, so a stalled client never blocks
//! the accept loop. A semaphore caps open connections: when it is exhausted the gateway
//! stops accepting and lets the kernel backlog absorb the burst.
//!
//! [`snapshot`] builds everything one config version needs; [`connection`] serves one
//! connection (handshake, identity, HTTP, idle policy); [`lifecycle`] runs the process
//! (signals, sd_notify, reload, readiness); [`admin`] is the health and metrics listener.

pub mod admin;
mod connection;
pub mod lifecycle;
mod shards;
mod snapshot;

pub use connection::ConnectionKind;
use connection::InForce;
pub use shards::Shards;
pub use snapshot::Snapshot;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::config::{Config, ConfigError};
use crate::metrics::{FileLabel, Metrics};
use crate::pipeline::identity::TrustInForce;
use crate::pipeline::service::{ClientConnections, Limiters};
use crate::revocation::CrlStore;
use crate::tls::server_tls;
use arc_swap::ArcSwap;

/// The serving state shared by all listeners.
pub struct Server {
    /// The snapshot in force; open connections send their next request to its gateway.
    current: Arc<ArcSwap<Snapshot>>,
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
    /// The verifier of the current snapshot, for the connections opened under older ones.
    trust: Arc<TrustInForce>,
}

impl Server {
    pub fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> Result<Arc<Self>, ConfigError> {
        let crls = CrlStore::new(metrics.clone());
        crls.load_cache(&cfg.tls)?;
        let limiters = Limiters::default();
        let snapshot = Snapshot::build_with(&crls.apply(cfg), &metrics, &limiters)?;
        snapshot.publish(&metrics);
        Ok(Arc::new(Server {
            trust: Arc::new(TrustInForce::new(snapshot.verifier.clone())),
            limiters,
            client_connections: Arc::default(),
            current: Arc::new(ArcSwap::from_pointee(snapshot)),
            connections: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            max_connections: cfg.limits.max_connections,
            metrics,
            crls,
            config: std::sync::Mutex::new(Arc::new(cfg.clone())),
            crl_wake: tokio::sync::Notify::new(),
        }))
    }

    /// Swaps in a new configuration. Listener addresses and `limits.max_connections` are
    /// fixed at start. Certificates, trust bundles and CRLs take effect for new
    /// handshakes and, at their next request, for open connections (`TrustInForce`);
    /// routes, allow-lists, token and NHSD checks, identity headers and the upstream at
    /// every connection's next request; HTTP limits and timeouts for new connections.
    pub fn reload(&self, cfg: &Config) -> Result<(), ConfigError> {
        let mut held = self.config.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.current.load_full();
        let result = self.crls.load_cache(&cfg.tls).and_then(|()| {
            let cfg = self.crls.apply(cfg);
            Snapshot::build_after(&cfg, &self.metrics, &self.limiters, Some(&previous))
        });
        if let Ok(s) = &result {
            s.publish(&self.metrics);
        }
        self.metrics.reload(result.is_ok());
        let snapshot = Arc::new(result?);
        self.current.store(snapshot.clone());
        self.trust.publish(snapshot.verifier.clone());
        if !Arc::ptr_eq(&previous.gateway, &snapshot.gateway) {
            tracing::info!(
                "request pipeline rebuilt: open connections use it from their next request"
            );
        }
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
                    let verifier = tls.verifier.clone();
                    self.current
                        .store(Arc::new(self.current.load().with_tls(tls)));
                    self.trust.publish(verifier);
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

    /// Accepts connections on `listener` until `shutdown` turns true, and serves each on
    /// one of `shards` if given, else on this runtime.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
        shards: Option<Arc<Shards>>,
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
                    // The generation first: a swap in between makes the connection check
                    // its certificate again at its first request, never skip a check.
                    let in_force = InForce {
                        trust: self.trust.clone(),
                        generation: self.trust.generation(),
                        snapshot: self.current.clone(),
                    };
                    let snapshot = self.current.load_full();
                    let metrics = self.metrics.clone();
                    let shutdown = shutdown.clone();
                    let clients = self.client_connections.clone();
                    let serve = move |tcp| async move {
                        metrics.open_connections.inc();
                        snapshot
                            .connection(tcp, peer, &metrics, shutdown, &clients, in_force)
                            .await;
                        metrics.open_connections.dec();
                        drop(permit);
                    };
                    match &shards {
                        // On failure the connection and its permit are dropped.
                        Some(shards) => {
                            if let Err(e) = shards.spawn(tcp, serve) {
                                tracing::warn!(error = %e, "cannot hand a connection to a runtime");
                            }
                        }
                        None => {
                            tokio::spawn(serve(tcp));
                        }
                    }
                }
                Err(e) => accept_failed("accept failed", &e).await,
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

/// A running gateway: bound listeners and the means to stop them.
pub struct Running {
    pub addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    server: Arc<Server>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shards: Option<Arc<Shards>>,
}

impl Running {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The runtimes serving connections, if not this one.
    pub fn shards(&self) -> Option<&Arc<Shards>> {
        self.shards.as_ref()
    }

    /// Stops accepting, asks open connections to finish, and waits for them up to
    /// `drain`. Returns how many connections were still open.
    pub async fn shutdown(self, drain: Duration) -> usize {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + drain;
        for t in self.tasks {
            // Accept loops and the CRL fetcher stop at the signal; one that has not by the
            // end of the drain period is aborted rather than holding up the exit.
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                tracing::warn!("a server task did not stop at shutdown; aborted");
                abort.abort();
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.server.drain(left).await
    }
}

/// Binds every configured listener and starts serving on this runtime.
pub async fn start(cfg: &Config) -> anyhow::Result<Running> {
    start_on(cfg, None).await
}

/// Binds every configured listener and starts serving: accept loops and the CRL fetcher
/// on this runtime, connections on `shards` if given (one runtime per CPU), else here.
pub async fn start_on(cfg: &Config, shards: Option<Arc<Shards>>) -> anyhow::Result<Running> {
    let mut metrics = Metrics::new();
    if let Some(s) = &shards {
        metrics.count_runtimes(s.counters());
    }
    let server = Server::from_config(cfg, Arc::new(metrics))?;
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
        let serve = server.clone().serve(listener, rx.clone(), shards.clone());
        tasks.push(tokio::spawn(serve));
    }
    Ok(Running {
        addrs,
        shutdown: tx,
        server,
        tasks,
        shards,
    })
}

/// An `accept` that failed: EMFILE and friends fail at once while a client waits in the
/// backlog, so each listener logs `what` and backs off instead of spinning a core.
async fn accept_failed(what: &str, e: &std::io::Error) {
    tracing::warn!(error = %e, "{what}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
