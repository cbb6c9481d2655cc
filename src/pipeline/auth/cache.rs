//! Token cache: keyed by SHA-256 of the token, one introspection per token per TTL.
//!
//! Positive entries live until `min(exp, now + max_ttl)` (in `jwt` mode no longer than
//! the key set they were verified with is used); negative ones for
//! `negative_ttl`; errors are not cached. Concurrent misses for one token share a single
//! introspection (moka's `try_get_with`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::future::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};

use super::introspect::{IntrospectError, Introspection};
use super::{AuthConfig, CacheConfig, TokenFacts};

pub type TokenKey = [u8; 32];

pub fn token_key(token: &str) -> TokenKey {
    Sha256::digest(token.as_bytes()).into()
}

/// First 16 hex digits of the token's SHA-256: safe to log, useful to correlate.
pub fn token_hash(key: &TokenKey) -> String {
    hex::encode(&key[..8])
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A cached verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachedToken {
    /// `granted`: the token's SMART scopes, parsed once when cached.
    Active {
        facts: Arc<TokenFacts>,
        granted: Vec<super::scope::Scope>,
        ttl: Duration,
    },
    Inactive,
    /// Refused on evidence that may change sooner than `negative_ttl` (a JWT whose `kid`
    /// is not in the key set held, which may be fetched again after `ttl`).
    InactiveFor(Duration),
}

/// How long a positive result may be cached: up to `exp` (never past it), at most
/// `max_ttl`; with no `exp`, `max_ttl`. `None` when the token is already expired.
pub fn positive_ttl(exp: Option<i64>, now: i64, max_ttl: Duration) -> Option<Duration> {
    match exp {
        None => Some(max_ttl),
        Some(exp) if exp <= now => None,
        Some(exp) => {
            let left = Duration::from_secs(u64::try_from(exp - now).unwrap_or(0));
            Some(left.min(max_ttl))
        }
    }
}

/// Allowed clock difference with the authorisation server for `nbf`.
const NBF_LEEWAY_SECS: i64 = 30;

/// What a token's `cnf` (RFC 7800) binds it to, as far as the gateway can check.
#[derive(Debug, PartialEq, Eq)]
pub enum Binding {
    /// A plain bearer token.
    None,
    /// RFC 8705: the SHA-256 of the client certificate (lower-case hex).
    Certificate(String),
    /// A proof-of-possession the gateway cannot verify (DPoP `jkt`, `jwk`, unknown
    /// members, a malformed thumbprint): refused rather than treated as bearer.
    Unverifiable,
}

pub fn binding(i: &Introspection) -> Binding {
    use base64::Engine;
    // RFC 6749 §7.1 types other than Bearer (e.g. DPoP) need a proof we do not check.
    if i.token_type
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
    {
        return Binding::Unverifiable;
    }
    let Some(cnf) = &i.cnf else {
        return Binding::None;
    };
    match (cnf.len(), cnf.get("x5t#S256").and_then(|v| v.as_str())) {
        (0, _) => Binding::None,
        (1, Some(t)) => match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t) {
            Ok(d) if d.len() == 32 => Binding::Certificate(hex::encode(d)),
            _ => Binding::Unverifiable,
        },
        _ => Binding::Unverifiable,
    }
}

/// Turns an introspection response into a verdict, applying the local checks.
/// `token_hash`: [`token_hash`] of the token, logged with every request that uses it.
pub fn entry_from(
    i: &Introspection,
    cfg: &AuthConfig,
    now: i64,
    token_hash: String,
) -> CachedToken {
    if !i.active {
        return match i.holds_for {
            Some(t) if t < cfg.cache.negative_ttl => CachedToken::InactiveFor(t),
            _ => CachedToken::Inactive,
        };
    }
    let bound_cert_sha256 = match binding(i) {
        Binding::None => None,
        Binding::Certificate(t) => Some(t),
        Binding::Unverifiable => return CachedToken::Inactive,
    };
    if i.nbf.is_some_and(|nbf| nbf > now + NBF_LEEWAY_SECS) {
        return CachedToken::Inactive;
    }
    if let Some(want) = &cfg.expected_issuer {
        if i.iss.as_deref() != Some(want.as_str()) {
            return CachedToken::Inactive;
        }
    }
    if let Some(want) = &cfg.expected_audience {
        if !i.aud.iter().any(|a| a == want) {
            return CachedToken::Inactive;
        }
    }
    match positive_ttl(i.exp, now, cfg.cache.max_ttl) {
        None => CachedToken::Inactive,
        Some(ttl) => {
            let ttl = i.holds_for.map_or(ttl, |h| ttl.min(h));
            let scope = i.scope.clone().unwrap_or_default();
            CachedToken::Active {
                granted: super::scope::parse_scope_list(&scope),
                facts: TokenFacts {
                    client_id: i.client_id.clone(),
                    sub: i.sub.clone(),
                    scope,
                    token_hash,
                    exp: i.exp,
                    development: false,
                    bound_cert_sha256,
                    upstream: Vec::new(),
                }
                .sealed(),
                ttl,
            }
        }
    }
}

struct PerEntry {
    negative: Duration,
}

impl Expiry<TokenKey, Arc<CachedToken>> for PerEntry {
    fn expire_after_create(
        &self,
        _k: &TokenKey,
        v: &Arc<CachedToken>,
        _at: Instant,
    ) -> Option<Duration> {
        Some(match &**v {
            CachedToken::Active { ttl, .. } => *ttl,
            CachedToken::Inactive => self.negative,
            CachedToken::InactiveFor(ttl) => *ttl,
        })
    }
}

pub struct TokenCache {
    inner: Cache<TokenKey, Arc<CachedToken>>,
}

impl TokenCache {
    pub fn new(cfg: &CacheConfig) -> Self {
        TokenCache {
            inner: Cache::builder()
                .max_capacity(cfg.max_capacity)
                .expire_after(PerEntry {
                    negative: cfg.negative_ttl,
                })
                .build(),
        }
    }

    pub async fn get(&self, key: &TokenKey) -> Option<Arc<CachedToken>> {
        self.inner.get(key).await
    }

    /// Returns the cached verdict or runs `fetch` once for all concurrent callers.
    pub async fn get_or_fetch(
        &self,
        key: TokenKey,
        fetch: impl std::future::Future<Output = Result<Arc<CachedToken>, IntrospectError>>,
    ) -> Result<Arc<CachedToken>, Arc<IntrospectError>> {
        self.inner.try_get_with(key, fetch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(extra: serde_json::Value) -> Introspection {
        let mut v = serde_json::json!({"active": true, "scope": "system/*.*"});
        if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        serde_json::from_value(v).expect("introspection")
    }

    #[test]
    fn bindings_are_checked_or_refused() {
        let thumb = [7u8; 32];
        let b64 = {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(thumb)
        };
        assert_eq!(binding(&with(serde_json::json!({}))), Binding::None);
        assert_eq!(
            binding(&with(serde_json::json!({"token_type": "Bearer"}))),
            Binding::None
        );
        assert_eq!(
            binding(&with(serde_json::json!({"cnf": {"x5t#S256": b64}}))),
            Binding::Certificate(hex::encode(thumb))
        );
        for unverifiable in [
            serde_json::json!({"token_type": "DPoP"}),
            serde_json::json!({"cnf": {"jkt": "abc"}}),
            serde_json::json!({"cnf": {"x5t#S256": "not base64url!"}}),
            serde_json::json!({"cnf": {"x5t#S256": "c2hvcnQ"}}),
            serde_json::json!({"cnf": {"x5t#S256": b64, "jkt": "abc"}}),
        ] {
            assert_eq!(
                binding(&with(unverifiable.clone())),
                Binding::Unverifiable,
                "{unverifiable}"
            );
        }
    }

    /// What every request presenting the token reuses: the hash its access lines log
    /// (never the token) and its upstream headers, encoded as the forward stage encodes
    /// any header value (non-ASCII percent-encoded).
    #[test]
    fn an_entry_carries_its_log_hash_and_upstream_headers() {
        let cfg: AuthConfig = serde_saphyr::from_str("mode: introspection\n").expect("auth config");
        let token = "eyJhbGciOiJub25lIn0.e30.not-a-real-token";
        let key = token_key(token);
        let hash = token_hash(&key);
        let expected = hex::encode(Sha256::digest(token.as_bytes()));
        assert_eq!(hash, expected[..16], "first 16 hex digits of SHA-256");
        let i = with(serde_json::json!({
            "client_id": "bars-sender-1",
            "sub": "Zoë",
            "exp": 2_000_000_000,
        }));
        let CachedToken::Active { facts, .. } = entry_from(&i, &cfg, 1_000_000, hash.clone())
        else {
            panic!("an active token with a future exp is cached as active");
        };
        assert_eq!(facts.token_hash, hash);
        assert!(!hash.contains(token) && !format!("{facts:?}").contains(token));
        let headers: Vec<(&str, &str)> = facts
            .upstream
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().expect("visible ASCII")))
            .collect();
        assert_eq!(
            headers,
            [
                ("x-fhirgate-client-id", "bars-sender-1"),
                ("x-fhirgate-sub", "Zo%C3%AB"),
                ("x-fhirgate-scopes", "system/*.*"),
            ]
        );
    }

    #[test]
    fn ttl_arithmetic() {
        let max = Duration::from_secs(300);
        let now = 1_000_000;
        assert_eq!(
            positive_ttl(Some(now - 1), now, max),
            None,
            "exp in the past"
        );
        assert_eq!(positive_ttl(Some(now), now, max), None, "exp now");
        assert_eq!(
            positive_ttl(Some(now + 60), now, max),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            positive_ttl(Some(now + 3600), now, max),
            Some(max),
            "exp beyond max_ttl"
        );
        assert_eq!(positive_ttl(None, now, max), Some(max), "missing exp");
    }
}
