//! Bearer tokens: RFC 6750 extraction, RFC 7662 introspection (IHE IUA ITI-102) with
//! discovery (ITI-103), a cache, and SMART on FHIR scope checks.
//!
//! Fail closed: a token the gateway cannot verify right now (authorisation server down,
//! slow, or answering nonsense) is refused with 503; only tokens already verified and
//! cached keep working. Tokens are never logged or used as cache keys: both use a SHA-256
//! of the token.

pub mod bearer;
pub mod cache;
pub mod client_auth;
pub mod introspect;
pub mod jwt;
pub mod scope;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::config::error::{err, ConfigError};
use crate::metrics::Metrics;
use crate::pipeline::outcome::{ErrorSource, Refuse, Rejection};
use cache::{CachedToken, TokenCache};
use introspect::{AsClient, Endpoints, Introspection};
use jwt::JwtVerifier;
use scope::{Context, Requirement};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Every request needs a token the authorisation server says is active.
    Introspection,
    /// JWT access tokens validated locally against the server's JWKS.
    Jwt,
    /// No token checks at all (the regional guide's "unrestricted access" development
    /// mode). Refused when `environment: production`; logged loudly.
    Development,
    /// No route checks tokens: the BaRS receiver model, where the sender is authorised by
    /// TLS-MA and the NHSD headers. A route with `token: required` is a config error, so
    /// this cannot silently turn checks off the way `development` does.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// RFC 6749 §2.3.1: HTTP Basic with the form-encoded client id and secret.
    ClientSecretBasic,
    /// RFC 7523: a short-lived JWT signed with the gateway's private key.
    PrivateKeyJwt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientAuthConfig {
    pub method: ClientAuthMethod,
    pub client_id: String,
    /// File holding the client secret (first line); preferred over the environment.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// PEM (PKCS#8) private key for `private_key_jwt`.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    #[serde(default)]
    pub key_id: Option<String>,
    /// `ES256` (default), `RS256` or `PS256`.
    #[serde(default = "default_alg")]
    pub algorithm: String,
}

fn default_alg() -> String {
    "ES256".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub max_capacity: u64,
    /// Longest a positive result is trusted, even if the token lives longer.
    #[serde(with = "crate::config::duration")]
    pub max_ttl: Duration,
    /// How long an `active: false` answer is remembered.
    #[serde(with = "crate::config::duration")]
    pub negative_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_capacity: 100_000,
            max_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Issuer URL: endpoints are discovered from `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Explicit introspection endpoint (instead of, or overriding, discovery).
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
    /// Explicit JWKS URL for `jwt` mode (instead of discovery).
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Shortest time between two JWKS fetches triggered by unknown `kid`s.
    #[serde(default = "default_min_refetch", with = "crate::config::duration")]
    pub jwks_min_refetch: Duration,
    /// How long a fetched JWKS is used before it is fetched again, so that a key the
    /// server withdraws stops verifying tokens (RFC 9068 §4).
    #[serde(default = "default_jwks_max_age", with = "crate::config::duration")]
    pub jwks_max_age: Duration,
    /// Signature algorithms accepted in `jwt` mode.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// PEM CA bundle for HTTPS to the authorisation server.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_auth: Option<ClientAuthConfig>,
    /// When set, the introspection `iss` must equal it.
    #[serde(default)]
    pub expected_issuer: Option<String>,
    /// When set, the introspection `aud` must contain it.
    #[serde(default)]
    pub expected_audience: Option<String>,
    /// `jwt` mode: also accept tokens whose JOSE `typ` is `JWT` or absent, and without
    /// the RFC 9068 §2.2 claims `sub`, `client_id`, `iat`, `jti` (issuers that predate
    /// RFC 9068). Off: only `at+jwt` / `application/at+jwt` tokens carrying them.
    #[serde(default)]
    pub accept_legacy_jwt_typ: bool,
    /// Status for invalid, inactive or expired tokens: 403 (regional IUA guide) or 401.
    #[serde(default = "default_invalid_status")]
    pub invalid_token_status: u16,
    /// Status when a token cannot be verified because the authorisation server failed.
    #[serde(default = "default_unavailable_status")]
    pub unavailable_status: u16,
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Scope contexts that count (`system` for application-restricted BaRS).
    #[serde(default = "default_contexts")]
    pub contexts: Vec<String>,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    /// Extra attempts after a transport error or 5xx, within `timeout`.
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_backoff", with = "crate::config::duration")]
    pub retry_backoff: Duration,
    /// Introspection calls in flight at once; further callers wait up to `timeout`.
    #[serde(default = "default_concurrency")]
    pub max_concurrent_introspections: usize,
    #[serde(
        default = "default_discovery_refresh",
        with = "crate::config::duration"
    )]
    pub discovery_refresh: Duration,
}

fn default_min_refetch() -> Duration {
    Duration::from_secs(10)
}
fn default_jwks_max_age() -> Duration {
    Duration::from_secs(300)
}
fn default_algorithms() -> Vec<String> {
    jwt::DEFAULT_ALGORITHMS
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_invalid_status() -> u16 {
    403
}
fn default_unavailable_status() -> u16 {
    503
}
fn default_realm() -> String {
    "fhirgate".into()
}
fn default_contexts() -> Vec<String> {
    vec!["system".into()]
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_retries() -> u32 {
    2
}
fn default_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_concurrency() -> usize {
    64
}
fn default_discovery_refresh() -> Duration {
    Duration::from_secs(3600)
}

impl AuthConfig {
    pub fn validate(&self, production: bool) -> Result<(), ConfigError> {
        // Checked in every mode: NHSD allow-list refusals (`refusal: unauthorized`) carry
        // the challenge with `auth.mode: none` too. It is written into a quoted-string
        // (RFC 9110 §11.2, §5.6.4), and a value outside one made every 401 go without its
        // WWW-Authenticate, which RFC 9110 §15.5.2 says it MUST carry.
        if self.realm.contains(['"', '\\'])
            || self.realm.chars().any(|c| c.is_control() && c != '\t')
        {
            return Err(err(
                "auth.realm",
                "must not contain quotes, backslashes or control characters (it is sent as \
                 WWW-Authenticate: Bearer realm=\"…\")",
            ));
        }
        if self.mode == AuthMode::None {
            return Ok(());
        }
        if self.mode == AuthMode::Development {
            if production {
                return Err(err(
                    "auth.mode",
                    "development (no token checks) is refused when environment is production",
                ));
            }
            return Ok(());
        }
        let explicit = match self.mode {
            AuthMode::Jwt => &self.jwks_uri,
            _ => &self.introspection_endpoint,
        };
        if self.issuer.is_none() && explicit.is_none() {
            return Err(err(
                "auth.issuer",
                "set issuer (discovery) or the endpoint itself (introspection_endpoint / jwks_uri)",
            ));
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            if jwt::parse_algorithm(a).is_none() {
                return Err(err(
                    format!("auth.algorithms[{i}]"),
                    format!("{a:?} is not an accepted asymmetric algorithm (RS/PS/ES*, EdDSA)"),
                ));
            }
        }
        for (field, url) in [
            ("auth.issuer", &self.issuer),
            ("auth.introspection_endpoint", &self.introspection_endpoint),
            ("auth.jwks_uri", &self.jwks_uri),
        ] {
            if let Some(u) = url {
                secure_url(u).map_err(|why| err(field, why))?;
            }
        }
        let ca = self.ca_file.as_ref();
        if let Some(p) = ca {
            std::fs::File::open(p)
                .map_err(|e| err("auth.ca_file", format!("{}: {e}", p.display())))?;
        }
        let Some(c) = &self.client_auth else {
            if self.mode == AuthMode::Jwt {
                return self.validate_common();
            }
            return Err(err(
                "auth.client_auth",
                "required: the gateway authenticates itself to the introspection endpoint",
            ));
        };
        if c.client_id.trim().is_empty() {
            return Err(err("auth.client_auth.client_id", "must not be empty"));
        }
        match c.method {
            ClientAuthMethod::ClientSecretBasic => {
                if c.client_secret_file.is_none() && c.client_secret_env.is_none() {
                    return Err(err(
                        "auth.client_auth.client_secret_file",
                        "set client_secret_file or client_secret_env (secrets are never inline)",
                    ));
                }
            }
            ClientAuthMethod::PrivateKeyJwt => {
                let Some(p) = &c.private_key_file else {
                    return Err(err(
                        "auth.client_auth.private_key_file",
                        "required for private_key_jwt",
                    ));
                };
                std::fs::File::open(p).map_err(|e| {
                    err(
                        "auth.client_auth.private_key_file",
                        format!("{}: {e}", p.display()),
                    )
                })?;
                if !matches!(c.algorithm.as_str(), "ES256" | "RS256" | "PS256") {
                    return Err(err(
                        "auth.client_auth.algorithm",
                        "must be ES256, RS256 or PS256",
                    ));
                }
            }
        }
        self.validate_common()
    }

    /// SMART "Scopes and Launch Context": with a `patient` launch context, "patient-level
    /// scopes ... will be scoped to" that patient. The gateway does not know which
    /// resources are in a patient's compartment, so a `patient/` scope would open every
    /// patient's records here: refused outside `environment: development`.
    pub fn validate_contexts(&self, development: bool) -> Result<(), ConfigError> {
        if development || self.mode == AuthMode::None {
            return Ok(());
        }
        match self.contexts.iter().position(|c| c == "patient") {
            Some(i) => Err(err(
                format!("auth.contexts[{i}]"),
                "patient is refused outside environment: development: the gateway cannot confine \
                 patient/ scopes to the launch patient's compartment, so they would grant every \
                 patient's records; use system (or user), or enforce patient scopes upstream",
            )),
            None => Ok(()),
        }
    }

    /// RFC 9068 §4: a resource server validating JWT access tokens MUST check `iss` and
    /// `aud`. Without both, any token the JWKS signed (an ID token, a token for another
    /// API) would pass, so both are required outside `environment: development`.
    pub fn validate_jwt_claims(&self, development: bool) -> Result<(), ConfigError> {
        if self.mode != AuthMode::Jwt || development {
            return Ok(());
        }
        if self.expected_issuer.is_none() {
            return Err(err(
                "auth.expected_issuer",
                "required with mode: jwt outside environment: development (RFC 9068 §4: the iss claim MUST be checked); set it to the authorisation server's issuer identifier",
            ));
        }
        if self.expected_audience.is_none() {
            return Err(err(
                "auth.expected_audience",
                "required with mode: jwt outside environment: development (RFC 9068 §4: the aud claim MUST be checked); set it to this API's resource identifier",
            ));
        }
        Ok(())
    }

    fn validate_common(&self) -> Result<(), ConfigError> {
        if !matches!(self.invalid_token_status, 401 | 403) {
            return Err(err("auth.invalid_token_status", "must be 401 or 403"));
        }
        if !(500..=599).contains(&self.unavailable_status) {
            return Err(err("auth.unavailable_status", "must be a 5xx status"));
        }
        if self.contexts.is_empty() {
            return Err(err(
                "auth.contexts",
                "at least one of system, user, patient",
            ));
        }
        for (i, c) in self.contexts.iter().enumerate() {
            if Context::parse(c).is_none() {
                return Err(err(
                    format!("auth.contexts[{i}]"),
                    "must be system, user or patient",
                ));
            }
        }
        if self.timeout.is_zero() {
            return Err(err("auth.timeout", "must be greater than zero"));
        }
        if self.max_concurrent_introspections == 0 {
            return Err(err(
                "auth.max_concurrent_introspections",
                "must be greater than zero",
            ));
        }
        if self.cache.max_ttl.is_zero() {
            return Err(err("auth.cache.max_ttl", "must be greater than zero"));
        }
        // These bound how often the authorisation server is called: zero would mean
        // without pause (discovery in a loop, a JWKS fetch per unknown kid or request).
        for (field, d, default) in [
            (
                "auth.discovery_refresh",
                self.discovery_refresh,
                default_discovery_refresh(),
            ),
            (
                "auth.jwks_min_refetch",
                self.jwks_min_refetch,
                default_min_refetch(),
            ),
            (
                "auth.jwks_max_age",
                self.jwks_max_age,
                default_jwks_max_age(),
            ),
        ] {
            if d.is_zero() {
                return Err(err(
                    field,
                    format!(
                        "must be greater than zero (0 calls the authorisation server without \
                         pause); remove it for the default, {}",
                        humantime_serde::re::humantime::format_duration(default)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Where the gateway may send tokens and its own credentials, or fetch keys from: https,
/// or plain http where nothing can listen in, loopback (RFC 6750 §5.3: bearer tokens
/// MUST travel over TLS). For configured URLs and those discovery learns alike.
pub(crate) fn secure_url(u: &str) -> Result<(), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("not a URL: {e}"))?;
    crate::config::error::no_userinfo(&uri)?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if is_loopback(&uri) => Ok(()),
        Some("http") => Err("must be https (http is allowed on loopback only)".into()),
        _ => Err("must be an http(s) URL".into()),
    }
}

fn is_loopback(uri: &http::Uri) -> bool {
    match uri.host() {
        Some("localhost") => true,
        Some(h) => h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// What a verified token says, forwarded upstream and logged. Built once per cache
/// entry and shared (`Arc`) by every request that presents the token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFacts {
    pub client_id: Option<String>,
    pub sub: Option<String>,
    pub scope: String,
    /// First 16 hex digits of the token's SHA-256: safe to log, useful to correlate.
    pub token_hash: String,
    /// Unix seconds, when the server said.
    pub exp: Option<i64>,
    /// Development mode: nothing was checked.
    pub development: bool,
    /// RFC 8705: the token is bound to the client certificate with this SHA-256
    /// thumbprint (lower-case hex), and is refused on any other connection.
    pub bound_cert_sha256: Option<String>,
    /// [`upstream_headers`] as header values, built with the facts rather than for
    /// every request; set only by [`TokenFacts::sealed`], so they always match.
    upstream: Vec<(HeaderName, HeaderValue)>,
}

impl TokenFacts {
    /// The facts with their upstream headers built, shared from then on.
    pub fn sealed(mut self) -> Arc<Self> {
        self.upstream = upstream_headers(&self)
            .into_iter()
            .map(|(n, v)| {
                (
                    HeaderName::from_static(n),
                    crate::pipeline::forward::header_value(v),
                )
            })
            .collect();
        Arc::new(self)
    }

    /// The headers the upstream gets for this token ([`upstream_headers`], encoded).
    pub fn upstream(&self) -> &[(HeaderName, HeaderValue)] {
        &self.upstream
    }
}

/// Headers set upstream from a verified token (all under the reserved `x-fhirgate-`
/// prefix, so client copies are stripped first).
pub fn upstream_headers(f: &TokenFacts) -> Vec<(&'static str, &str)> {
    let mut v: Vec<(&'static str, &str)> = Vec::new();
    if f.development {
        v.push(("x-fhirgate-auth", "development"));
        return v;
    }
    if let Some(c) = &f.client_id {
        v.push(("x-fhirgate-client-id", c));
    }
    if let Some(s) = &f.sub {
        v.push(("x-fhirgate-sub", s));
    }
    if !f.scope.is_empty() {
        v.push(("x-fhirgate-scopes", &f.scope));
    }
    v
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("No bearer token was presented")]
    Missing,
    #[error("The bearer token is not valid: {0}")]
    InvalidToken(&'static str),
    /// RFC 6750 §3.1 `invalid_request`, e.g. a token sent by more than one method.
    #[error("{0}")]
    InvalidRequest(&'static str),
    #[error("The token does not grant the scope this request needs ({needed})")]
    InsufficientScope { needed: String },
    #[error("The token could not be verified now; try again later")]
    Unavailable(String),
}

impl AuthError {
    /// This error with the settings its refusal depends on (realm, configured statuses).
    pub fn refusal<'a>(&'a self, cfg: &'a AuthConfig) -> AuthRefusal<'a> {
        AuthRefusal { error: self, cfg }
    }
}

/// An [`AuthError`] bound to the [`AuthConfig`] that shapes its response: the refusal as
/// an OperationOutcome, with `WWW-Authenticate` per RFC 6750 §3.
pub struct AuthRefusal<'a> {
    error: &'a AuthError,
    cfg: &'a AuthConfig,
}

impl Refuse for AuthRefusal<'_> {
    fn rejection(&self) -> Rejection {
        let (cfg, diag) = (self.cfg, self.error.to_string());
        match self.error {
            AuthError::Missing => Rejection::token_missing(&cfg.realm, diag),
            AuthError::InvalidToken(_) => {
                Rejection::token_invalid(cfg.invalid_token_status, &cfg.realm, diag)
            }
            AuthError::InvalidRequest(_) => Rejection::token_invalid_request(&cfg.realm, diag),
            AuthError::InsufficientScope { needed } => {
                Rejection::token_scope(&cfg.realm, needed, diag)
            }
            AuthError::Unavailable(_) => {
                Rejection::token_unverifiable(cfg.unavailable_status, diag)
            }
        }
    }

    fn source(&self) -> ErrorSource {
        match self.error {
            // The authorisation server, a service the gateway depends on.
            AuthError::Unavailable(_) => ErrorSource::Internal,
            _ => ErrorSource::Client,
        }
    }
}

/// The token stage.
pub struct Authoriser {
    cfg: AuthConfig,
    contexts: Vec<Context>,
    client: Option<AsClient>,
    /// Endpoints once known (explicit, or discovered).
    endpoints: Arc<ArcSwapOption<Endpoints>>,
    jwt: Option<JwtVerifier>,
    cache: TokenCache,
    permits: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    /// `fhirgate_token_cache_total{result="hit"}` and `{result="miss"}`, resolved once.
    cache_hits: Counter,
    cache_misses: Counter,
    /// What development mode says of every request.
    development: Arc<TokenFacts>,
}

impl Authoriser {
    /// Builds the stage. With `issuer` set and no explicit endpoint, discovery runs in the
    /// background (retrying until it works, then refreshing); until then requests fail
    /// closed with 503.
    pub fn new(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        let contexts = cfg
            .contexts
            .iter()
            .filter_map(|c| Context::parse(c))
            .collect();
        let explicit = Endpoints {
            introspection: cfg.introspection_endpoint.clone(),
            jwks_uri: cfg.jwks_uri.clone(),
        };
        let needed_known = match cfg.mode {
            AuthMode::Jwt => explicit.jwks_uri.is_some(),
            _ => explicit.introspection.is_some(),
        };
        let endpoints = Arc::new(ArcSwapOption::from(
            needed_known.then(|| Arc::new(explicit)),
        ));
        let client = match cfg.mode {
            AuthMode::Development | AuthMode::None => None,
            AuthMode::Introspection | AuthMode::Jwt => Some(AsClient::new(cfg)?),
        };
        let jwt = (cfg.mode == AuthMode::Jwt).then(|| {
            let algs = cfg
                .algorithms
                .iter()
                .filter_map(|a| jwt::parse_algorithm(a))
                .collect();
            JwtVerifier::new(
                algs,
                cfg.expected_issuer.clone(),
                cfg.expected_audience.clone(),
                cfg.jwks_min_refetch,
            )
            .key_set_max_age(cfg.jwks_max_age)
            .accept_legacy_typ(cfg.accept_legacy_jwt_typ)
        });
        let cache_counter = |result: &str| {
            metrics
                .token_cache
                .get_or_create(&crate::metrics::ResultLabel {
                    result: result.into(),
                })
                .clone()
        };
        let a = Authoriser {
            cache_hits: cache_counter("hit"),
            cache_misses: cache_counter("miss"),
            development: TokenFacts {
                development: true,
                ..TokenFacts::default()
            }
            .sealed(),
            cache: TokenCache::new(&cfg.cache),
            permits: Arc::new(Semaphore::new(cfg.max_concurrent_introspections.max(1))),
            cfg: cfg.clone(),
            contexts,
            client,
            endpoints,
            jwt,
            metrics,
        };
        if !needed_known {
            if let (Some(issuer), Some(client)) = (&cfg.issuer, &a.client) {
                introspect::spawn_discovery(
                    client.clone(),
                    issuer.clone(),
                    cfg.discovery_refresh,
                    Arc::downgrade(&a.endpoints),
                );
            }
        }
        Ok(a)
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// A pipeline rebuilt at a reload starts with the endpoints the one it replaces
    /// discovered for the same issuer, while its own discovery runs: otherwise every
    /// replica, reloaded together, fails `/readyz` and answers uncached tokens with 503
    /// until the authorisation server answers again. Discovery replaces them when it
    /// succeeds; endpoints that were configured, not discovered, are not carried over.
    pub fn inherit_endpoints(&self, previous: &Authoriser) {
        let discovered = |c: &AuthConfig| {
            c.issuer.is_some() && c.introspection_endpoint.is_none() && c.jwks_uri.is_none()
        };
        if !discovered(&self.cfg)
            || !discovered(&previous.cfg)
            || self.cfg.issuer != previous.cfg.issuer
        {
            return;
        }
        let Some(found) = previous.endpoints.load_full() else {
            return;
        };
        // Only into an empty slot: a discovery that already answered is newer.
        self.endpoints
            .rcu(|now| now.clone().or_else(|| Some(found.clone())));
    }

    pub fn is_development(&self) -> bool {
        self.cfg.mode == AuthMode::Development
    }

    /// Whether the endpoint this mode needs is known (for readiness).
    pub fn endpoint_known(&self) -> bool {
        self.is_development() || self.cfg.mode == AuthMode::None || self.endpoint().is_some()
    }

    /// The introspection endpoint or JWKS URL, whichever this mode uses.
    fn endpoint(&self) -> Option<String> {
        let e = self.endpoints.load();
        let e = e.as_ref()?;
        match self.cfg.mode {
            AuthMode::Jwt => e.jwks_uri.clone(),
            _ => e.introspection.clone(),
        }
    }

    /// Checks the request's bearer token and its scopes against `need`.
    /// `cert_sha256` is the connection's client certificate thumbprint (lower-case hex),
    /// checked against certificate-bound tokens.
    pub async fn authorise(
        &self,
        headers: &HeaderMap,
        need: &Requirement,
        required_scopes: &[String],
        cert_sha256: &str,
    ) -> Result<Arc<TokenFacts>, AuthError> {
        let Some(client) = &self.client else {
            if self.cfg.mode == AuthMode::None {
                // Config validation keeps token-checked routes out of this mode; fail
                // closed should one get here anyway.
                return Err(AuthError::Unavailable(
                    "auth.mode is none but the route requires a token".into(),
                ));
            }
            return Ok(self.development.clone());
        };
        let token = bearer::extract(headers)?;
        let key = cache::token_key(token);

        let now = cache::unix_now();
        let entry = match self.cache.get(&key).await {
            Some(e) => {
                self.cache_hits.inc();
                e
            }
            None => {
                self.cache_misses.inc();
                let fetch = self.introspect_once(client, token, &key);
                // Concurrent misses for one token share this single call. Boxed: the
                // introspection future is large (about 8 KB), and inline it would make
                // every request's future that large, cache hits included.
                Box::pin(self.cache.get_or_fetch(key, fetch))
                    .await
                    .map_err(|e| {
                        tracing::warn!(target: "fhirgate::auth", token_hash = %cache::token_hash(&key), error = %e, "token could not be verified");
                        AuthError::Unavailable(e.to_string())
                    })?
            }
        };
        let (facts, granted) = match &*entry {
            CachedToken::Inactive | CachedToken::InactiveFor(_) => {
                return Err(AuthError::InvalidToken("inactive, expired or unknown"))
            }
            CachedToken::Active { facts, granted, .. } => (facts, granted),
        };
        // The cache never outlives `exp`, but check again at the moment of use.
        if facts.exp.is_some_and(|exp| exp <= now) {
            return Err(AuthError::InvalidToken("expired"));
        }
        // A stolen certificate-bound token is useless without the certificate's key.
        if let Some(bound) = &facts.bound_cert_sha256 {
            if !bound.eq_ignore_ascii_case(cert_sha256) {
                return Err(AuthError::InvalidToken(
                    "bound to a different client certificate",
                ));
            }
        }
        if !scope::permits(granted, need, &self.contexts) {
            return Err(AuthError::InsufficientScope {
                needed: need.hint(),
            });
        }
        if let Some(missing) = required_scopes
            .iter()
            .find(|s| !facts.scope.split(' ').any(|t| t == s.as_str()))
        {
            return Err(AuthError::InsufficientScope {
                needed: missing.clone(),
            });
        }
        Ok(facts.clone())
    }

    fn count_introspection(&self, result: &str) {
        self.metrics
            .introspections
            .get_or_create(&crate::metrics::ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// One introspection (with retries), turned into a cache entry. `key`: the token's
    /// [`cache::token_key`], already computed by the caller.
    async fn introspect_once(
        &self,
        client: &AsClient,
        token: &str,
        key: &cache::TokenKey,
    ) -> Result<Arc<CachedToken>, introspect::IntrospectError> {
        let Some(endpoint) = self.endpoint() else {
            return Err(introspect::IntrospectError::NoEndpoint);
        };
        let permit = tokio::time::timeout(self.cfg.timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| introspect::IntrospectError::Busy)?
            .map_err(|_| introspect::IntrospectError::Busy)?;
        let started = std::time::Instant::now();
        let result = match &self.jwt {
            Some(v) => v.verify(client, &endpoint, token).await,
            None => client.introspect(&endpoint, token).await,
        };
        drop(permit);
        self.metrics
            .introspection_seconds
            .observe(started.elapsed().as_secs_f64());
        // An RFC 6749-style refusal of the token is an answer, not an outage: remembered
        // like `active: false` (for `negative_ttl`), so the client is not told to retry
        // and the authorisation server is not asked again on every request.
        let result = match result {
            Err(introspect::IntrospectError::Refused(error)) => {
                tracing::debug!(target: "fhirgate::auth", %error, "authorisation server refused to introspect the token");
                self.count_introspection("refused");
                return Ok(Arc::new(cache::CachedToken::Inactive));
            }
            Err(e @ introspect::IntrospectError::ClientRejected { .. }) => {
                self.count_introspection("misconfigured");
                introspect::log_client_rejected(&e);
                return Err(e);
            }
            r => r,
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .introspections
            .get_or_create(&crate::metrics::ResultLabel {
                result: label.into(),
            })
            .inc();
        let i: Introspection = result?;
        Ok(Arc::new(cache::entry_from(
            &i,
            &self.cfg,
            cache::unix_now(),
            cache::token_hash(key),
        )))
    }
}
