//! `jwt` mode: JWT access tokens validated locally with the authorisation server's JWKS.
//!
//! Keys are fetched from `jwks_uri` (configured or discovered), kept in memory, and
//! fetched again when a token names an unknown `kid`, at most once per
//! `auth.jwks_min_refetch` (10 s by default) so a stream of junk tokens cannot turn the
//! gateway into a JWKS load generator.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::introspect::{AsClient, IntrospectError, Introspection};

/// Algorithms accepted in `jwt` mode unless configured otherwise. Never `none`, never
/// HMAC (a shared secret would let anyone holding it mint tokens).
pub const DEFAULT_ALGORITHMS: [&str; 4] = ["RS256", "PS256", "ES256", "ES384"];

pub fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "PS384" => Some(Algorithm::PS384),
        "PS512" => Some(Algorithm::PS512),
        "ES256" => Some(Algorithm::ES256),
        "ES384" => Some(Algorithm::ES384),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// Claims read from an access token (RFC 9068 names, with common alternatives).
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    scope: Option<OneOrMany>,
    #[serde(default)]
    scp: Option<OneOrMany>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<i64>,
    /// NumericDate, possibly with a fraction (RFC 7519 §2).
    #[serde(default)]
    iat: Option<f64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    iss: Option<String>,
    /// One audience or several (RFC 7519 §4.1.3).
    #[serde(default)]
    aud: Option<OneOrMany>,
    /// RFC 7800 confirmation (certificate- or DPoP-bound tokens).
    #[serde(default)]
    cnf: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A claim that is a string or an array of strings (`scope`/`scp`, `aud`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    Text(String),
    List(Vec<String>),
}

impl OneOrMany {
    fn joined(self) -> String {
        match self {
            OneOrMany::Text(s) => s,
            OneOrMany::List(v) => v.join(" "),
        }
    }

    fn list(self) -> Vec<String> {
        match self {
            OneOrMany::Text(s) => vec![s],
            OneOrMany::List(v) => v,
        }
    }
}

/// The last key-set fetch: when it started, and the error if it failed.
struct LastFetch {
    at: Instant,
    failed: Option<IntrospectError>,
}

pub struct JwtVerifier {
    keys: ArcSwap<HashMap<String, DecodingKey>>,
    /// When the keys in `keys` were fetched (`None` before the first good fetch).
    keys_at: std::sync::Mutex<Option<Instant>>,
    last_fetch: Mutex<Option<LastFetch>>,
    min_refetch: Duration,
    /// `auth.jwks_max_age`: how long a fetched key set is used before it is fetched
    /// again. RFC 9068 §4: the resource server "MUST use the keys provided by the
    /// authorization server", so a key the server withdraws (a compromised one) must
    /// stop verifying tokens: within this long.
    max_age: Duration,
    algorithms: Vec<Algorithm>,
    issuer: Option<String>,
    audience: Option<String>,
    accept_legacy_typ: bool,
}

/// RFC 9068 §4: the resource server "MUST verify that the `typ` header value is `at+jwt`
/// or `application/at+jwt` and reject tokens carrying any other value". RFC 7515 §4.1.9:
/// media type values are case-insensitive and the `application/` prefix may be omitted.
/// With `legacy`, a missing `typ` or plain `JWT` is tolerated too; other explicit types
/// (an ID token's or logout token's, say) never are.
pub fn typ_acceptable(typ: Option<&str>, legacy: bool) -> bool {
    let Some(t) = typ else { return legacy };
    let t = t.trim();
    let bare = match t.get(..12) {
        Some(p) if p.eq_ignore_ascii_case("application/") => &t[12..],
        _ => t,
    };
    bare.eq_ignore_ascii_case("at+jwt") || (legacy && bare.eq_ignore_ascii_case("jwt"))
}

impl JwtVerifier {
    pub fn new(
        algorithms: Vec<Algorithm>,
        issuer: Option<String>,
        audience: Option<String>,
        min_refetch: Duration,
    ) -> Self {
        JwtVerifier {
            keys: ArcSwap::from_pointee(HashMap::new()),
            keys_at: std::sync::Mutex::new(None),
            last_fetch: Mutex::new(None),
            min_refetch,
            max_age: Duration::from_secs(300),
            algorithms,
            issuer,
            audience,
            accept_legacy_typ: false,
        }
    }

    /// `auth.jwks_max_age`.
    pub fn key_set_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// `auth.accept_legacy_jwt_typ`.
    pub fn accept_legacy_typ(mut self, yes: bool) -> Self {
        self.accept_legacy_typ = yes;
        self
    }

    /// Fetches the JWKS unless one was fetched less than `min_refetch` ago. Within that
    /// window the last fetch's outcome stands: a failed one is an error again (503, never
    /// a verdict on the token, so nothing is cached against it), a good one means the
    /// keys held are the server's current ones.
    async fn refresh(&self, client: &AsClient, jwks_uri: &str) -> Result<(), IntrospectError> {
        let mut last = self.last_fetch.lock().await;
        if let Some(l) = last.as_ref().filter(|l| l.at.elapsed() < self.min_refetch) {
            return l.failed.clone().map_or(Ok(()), Err);
        }
        let at = Instant::now();
        let r = self.fetch(client, jwks_uri).await;
        *last = Some(LastFetch {
            at,
            failed: r.as_ref().err().cloned(),
        });
        if r.is_ok() {
            if let Ok(mut k) = self.keys_at.lock() {
                *k = Some(at);
            }
        }
        r
    }

    /// Whether the keys held are older than `max_age` (or there are none).
    fn keys_stale(&self) -> bool {
        self.keys_younger_by(self.max_age).is_zero()
    }

    /// How long until the key set held is `after` old (zero with none held).
    fn keys_younger_by(&self, after: Duration) -> Duration {
        self.keys_at
            .lock()
            .ok()
            .and_then(|k| *k)
            .map_or(Duration::ZERO, |t| after.saturating_sub(t.elapsed()))
    }

    /// Whether a fetch is under way or was tried within `min_refetch` (a stale set is
    /// then used as it is, without waiting).
    fn fetching_or_fetched_recently(&self) -> bool {
        self.last_fetch.try_lock().map_or(true, |l| {
            l.as_ref()
                .is_some_and(|l| l.at.elapsed() < self.min_refetch)
        })
    }

    async fn fetch(&self, client: &AsClient, jwks_uri: &str) -> Result<(), IntrospectError> {
        let body = client.get_json(jwks_uri).await?;
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| IntrospectError::Malformed(format!("JWKS: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk))
            else {
                continue;
            };
            keys.insert(kid, key);
        }
        tracing::info!(target: "fhirgate::auth", keys = keys.len(), "JWKS loaded");
        self.keys.store(Arc::new(keys));
        Ok(())
    }

    /// Verifies a JWT access token. A bad token yields an inactive result (cached like
    /// an `active: false` answer); failing to get the keys is an error (503).
    pub async fn verify(
        &self,
        client: &AsClient,
        jwks_uri: &str,
        token: &str,
    ) -> Result<Introspection, IntrospectError> {
        let inactive = Introspection::default();
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(inactive);
        };
        if !self.algorithms.contains(&header.alg) {
            return Ok(inactive);
        }
        if !typ_acceptable(header.typ.as_deref(), self.accept_legacy_typ) {
            return Ok(inactive);
        }
        let Some(kid) = header.kid else {
            return Ok(inactive);
        };
        if !self.keys.load().contains_key(&kid) {
            self.refresh(client, jwks_uri).await?;
        } else if self.keys_stale() && !self.fetching_or_fetched_recently() {
            // A known key, but the set may have dropped it since: fetched again. If the
            // server cannot be reached the keys held stay in use (an outage of the key
            // server must not refuse every token), and the next request tries again once
            // `min_refetch` has passed.
            if let Err(e) = self.refresh(client, jwks_uri).await {
                tracing::warn!(target: "fhirgate::auth", error = %e, "JWKS refresh failed; keeping the keys held");
            }
        }
        let keys = self.keys.load();
        let Some(key) = keys.get(&kid) else {
            // The kid is not in a key set fetched within `min_refetch` (a lookup that
            // could not consult one returned the error above). A verdict, but only on
            // that set: a key published after it (a rotation, a JWKS behind a CDN
            // catching up) is seen by the next fetch, which the throttle allows once
            // `min_refetch` has passed. So the refusal is cached until then, not for
            // `negative_ttl`: junk kids keeping the window busy can hold back a newly
            // rotated key by at most `min_refetch` (as a key published just after any
            // fetch is), never lock its tokens out beyond it.
            return Ok(Introspection {
                holds_for: Some(self.keys_younger_by(self.min_refetch)),
                ..inactive
            });
        };
        let mut v = Validation::new(header.alg);
        v.leeway = 30;
        v.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when the token has them; RFC 9068 §4
        // says a token whose `aud` does not name this resource server MUST be rejected,
        // and one without `aud` names nothing. So configured claims are also required.
        let mut required = vec!["exp"];
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
            required.push("iss");
        }
        match &self.audience {
            Some(a) => {
                v.set_audience(&[a]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        let Ok(data) = jsonwebtoken::decode::<Claims>(token, key, &v) else {
            return Ok(inactive);
        };
        let c = data.claims;
        // RFC 9068 §2.2 makes iss, exp, aud, sub, client_id, iat and jti REQUIRED (exp,
        // and iss and aud when configured, are required above): a token without them is
        // not an RFC 9068 access token. Issuers that predate it, admitted by
        // `accept_legacy_jwt_typ`, often mint no `jti` and name the client in `azp`:
        // the same switch admits their claims too, or it would admit none of their tokens.
        if !self.accept_legacy_typ
            && (c.sub.is_none() || c.client_id.is_none() || c.iat.is_none() || c.jti.is_none())
        {
            return Ok(inactive);
        }
        Ok(Introspection {
            active: true,
            scope: c.scope.or(c.scp).map(OneOrMany::joined),
            client_id: c.client_id.or(c.azp),
            sub: c.sub,
            exp: c.exp,
            iat: c.iat.filter(|f| f.is_finite()).map(|f| f.floor() as i64),
            nbf: None,
            iss: c.iss,
            // The token's own audiences, so the shared check after this one sees what
            // the token says rather than what was expected.
            aud: c.aud.map(OneOrMany::list).unwrap_or_default(),
            token_type: None,
            cnf: c.cnf,
            // A verdict on the key set held, which is fetched again once `max_age`
            // old: cached no longer, so a key withdrawn by then stops verifying the
            // tokens it signed, cached ones included (RFC 9068 §4). While the set
            // cannot be fetched again, the keys held still verify, uncached.
            holds_for: Some(self.keys_younger_by(self.max_age)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::auth::AuthConfig;
    use base64::Engine;

    /// README: "Fail closed: when the authorisation server is down, slow, … unknown
    /// tokens get 503". A key set that cannot be fetched is that, on the first try and
    /// on every try within `jwks_min_refetch` after it: never an `active: false` verdict,
    /// which would be cached against the token and outlive the outage.
    #[tokio::test]
    async fn a_key_set_outage_is_an_error_every_time_not_a_verdict() {
        // Nothing listens here: every fetch is a transport error.
        let Ok(l) = std::net::TcpListener::bind("127.0.0.1:0") else {
            panic!("bind")
        };
        let url = format!("http://{}/jwks", l.local_addr().expect("addr"));
        drop(l);
        let cfg: AuthConfig =
            serde_saphyr::from_str(&format!("mode: jwt\njwks_uri: {url}\ntimeout: 1s\n"))
                .expect("config");
        let client = AsClient::new(&cfg).expect("client");
        let v = JwtVerifier::new(vec![Algorithm::ES256], None, None, Duration::from_secs(10));
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!(
            "{}.{}.{}",
            b(r#"{"alg":"ES256","typ":"at+jwt","kid":"k1"}"#),
            b(r#"{"exp":4000000000}"#),
            b("sig")
        );
        for attempt in 0..3 {
            let got = v.verify(&client, &url, &token).await;
            assert!(got.is_err(), "attempt {attempt}: {got:?}");
        }
    }

    #[test]
    fn rfc9068_typ_values() {
        // RFC 9068 §4: "MUST verify that the typ header value is at+jwt or
        // application/at+jwt and reject tokens carrying any other value".
        for ok in [
            "at+jwt",
            "application/at+jwt",
            "AT+JWT",
            "Application/At+Jwt",
        ] {
            assert!(typ_acceptable(Some(ok), false), "{ok}");
            assert!(typ_acceptable(Some(ok), true), "{ok}");
        }
        for bad in [
            "JWT",
            "jwt",
            "",
            "dpop+jwt",
            "application/jwt",
            "at+jwt2",
            "xat+jwt",
        ] {
            assert!(!typ_acceptable(Some(bad), false), "{bad}");
        }
        assert!(!typ_acceptable(None, false));
        // The legacy opt-out admits `JWT` and a missing typ, nothing else.
        assert!(typ_acceptable(None, true));
        assert!(typ_acceptable(Some("JWT"), true));
        assert!(typ_acceptable(Some("application/jwt"), true));
        assert!(!typ_acceptable(Some("logout+jwt"), true));
        assert!(!typ_acceptable(Some("secevent+jwt"), true));
    }
}
