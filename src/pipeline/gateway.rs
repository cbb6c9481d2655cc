//! The [`Gateway`] the stages run in: its state built from one config version, the
//! steps of each stage that [`Gateway::run`] (in [`crate::pipeline`]) calls in order,
//! and [`Gateway::handle`], which wraps them with the time budget, echoed ids, the
//! access line and metrics.
//!
//! [`Gateway::handle`] never fails: every refusal is a [`Rejection`] turned into an
//! `OperationOutcome` by [`crate::pipeline::outcome`], and every request produces one access line.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Limited};

use crate::config::{Config, ConfigError, NhsdConfig};
use crate::metrics::{HeaderLabel, Metrics};
use crate::pipeline::auth::{self, scope, Authoriser};
use crate::pipeline::forward;
use crate::pipeline::forward::{ConnectionHeaders, IdentityNames};
use crate::pipeline::identity::{ClientChain, ClientIdentity};
use crate::pipeline::nhsd;
use crate::pipeline::outcome::{Body, Refuse, Rejection};
use crate::pipeline::policy::{prefix_covers, PolicyError, Route, RoutePolicy, TokenRequirement};
use crate::pipeline::service::{self, Levels, LimitKey, Limiters, ServiceLevels, Unmatched};
use crate::pipeline::tracecontext::{Hex, TraceContext};
use crate::pipeline::upstream::{PinnedSlot, Upstream, UpstreamBody, UpstreamError};

/// What the listener learnt about a connection; shared by its requests.
#[derive(Debug)]
pub struct ConnInfo {
    pub identity: ClientIdentity,
    pub peer: SocketAddr,
    /// The identity and forwarding headers every request on the connection carries
    /// upstream ([`Gateway::connection_headers`]).
    pub headers: ConnectionHeaders,
    /// The connection's place for upstream connections of its own
    /// ([`Gateway::pinned_slot`]); `None` with pinning off.
    pub upstream: Option<Arc<PinnedSlot>>,
    /// The certificate chain the handshake verified, checked again per request (shared
    /// with the connection's next binding after a reload).
    pub chain: Arc<ClientChain>,
}

impl ConnInfo {
    /// Stage 3 again, per request: the connection's certificate has not expired and the
    /// trust in force still accepts it (logged the first time it does not).
    pub fn certificate_still_valid(&self) -> Result<(), Rejection> {
        self.chain.check().map_err(|(lapsed, first)| {
            if first {
                tracing::warn!(target: "fhirgate::tls", peer = %self.peer, subject = %crate::logging::Escaped(&self.identity.subject), serial = %self.identity.serial, kind = %lapsed.0, "client certificate no longer valid on an open connection: its requests are refused");
            }
            lapsed.into()
        })
    }
}

pub struct Gateway {
    policy: RoutePolicy,
    upstream: Upstream,
    identity_names: IdentityNames,
    nhsd: Option<NhsdConfig>,
    auth: Authoriser,
    max_body_bytes: u64,
    max_headers: usize,
    max_header_bytes: usize,
    /// Longest wait for a form-encoded body the gateway reads (`upstream.response_timeout`).
    body_read_timeout: Duration,
    metrics: Arc<Metrics>,
    /// `logging.redact_paths`: ids replaced in access-line paths.
    redact_paths: bool,
    pub(super) levels: ServiceLevels,
    #[cfg(feature = "otlp")]
    otlp: Option<crate::otlp::Exporter>,
}

/// What the pipeline learnt about one request, for the access line and metrics.
#[derive(Default)]
pub(super) struct Trace<'g> {
    /// The matched route (its name labels metrics and the access line).
    pub(super) route: Option<&'g Route>,
    pub(super) rejection: Option<&'static str>,
    pub(super) upstream_status: Option<u16>,
    pub(super) upstream_time: Option<Duration>,
    pub(super) ods_code: Option<String>,
    /// The verified token's facts, shared with its cache entry.
    pub(super) token: Option<Arc<auth::TokenFacts>>,
    /// W3C trace context: continued from the client's `traceparent` or new.
    pub(super) context: Option<TraceContext>,
}

/// Transaction-id headers echoed on every response, refusals included (BaRS).
const ECHOED: [HeaderName; 2] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-correlation-id"),
];

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
            upstream: Upstream::from_config(
                &cfg.upstream,
                metrics.pinned_upstream_connections.clone(),
            )?,
            identity_names: cfg.identity_headers.parsed(),
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
            max_header_bytes: cfg.limits.max_header_bytes,
            body_read_timeout: cfg.upstream.response_timeout,
            metrics,
            redact_paths: cfg.redact_paths(),
        })
    }

    /// The headers that carry a connection's verified client upstream, built once when
    /// the connection is accepted.
    pub fn connection_headers(
        &self,
        identity: &ClientIdentity,
        peer: SocketAddr,
    ) -> ConnectionHeaders {
        ConnectionHeaders::new(&self.identity_names, identity, peer)
    }

    /// A new client connection's slot for upstream connections of its own
    /// ([`Upstream::pinned_slot`]).
    pub fn pinned_slot(&self, h2: bool) -> Option<Arc<PinnedSlot>> {
        self.upstream.pinned_slot(h2)
    }

    /// One request, start to finish. Its body comes boxed (by the connection, which
    /// tracks whether it was read to its end), so that a body the gateway had to read (a
    /// form-encoded one, for an RFC 6750 §2.2 token) continues down the same path as a
    /// streamed one.
    pub async fn handle(self: &Arc<Self>, req: Request<Body>, conn: &ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let mut req = req;
        // Without BaRS checks nothing requires an X-Request-ID, so one is made up when
        // absent: sent upstream, echoed and logged, so one request can be followed
        // through every log. (With an `nhsd` section a missing id stays a 400.)
        if self.nhsd.is_none() && !req.headers().contains_key(&ECHOED[0]) {
            let id = uuid::Uuid::new_v4().to_string();
            if let Ok(v) = HeaderValue::from_str(&id) {
                req.headers_mut().insert(ECHOED[0].clone(), v);
            }
        }
        let method = req.method().clone();
        let version = req.version();
        // A shared reference to the request line's bytes, not a copy.
        let uri = req.uri().clone();
        let raw_path = uri.path();
        let echoed = ECHOED
            .each_ref()
            .map(|n| echoable(req.headers(), n, self.nhsd.is_some()));
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
        for (name, value) in ECHOED.iter().zip(&echoed) {
            if let Some(v) = value {
                response.headers_mut().insert(name.clone(), v.clone());
            }
        }
        if version >= http::Version::HTTP_2 {
            // HPACK keeps what it indexes for the connection's life: values that are
            // slices of the buffers their messages were read into would keep those alive.
            forward::detach_values(response.headers_mut());
        }
        // An oversized HTTP/1.1 header section ends the connection, as the parser's own
        // refusal would: what follows on it is not worth reading. So does a missing,
        // repeated or malformed Host (RFC 9112 §3.2), the mark of a request smuggled or
        // built to poison a cache; nginx closes after its own 400s the same way.
        if version < http::Version::HTTP_2
            && matches!(
                trace.rejection,
                Some("headers_too_large" | "too_many_headers" | "bad_host" | "certificate_lapsed")
            )
        {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }

        let status = response.status().as_u16();
        let route = trace.route.map_or("-", |r| &*r.name);
        let path = if self.redact_paths {
            // The route's prefix is operator config: logged verbatim.
            let redacted = redact_path(raw_path, trace.route.map(|r| r.path_prefix.as_str()));
            std::borrow::Cow::Owned(log_safe_str(&redacted).into_owned())
        } else {
            log_safe_str(raw_path)
        };
        // One clock read for the metric and the access line, so they agree.
        let latency = start.elapsed();
        match trace.route {
            Some(r) => {
                self.metrics
                    .request_on(&r.name, &r.metrics, status, latency, trace.upstream_time)
            }
            None => self
                .metrics
                .request(None, status, latency, trace.upstream_time),
        }
        if let Some(kind) = trace.rejection {
            self.metrics.rejection(kind);
        }
        let id = |i: usize| {
            echoed[i]
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
        };
        let token = trace.token.as_deref();
        let trace_id = trace.context.as_ref().map(TraceContext::trace_id_hex);
        let span_id = trace.context.as_ref().map(TraceContext::span_id_hex);
        crate::logging::access(&crate::logging::AccessLine {
            method: method.as_str(),
            path: &path,
            status,
            latency_ms: latency.as_secs_f64() * 1000.0,
            client_subject: &conn.identity.subject,
            client_fingerprint: &conn.identity.fingerprint_sha256,
            bundle: &conn.identity.bundle,
            peer: conn.peer,
            route,
            ods_code: trace.ods_code.as_deref().unwrap_or("-"),
            client_id: token.and_then(|t| t.client_id.as_deref()).unwrap_or("-"),
            token_hash: token
                .map(|t| t.token_hash.as_str())
                .filter(|h| !h.is_empty())
                .unwrap_or("-"),
            auth: if self.auth.is_development() {
                "DEVELOPMENT-NO-TOKEN-CHECK"
            } else {
                "checked"
            },
            upstream_status: trace.upstream_status.unwrap_or(0),
            upstream_ms: trace
                .upstream_time
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            rejection: trace.rejection.unwrap_or("-"),
            request_id: id(0),
            correlation_id: id(1),
            trace_id: trace_id.as_ref().map_or("", Hex::as_str),
            span_id: span_id.as_ref().map_or("", Hex::as_str),
        });
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
                    start: end - latency,
                    end,
                },
            );
        }
        response
    }

    /// [`Gateway::run`] under the route's total time budget, if it has one: the
    /// budget runs from `start` (the request's arrival) to the response headers, token
    /// check and upstream included, and its expiry abandons whatever is in progress.
    async fn forward_in_budget<'g>(
        &'g self,
        req: Request<Body>,
        conn: &ConnInfo,
        trace: &mut Trace<'g>,
        start: Instant,
    ) -> Result<Response<Body>, Rejection> {
        let route = self.policy.covering(req.uri().path()).map(|r| &*r.name);
        let Some(budget) = self.levels.of(route).budget.clone() else {
            return self.run(req, conn, trace).await;
        };
        let deadline = tokio::time::Instant::from_std(start + budget.limit);
        match tokio::time::timeout_at(deadline, self.run(req, conn, trace)).await {
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
    pub(super) fn rate_limit(
        &self,
        levels: &Levels,
        route: &std::sync::Arc<str>,
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
                    route: route.clone(),
                })
                .inc();
            Rejection::too_many_requests(service::retry_after_secs(wait))
        })
    }

    /// Takes over the endpoints `previous` discovered for the same issuer (see
    /// [`Authoriser::inherit_endpoints`]); for a pipeline rebuilt at a reload.
    pub fn inherit_discovery(&self, previous: &Gateway) {
        self.auth.inherit_endpoints(&previous.auth);
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

    /// NHSD stage: the route's policy (or the default); on an exempt path nothing is
    /// required, but whatever is sent is checked ([`nhsd::NhsdPolicy::exempt`]).
    pub(super) fn check_nhsd(
        &self,
        route: &Route,
        req: &Request<Body>,
    ) -> Result<Option<nhsd::NhsdFacts>, Rejection> {
        let Some(cfg) = &self.nhsd else {
            return Ok(None);
        };
        let path = req.uri().path();
        let relaxed;
        let policy = match &route.nhsd {
            // A route's own block is applied as written, on an exempt path too: an
            // operator who put an allow-list on `/MessageDefinition` meant it.
            Some(own) => own,
            None if cfg.exempt_paths.iter().any(|p| prefix_covers(p, path)) => {
                relaxed = cfg.headers.exempt();
                &relaxed
            }
            None => &cfg.headers,
        };
        nhsd::check(req.headers(), policy).map(Some).map_err(|e| {
            self.metrics
                .nhsd_rejections
                .get_or_create(&HeaderLabel {
                    header: e.header().to_owned(),
                })
                .inc();
            let r = Rejection::from(&e);
            // `refusal: unauthorized` (the BaRS coding) answers 401, and RFC 9110
            // §15.5.2: "The server generating a 401 response MUST send a
            // WWW-Authenticate header field containing at least one challenge". The
            // gateway's one scheme is Bearer, in its configured realm.
            if r.status == http::StatusCode::UNAUTHORIZED {
                let realm = &self.auth.config().realm;
                r.with_www_authenticate(Some(format!("Bearer realm=\"{realm}\"")))
            } else {
                r
            }
        })
    }

    /// Request hygiene before any stage: `CONNECT`, `Host`, and the configured header
    /// limits (the HTTP libraries stop at twice these, see `server::snapshot`).
    pub(super) fn hygiene(&self, req: &Request<Body>) -> Result<(), Rejection> {
        if req.method() == Method::CONNECT {
            return Err(Rejection::method_not_allowed("CONNECT is not supported"));
        }
        check_host(req)?;
        if req.headers().len() > self.max_headers {
            return Err(Rejection::too_many_headers(self.max_headers));
        }
        if header_section_size(req) > self.max_header_bytes {
            return Err(Rejection::headers_too_large(self.max_header_bytes));
        }
        Ok(())
    }

    /// Stage 4: the route covering the path, if this certificate may use it.
    pub(super) fn route<'g>(
        &'g self,
        req: &Request<Body>,
        conn: &ConnInfo,
        trace: &mut Trace<'g>,
    ) -> Result<&'g Route, Rejection> {
        let route = self
            .policy
            .decide(req.uri().path(), &conn.identity)
            .map_err(|e| match (self.levels.unmatched, &e) {
                (Unmatched::NotImplemented, PolicyError::NoRoute) => Rejection::not_implemented(),
                _ => e.rejection(),
            })?;
        trace.route = Some(route);
        Ok(route)
    }

    /// Stage 5: the bearer token, on routes that require one.
    pub(super) async fn token(
        &self,
        route: &Route,
        req: &mut Request<Body>,
        conn: &ConnInfo,
        trace: &mut Trace<'_>,
    ) -> Result<Option<Arc<auth::TokenFacts>>, Rejection> {
        // RFC 6750 §3.1: a request that "uses more than one method for including an
        // access token" is `invalid_request` (400). Checked on every route, before any
        // introspection, so such a query string never goes anywhere.
        if query_has_access_token(req.uri().query())
            && req.headers().contains_key(header::AUTHORIZATION)
        {
            return Err(auth::AuthError::InvalidRequest(
                "The access token was sent in both the Authorization header and the access_token query parameter",
            )
            .refusal(self.auth.config()).rejection());
        }
        match route.token {
            TokenRequirement::None => Ok(None),
            TokenRequirement::Required => {
                // A FHIR search by POST carries its parameters in a form-encoded body:
                // the token is checked first for the search of the type alone, then the
                // body (read only for a verified token, so a refused client cannot make
                // the gateway buffer it) for what its parameters bring in. Any other
                // body there counts as unknown parameters (`*` read, from `classify`).
                let path = req.uri().path();
                let as_get = (req.method() == http::Method::POST && is_form_encoded(req.headers()))
                    .then(|| path.strip_suffix("/_search"))
                    .flatten()
                    .map(|searched| scope::classify(&http::Method::GET, searched))
                    .filter(|r| r.interaction == scope::Interaction::Search);
                let by_post = as_get.is_some();
                let mut need = as_get
                    .unwrap_or_else(|| scope::classify(req.method(), path))
                    .with_query(req.uri().query());
                // A conditional create searches with its criteria (left as they are for
                // anything but a create).
                for criteria in req.headers().get_all("if-none-exist") {
                    need = need.with_if_none_exist(criteria.as_bytes());
                }
                let facts = self.authorise(route, req.headers(), &need, conn).await?;
                if by_post {
                    // Boxed: rare, and not worth space in every request's future.
                    Box::pin(self.search_body(route, req, need, conn)).await?;
                }
                trace.token = Some(facts.clone());
                Ok(Some(facts))
            }
        }
    }

    /// A search by POST whose token passed for its type: the form-encoded body read, its
    /// parameters checked as a query's are, and the body put back to be sent on.
    async fn search_body(
        &self,
        route: &Route,
        req: &mut Request<Body>,
        need: scope::Requirement,
        conn: &ConnInfo,
    ) -> Result<(), Rejection> {
        self.declared_size(req.headers())?;
        let params = self.read_body(std::mem::take(req.body_mut())).await?;
        // The same token again: a cache hit, with the whole requirement.
        let need = need.with_params(&params);
        self.authorise(route, req.headers(), &need, conn).await?;
        *req.body_mut() = full_body(params);
        Ok(())
    }

    /// The bearer token of `headers` checked for `need` and the route's required scopes.
    async fn authorise(
        &self,
        route: &Route,
        headers: &http::HeaderMap,
        need: &scope::Requirement,
        conn: &ConnInfo,
    ) -> Result<Arc<auth::TokenFacts>, Rejection> {
        self.auth
            .authorise(
                headers,
                need,
                &route.required_scopes,
                &conn.identity.fingerprint_sha256,
            )
            .await
            .map_err(|e| e.refusal(self.auth.config()).rejection())
    }

    /// The body limit from `Content-Length`, then a form-encoded body's `access_token`
    /// (see [`Gateway::form_body_token`]). Only run with every other check passed, as
    /// only then is a body worth reading.
    pub(super) async fn body(
        &self,
        req: Request<Body>,
        route: &Route,
    ) -> Result<Request<Body>, Rejection> {
        self.declared_size(req.headers())?;
        if is_form_encoded(req.headers()) {
            // Boxed, as the token check: rare, and not worth space in every request.
            Box::pin(self.form_body_token(req, route.forward_token)).await
        } else {
            Ok(req)
        }
    }

    /// Stage 7, rewrite: the request as the upstream gets it (target URI, identity and
    /// verified-fact headers, no token unless the route forwards it, streamed body under
    /// the size limit). The flag turns true once the client's body has been read.
    pub(super) fn upstream_request(
        &self,
        req: Request<Body>,
        route: &Route,
        conn: &ConnInfo,
        trace: &Trace<'_>,
        token: Option<&auth::TokenFacts>,
        facts: Option<&nhsd::NhsdFacts>,
    ) -> Result<(Request<UpstreamBody>, Arc<AtomicBool>), Rejection> {
        let (mut parts, body) = req.into_parts();
        let original_host = match parts.uri.authority() {
            Some(a) => Some(forward::header_value(a.as_str())),
            None => parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(forward::header_value),
        };
        // The upstream never gets a replayable token unless the route asks for it: the
        // verified facts go up as `X-Fhirgate-*` instead.
        let stripped;
        let mut pq = parts.uri.path_and_query();
        if !route.forward_token {
            parts.headers.remove(header::AUTHORIZATION);
            if let Some(p) = pq.and_then(without_access_token) {
                stripped = p;
                pq = Some(&stripped);
            }
        }
        let uri = self.upstream.target(pq)?;
        // Room for every header added below at once: one growth of the map, not one per
        // power of two it passes (an error leaves the inserts to grow it as they go).
        let _ = parts.headers.try_reserve(
            conn.headers.len()
                + 3 // X-Forwarded-Host, traceparent, tracestate
                + token.map_or(0, |t| t.upstream().len())
                + facts.map_or(0, |_| nhsd::FORWARDED_FACT_HEADERS.len()),
        );
        forward::upstream_request_headers(
            &mut parts.headers,
            &self.identity_names,
            &conn.headers,
            original_host,
        );
        if let Some(tc) = &trace.context {
            tc.set_upstream(&mut parts.headers);
        }
        if let Some(t) = token {
            for (name, value) in t.upstream() {
                parts.headers.insert(name.clone(), value.clone());
            }
        }
        if let (Some(f), Some(cfg)) = (facts, &self.nhsd) {
            for name in route
                .nhsd
                .as_ref()
                .unwrap_or(&cfg.headers)
                .ignored_headers()
            {
                parts.headers.remove(name);
            }
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
        Ok((Request::from_parts(parts, body), body_done))
    }

    /// Stage 7, send: the upstream's response with hop-by-hop headers removed, or the
    /// refusal that blames the right side for a timeout.
    pub(super) async fn send(
        &self,
        upstream_req: Request<UpstreamBody>,
        body_done: Arc<AtomicBool>,
        slot: Option<&Arc<PinnedSlot>>,
        trace: &mut Trace<'_>,
    ) -> Result<Response<Body>, Rejection> {
        let sent = Instant::now();
        let result = self
            .upstream
            .send(upstream_req, sent, self.max_body_bytes, slot)
            .await;
        trace.upstream_time = Some(sent.elapsed());
        let resp = result.map_err(|(e, detail)| {
            if e == UpstreamError::Timeout && !body_done.load(Ordering::Relaxed) {
                // The client, not the upstream, was too slow: its body never finished.
                return Rejection::body_timeout();
            }
            tracing::warn!(target: "fhirgate::upstream", error = %detail, reason = e.reason(), "upstream request failed");
            self.metrics.upstream_error(e.reason());
            e.rejection()
        })?;
        let (mut parts, body) = resp.into_parts();
        forward::client_response_headers(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }
}

pin_project_lite::pin_project! {
    /// The client's request body, noting when it has been read to the end, so that a
    /// timeout can be blamed on the right side, and without its trailers: a trailer
    /// section is a header section the client wrote after the body, which the header
    /// checks never saw (it could name `X-Client-Cert-Subject`), and FHIR uses none.
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
        loop {
            let r = this.inner.as_mut().poll_frame(cx);
            if matches!(r, Poll::Ready(None)) || this.inner.is_end_stream() {
                this.done.store(true, Ordering::Relaxed);
            }
            match r {
                // Dropped, not refused: RFC 9112 §7.1.2 "A recipient that removes the
                // chunked coding from a message MAY selectively retain or discard the
                // received trailer fields" (HTTP/2 trailers are the same fields).
                Poll::Ready(Some(Ok(f))) if f.is_trailers() => continue,
                r => return r,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Gateway {
    /// RFC 6750 §2.2 puts a token in a form-encoded body as `access_token`. Such a body is
    /// read (bounded by `limits.max_body_bytes` and the upstream response timeout; only
    /// after the route, token and NHSD checks passed, so a refused client cannot make
    /// the gateway buffer anything) when the request also has an `Authorization` header
    /// (two methods: RFC 6750 §3.1 `invalid_request`, 400) or when the route does not
    /// forward tokens (the parameter is then removed, so the upstream never sees it).
    /// Other bodies are streamed.
    async fn form_body_token(
        &self,
        req: Request<Body>,
        forward_token: bool,
    ) -> Result<Request<Body>, Rejection> {
        let has_header = req.headers().contains_key(header::AUTHORIZATION);
        if forward_token && !has_header {
            return Ok(req);
        }
        let (mut parts, body) = req.into_parts();
        let bytes = self.read_body(body).await?;
        let is_token = |pair: &[u8]| form_urlencoded::parse(pair).any(|(k, _)| k == "access_token");
        let body_token = is_token(&bytes);
        if body_token && has_header {
            return Err(auth::AuthError::InvalidRequest(
                "The access token was sent in both the Authorization header and the request body",
            )
            .refusal(self.auth.config())
            .rejection());
        }
        let bytes = if body_token && !forward_token {
            let kept: Vec<&[u8]> = bytes
                .split(|b| *b == b'&')
                .filter(|pair| !is_token(pair))
                .collect();
            let joined = bytes::Bytes::from(kept.join(&b'&'));
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(joined.len()));
            joined
        } else {
            bytes
        };
        Ok(Request::from_parts(parts, full_body(bytes)))
    }

    /// A body whose `Content-Length` is over `limits.max_body_bytes` is refused (413)
    /// before any of it is read.
    fn declared_size(&self, headers: &HeaderMap) -> Result<(), Rejection> {
        match content_length(headers) {
            Some(len) if len > self.max_body_bytes => {
                Err(Rejection::body_too_large(self.max_body_bytes))
            }
            _ => Ok(()),
        }
    }

    /// A body read whole, within `limits.max_body_bytes` (413) and the body read timeout.
    async fn read_body(&self, body: Body) -> Result<bytes::Bytes, Rejection> {
        let limit = usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX);
        let read =
            tokio::time::timeout(self.body_read_timeout, Limited::new(body, limit).collect());
        match read.await {
            Err(_) => Err(Rejection::body_timeout()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                Err(Rejection::body_too_large(self.max_body_bytes))
            }
            Ok(Err(_)) => Err(Rejection::bad_request_body()),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }
}

/// A body already read, to send on.
fn full_body(bytes: bytes::Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never: std::convert::Infallible| match never {})
        .boxed()
}

/// Whether the body is `application/x-www-form-urlencoded` (RFC 6750 §2.2's condition).
fn is_form_encoded(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// RFC 9112 §3.2: a request with more than one `Host`, or an HTTP/1.1 request with none,
/// is refused with 400; so is a `Host` that is not a plain `host[:port]`, since it goes
/// upstream as `X-Forwarded-Host`. RFC 9113 §8.3.1: "A server SHOULD treat a request as
/// malformed if it contains a Host header field that identifies an entity that differs
/// from the entity in the ':authority' pseudo-header field": an HTTP/2 request whose
/// two disagree is refused too, so the gateway and the upstream cannot each take a
/// different one for the request's host.
fn check_host<B>(req: &Request<B>) -> Result<(), Rejection> {
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
            if req.version() == http::Version::HTTP_2 {
                if let Some(a) = req.uri().authority() {
                    if !same_origin_host(a, h) {
                        return Err(Rejection::bad_host(
                            "The Host header differs from the :authority pseudo-header",
                        ));
                    }
                }
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

/// Whether `host` names the entity `authority` does on this https listener: host names
/// compare case-insensitively and an absent (or empty) port is https's 443 (RFC 9110
/// §4.2.3: with the default port omitted or given, the URIs are equivalent).
fn same_origin_host(authority: &http::uri::Authority, host: &http::HeaderValue) -> bool {
    use http::uri::Authority;
    // The port as written: `port_u16` would read an out-of-range one as no port.
    fn port(a: &Authority) -> Option<u32> {
        let s = a.as_str();
        let host_port = s.rsplit_once('@').map_or(s, |(_, hp)| hp);
        let written = host_port.get(a.host().len()..)?;
        match written.strip_prefix(':') {
            None if written.is_empty() => Some(443),
            Some("") => Some(443),
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok(),
            _ => None,
        }
    }
    let Ok(host) = Authority::try_from(host.as_bytes()) else {
        return false;
    };
    authority.host().eq_ignore_ascii_case(host.host())
        && port(authority).is_some_and(|p| port(&host) == Some(p))
}

/// The size of the request's header section as its protocol counts it: HTTP/1.1 the
/// request line and `name: value\r\n` lines (what hyper's buffer limit bounds), HTTP/2
/// RFC 7541 §4.1 (name + value + 32 per field, pseudo-header fields included), the
/// measure behind SETTINGS_MAX_HEADER_LIST_SIZE.
fn header_section_size<B>(req: &Request<B>) -> usize {
    let fields = req.headers().iter();
    if req.version() >= http::Version::HTTP_2 {
        let uri = req.uri();
        let pseudo = [
            (7, req.method().as_str().len()),
            (7, uri.scheme_str().map_or(0, str::len)),
            (10, uri.authority().map_or(0, |a| a.as_str().len())),
            (5, uri.path_and_query().map_or(1, |p| p.as_str().len())),
        ];
        pseudo.iter().map(|(n, v)| n + v + 32).sum::<usize>()
            + fields
                .map(|(n, v)| n.as_str().len() + v.len() + 32)
                .sum::<usize>()
    } else {
        let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len())
            + req.uri().authority().map_or(0, |a| a.as_str().len() + 8);
        req.method().as_str().len()
            + target
            + 12
            + fields
                .map(|(n, v)| n.as_str().len() + v.len() + 4)
                .sum::<usize>()
            + 2
    }
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A transaction id worth echoing: one value, printable ASCII, at most 128 bytes; with
/// BaRS checks on, a hyphenated UUID, which is what the BaRS API mirrors back
/// (`format: uuid`) and all the NHSD stage accepts: the value it refuses is never
/// reflected on the refusal (SECURITY.md).
fn echoable(h: &HeaderMap, name: &HeaderName, uuid_only: bool) -> Option<HeaderValue> {
    let mut all = h.get_all(name).iter();
    let v = all.next()?;
    if all.next().is_some() || v.len() > 128 || !v.as_bytes().iter().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    if uuid_only && (v.len() != 36 || uuid::Uuid::try_parse_ascii(v.as_bytes()).is_err()) {
        return None;
    }
    let mut v = v.clone();
    // A per-request id never repeats, so HTTP/2's HPACK gains nothing by indexing it, and
    // every response would otherwise evict and search the connection's header table (h2
    // sends a "sensitive" value as a never-indexed literal; HTTP/1.1 ignores the flag).
    v.set_sensitive(true);
    Some(v)
}

/// Whether a query string carries an RFC 6750 §2.3 `access_token` parameter.
fn query_has_access_token(query: Option<&str>) -> bool {
    query.is_some_and(|q| form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "access_token"))
}

/// `pq` without its `access_token` parameters (other parameters byte for byte), or
/// `None` when there is none to remove.
fn without_access_token(pq: &http::uri::PathAndQuery) -> Option<http::uri::PathAndQuery> {
    let q = pq.query()?;
    if !query_has_access_token(Some(q)) {
        return None;
    }
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| !query_has_access_token(Some(pair)))
        .collect();
    let text = if kept.is_empty() {
        pq.path().to_owned()
    } else {
        format!("{}?{}", pq.path(), kept.join("&"))
    };
    text.parse().ok()
}

/// A request path as the access log shows it with `logging.redact_paths`: the route's
/// prefix (operator configuration) verbatim, then FHIR REST segments with every id
/// replaced: `/Patient/{id}`, `/Patient/{id}/_history/{vid}`, `/Patient/{id}/$everything`,
/// `/Patient/{id}/Observation`. Resource types, `$operations`, `_history`/`_search` and
/// `metadata` are kept. Anything in a resource-type position that does not look like one
/// is replaced too, so an NHS number never survives.
pub fn redact_path(path: &str, prefix: Option<&str>) -> String {
    enum Next {
        Type,
        Id,
        AfterId,
        Version,
    }
    let keep_prefix = prefix.filter(|p| *p != "/" && prefix_covers(p, path));
    let prefix_segments = keep_prefix.map_or(0, |p| p.split('/').count() - 1);
    let mut out = String::with_capacity(path.len());
    let mut next = Next::Type;
    for (i, seg) in path.split('/').skip(1).enumerate() {
        out.push('/');
        let keyword = is_keyword(seg);
        let (shown, then) = match next {
            Next::Version => ("{vid}", Next::Type),
            Next::Id | Next::AfterId if seg == "_history" => (seg, Next::Version),
            Next::Id | Next::AfterId if keyword => (seg, Next::Type),
            Next::Id => ("{id}", Next::AfterId),
            // A compartment search: /Patient/{id}/Observation.
            Next::AfterId if is_type_like(seg) => (seg, Next::Id),
            Next::AfterId => ("{id}", Next::Type),
            Next::Type if keyword || seg == "metadata" || seg.is_empty() => (seg, Next::Type),
            Next::Type if is_type_like(seg) => (seg, Next::Id),
            Next::Type => ("{id}", Next::Type),
        };
        next = then;
        if i < prefix_segments {
            out.push_str(seg);
        } else {
            out.push_str(shown);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// `$operation` or `_history`/`_search`: `$` or `_`, a letter, then letters, digits or
/// `-` (so a `$` or `_` in front of an identifier does not keep it).
fn is_keyword(seg: &str) -> bool {
    let mut b = seg.bytes();
    matches!(b.next(), Some(b'$' | b'_'))
        && b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

/// A FHIR resource type name: an upper-case letter, then letters (`Patient`,
/// `MessageDefinition`).
fn is_type_like(seg: &str) -> bool {
    let mut b = seg.bytes();
    b.next().is_some_and(|c| c.is_ascii_uppercase())
        && seg.len() <= 64
        && b.all(|c| c.is_ascii_alphabetic())
}

/// Text as it may appear in a log line: printable ASCII, at most 128 chars (borrowed
/// when it already is).
fn log_safe_str(s: &str) -> std::borrow::Cow<'_, str> {
    if s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return s.into();
    }
    s.chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_authority_name_one_entity_with_https_default_port() {
        let same = [
            ("localhost", "localhost"),
            ("localhost", "LocalHost"),
            ("localhost:443", "localhost"),
            ("localhost", "localhost:443"),
            ("localhost", "localhost:"),
            ("localhost:0443", "localhost"),
            ("[::1]:443", "[::1]"),
            ("gw.example.nhs.uk:8443", "GW.example.nhs.uk:8443"),
        ];
        let different = [
            ("localhost", "localhost:8443"),
            ("localhost:8443", "localhost"),
            ("localhost", "localhost:99999"),
            ("localhost:99999", "localhost:34463"),
            ("localhost", "evil.example"),
            ("localhost", "localhost.evil.example"),
            ("[::1]", "[::2]"),
            ("[::1]:443", "[::1]:80"),
        ];
        for (cases, want) in [(&same, true), (&different, false)] {
            for (a, h) in cases {
                let a = http::uri::Authority::from_static(a);
                let h = http::HeaderValue::from_static(h);
                assert_eq!(same_origin_host(&a, &h), want, "{a} / {h:?}");
            }
        }
    }

    #[test]
    fn redacted_paths_keep_types_and_operations_only() {
        let cases = [
            ("/Patient/9000000009", None, "/Patient/{id}"),
            (
                "/Patient/9000000009/_history/3",
                None,
                "/Patient/{id}/_history/{vid}",
            ),
            (
                "/Patient/9000000009/_history",
                None,
                "/Patient/{id}/_history",
            ),
            (
                "/Patient/9000000009/$everything",
                None,
                "/Patient/{id}/$everything",
            ),
            (
                "/Patient/9000000009/Observation",
                None,
                "/Patient/{id}/Observation",
            ),
            ("/Patient/$match", None, "/Patient/$match"),
            ("/Patient/_search", None, "/Patient/_search"),
            ("/Patient", None, "/Patient"),
            ("/$process-message", None, "/$process-message"),
            ("/metadata", None, "/metadata"),
            ("/", None, "/"),
            ("/9000000009", None, "/{id}"),
            ("/Patient/$9000000009", None, "/Patient/{id}"),
            ("/$9000000009", None, "/{id}"),
            (
                "/Patient/_9000000009/_history/x",
                None,
                "/Patient/{id}/_history/{vid}",
            ),
            ("/Patient/ABC", None, "/Patient/{id}"),
            (
                "/fhir/R4/Patient/9000000009",
                Some("/fhir/R4"),
                "/fhir/R4/Patient/{id}",
            ),
            ("/Patient/9000000009", Some("/Patient"), "/Patient/{id}"),
            ("/Patient/9000000009", Some("/"), "/Patient/{id}"),
        ];
        for (path, prefix, want) in cases {
            assert_eq!(redact_path(path, prefix), want, "{path} {prefix:?}");
        }
    }

    #[test]
    fn access_token_is_removed_from_the_query_only() {
        let pq: http::uri::PathAndQuery =
            "/Patient?name=x&access_token=abc&b=%20c".parse().unwrap();
        assert_eq!(
            without_access_token(&pq).unwrap().as_str(),
            "/Patient?name=x&b=%20c"
        );
        let pq: http::uri::PathAndQuery = "/Patient?access%5Ftoken=abc".parse().unwrap();
        assert_eq!(without_access_token(&pq).unwrap().as_str(), "/Patient");
        let pq: http::uri::PathAndQuery = "/Patient?name=access_token".parse().unwrap();
        assert!(without_access_token(&pq).is_none());
        assert!(query_has_access_token(Some("a=1&access_token=")));
        assert!(!query_has_access_token(Some("access_tokens=1")));
        assert!(!query_has_access_token(None));
    }

    /// The echoed id is the client's value, byte for byte, marked sensitive so HTTP/2
    /// sends it as a never-indexed literal; the request's own header (sent upstream) is
    /// left as it came. Repeated, over-long or non-printable ids are not echoed.
    #[test]
    fn echoed_ids_are_the_clients_bytes_marked_never_indexed() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-request-id",
            HeaderValue::from_static("60E0B220-8136-4CA5-AE46-1D97EF59D068"),
        );
        let v = echoable(&h, &ECHOED[0], false).expect("a valid id is echoed");
        assert_eq!(v.as_bytes(), b"60E0B220-8136-4CA5-AE46-1D97EF59D068");
        assert!(v.is_sensitive());
        assert!(!h["x-request-id"].is_sensitive());
        assert!(echoable(&h, &ECHOED[1], false).is_none());

        h.append("x-request-id", HeaderValue::from_static("second"));
        assert!(echoable(&h, &ECHOED[0], false).is_none());
        let long = "a".repeat(129);
        h.insert("x-request-id", HeaderValue::from_str(&long).unwrap());
        assert!(echoable(&h, &ECHOED[0], false).is_none());
        h.insert("x-request-id", HeaderValue::from_static("has space"));
        assert!(echoable(&h, &ECHOED[0], false).is_none());
    }

    /// SECURITY.md: refusals carry "never the offending header value echoed back"; the
    /// BaRS API's `X-Request-Id` response header is `format: uuid`, "mirrored back".
    /// With BaRS checks on, only a hyphenated UUID is echoed.
    #[test]
    fn with_bars_checks_only_a_uuid_is_echoed() {
        let mut h = HeaderMap::new();
        for (value, echoed) in [
            ("60e0b220-8136-4ca5-ae46-1d97ef59d068", true),
            ("<img/src=x>", false),
            ("60e0b2208136-4ca5-ae46-1d97ef59d068x", false),
            ("{60e0b220-8136-4ca5-ae46-1d97ef59d0}", false),
            ("60e0b22081364ca5ae461d97ef59d068", false),
        ] {
            h.insert("x-request-id", HeaderValue::from_static(value));
            assert_eq!(echoable(&h, &ECHOED[0], true).is_some(), echoed, "{value}");
            assert!(echoable(&h, &ECHOED[0], false).is_some(), "{value}");
        }
    }
}
