//! The one place that turns a refusal into a FHIR `OperationOutcome` response.
//!
//! Every stage returns a [`Rejection`]; nothing else in the gateway builds an error body.
//! Codes come from the NHS `http-error-codes` code system used by BaRS (see the BaRS
//! "Failure scenarios" page: REC_* codes are those a receiver, or a gateway on its
//! behalf, returns). The `diagnostics` text is ours, never an echo of client input.

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Response body type used throughout the gateway.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// NHS code system for HTTP error codes (BaRS core, error handling).
pub const NHS_ERROR_SYSTEM: &str = "https://fhir.nhs.uk/CodeSystem/http-error-codes";

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// Who a refusal blames, for logs and for deciding between refusals (a timeout with the
/// client's body unfinished is the client's, not the upstream's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The request: its path, headers, token or body.
    Client,
    /// The upstream server, or the way to it.
    Upstream,
    /// The gateway or a service it depends on (the authorisation server).
    Internal,
}

/// A stage's refusal (policy, auth, nhsd, upstream): one status, one NHS code, one FHIR
/// issue code and one reason label per variant. [`Refuse::rejection`] builds the
/// response through the constructors below, so labels and codes have one source.
pub trait Refuse {
    /// The refusal as the client gets it.
    fn rejection(&self) -> Rejection;
    /// Who is to blame.
    fn source(&self) -> ErrorSource;
    fn status(&self) -> StatusCode {
        self.rejection().status
    }
    /// Code from [`NHS_ERROR_SYSTEM`].
    fn nhs_code(&self) -> &'static str {
        self.rejection().nhs_code
    }
    /// FHIR `OperationOutcome.issue.code`.
    fn issue(&self) -> &'static str {
        self.rejection().issue
    }
    /// Label for logs and the `reason` metric labels.
    fn reason(&self) -> &'static str {
        self.rejection().reason
    }
}

/// Why a request was refused. Each variant maps to one status, one NHS code and one
/// FHIR issue type, so clients and dashboards can tell refusals apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    /// FHIR `OperationOutcome.issue.code` (issue-type value set).
    pub issue: &'static str,
    /// Code from [`NHS_ERROR_SYSTEM`].
    pub nhs_code: &'static str,
    /// Human-readable explanation sent to the client. Must not contain secrets or raw
    /// client input.
    pub diagnostics: String,
    /// Optional `WWW-Authenticate` header (RFC 6750) for token refusals.
    pub www_authenticate: Option<String>,
    /// Optional `Retry-After` header, in whole seconds (RFC 9110 §10.2.3), for 429.
    pub retry_after: Option<u64>,
    /// Short machine-friendly reason for logs and metrics.
    pub reason: &'static str,
}

impl Rejection {
    fn new(
        status: StatusCode,
        issue: &'static str,
        nhs_code: &'static str,
        reason: &'static str,
        diagnostics: impl Into<String>,
    ) -> Self {
        Rejection {
            status,
            issue,
            nhs_code,
            diagnostics: diagnostics.into(),
            www_authenticate: None,
            retry_after: None,
            reason,
        }
    }

    /// Path is malformed or tries to escape a route (dot segments, encoded slashes).
    pub fn bad_path(diag: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "REC_BAD_REQUEST",
            "bad_path",
            diag,
        )
    }

    /// Request shape the gateway does not forward (e.g. CONNECT).
    pub fn method_not_allowed(diag: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            "REC_METHOD_NOT_ALLOWED",
            "method_not_allowed",
            diag,
        )
    }

    /// No route covers the path: default deny.
    pub fn no_route() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "REC_FORBIDDEN",
            "no_route",
            "No route of this gateway permits this path",
        )
    }

    /// The certificate this connection was opened with has expired or is refused by the
    /// trust now in force (a newer CRL revokes it); the client must reconnect.
    pub fn certificate_lapsed(kind: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "REC_FORBIDDEN",
            "certificate_lapsed",
            format!(
                "The client certificate of this connection is no longer valid ({kind}); \
                 reconnect with a valid certificate"
            ),
        )
    }

    /// The client certificate is valid but not allowed on this route.
    pub fn route_forbidden(route: &str) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "REC_FORBIDDEN",
            "route_forbidden",
            format!("The client certificate is not permitted to use route '{route}'"),
        )
    }

    pub fn body_too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-long",
            "REC_BAD_REQUEST",
            "body_too_large",
            format!("Request body exceeds the limit of {limit} bytes"),
        )
    }

    /// RFC 9112 §3.2: more than one `Host`, an invalid one, or none on HTTP/1.1.
    pub fn bad_host(diag: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "REC_BAD_REQUEST",
            "bad_host",
            diag,
        )
    }

    /// More header fields than `limits.max_headers` (either protocol; the HTTP libraries'
    /// own limits sit at twice the configured ones).
    pub fn too_many_headers(limit: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too-long",
            "REC_BAD_REQUEST",
            "too_many_headers",
            format!("More than {limit} header fields"),
        )
    }

    /// A header section larger than `limits.max_header_bytes`, as HTTP/1.1 (request line
    /// and fields) or HTTP/2 (RFC 7541 §4.1 header list size) counts it.
    pub fn headers_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too-long",
            "REC_BAD_REQUEST",
            "headers_too_large",
            format!("The request header section exceeds {limit} bytes"),
        )
    }

    /// The client did not finish sending its request body in time.
    pub fn body_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "REC_TIMEOUT",
            "body_timeout",
            "The request body was not received in time",
        )
    }

    pub fn bad_request_body() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "REC_BAD_REQUEST",
            "bad_body",
            "The request body could not be read",
        )
    }

    pub fn upstream_unavailable() -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            "transient",
            "REC_SERVICE_UNAVAILABLE",
            "upstream_unavailable",
            "The FHIR service behind this gateway could not be reached",
        )
    }

    pub fn upstream_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "REC_TIMEOUT",
            "upstream_timeout",
            "The FHIR service behind this gateway did not answer in time",
        )
    }

    /// No route covers the path and `service_levels.unmatched` is `not_implemented`
    /// (the BaRS examples answer an endpoint a receiver has not implemented with 501).
    pub fn not_implemented() -> Self {
        Self::new(
            StatusCode::NOT_IMPLEMENTED,
            "not-supported",
            "REC_NOT_IMPLEMENTED",
            "not_implemented",
            "This endpoint is not implemented by this service",
        )
    }

    /// `Accept` asks only for FHIR versions the route does not support. The diagnostics
    /// list the supported versions (from config, never the client's text).
    pub fn not_acceptable(supported: &[String]) -> Self {
        Self::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            "REC_NOT_ACCEPTABLE",
            "not_acceptable",
            format!(
                "The requested FHIR version is not supported; supported versions: {}",
                supported.join(", ")
            ),
        )
    }

    /// The client is over its rate limit; it may retry after `retry_after` seconds.
    pub fn too_many_requests(retry_after: u64) -> Self {
        let mut r = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "REC_TOO_MANY_REQUESTS",
            "rate_limited",
            format!("Too many requests from this client; retry after {retry_after} s"),
        );
        r.retry_after = Some(retry_after);
        r
    }

    /// The client already has `limits.max_connections_per_client` connections open.
    pub fn too_many_connections(limit: usize, retry_after: u64) -> Self {
        let mut r = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "throttled",
            "REC_TOO_MANY_REQUESTS",
            "too_many_connections",
            format!("This client already has {limit} connections open; reuse one of them"),
        );
        r.retry_after = Some(retry_after);
        r
    }

    /// RFC 6750 §3.1: no token was presented; the challenge carries no error code.
    pub fn token_missing(realm: &str, diag: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "login",
            "REC_UNAUTHORIZED",
            "token_missing",
            diag,
        )
        .with_www_authenticate(Some(format!("Bearer realm=\"{realm}\"")))
    }

    /// RFC 6750 §3.1 `invalid_token`. `status` is `auth.invalid_token_status` (401, or 403
    /// for receivers that follow the BaRS examples).
    pub fn token_invalid(status: u16, realm: &str, diag: impl Into<String>) -> Self {
        let (issue, code) = if status == 401 {
            ("login", "REC_UNAUTHORIZED")
        } else {
            ("forbidden", "REC_FORBIDDEN")
        };
        Self::from_parts(status, issue, code, "token_invalid", diag).with_www_authenticate(Some(
            format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
        ))
    }

    /// RFC 6750 §3.1 `invalid_request`, e.g. a token sent by more than one method.
    pub fn token_invalid_request(realm: &str, diag: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            "REC_BAD_REQUEST",
            "token_invalid_request",
            diag,
        )
        .with_www_authenticate(Some(format!(
            "Bearer realm=\"{realm}\", error=\"invalid_request\""
        )))
    }

    /// RFC 6750 §3.1 `insufficient_scope`, naming the scope the request needs.
    pub fn token_scope(realm: &str, needed: &str, diag: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "REC_FORBIDDEN",
            "token_scope",
            diag,
        )
        .with_www_authenticate(Some(format!(
            "Bearer realm=\"{realm}\", error=\"insufficient_scope\", scope=\"{needed}\""
        )))
    }

    /// The token could not be verified now (authorisation server down, slow or broken):
    /// fail closed with `auth.unavailable_status` (a 5xx).
    pub fn token_unverifiable(status: u16, diag: impl Into<String>) -> Self {
        Self::from_parts(
            status,
            "transient",
            "REC_SERVICE_UNAVAILABLE",
            "token_unverifiable",
            diag,
        )
    }

    /// The request's total time budget (`service_levels.response_timeout`) ran out.
    /// Status and code come from config (BaRS: 408 `REC_TIMEOUT`).
    pub fn budget_timeout(status: StatusCode, nhs_code: &'static str, budget_ms: u128) -> Self {
        Self::new(
            status,
            "timeout",
            nhs_code,
            "response_budget",
            format!("The request was not answered within {budget_ms} ms"),
        )
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "exception",
            "REC_SERVER_ERROR",
            "internal",
            "Unexpected error in the gateway",
        )
    }

    /// Builds a rejection from parts supplied by a stage's own error type.
    pub fn from_parts(
        status: u16,
        issue: &'static str,
        nhs_code: &'static str,
        reason: &'static str,
        diagnostics: impl Into<String>,
    ) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self::new(status, issue, nhs_code, reason, diagnostics)
    }

    pub fn with_www_authenticate(mut self, value: Option<String>) -> Self {
        self.www_authenticate = value;
        self
    }

    /// The `OperationOutcome` JSON document.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "resourceType": "OperationOutcome",
            "meta": {
                "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-OperationOutcome"]
            },
            "issue": [{
                "severity": "error",
                "code": self.issue,
                // No `display`: FHIR's is "a representation of the meaning of the code
                // in the system", the CodeSystem's own text (`400: The Receiver was
                // unable to process the request.`), which a validator checks; the BaRS
                // examples carry the system and code alone, as here.
                "details": {
                    "coding": [{
                        "system": NHS_ERROR_SYSTEM,
                        "code": self.nhs_code,
                    }]
                },
                "diagnostics": self.diagnostics,
            }]
        })
    }

    /// The full HTTP response.
    pub fn into_response(self) -> Response<Body> {
        let body = Bytes::from(self.to_json().to_string());
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        if let Some(v) = self
            .www_authenticate
            .and_then(|v| HeaderValue::try_from(v).ok())
        {
            resp.headers_mut().insert(WWW_AUTHENTICATE, v);
        }
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        // RFC 9110 §15.5.6: "The origin server MUST generate an Allow header field in a
        // 405 response"; the methods are FHIR's RESTful API's, all the gateway passes on.
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            resp.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        resp
    }
}

impl From<crate::pipeline::identity::CertificateLapsed> for Rejection {
    fn from(e: crate::pipeline::identity::CertificateLapsed) -> Self {
        Rejection::certificate_lapsed(e.0.as_str())
    }
}

impl From<&crate::pipeline::nhsd::NhsdError> for Rejection {
    fn from(e: &crate::pipeline::nhsd::NhsdError) -> Self {
        Rejection::from_parts(
            e.status(),
            e.fhir_issue_code(),
            e.nhs_code(),
            e.reason(),
            e.to_string(),
        )
    }
}

impl Refuse for crate::pipeline::nhsd::NhsdError {
    fn rejection(&self) -> Rejection {
        Rejection::from(self)
    }

    fn source(&self) -> ErrorSource {
        ErrorSource::Client
    }
}

/// A complete in-memory body.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// README.md's refusal table, row by row, against what the stages send: every row
    /// is matched by at least one refusal and every refusal listed here has a row whose
    /// status, NHS code, issue code and (where the row names one) reason label agree.
    #[test]
    fn readme_refusal_table_matches_the_stage_errors() {
        use crate::pipeline::auth::{AuthConfig, AuthError};
        use crate::pipeline::nhsd::{NhsdError, END_USER_ORGANISATION as H};
        use crate::pipeline::policy::PolicyError;
        use crate::pipeline::upstream::UpstreamError;
        let readme = include_str!("../../README.md");
        let auth: AuthConfig = serde_saphyr::from_str("mode: none\n").expect("auth config");
        let nhsd = |e: NhsdError| e.rejection();
        let rows: Vec<(&str, Rejection)> = vec![
            (
                "bad path (dot segments",
                PolicyError::BadPath("x").rejection(),
            ),
            (
                "body over the limit",
                UpstreamError::BodyTooLarge { limit: 1 }.rejection(),
            ),
            (
                "no route / certificate not allowed",
                PolicyError::NoRoute.rejection(),
            ),
            (
                "no route / certificate not allowed",
                PolicyError::RouteForbidden("r".into()).rejection(),
            ),
            (
                "no bearer token",
                AuthError::Missing.refusal(&auth).rejection(),
            ),
            (
                "token invalid, inactive",
                AuthError::InvalidToken("x").refusal(&auth).rejection(),
            ),
            (
                "token lacks the scope",
                AuthError::InsufficientScope { needed: "x".into() }
                    .refusal(&auth)
                    .rejection(),
            ),
            (
                "token in both the `Authorization` header",
                AuthError::InvalidRequest("x").refusal(&auth).rejection(),
            ),
            (
                "authorisation server refuses to introspect",
                AuthError::InvalidToken("x").refusal(&auth).rejection(),
            ),
            (
                "authorisation server down/slow/broken",
                AuthError::Unavailable("x".into())
                    .refusal(&auth)
                    .rejection(),
            ),
            (
                "NHSD header missing",
                nhsd(NhsdError::Missing { header: H }),
            ),
            (
                "`X-Request-ID` / `X-Correlation-ID` missing",
                nhsd(NhsdError::Missing {
                    header: crate::pipeline::nhsd::REQUEST_ID,
                }),
            ),
            (
                "NHSD header not standard Base64",
                nhsd(NhsdError::NotAscii { header: H }),
            ),
            (
                "NHSD header not standard Base64",
                nhsd(NhsdError::Duplicate { header: H }),
            ),
            (
                "decodes to something that is not a JSON object",
                nhsd(NhsdError::Json {
                    header: H,
                    detail: String::new(),
                }),
            ),
            (
                "a field of the wrong JSON type",
                nhsd(NhsdError::WrongType {
                    header: H,
                    field: "x",
                    reason: String::new(),
                }),
            ),
            (
                "NHSD header over `max_encoded_bytes`",
                nhsd(NhsdError::TooLarge {
                    header: H,
                    limit: 1,
                }),
            ),
            (
                "NHSD header field invalid",
                nhsd(NhsdError::InvalidValue {
                    header: H,
                    field: "x",
                    reason: String::new(),
                }),
            ),
            (
                "ODS code / target not on the allow-list",
                nhsd(NhsdError::NotAllowed {
                    header: H,
                    what: "x",
                    value: String::new(),
                    refusal: Default::default(),
                }),
            ),
            ("`CONNECT`", Rejection::method_not_allowed("x")),
            (
                "missing, duplicate or invalid `Host`",
                Rejection::bad_host("x"),
            ),
            (
                "more header fields than `limits.max_headers`",
                Rejection::too_many_headers(1),
            ),
            (
                "header section over `limits.max_header_bytes`",
                Rejection::headers_too_large(1),
            ),
            (
                "request body stalls past its timeout",
                Rejection::body_timeout(),
            ),
            (
                "upstream unreachable or reset",
                UpstreamError::Unavailable.rejection(),
            ),
            (
                "upstream connect/response timeout",
                UpstreamError::Timeout.rejection(),
            ),
            (
                "no route covers the path, with `service_levels.unmatched",
                Rejection::not_implemented(),
            ),
            (
                "within its `service_levels.response_timeout` budget",
                Rejection::budget_timeout(StatusCode::REQUEST_TIMEOUT, "REC_TIMEOUT", 1),
            ),
            (
                "`Accept: application/fhir+json; version=X`",
                Rejection::not_acceptable(&[]),
            ),
            (
                "client over its rate limit",
                Rejection::too_many_requests(1),
            ),
            (
                "client over `limits.max_connections_per_client`",
                Rejection::too_many_connections(1, 1),
            ),
            (
                "certificate of an open connection expired or revoked since",
                Rejection::certificate_lapsed("revoked"),
            ),
        ];
        let start = readme
            .find("| situation | status |")
            .expect("README has the refusal table");
        let table: Vec<&str> = readme[start..]
            .lines()
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .collect();
        assert!(table.len() > 20, "{table:?}");
        // The first backquoted word of a cell: `REC_FORBIDDEN`, `invalid` (`bad_host`).
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        };
        for (row, r) in &rows {
            let line = table
                .iter()
                .find(|l| l.contains(row))
                .unwrap_or_else(|| panic!("README table has no row for {row:?}"));
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // | situation | status | NHS code | issue code |
            assert!(cells[2].starts_with(r.status.as_str()), "{row}: {line}");
            assert_eq!(
                ticked(cells[3]).first().map(String::as_str),
                Some(r.nhs_code),
                "{line}"
            );
            let issue = ticked(cells[4]);
            assert_eq!(issue.first().map(String::as_str), Some(r.issue), "{line}");
            if let Some(reason) = issue.get(1) {
                assert_eq!(reason, r.reason, "{line}");
            }
        }
        for line in &table {
            assert!(
                rows.iter().any(|(row, _)| line.contains(row)),
                "README row not checked against a stage error: {line}"
            );
        }
    }

    #[test]
    fn outcome_has_nhs_coding_and_status() {
        let r = Rejection::upstream_timeout();
        let j = r.to_json();
        assert_eq!(j["resourceType"], "OperationOutcome");
        assert_eq!(j["issue"][0]["code"], "timeout");
        assert_eq!(
            j["issue"][0]["details"]["coding"][0]["system"],
            NHS_ERROR_SYSTEM
        );
        assert_eq!(j["issue"][0]["details"]["coding"][0]["code"], "REC_TIMEOUT");
        // FHIR Coding.display is "a representation of the meaning of the code in the
        // system": the CodeSystem's text or nothing, never one made up here (it used
        // to be "504 - REC_TIMEOUT").
        assert!(
            j["issue"][0]["details"]["coding"][0]
                .get("display")
                .is_none(),
            "{j}"
        );
        let resp = r.into_response();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(resp.headers()[CONTENT_TYPE], FHIR_JSON);
    }

    #[test]
    fn www_authenticate_is_set_only_when_given() {
        let r = Rejection::no_route();
        assert!(r
            .clone()
            .into_response()
            .headers()
            .get(WWW_AUTHENTICATE)
            .is_none());
        let r = r.with_www_authenticate(Some("Bearer realm=\"fhirgate\"".into()));
        assert_eq!(
            r.into_response().headers()[WWW_AUTHENTICATE],
            "Bearer realm=\"fhirgate\""
        );
    }

    /// The auth stage's refusals through [`Refuse`], pinned field by field: the challenge
    /// header follows RFC 6750 §3 ("the resource server MUST include the HTTP
    /// WWW-Authenticate response header field"), and the configured statuses apply.
    #[test]
    fn auth_refusals_keep_their_wire_form_and_blame() {
        use crate::pipeline::auth::{AuthConfig, AuthError};
        let cfg: AuthConfig = serde_saphyr::from_str(
            "mode: none\nrealm: r\ninvalid_token_status: 403\nunavailable_status: 502\n",
        )
        .expect("auth config");
        type Want = (
            u16,
            &'static str,
            &'static str,
            &'static str,
            Option<&'static str>,
        );
        let cases: Vec<(AuthError, Want, ErrorSource)> =
            vec![
            (
                AuthError::Missing,
                (401, "login", "REC_UNAUTHORIZED", "token_missing", Some("Bearer realm=\"r\"")),
                ErrorSource::Client,
            ),
            (
                AuthError::InvalidToken("expired"),
                (
                    403,
                    "forbidden",
                    "REC_FORBIDDEN",
                    "token_invalid",
                    Some("Bearer realm=\"r\", error=\"invalid_token\""),
                ),
                ErrorSource::Client,
            ),
            (
                AuthError::InvalidRequest("two methods"),
                (
                    400,
                    "invalid",
                    "REC_BAD_REQUEST",
                    "token_invalid_request",
                    Some("Bearer realm=\"r\", error=\"invalid_request\""),
                ),
                ErrorSource::Client,
            ),
            (
                AuthError::InsufficientScope {
                    needed: "system/*.read".into(),
                },
                (
                    403,
                    "forbidden",
                    "REC_FORBIDDEN",
                    "token_scope",
                    Some(
                        "Bearer realm=\"r\", error=\"insufficient_scope\", scope=\"system/*.read\"",
                    ),
                ),
                ErrorSource::Client,
            ),
            (
                AuthError::Unavailable("down".into()),
                (
                    502,
                    "transient",
                    "REC_SERVICE_UNAVAILABLE",
                    "token_unverifiable",
                    None,
                ),
                ErrorSource::Internal,
            ),
        ];
        for (e, (status, issue, code, reason, challenge), blame) in cases {
            let refusal = e.refusal(&cfg);
            let r = refusal.rejection();
            assert_eq!(r.status.as_u16(), status, "{e:?}");
            assert_eq!(
                (r.issue, r.nhs_code, r.reason),
                (issue, code, reason),
                "{e:?}"
            );
            assert_eq!(refusal.reason(), reason);
            assert_eq!(r.diagnostics, e.to_string());
            assert_eq!(r.www_authenticate.as_deref(), challenge, "{e:?}");
            assert_eq!(refusal.source(), blame, "{e:?}");
        }
        // With `invalid_token_status: 401` (RFC 6750's own status), a login problem.
        let rfc: AuthConfig =
            serde_saphyr::from_str("mode: none\ninvalid_token_status: 401\n").expect("auth config");
        let r = AuthError::InvalidToken("x").refusal(&rfc).rejection();
        assert_eq!(
            (r.status.as_u16(), r.issue, r.nhs_code),
            (401, "login", "REC_UNAUTHORIZED")
        );
    }

    #[test]
    fn from_parts_maps_bad_status_to_500() {
        let r = Rejection::from_parts(42, "invalid", "REC_BAD_REQUEST", "x", "d");
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
