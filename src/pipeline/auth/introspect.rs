//! RFC 7662 introspection and RFC 8414 / OpenID discovery, over a pooled client.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Deserializer};

use super::client_auth::ClientCredential;
use super::AuthConfig;
use crate::config::error::ConfigError;
use crate::tls::client_connector;

/// Largest response body read from the authorisation server.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IntrospectError {
    #[error("introspection endpoint not known yet (discovery pending)")]
    NoEndpoint,
    #[error("too many introspections in flight")]
    Busy,
    #[error("authorisation server timed out")]
    Timeout,
    #[error("authorisation server unreachable: {0}")]
    Transport(String),
    #[error("authorisation server answered HTTP {0}")]
    Status(u16),
    #[error("authorisation server answered malformed JSON: {0}")]
    Malformed(String),
    #[error("discovery failed: {0}")]
    Discovery(String),
    #[error("{0}")]
    Credential(String),
    /// RFC 6749 §5.2-style 400 answer about the token (`unsupported_token_type`,
    /// `invalid_request`, …): a verdict on the token, not an outage.
    #[error("authorisation server refused the token: {0}")]
    Refused(String),
    /// 401/403, or 400 `invalid_client`/`unauthorized_client`: the authorisation server
    /// rejects the gateway's own credentials. A misconfiguration, not the client's fault.
    #[error("authorisation server rejected the gateway's own client credentials (HTTP {status}, error {error}): check auth.client_auth and the client registration")]
    ClientRejected { status: u16, error: String },
}

impl IntrospectError {
    fn retryable(&self) -> bool {
        matches!(self, IntrospectError::Transport(_))
            || matches!(self, IntrospectError::Status(s) if *s >= 500)
    }
}

/// The RFC 7662 response members the gateway uses.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Introspection {
    pub active: bool,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub exp: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub iat: Option<i64>,
    #[serde(default, deserialize_with = "numeric_date")]
    pub nbf: Option<i64>,
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub aud: Vec<String>,
    /// RFC 6749 token type (`Bearer`); anything else is a proof-of-possession scheme.
    #[serde(default)]
    pub token_type: Option<String>,
    /// RFC 7800 confirmation: the key the token is bound to (RFC 8705 `x5t#S256` for a
    /// client certificate, RFC 9449 `jkt` for DPoP).
    #[serde(default)]
    pub cnf: Option<serde_json::Map<String, serde_json::Value>>,
    /// Set by `jwt` mode, whose answer rests on the key set held, which may be fetched
    /// again sooner than the cache would keep it: the verdict is cached no longer.
    #[serde(skip)]
    pub holds_for: Option<std::time::Duration>,
}

/// NumericDate: seconds, possibly with a fraction (RFC 7519 §2).
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v: Option<f64> = Option::deserialize(d)?;
    Ok(v.filter(|f| f.is_finite()).map(|f| f.floor() as i64))
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

/// Parses an introspection response body. `active` must be present and boolean.
pub fn parse_introspection(body: &[u8]) -> Result<Introspection, IntrospectError> {
    serde_json::from_slice(body).map_err(|e| IntrospectError::Malformed(e.to_string()))
}

#[derive(Debug, Deserialize)]
struct Metadata {
    issuer: String,
    #[serde(default)]
    introspection_endpoint: Option<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
}

/// Endpoints learnt from discovery (or configured).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub introspection: Option<String>,
    pub jwks_uri: Option<String>,
}

/// Client for the authorisation server.
#[derive(Clone)]
pub struct AsClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The gateway's own client credential; not needed for JWKS-only (`jwt`) mode.
    credential: Option<Arc<ClientCredential>>,
    issuer: Option<String>,
    timeout: Duration,
    retries: u32,
    backoff: Duration,
}

impl AsClient {
    pub fn new(cfg: &AuthConfig) -> Result<Self, ConfigError> {
        let credential = match &cfg.client_auth {
            Some(c) => Some(Arc::new(ClientCredential::from_config(c)?)),
            None => None,
        };
        let https = client_connector("auth", cfg.ca_file.as_deref(), None, cfg.timeout, false)?;
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_timer(TokioTimer::new())
            .build(https);
        Ok(AsClient {
            http,
            credential,
            issuer: cfg.issuer.clone(),
            timeout: cfg.timeout,
            retries: cfg.retries,
            backoff: cfg.retry_backoff,
        })
    }

    /// Introspects `token`, retrying transport errors and 5xx with backoff, all within
    /// the configured timeout.
    pub async fn introspect(
        &self,
        endpoint: &str,
        token: &str,
    ) -> Result<Introspection, IntrospectError> {
        let deadline = Instant::now() + self.timeout;
        let mut attempt = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let result = match tokio::time::timeout(left, self.post(endpoint, token)).await {
                Ok(r) => r,
                Err(_) => Err(IntrospectError::Timeout),
            };
            match result {
                Err(e) if e.retryable() && attempt < self.retries => {
                    attempt += 1;
                    let wait = self.backoff * 2u32.saturating_pow(attempt - 1);
                    if Instant::now() + wait >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    async fn post(&self, endpoint: &str, token: &str) -> Result<Introspection, IntrospectError> {
        let credential = self
            .credential
            .as_ref()
            .ok_or_else(|| IntrospectError::Credential("no client_auth configured".into()))?;
        let (auth, extra) = credential
            .apply(endpoint, self.issuer.as_deref())
            .map_err(IntrospectError::Credential)?;
        // Built in one expression: the serializer is not Send and must not live across
        // an await.
        let form = {
            let mut f = form_urlencoded::Serializer::new(String::new());
            f.append_pair("token", token);
            f.append_pair("token_type_hint", "access_token");
            for (k, v) in &extra {
                f.append_pair(k, v);
            }
            f.finish()
        };
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(endpoint)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(header::ACCEPT, "application/json");
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| IntrospectError::Transport(e.to_string()))?;
        let (status, body) = self.send_raw(req).await?;
        if status != StatusCode::OK {
            return Err(classify_refusal(status.as_u16(), &body));
        }
        parse_introspection(&body)
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Result<Bytes, IntrospectError> {
        let (status, body) = self.send_raw(req).await?;
        if status != StatusCode::OK {
            return Err(IntrospectError::Status(status.as_u16()));
        }
        Ok(body)
    }

    async fn send_raw(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), IntrospectError> {
        let resp =
            self.http.request(req).await.map_err(|e| {
                IntrospectError::Transport(crate::pipeline::upstream::error_chain(&e))
            })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| IntrospectError::Transport(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    /// GETs a JSON document (JWKS), bounded in size and time.
    pub async fn get_json(&self, url: &str) -> Result<Bytes, IntrospectError> {
        let req = Request::get(url)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| IntrospectError::Transport(e.to_string()))?;
        tokio::time::timeout(self.timeout, self.send(req))
            .await
            .map_err(|_| IntrospectError::Timeout)?
    }

    /// ITI-103: reads `{issuer}/.well-known/openid-configuration`. The metadata's
    /// `issuer` must equal the configured one.
    pub async fn discover(&self, issuer: &str) -> Result<Endpoints, IntrospectError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let req = Request::get(url)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| IntrospectError::Discovery(e.to_string()))?;
        let body = tokio::time::timeout(self.timeout, self.send(req))
            .await
            .map_err(|_| IntrospectError::Timeout)??;
        endpoints(&body, issuer)
    }
}

/// The endpoints an ITI-103 metadata document gives, held to the rules configured ones
/// are: its `issuer` must be the configured one, and a learned endpoint must be https
/// (or loopback), as tokens, the gateway's credentials and the keys travel over it.
fn endpoints(body: &[u8], issuer: &str) -> Result<Endpoints, IntrospectError> {
    let meta: Metadata =
        serde_json::from_slice(body).map_err(|e| IntrospectError::Discovery(e.to_string()))?;
    if meta.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
        return Err(IntrospectError::Discovery(format!(
            "metadata issuer {:?} differs from the configured issuer",
            meta.issuer
        )));
    }
    for (field, url) in [
        ("introspection_endpoint", &meta.introspection_endpoint),
        ("jwks_uri", &meta.jwks_uri),
    ] {
        if let Some(u) = url {
            super::secure_url(u).map_err(|why| {
                IntrospectError::Discovery(format!("metadata {field} {u:?}: {why}"))
            })?;
        }
    }
    Ok(Endpoints {
        introspection: meta.introspection_endpoint,
        jwks_uri: meta.jwks_uri,
    })
}

/// The `error` code of an RFC 6749 §5.2 error response, if the body is one (the code is
/// limited to the characters §5.2 allows, so it is safe to log).
fn oauth_error(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let e: ErrorBody = serde_json::from_slice(body).ok()?;
    let valid = !e.error.is_empty()
        && e.error.len() <= 64
        && e.error
            .bytes()
            .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5b | 0x5d..=0x7e));
    valid.then_some(e.error)
}

/// Classifies a non-200 introspection answer. Only 5xx (and unexpected statuses) are
/// outages; RFC 7662 §2.3 says invalid gateway credentials get 401, and RFC 6749 §5.2
/// lets a server answer `invalid_client` with 400; any other 400 with an OAuth error
/// code is about the token. A 400 without one is a malformed answer.
pub fn classify_refusal(status: u16, body: &[u8]) -> IntrospectError {
    let error = oauth_error(body);
    match (status, error) {
        (401 | 403, e) => IntrospectError::ClientRejected {
            status,
            error: e.unwrap_or_else(|| "-".into()),
        },
        (400, Some(e)) if e == "invalid_client" || e == "unauthorized_client" => {
            IntrospectError::ClientRejected { status, error: e }
        }
        (400, Some(e)) => IntrospectError::Refused(e),
        (400, None) => IntrospectError::Malformed("HTTP 400 without an RFC 6749 error code".into()),
        (s, _) => IntrospectError::Status(s),
    }
}

/// Logs a rejected gateway credential at ERROR, at most once per 10 s (every request
/// with an uncached token would otherwise log it).
pub fn log_client_rejected(e: &IntrospectError) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = super::cache::unix_now().max(0) as u64;
    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < 10 {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if LAST
        .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
        .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Ordering::Relaxed);
        tracing::error!(target: "fhirgate::auth", error = %e, suppressed, "MISCONFIGURATION: the authorisation server rejects the gateway's client credentials; every uncached token gets 503 until this is fixed");
    }
}

/// Runs discovery until it succeeds (every 2 s at first, backing off to 60 s), then
/// refreshes every `refresh`. Stops when the owning authoriser is dropped (on reload).
pub fn spawn_discovery(
    client: AsClient,
    issuer: String,
    refresh: Duration,
    target: Weak<ArcSwapOption<Endpoints>>,
) {
    tokio::spawn(async move {
        let mut retry = Duration::from_secs(2);
        loop {
            let result = client.discover(&issuer).await;
            let Some(slot) = target.upgrade() else { return };
            let wait = match result {
                Ok(found) => {
                    if slot.load().as_deref() != Some(&found) {
                        tracing::info!(target: "fhirgate::auth", %issuer, introspection = ?found.introspection, jwks_uri = ?found.jwks_uri, "discovered authorisation server endpoints");
                    }
                    slot.store(Some(Arc::new(found)));
                    retry = Duration::from_secs(2);
                    refresh
                }
                Err(e) => {
                    // Keep the last good endpoint (if any) and try again soon.
                    tracing::warn!(target: "fhirgate::auth", %issuer, error = %e, "discovery failed");
                    let w = retry;
                    retry = (retry * 2).min(Duration::from_secs(60));
                    w
                }
            };
            drop(slot);
            tokio::time::sleep(wait).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6750 §5.3: "Clients MUST always use TLS [RFC5246] (https) or equivalent
    /// transport security when making requests with bearer tokens." An endpoint learned
    /// from metadata gets the tokens (introspection) or decides which signatures count
    /// (JWKS), so it is held to the rule configured endpoints are.
    #[test]
    fn discovered_endpoints_must_be_https_or_loopback() {
        let meta = |intro: &str, jwks: &str| {
            serde_json::json!({"issuer": "https://as.example", "introspection_endpoint": intro, "jwks_uri": jwks})
                .to_string()
        };
        let ok = endpoints(
            meta("https://as.example/introspect", "https://as.example/jwks").as_bytes(),
            "https://as.example/",
        )
        .unwrap();
        assert_eq!(ok.jwks_uri.as_deref(), Some("https://as.example/jwks"));
        for (intro, jwks) in [
            ("http://127.0.0.1:8080/introspect", "http://[::1]:8080/jwks"),
            ("http://localhost/introspect", "https://as.example/jwks"),
        ] {
            assert!(
                endpoints(meta(intro, jwks).as_bytes(), "https://as.example").is_ok(),
                "{intro} {jwks}"
            );
        }
        for (intro, jwks, names) in [
            (
                "https://as.example/introspect",
                "http://as.internal/jwks",
                "jwks_uri",
            ),
            (
                "http://as.example/introspect",
                "https://as.example/jwks",
                "introspection_endpoint",
            ),
            (
                "ftp://as.example/introspect",
                "https://as.example/jwks",
                "introspection_endpoint",
            ),
        ] {
            match endpoints(meta(intro, jwks).as_bytes(), "https://as.example") {
                Err(IntrospectError::Discovery(why)) => assert!(why.contains(names), "{why}"),
                other => panic!("{intro} {jwks}: {other:?}"),
            }
        }
        // Another issuer's metadata is refused whatever its endpoints.
        assert!(matches!(
            endpoints(
                meta("https://as.example/introspect", "https://as.example/jwks").as_bytes(),
                "https://other.example"
            ),
            Err(IntrospectError::Discovery(_))
        ));
    }

    #[test]
    fn non_200_answers_are_classified() {
        let body = |e: &str| format!("{{\"error\":\"{e}\",\"error_description\":\"x\"}}");
        // oidc-provider's answer to a JWT presented for introspection.
        assert_eq!(
            classify_refusal(400, body("unsupported_token_type").as_bytes()),
            IntrospectError::Refused("unsupported_token_type".into())
        );
        assert_eq!(
            classify_refusal(400, body("invalid_request").as_bytes()),
            IntrospectError::Refused("invalid_request".into())
        );
        for (status, e) in [
            (401, "invalid_client"),
            (400, "invalid_client"),
            (403, "access_denied"),
        ] {
            assert!(matches!(
                classify_refusal(status, body(e).as_bytes()),
                IntrospectError::ClientRejected { .. }
            ));
        }
        assert!(matches!(
            classify_refusal(401, b"nope"),
            IntrospectError::ClientRejected { .. }
        ));
        assert!(matches!(
            classify_refusal(400, b"<html>"),
            IntrospectError::Malformed(_)
        ));
        assert!(matches!(
            classify_refusal(400, body("bad\\u0000code").as_bytes()),
            IntrospectError::Malformed(_)
        ));
        assert_eq!(classify_refusal(502, b""), IntrospectError::Status(502));
        assert_eq!(classify_refusal(404, b""), IntrospectError::Status(404));
        assert!(IntrospectError::Status(503).retryable());
        assert!(!IntrospectError::Refused("x".into()).retryable());
    }

    #[test]
    fn parses_rfc7662_responses() {
        let i = parse_introspection(
            br#"{"active":true,"scope":"system/*.* openid","client_id":"c1","sub":"s","exp":1900000000.5,"iat":1,"nbf":1,"iss":"https://as","aud":"fhir"}"#,
        )
        .unwrap();
        assert!(i.active);
        assert_eq!(i.exp, Some(1_900_000_000));
        assert_eq!(i.aud, vec!["fhir".to_string()]);
        let i = parse_introspection(br#"{"active":true,"aud":["a","b"]}"#).unwrap();
        assert_eq!(i.aud.len(), 2);
        assert!(!parse_introspection(br#"{"active":false}"#).unwrap().active);
        for bad in [
            &b"{}"[..],
            b"{\"active\":\"true\"}",
            b"not json",
            b"[]",
            b"{\"active\":true,\"exp\":\"soon\"}",
            b"{\"active\":true,\"aud\":5}",
        ] {
            assert!(
                matches!(parse_introspection(bad), Err(IntrospectError::Malformed(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
