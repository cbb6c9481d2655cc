//! Admin listener: plain HTTP for probes and scraping, meant for loopback or a pod-local
//! port. `/healthz` says the process is alive, `/readyz` whether it should get traffic,
//! `/metrics` is Prometheus text 0.0.4 by default and OpenMetrics 1.0 when the client
//! asks for it (`Accept: application/openmetrics-text`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// A named readiness check: `(ok, detail)`.
pub type Check = Box<dyn Fn() -> (bool, String) + Send + Sync>;

/// What `/readyz` reports.
#[derive(Default)]
pub struct Readiness {
    /// Listeners bound and the first TLS configuration loaded.
    pub serving: AtomicBool,
    /// Set when shutdown begins, so load balancers stop sending traffic during the drain.
    pub draining: AtomicBool,
    checks: std::sync::Mutex<Vec<(&'static str, Check)>>,
}

impl Readiness {
    /// Adds a check evaluated on every `/readyz`.
    pub fn add_check(&self, name: &'static str, check: Check) {
        if let Ok(mut c) = self.checks.lock() {
            c.push((name, check));
        }
    }

    /// `(ready, explanation)`; the explanation lists each check and its state.
    pub fn report(&self) -> (bool, String) {
        let serving = self.serving.load(Ordering::Relaxed);
        let draining = self.draining.load(Ordering::Relaxed);
        let mut ready = serving && !draining;
        let mut text = format!(
            "listeners_bound_and_tls_loaded: {}\ndraining: {}\n",
            if serving { "ok" } else { "no" },
            if draining { "yes" } else { "no" },
        );
        if let Ok(checks) = self.checks.lock() {
            for (name, check) in checks.iter() {
                let (ok, detail) = check();
                ready &= ok;
                text.push_str(&format!(
                    "{name}: {} ({detail})\n",
                    if ok { "ok" } else { "no" }
                ));
            }
        }
        (ready, text)
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Content negotiation for `/metrics` (RFC 9110 §12.5.1): OpenMetrics when the client
/// accepts `application/openmetrics-text` with a quality at least that of `text/plain`
/// (Prometheus itself sends OpenMetrics at q=0.5 before text at q=0.3); classic
/// Prometheus text otherwise, including with no `Accept` or only `*/*`.
pub fn wants_openmetrics(accept: &str) -> bool {
    let mut om: f32 = 0.0;
    let mut plain: f32 = 0.0;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut q: f32 = 1.0;
        for p in parts {
            if let Some((k, v)) = p.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
        }
        if !(0.0..=1.0).contains(&q) {
            continue;
        }
        match media.as_str() {
            "application/openmetrics-text" => om = om.max(q),
            "text/plain" | "text/*" => plain = plain.max(q),
            _ => {}
        }
    }
    om > 0.0 && om >= plain
}

fn route(req: &Request<Incoming>, ready: &Readiness, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only\n".into(),
            "text/plain",
        );
        // RFC 9110 §15.5.6: a 405 MUST carry Allow.
        r.headers_mut().insert(
            http::header::ALLOW,
            http::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            let (ok, body) = ready.report();
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, body, "text/plain")
        }
        "/metrics" => {
            let accept = req
                .headers()
                .get_all(http::header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",");
            if wants_openmetrics(&accept) {
                text(StatusCode::OK, metrics.encode(), OPENMETRICS)
            } else {
                text(StatusCode::OK, metrics.encode_prometheus(), PROMETHEUS_TEXT)
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// Binds the admin listener and serves it until `shutdown` turns true.
pub async fn start(
    addr: SocketAddr,
    ready: Arc<Readiness>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    // Name the address: "Address already in use" alone does not say which port.
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("admin.address: cannot bind {addr}: {e}"))
    })?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        tracing::warn!(address = %local, "admin listener is not on loopback: restrict it with a firewall");
    }
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.changed() => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    super::accept_failed("admin accept failed", &e).await;
                    continue;
                }
            };
            let ready = ready.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = route(&req, &ready, &metrics);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::wants_openmetrics;

    #[test]
    fn metrics_format_follows_accept() {
        // Prometheus 2.x/3.x scrape header.
        assert!(wants_openmetrics("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(wants_openmetrics(
            "Application/OpenMetrics-Text; version=1.0.0"
        ));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("text/plain"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
        assert!(!wants_openmetrics(
            "text/plain, application/openmetrics-text;q=0.5"
        ));
        assert!(!wants_openmetrics("application/openmetrics-text;q=bogus"));
    }
}
