//! Everything built from one version of the config: TLS acceptor and verifier, the
//! request pipeline, HTTP settings and the trust inventory. Building has no effect on
//! the running process; [`Snapshot::publish`] sets the certificate and CRL metrics
//! when the server takes the snapshot into use.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, ConfigError, Limits};
use crate::metrics::{FileLabel, Metrics};
use crate::pipeline::service::Limiters;
use crate::pipeline::Gateway;
use crate::tls::{server_tls, BundleVerifier, ServerTls, TrustInventory};

/// Everything built from one version of the config. A reload builds a new snapshot and
/// swaps it in: new connections use it; open connections keep their TLS session and HTTP
/// settings, and send their next request to its gateway (`connection::Bound`).
pub struct Snapshot {
    pub(super) gateway: Arc<Gateway>,
    /// What `gateway` was built from ([`gateway_key`]).
    gateway_key: [u8; 32],
    pub(super) acceptor: TlsAcceptor,
    pub(super) verifier: Arc<BundleVerifier>,
    pub(super) limits: Limits,
    pub(super) handshake_timeout: Duration,
    /// HTTP/1.1 and HTTP/2 servers, chosen by the TLS handshake's ALPN result (see
    /// `Snapshot::connection`).
    pub(super) http1: http1::Builder,
    pub(super) http2: http2::Builder<TokioExecutor>,
    /// CAs, server certificate and CRLs of this configuration, for expiry reports.
    pub(super) inventory: Arc<TrustInventory>,
    /// `tls.revocation.warn_before`, in seconds.
    pub(super) warn_before: i64,
    /// For [`Snapshot::publish`]: the server certificate's notAfter and each CRL's
    /// nextUpdate, as Unix seconds.
    server_not_after: Option<i64>,
    crl_next_updates: Vec<(String, i64)>,
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
        Self::build_after(cfg, metrics, limiters, None)
    }

    /// As [`Snapshot::build_with`], keeping `previous`'s gateway (its token cache, upstream
    /// connections and discovery state) when nothing it is built from changed: a reload
    /// that only brings new certificates or CRLs does not start the pipeline afresh.
    pub(super) fn build_after(
        cfg: &Config,
        metrics: &Arc<Metrics>,
        limiters: &Limiters,
        previous: Option<&Snapshot>,
    ) -> Result<Self, ConfigError> {
        let tls = server_tls(&cfg.tls)?;
        let gateway_key = gateway_key(cfg);
        let gateway = match previous {
            Some(p) if p.gateway_key == gateway_key => p.gateway.clone(),
            _ => {
                let g = Gateway::with_limiters(cfg, metrics.clone(), limiters)?;
                if let Some(p) = previous {
                    g.inherit_discovery(&p.gateway);
                }
                Arc::new(g)
            }
        };
        let limits = cfg.limits.clone();
        // The HTTP libraries' own limits are twice the configured ones: a request a little
        // over `limits.max_header_bytes` / `max_headers` still reaches the gateway, which
        // refuses it with an OperationOutcome (hyper would answer a bare 431, h2 a 431
        // and a stream reset). Only grossly oversized header sections are refused by the
        // libraries themselves, still with 431.
        let lib_header_bytes = limits.max_header_bytes.saturating_mul(2);
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(lib_header_bytes)
            .max_headers(limits.max_headers.saturating_mul(2))
            // Head and a small body in one buffer, hence one TLS record, rather than a
            // vectored write that rustls would seal as two records.
            .writev(false)
            .keep_alive(true);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(u32::try_from(lib_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(Some(20))
            .max_local_error_reset_streams(Some(256));
        // hyper's own builders, one per protocol, and the protocol from ALPN: hyper-util's
        // `auto` connection sniffs the first bytes (after which hyper's 8 KiB read buffer
        // grows to 16 KiB for the connection's life) and is an enum sized for HTTP/2,
        // which every HTTP/1.1 connection would carry (bench/README.md, memory).
        Ok(Snapshot {
            server_not_after: tls.server_not_after,
            crl_next_updates: tls.crl_next_updates,
            gateway,
            gateway_key,
            acceptor: TlsAcceptor::from(tls.config),
            verifier: tls.verifier,
            handshake_timeout: cfg.tls.handshake_timeout,
            limits,
            http1,
            http2,
            inventory: Arc::new(tls.inventory),
            warn_before: i64::try_from(cfg.tls.revocation.warn_before.as_secs())
                .unwrap_or(i64::MAX),
        })
    }

    /// Sets the certificate and CRL expiry metrics to this snapshot's; called when the
    /// server takes it into use (not by `fhirgate check`, which only builds one).
    pub fn publish(&self, metrics: &Metrics) {
        if let Some(t) = self.server_not_after {
            metrics.server_cert_not_after.set(t);
        }
        for (file, next) in &self.crl_next_updates {
            metrics
                .crl_next_update
                .get_or_create(&FileLabel { file: file.clone() })
                .set(*next);
        }
        metrics.set_cert_not_after(
            self.inventory
                .certs
                .iter()
                .filter(|c| c.bundle != "server")
                .map(|c| (c.bundle.as_str(), c.subject.as_str(), c.not_after)),
        );
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
    pub(super) fn with_tls(&self, tls: ServerTls) -> Snapshot {
        Snapshot {
            gateway: self.gateway.clone(),
            gateway_key: self.gateway_key,
            acceptor: TlsAcceptor::from(tls.config),
            verifier: tls.verifier,
            limits: self.limits.clone(),
            handshake_timeout: self.handshake_timeout,
            http1: self.http1.clone(),
            http2: self.http2.clone(),
            inventory: Arc::new(tls.inventory),
            warn_before: self.warn_before,
            server_not_after: tls.server_not_after,
            crl_next_updates: tls.crl_next_updates,
        }
    }
}

/// A digest of what a [`Gateway`] is built from: every config section but the TLS ones
/// (the verifier in force reaches open connections by itself, `TrustInForce`) and those
/// fixed at start or outside the pipeline, and the contents of the files the gateway
/// reads. Compared within one process only, so the sections' `Debug` text serves.
fn gateway_key(cfg: &Config) -> [u8; 32] {
    // No `..`: a new section has to be placed on one side or the other.
    let Config {
        environment,
        environment_explicit: _,
        listeners: _,
        tls: _,
        limits,
        upstream,
        identity_headers,
        routes,
        admin: _,
        logging,
        auth,
        nhsd,
        reload: _,
        service_levels,
        telemetry,
    } = cfg;
    let mut h = Sha256::new();
    h.update(format!(
        "{environment:?}{limits:?}{upstream:?}{identity_headers:?}{routes:?}{logging:?}\
         {auth:?}{nhsd:?}{service_levels:?}{telemetry:?}"
    ));
    h.update(crate::watch::fingerprint(&crate::watch::gateway_files(cfg)));
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::{config_dir, config_in};

    /// A reload keeps the running pipeline (its token cache, upstream connections) when
    /// only TLS material changed, and builds a new one, which open connections then move
    /// to, when anything the pipeline is built from changed.
    #[test]
    fn the_gateway_is_rebuilt_only_when_what_it_is_built_from_changed() {
        let dir = config_dir();
        let d = dir.path();
        let key = |edit: &dyn Fn(String) -> String| gateway_key(&config_in(d, "", edit));
        let base = key(&|y| y);
        assert_eq!(base, key(&|y| y), "same config, same key");

        // TLS material: a new CRL, another CRL file, a new CA file content.
        std::fs::write(d.join("ca.crl"), "new CRL").unwrap();
        std::fs::write(d.join("ca.crt"), "new CA").unwrap();
        assert_eq!(base, key(&|y| y));
        assert_eq!(
            base,
            key(&|y| y.replace(
                "crl_files: [ca.crl]",
                "crl_files: [ca.crl, certs/dev/ca.crt]"
            ))
        );

        // What the pipeline is built from.
        let allow = |y: String| y + "    allow_subjects: ['CN=someone else']\n";
        assert_ne!(base, key(&allow), "a route's allow-list");
        let up = |y: String| y.replace("127.0.0.1:9'", "127.0.0.1:10'");
        assert_ne!(base, key(&up), "the upstream");
        let limits = |y: String| y + "limits: {max_body_bytes: 1000}\n";
        assert_ne!(base, key(&limits), "a limit");
        std::fs::write(d.join("secret"), "rotated").unwrap();
        assert_ne!(base, key(&|y| y), "the gateway's client secret, rotated");
    }
}
