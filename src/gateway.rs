//! Per-request pipeline: route policy → (token, NHSD headers: later stages) → forward.
//!
//! [`Gateway::handle`] never fails: every refusal is a [`Rejection`] turned into an
//! `OperationOutcome` by [`crate::outcome`], and every request produces one access line.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::config::{Config, ConfigError, IdentityHeaders};
use crate::forward;
use crate::identity::ClientIdentity;
use crate::metrics::Metrics;
use crate::outcome::{Body, Rejection};
use crate::policy::RoutePolicy;
use crate::upstream::Upstream;

/// What the listener learnt about a connection; shared by its requests.
#[derive(Debug)]
pub struct ConnInfo {
    pub identity: ClientIdentity,
    pub peer: SocketAddr,
}

pub struct Gateway {
    policy: RoutePolicy,
    upstream: Upstream,
    identity_headers: IdentityHeaders,
    max_body_bytes: u64,
    metrics: Arc<Metrics>,
}

/// Outcome of the pipeline, before logging.
struct Handled {
    response: Response<Body>,
    route: Option<String>,
    rejection: Option<&'static str>,
    upstream_status: Option<u16>,
    upstream_time: Option<Duration>,
}

impl Gateway {
    pub fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        Ok(Gateway {
            policy: RoutePolicy::new(&cfg.routes),
            upstream: Upstream::from_config(&cfg.upstream)?,
            identity_headers: cfg.identity_headers.clone(),
            max_body_bytes: cfg.limits.max_body_bytes,
            metrics,
        })
    }

    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Response<Body> {
        let start = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let request_id = log_safe(req.headers().get("x-request-id"));
        let correlation_id = log_safe(req.headers().get("x-correlation-id"));
        let h = self.process(req, conn).await;
        let status = h.response.status().as_u16();
        let route = h.route.as_deref().unwrap_or("-");
        self.metrics
            .request(route, status, start.elapsed(), h.upstream_time);
        if let Some(kind) = h.rejection {
            self.metrics.rejection(kind);
        }
        tracing::info!(
            target: "fhirgate::access",
            method = %method,
            path = %log_safe_str(&path),
            status,
            latency_ms = start.elapsed().as_secs_f64() * 1000.0,
            client_subject = %conn.identity.subject,
            client_fingerprint = %conn.identity.fingerprint_sha256,
            bundle = %conn.identity.bundle,
            peer = %conn.peer,
            route,
            upstream_status = h.upstream_status.unwrap_or(0),
            upstream_ms = h.upstream_time.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            rejection = h.rejection.unwrap_or("-"),
            request_id = %request_id,
            correlation_id = %correlation_id,
            "request"
        );
        h.response
    }

    async fn process(&self, req: Request<Incoming>, conn: &ConnInfo) -> Handled {
        let mut route_name = None;
        let mut upstream_time = None;
        match self
            .forward(req, conn, &mut route_name, &mut upstream_time)
            .await
        {
            Ok(response) => Handled {
                upstream_status: Some(response.status().as_u16()),
                response,
                route: route_name,
                rejection: None,
                upstream_time,
            },
            Err(r) => Handled {
                rejection: Some(r.reason),
                response: r.into_response(),
                route: route_name,
                upstream_status: None,
                upstream_time,
            },
        }
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        route_name: &mut Option<String>,
        upstream_time: &mut Option<Duration>,
    ) -> Result<Response<Body>, Rejection> {
        if req.method() == Method::CONNECT {
            return Err(Rejection::method_not_allowed("CONNECT is not supported"));
        }
        let route = self.policy.decide(req.uri().path(), &conn.identity)?;
        *route_name = Some(route.name.clone());

        if let Some(len) = content_length(req.headers()) {
            if len > self.max_body_bytes {
                return Err(Rejection::body_too_large(self.max_body_bytes));
            }
        }

        let (mut parts, body) = req.into_parts();
        let original_host = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            });
        let uri = self.upstream.target(parts.uri.path_and_query())?;
        forward::upstream_request_headers(
            &mut parts.headers,
            &self.identity_headers,
            &conn.identity,
            conn.peer,
            original_host.as_deref(),
        );
        parts.uri = uri;
        // The upstream speaks its own protocol version; let the client pick it.
        parts.version = http::Version::HTTP_11;
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let body = Limited::new(body, limit).boxed();
        let upstream_req = Request::from_parts(parts, body);

        let sent = Instant::now();
        let result = self.upstream.send(upstream_req, self.max_body_bytes).await;
        *upstream_time = Some(sent.elapsed());
        let resp = result.map_err(|(rejection, detail)| {
            tracing::warn!(target: "fhirgate::upstream", error = %detail, reason = rejection.reason, "upstream request failed");
            self.metrics.upstream_error(rejection.reason);
            rejection
        })?;
        let (mut parts, body) = resp.into_parts();
        forward::client_response_headers(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A header value as it may appear in a log line: printable ASCII, at most 128 chars.
fn log_safe(v: Option<&http::HeaderValue>) -> String {
    match v.and_then(|v| v.to_str().ok()) {
        Some(s) => log_safe_str(s),
        None => "-".into(),
    }
}

fn log_safe_str(s: &str) -> String {
    s.chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}
