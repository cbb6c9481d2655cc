//! Per-request pipeline: route policy → bearer token → NHSD headers → forward.
//!
//! The route is matched first because it decides which later checks apply; a client
//! whose certificate may not use the route is refused before it can cost an
//! introspection call.
//!
//! [`Gateway::handle`] never fails: every refusal is a [`Rejection`] turned into an
//! `OperationOutcome` by [`crate::outcome`], and every request produces one access line.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use crate::auth::{self, scope, Authoriser};
use crate::config::{Config, ConfigError, IdentityHeaders, NhsdConfig, TokenRequirement};
use crate::forward;
use crate::identity::ClientIdentity;
use crate::metrics::{HeaderLabel, Metrics};
use crate::nhsd;
use crate::outcome::{Body, Rejection};
use crate::policy::{prefix_covers, Route, RoutePolicy};
use crate::service::{self, Levels, LimitKey, Limiters, ServiceLevels, Unmatched};
use crate::tracecontext::TraceContext;
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
    nhsd: Option<NhsdConfig>,
    auth: Authoriser,
    max_body_bytes: u64,
    max_headers: usize,
    metrics: Arc<Metrics>,
    levels: ServiceLevels,
    #[cfg(feature = "otlp")]
    otlp: Option<crate::otlp::Exporter>,
}

/// What the pipeline learnt about one request, for the access line and metrics.
#[derive(Default)]
struct Trace {
    route: Option<String>,
    rejection: Option<&'static str>,
    upstream_status: Option<u16>,
    upstream_time: Option<Duration>,
    ods_code: Option<String>,
    client_id: Option<String>,
    token_hash: Option<String>,
    /// W3C trace context: continued from the client's `traceparent` or new.
    context: Option<TraceContext>,
}

/// Transaction-id headers echoed on every response, refusals included (BaRS).
const ECHOED: [&str; 2] = ["x-request-id", "x-correlation-id"];

impl Gateway {
    pub fn from_config(cfg: &Config, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        Self::with_limiters(cfg, metrics, &Limiters::default())
    }

    /// As [`Gateway::from_config`], taking rate limiters from `limiters`, which outlives
    /// reloads, so unchanged limits keep their buckets.
    pub fn with_limiters(
        cfg: &Config,
        metrics: Arc<Metrics>,
        limiters: &Limiters,
    ) -> Result<Self, ConfigError> {
        Ok(Gateway {
            levels: ServiceLevels::new(&cfg.service_levels, &cfg.routes, limiters),
            #[cfg(feature = "otlp")]
            otlp: match &cfg.telemetry.otlp_endpoint {
                // `fhirgate check` builds a gateway outside a runtime and serves nothing.
                Some(url) if tokio::runtime::Handle::try_current().is_ok() => {
                    Some(crate::otlp::Exporter::new(&cfg.telemetry, url)?)
                }
                _ => None,
            },
            policy: RoutePolicy::new(&cfg.routes),
            upstream: Upstream::from_config(&cfg.upstream)?,
            identity_headers: cfg.identity_headers.clone(),
            nhsd: cfg.nhsd.clone(),
            auth: {
                let a = Authoriser::new(&cfg.auth, metrics.clone())?;
                if a.is_development() {
                    tracing::warn!(target: "fhirgate::auth", "auth.mode is development: NO BEARER TOKEN CHECKS. Never use this outside development.");
                }
                a
            },
            max_body_bytes: cfg.limits.max_body_bytes,
            max_headers: cfg.limits.max_headers,
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
        let path = log_safe_str(req.uri().path());
        let echoed: Vec<(&str, HeaderValue)> = ECHOED
            .iter()
            .filter_map(|n| echoable(req.headers(), n).map(|v| (*n, v)))
            .collect();
        let mut trace = Trace {
            context: Some(TraceContext::from_headers(req.headers())),
            ..Trace::default()
        };
        let mut response = match self.forward_in_budget(req, conn, &mut trace, start).await {
            Ok(r) => {
                trace.upstream_status = Some(r.status().as_u16());
                r
            }
            Err(r) => {
                trace.rejection = Some(r.reason);
                r.into_response()
            }
        };
        for (name, value) in &echoed {
            response.headers_mut().insert(*name, value.clone());
        }

        let status = response.status().as_u16();
        let route = trace.route.as_deref().unwrap_or("-");
        self.metrics
            .request(route, status, start.elapsed(), trace.upstream_time);
        if let Some(kind) = trace.rejection {
            self.metrics.rejection(kind);
        }
        let id = |n: &str| {
            echoed
                .iter()
                .find(|(k, _)| *k == n)
                .and_then(|(_, v)| v.to_str().ok())
                .unwrap_or("-")
        };
        tracing::info!(
            target: "fhirgate::access",
            method = %method,
            path = %path,
            status,
            latency_ms = start.elapsed().as_secs_f64() * 1000.0,
            client_subject = %conn.identity.subject,
            client_fingerprint = %conn.identity.fingerprint_sha256,
            bundle = %conn.identity.bundle,
            peer = %conn.peer,
            route,
            ods_code = trace.ods_code.as_deref().unwrap_or("-"),
            client_id = trace.client_id.as_deref().unwrap_or("-"),
            token_hash = trace.token_hash.as_deref().unwrap_or("-"),
            auth = if self.auth.is_development() { "DEVELOPMENT-NO-TOKEN-CHECK" } else { "checked" },
            upstream_status = trace.upstream_status.unwrap_or(0),
            upstream_ms = trace.upstream_time.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            rejection = trace.rejection.unwrap_or("-"),
            request_id = id("x-request-id"),
            correlation_id = id("x-correlation-id"),
            trace_id = trace.context.as_ref().map_or_else(String::new, TraceContext::trace_id_hex),
            span_id = trace.context.as_ref().map_or_else(String::new, TraceContext::span_id_hex),
            "request"
        );
        #[cfg(feature = "otlp")]
        if let (Some(x), Some(tc)) = (&self.otlp, &trace.context) {
            let end = std::time::SystemTime::now();
            x.record(
                tc,
                &crate::otlp::RequestSpan {
                    method: method.as_str(),
                    path: &path,
                    route,
                    status,
                    rejection: trace.rejection,
                    start: end - start.elapsed(),
                    end,
                },
            );
        }
        response
    }

    /// [`Gateway::forward`] under the route's total time budget, if it has one: the
    /// budget runs from `start` (the request's arrival) to the response headers, token
    /// check and upstream included, and its expiry abandons whatever is in progress.
    async fn forward_in_budget(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        trace: &mut Trace,
        start: Instant,
    ) -> Result<Response<Body>, Rejection> {
        let route = self
            .policy
            .covering(req.uri().path())
            .map(|r| r.name.as_str());
        let Some(budget) = self.levels.of(route).budget.clone() else {
            return self.forward(req, conn, trace).await;
        };
        let deadline = tokio::time::Instant::from_std(start + budget.limit);
        match tokio::time::timeout_at(deadline, self.forward(req, conn, trace)).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!(target: "fhirgate::upstream", budget_ms = budget.limit.as_millis() as u64, "request not answered within its time budget");
                Err(budget.rejection())
            }
        }
    }

    /// Takes one request from the route's rate limit at `stage`: limits keyed by the
    /// certificate are checked before the token (so a flood costs no introspection),
    /// limits keyed by `client_id` after it.
    fn rate_limit(
        &self,
        levels: &Levels,
        route: &str,
        conn: &ConnInfo,
        client_id: Option<&str>,
        stage: LimitKey,
    ) -> Result<(), Rejection> {
        let Some(limiter) = &levels.limiter else {
            return Ok(());
        };
        if limiter.key != stage {
            return Ok(());
        }
        let key = match (limiter.key, client_id) {
            (LimitKey::ClientId, Some(c)) => format!("client_id:{c}"),
            _ => format!("cert:{}", conn.identity.fingerprint_sha256),
        };
        limiter.check(&key).map_err(|wait| {
            self.metrics
                .rate_limited
                .get_or_create(&crate::metrics::RouteLabel {
                    route: route.to_owned(),
                })
                .inc();
            Rejection::too_many_requests(service::retry_after_secs(wait))
        })
    }

    /// Whether tokens can be verified: `(ok, detail)`, for `/readyz` and start-up.
    pub fn auth_status(&self) -> (bool, String) {
        if self.auth.is_development() {
            (true, "development mode: NO token checks".into())
        } else if self.auth.endpoint_known() {
            (true, "introspection endpoint known".into())
        } else {
            (
                false,
                "introspection endpoint not discovered yet; unknown tokens get 503".into(),
            )
        }
    }

    /// NHSD stage: the route's policy (or the default) unless the path is exempt.
    fn check_nhsd(
        &self,
        route: &Route,
        req: &Request<Incoming>,
    ) -> Result<Option<nhsd::NhsdFacts>, Rejection> {
        let Some(cfg) = &self.nhsd else {
            return Ok(None);
        };
        let path = req.uri().path();
        if cfg.exempt_paths.iter().any(|p| prefix_covers(p, path)) {
            return Ok(None);
        }
        let policy = route.nhsd.as_ref().unwrap_or(&cfg.headers);
        nhsd::check(req.headers(), policy).map(Some).map_err(|e| {
            self.metrics
                .nhsd_rejections
                .get_or_create(&HeaderLabel {
                    header: e.header().to_owned(),
                })
                .inc();
            Rejection::from(&e)
        })
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        trace: &mut Trace,
    ) -> Result<Response<Body>, Rejection> {
        if req.method() == Method::CONNECT {
            return Err(Rejection::method_not_allowed("CONNECT is not supported"));
        }
        check_host(&req)?;
        // HTTP/1.1 enforces this while parsing; HTTP/2 only bounds the header bytes.
        if req.headers().len() > self.max_headers {
            return Err(Rejection::too_many_headers(self.max_headers));
        }
        let route = self
            .policy
            .decide(req.uri().path(), &conn.identity)
            .map_err(|r| match self.levels.unmatched {
                Unmatched::NotImplemented if r.reason == "no_route" => Rejection::not_implemented(),
                _ => r,
            })?;
        trace.route = Some(route.name.clone());
        let levels = self.levels.of(Some(&route.name));
        self.rate_limit(levels, &route.name, conn, None, LimitKey::Fingerprint)?;
        let token = match route.token {
            TokenRequirement::None => None,
            TokenRequirement::Required => {
                let need = scope::classify(req.method(), req.uri().path());
                let facts = self
                    .auth
                    .authorise(
                        req.headers(),
                        &need,
                        &route.required_scopes,
                        &conn.identity.fingerprint_sha256,
                    )
                    .await
                    .map_err(|e| e.rejection(self.auth.config()))?;
                trace.client_id = facts.client_id.clone();
                trace.token_hash = Some(facts.token_hash.clone()).filter(|h| !h.is_empty());
                Some(facts)
            }
        };
        let client_id = token.as_ref().and_then(|t| t.client_id.as_deref());
        self.rate_limit(levels, &route.name, conn, client_id, LimitKey::ClientId)?;
        let facts = self.check_nhsd(route, &req)?;
        trace.ods_code = facts.as_ref().and_then(|f| f.ods_code.clone());
        service::check_accept(req.headers(), &levels.accept_versions)?;

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
        if let Some(tc) = &trace.context {
            tc.set_upstream(&mut parts.headers);
        }
        if let Some(t) = &token {
            for (name, value) in auth::upstream_headers(t) {
                parts.headers.insert(name, forward::header_value(value));
            }
        }
        if let (Some(f), Some(cfg)) = (&facts, &self.nhsd) {
            if cfg.forward_facts {
                for (name, value) in nhsd::upstream_fact_headers(f) {
                    parts.headers.insert(name, forward::header_value(value));
                }
            }
        }
        parts.uri = uri;
        // The upstream connection has its own protocol version.
        parts.version = http::Version::HTTP_11;
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let (body, body_done) = Watched::new(body);
        let body = Limited::new(body, limit).boxed();
        let upstream_req = Request::from_parts(parts, body);

        let sent = Instant::now();
        let result = self.upstream.send(upstream_req, self.max_body_bytes).await;
        trace.upstream_time = Some(sent.elapsed());
        let resp = result.map_err(|(rejection, detail)| {
            if rejection.reason == "upstream_timeout" && !body_done.load(Ordering::Relaxed) {
                // The client, not the upstream, was too slow: its body never finished.
                return Rejection::body_timeout();
            }
            tracing::warn!(target: "fhirgate::upstream", error = %detail, reason = rejection.reason, "upstream request failed");
            self.metrics.upstream_error(rejection.reason);
            rejection
        })?;
        let (mut parts, body) = resp.into_parts();
        forward::client_response_headers(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

pin_project_lite::pin_project! {
    /// The client's request body, noting when it has been read to the end, so that a
    /// timeout can be blamed on the right side.
    struct Watched<B> {
        #[pin]
        inner: B,
        done: Arc<AtomicBool>,
    }
}

impl<B: http_body::Body> Watched<B> {
    fn new(inner: B) -> (Self, Arc<AtomicBool>) {
        let done = Arc::new(AtomicBool::new(inner.is_end_stream()));
        (
            Watched {
                inner,
                done: done.clone(),
            },
            done,
        )
    }
}

impl<B: http_body::Body> http_body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        let r = this.inner.as_mut().poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || this.inner.is_end_stream() {
            this.done.store(true, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// RFC 9112 §3.2: a request with more than one `Host`, or an HTTP/1.1 request with none,
/// is refused with 400; so is a `Host` that is not a plain `host[:port]`, since it goes
/// upstream as `X-Forwarded-Host`.
fn check_host(req: &Request<Incoming>) -> Result<(), Rejection> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(Rejection::bad_host("More than one Host header"));
    }
    match first {
        Some(h) => {
            let valid = !h.as_bytes().contains(&b'@')
                && http::uri::Authority::try_from(h.as_bytes()).is_ok();
            if !valid {
                return Err(Rejection::bad_host(
                    "The Host header is not a valid host[:port]",
                ));
            }
        }
        None if req.version() == http::Version::HTTP_11 && req.uri().authority().is_none() => {
            return Err(Rejection::bad_host(
                "An HTTP/1.1 request needs a Host header",
            ));
        }
        None => {}
    }
    Ok(())
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A transaction id worth echoing: one value, printable ASCII, at most 128 bytes. Anything
/// else is not reflected back (the NHSD stage reports it as invalid).
fn echoable(h: &HeaderMap, name: &str) -> Option<HeaderValue> {
    let mut all = h.get_all(name).iter();
    let v = all.next()?;
    if all.next().is_some() || v.len() > 128 || !v.as_bytes().iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(v.clone())
}

/// Text as it may appear in a log line: printable ASCII, at most 128 chars.
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
