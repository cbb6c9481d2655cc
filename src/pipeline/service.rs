//! Service levels a receiver promises its senders (BaRS non-functional requirements), and
//! the per-client limits operators expect from a gateway:
//!
//! - a total time budget per request, answered with a configurable status and NHS code
//!   (BaRS: 5 s, then 408 `REC_TIMEOUT`);
//! - what a path no route covers gets (403 `REC_FORBIDDEN` or 501 `REC_NOT_IMPLEMENTED`);
//! - an `Accept: application/fhir+json; version=X` check (406 `REC_NOT_ACCEPTABLE`);
//! - per-client rate limits (`governor`, GCRA) and a per-client connection cap.
//!
//! Settings come from the top-level `service_levels` section (the default) and a route's
//! own `service_levels` block, which replaces the default field by field.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::config::error::{err, ConfigError};
use crate::pipeline::outcome::Rejection;
use crate::pipeline::policy::RouteConfig;

/// What a path that no route covers is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// 403 `REC_FORBIDDEN` (default, as before this option existed).
    #[default]
    Forbidden,
    /// 501 `REC_NOT_IMPLEMENTED`, as the BaRS examples answer an endpoint a receiver has
    /// not implemented.
    NotImplemented,
}

/// Which client identity a rate limit counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// SHA-256 fingerprint of the verified client certificate (default).
    #[default]
    Fingerprint,
    /// The token's `client_id` (after the token check); the certificate fingerprint when
    /// the route takes no token or the token names no client.
    ClientId,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests allowed per `per`, sustained.
    pub rate: u32,
    #[serde(default = "default_per", with = "crate::config::duration")]
    pub per: Duration,
    /// Requests allowed at once before the rate applies (bucket size); default `rate`.
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub key: LimitKey,
}

fn default_per() -> Duration {
    Duration::from_secs(1)
}

/// `service_levels` at the top level (defaults) or in a route (overrides).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceLevelsConfig {
    /// Top level only: what a path no route covers gets.
    pub unmatched: Option<Unmatched>,
    /// Total time the gateway may take for a request, token check and upstream included,
    /// until the response headers. Absent: no budget (only `upstream.response_timeout`,
    /// answered 504).
    #[serde(deserialize_with = "crate::config::duration::option::deserialize")]
    pub response_timeout: Option<Duration>,
    /// Status when the budget runs out: 408 (default; BaRS), 503 or 504.
    pub timeout_status: Option<u16>,
    /// NHS code when the budget runs out (default `REC_TIMEOUT`).
    pub timeout_code: Option<String>,
    /// FHIR versions accepted in `Accept: application/fhir+json; version=…`; absent or
    /// empty: no check.
    pub accept_versions: Option<Vec<String>>,
    pub rate_limit: Option<RateLimitConfig>,
}

/// NHS codes a timeout may be answered with (`https://fhir.nhs.uk/CodeSystem/http-error-codes`).
const TIMEOUT_CODES: [&str; 3] = ["REC_TIMEOUT", "REC_SERVICE_UNAVAILABLE", "REC_SERVER_ERROR"];
const TIMEOUT_STATUSES: [u16; 3] = [408, 503, 504];

impl ServiceLevelsConfig {
    /// Checks one block; `route` is true for a route's block.
    pub fn validate(&self, field: &str, route: bool) -> Result<(), ConfigError> {
        if route && self.unmatched.is_some() {
            return Err(err(
                format!("{field}.unmatched"),
                "only valid in the top-level service_levels section",
            ));
        }
        if self.response_timeout.is_some_and(|d| d.is_zero()) {
            return Err(err(
                format!("{field}.response_timeout"),
                "must be greater than zero",
            ));
        }
        if let Some(s) = self.timeout_status {
            if !TIMEOUT_STATUSES.contains(&s) {
                return Err(err(
                    format!("{field}.timeout_status"),
                    "must be 408, 503 or 504",
                ));
            }
        }
        if let Some(c) = &self.timeout_code {
            if !TIMEOUT_CODES.contains(&c.as_str()) {
                return Err(err(
                    format!("{field}.timeout_code"),
                    format!("must be one of {}", TIMEOUT_CODES.join(", ")),
                ));
            }
        }
        for (i, v) in self.accept_versions.iter().flatten().enumerate() {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(err(
                    format!("{field}.accept_versions[{i}]"),
                    "must be a version such as 1.4.0 (letters, digits, '.', '-', '_')",
                ));
            }
        }
        if let Some(r) = &self.rate_limit {
            let f = format!("{field}.rate_limit");
            if r.rate == 0 {
                return Err(err(format!("{f}.rate"), "must be greater than 0"));
            }
            if r.per.is_zero() {
                return Err(err(format!("{f}.per"), "must be greater than zero"));
            }
            if r.burst == Some(0) {
                return Err(err(format!("{f}.burst"), "must be greater than 0"));
            }
            if r.quota().is_none() {
                return Err(err(
                    format!("{f}.per"),
                    "per / rate must be at least one nanosecond",
                ));
            }
        }
        Ok(())
    }
}

impl RateLimitConfig {
    fn quota(&self) -> Option<Quota> {
        let period = self.per / self.rate.max(1);
        let burst = NonZeroU32::new(self.burst.unwrap_or(self.rate))?;
        Some(Quota::with_period(period)?.allow_burst(burst))
    }
}

/// What the gateway does when a request's budget runs out.
#[derive(Debug, Clone)]
pub struct Budget {
    pub limit: Duration,
    status: StatusCode,
    code: &'static str,
}

impl Budget {
    pub fn rejection(&self) -> Rejection {
        Rejection::budget_timeout(self.status, self.code, self.limit.as_millis())
    }
}

/// The effective service levels of one route (or of requests no route covers).
pub struct Levels {
    pub budget: Option<Budget>,
    /// Empty: no `Accept` version check.
    pub accept_versions: Vec<String>,
    pub limiter: Option<Arc<ClientLimiter>>,
}

impl Levels {
    fn resolve(
        scope: &str,
        own: Option<&ServiceLevelsConfig>,
        default: &ServiceLevelsConfig,
        limiters: &Limiters,
        default_limiter: &Option<Arc<ClientLimiter>>,
    ) -> Self {
        // Each field: the route's own value if it sets one, else the default's.
        let pick = |f: fn(&ServiceLevelsConfig) -> bool| own.filter(|o| f(o)).unwrap_or(default);
        let timeout_status = pick(|c| c.timeout_status.is_some()).timeout_status;
        let timeout_code = pick(|c| c.timeout_code.is_some()).timeout_code.as_deref();
        let budget = pick(|c| c.response_timeout.is_some())
            .response_timeout
            .map(|limit| Budget {
                limit,
                status: timeout_status
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::REQUEST_TIMEOUT),
                code: timeout_code
                    .and_then(|c| TIMEOUT_CODES.iter().find(|k| **k == c).copied())
                    .unwrap_or("REC_TIMEOUT"),
            });
        let accept_versions = pick(|c| c.accept_versions.is_some())
            .accept_versions
            .clone()
            .unwrap_or_default();
        // A route's own limit has its own buckets; routes without one share the default's.
        let limiter = match own.and_then(|o| o.rate_limit.as_ref()) {
            Some(r) => limiters.get(scope, r),
            None => default_limiter.clone(),
        };
        Levels {
            budget,
            accept_versions,
            limiter,
        }
    }
}

/// Service levels of every route, plus those for paths no route covers.
pub struct ServiceLevels {
    pub unmatched: Unmatched,
    routes: HashMap<String, Levels>,
    default: Levels,
}

impl ServiceLevels {
    pub fn new(default: &ServiceLevelsConfig, routes: &[RouteConfig], limiters: &Limiters) -> Self {
        let default_limiter = default
            .rate_limit
            .as_ref()
            .and_then(|r| limiters.get("", r));
        let routes = routes
            .iter()
            .map(|r| {
                let levels = Levels::resolve(
                    &r.name,
                    Some(&r.service_levels),
                    default,
                    limiters,
                    &default_limiter,
                );
                (r.name.clone(), levels)
            })
            .collect();
        ServiceLevels {
            unmatched: default.unmatched.unwrap_or_default(),
            default: Levels::resolve("", None, default, limiters, &default_limiter),
            routes,
        }
    }

    /// The levels of a route by name; the defaults when `None` (no route).
    pub fn of(&self, route: Option<&str>) -> &Levels {
        route
            .and_then(|r| self.routes.get(r))
            .unwrap_or(&self.default)
    }
}

/// Checks `Accept` against the supported FHIR versions (BaRS: a receiver that does not
/// support the version a sender asks for answers 406 `REC_NOT_ACCEPTABLE`).
///
/// The request is acceptable when it has no `Accept`, or when any media range it lists
/// (with q > 0) either carries no `version` parameter or one the route supports; a media
/// range that does not parse is left to the upstream. Versions compare exactly.
pub fn check_accept(headers: &HeaderMap, supported: &[String]) -> Result<(), Rejection> {
    if supported.is_empty() {
        return Ok(());
    }
    let mut any = false;
    for value in headers.get_all(http::header::ACCEPT) {
        let Ok(text) = value.to_str() else {
            return Ok(());
        };
        for range in split_list(text) {
            let Ok(m) = range.trim().parse::<mime::Mime>() else {
                return Ok(());
            };
            if m.get_param("q")
                .and_then(|q| q.as_str().trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
            {
                continue;
            }
            any = true;
            match m.get_param("version") {
                None => return Ok(()),
                Some(v) if supported.iter().any(|s| s == v.as_str()) => return Ok(()),
                Some(_) => {}
            }
        }
    }
    if any {
        Err(Rejection::not_acceptable(supported))
    } else {
        Ok(())
    }
}

/// Splits an `Accept` list on commas outside quoted strings (RFC 9110 §5.6.1, §5.6.4).
fn split_list(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().filter(|r| !r.trim().is_empty()).collect()
}

/// A keyed GCRA rate limiter: one bucket per client key.
pub struct ClientLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<String, DefaultKeyedStateStore<String>, C, NoOpMiddleware<C::Instant>>,
    pub key: LimitKey,
}

impl ClientLimiter<DefaultClock> {
    pub fn new(cfg: &RateLimitConfig) -> Option<Self> {
        Some(ClientLimiter {
            limiter: RateLimiter::dashmap(cfg.quota()?),
            key: cfg.key,
        })
    }
}

impl<C: Clock> ClientLimiter<C> {
    pub fn with_clock(cfg: &RateLimitConfig, clock: C) -> Option<Self> {
        Some(ClientLimiter {
            limiter: RateLimiter::dashmap_with_clock(cfg.quota()?, clock),
            key: cfg.key,
        })
    }

    /// Takes one request from `key`'s bucket, or says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        // The key is cloned only by the store when it inserts a new bucket.
        self.limiter
            .check_key(&key.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    /// Drops buckets that are full again (indistinguishable from a new client) and
    /// returns the memory, so many one-off clients do not grow the map for ever.
    pub fn evict_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys currently held.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

/// Rate limiters by (scope, config), shared across reloads: a reload that keeps a
/// limiter's config keeps its buckets; a changed config starts fresh ones. Held weakly,
/// so a limiter lives as long as some configuration snapshot uses it.
pub struct Limiters {
    map: Mutex<HashMap<(String, RateLimitConfig), Weak<ClientLimiter>>>,
    sweep: Duration,
}

impl Default for Limiters {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

impl Limiters {
    /// `sweep`: how often idle buckets are evicted.
    pub fn new(sweep: Duration) -> Self {
        Limiters {
            map: Mutex::new(HashMap::new()),
            sweep,
        }
    }

    /// The limiter for `scope` (a route name, or "" for the default) with this config.
    pub fn get(&self, scope: &str, cfg: &RateLimitConfig) -> Option<Arc<ClientLimiter>> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        let k = (scope.to_owned(), cfg.clone());
        if let Some(l) = map.get(&k).and_then(Weak::upgrade) {
            return Some(l);
        }
        let l = Arc::new(ClientLimiter::new(cfg)?);
        map.insert(k, Arc::downgrade(&l));
        self.spawn_sweeper(&l);
        Some(l)
    }

    /// Evicts idle buckets every `sweep` until the limiter is dropped.
    fn spawn_sweeper(&self, l: &Arc<ClientLimiter>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // `fhirgate check` builds a snapshot outside a runtime; nothing is served.
            return;
        };
        let weak = Arc::downgrade(l);
        let every = self.sweep;
        rt.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    // O(keys): ~5 ms for 10,000 keys in a debug build; off the workers.
                    Some(l) => {
                        let _ = tokio::task::spawn_blocking(move || l.evict_idle()).await;
                    }
                    None => return,
                }
            }
        });
    }
}

/// Open connections per client certificate, for `limits.max_connections_per_client`.
/// Shared across reloads; an entry goes when the client's last connection closes.
#[derive(Default)]
pub struct ClientConnections {
    open: Mutex<HashMap<String, usize>>,
}

impl ClientConnections {
    /// Counts a new connection from `fingerprint`. `None` when it already has `max` open
    /// (max 0: no cap).
    pub fn open(self: &Arc<Self>, fingerprint: &str, max: usize) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(fingerprint.to_owned()).or_insert(0);
        if max > 0 && *n >= max {
            if *n == 0 {
                open.remove(fingerprint);
            }
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            owner: self.clone(),
            fingerprint: fingerprint.to_owned(),
        })
    }

    /// Clients with at least one connection open.
    pub fn clients(&self) -> usize {
        self.open.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// One counted connection; uncounted when dropped.
pub struct ConnectionSlot {
    owner: Arc<ClientConnections>,
    fingerprint: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.fingerprint) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.fingerprint);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn rl(rate: u32, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            rate,
            per: Duration::from_secs(1),
            burst: Some(burst),
            key: LimitKey::Fingerprint,
        }
    }

    #[test]
    fn burst_then_refusal_with_wait_then_refill() {
        let clock = FakeRelativeClock::default();
        let l = ClientLimiter::with_clock(&rl(2, 3), clock.clone()).expect("quota");
        for _ in 0..3 {
            assert_eq!(l.check("a"), Ok(()));
        }
        let wait = l.check("a").expect_err("over the burst");
        // 2 per second: the next request is due 500 ms later.
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_secs(wait), 1);
        // Another key has its own bucket.
        assert_eq!(l.check("b"), Ok(()));
        clock.advance(Duration::from_millis(500));
        assert_eq!(l.check("a"), Ok(()));
    }

    #[test]
    fn ten_thousand_idle_keys_are_evicted() {
        let clock = FakeRelativeClock::default();
        let l = ClientLimiter::with_clock(&rl(10, 5), clock.clone()).expect("quota");
        for i in 0..10_000 {
            assert_eq!(l.check(&format!("client-{i}")), Ok(()));
        }
        assert_eq!(l.len(), 10_000);
        // Still inside the refill time: nothing is indistinguishable from fresh yet.
        l.evict_idle();
        assert_eq!(l.len(), 10_000);
        // One request at 10/s is repaid in 100 ms; governor drops a key one emission
        // interval after that (200 ms here). Afterwards every key is idle…
        clock.advance(Duration::from_millis(150));
        l.evict_idle();
        assert_eq!(l.len(), 10_000, "150 ms: not yet");
        clock.advance(Duration::from_millis(100));
        // …except one that is busy now.
        for _ in 0..5 {
            let _ = l.check("busy");
        }
        l.evict_idle();
        assert_eq!(l.len(), 1, "only the busy key is kept");
        assert!(l.check("busy").is_err(), "its bucket was kept, not reset");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }

    #[tokio::test]
    async fn reload_with_same_config_keeps_buckets() {
        let ls = Limiters::default();
        let a = ls.get("r", &rl(1, 1)).expect("limiter");
        assert_eq!(a.check("x"), Ok(()));
        let same = ls.get("r", &rl(1, 1)).expect("limiter");
        assert!(same.check("x").is_err(), "same config: same buckets");
        let other_route = ls.get("s", &rl(1, 1)).expect("limiter");
        assert_eq!(other_route.check("x"), Ok(()));
        let changed = ls.get("r", &rl(2, 1)).expect("limiter");
        assert_eq!(changed.check("x"), Ok(()), "changed config: fresh buckets");
        drop((a, same));
        let again = ls.get("r", &rl(1, 1)).expect("limiter");
        assert_eq!(again.check("x"), Ok(()), "no snapshot used it: dropped");
    }

    /// The sweeper task evicts idle buckets of a live limiter on its own, and ends once
    /// no configuration uses the limiter any more.
    #[tokio::test]
    async fn sweeper_evicts_idle_keys_in_the_background() {
        let ls = Limiters::new(Duration::from_millis(20));
        let l = ls.get("", &rl(1000, 1)).expect("limiter");
        for i in 0..1000 {
            assert_eq!(l.check(&format!("k{i}")), Ok(()));
        }
        assert_eq!(l.len(), 1000);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !l.is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} keys left",
                l.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let weak = Arc::downgrade(&l);
        drop(l);
        assert!(
            weak.upgrade().is_none(),
            "the sweeper holds no strong reference"
        );
    }

    #[test]
    fn connection_cap_counts_per_client() {
        let c = Arc::new(ClientConnections::default());
        let a1 = c.open("a", 2).expect("first");
        let _a2 = c.open("a", 2).expect("second");
        assert!(c.open("a", 2).is_none(), "third over the cap");
        assert!(c.open("b", 2).is_some(), "other client unaffected");
        drop(a1);
        assert!(c.open("a", 2).is_some(), "a slot freed");
        assert!(c.open("z", 0).is_some(), "0: no cap");
    }

    #[test]
    fn route_levels_replace_defaults_field_by_field() {
        let yaml = |t: &str| -> ServiceLevelsConfig { serde_saphyr::from_str(t).expect("yaml") };
        let default =
            yaml("{response_timeout: 5s, accept_versions: [\"1.4.0\"], rate_limit: {rate: 1}}");
        let ls = Limiters::default();
        let none = None;
        let own = yaml("{timeout_status: 504}");
        let l = Levels::resolve("r", Some(&own), &default, &ls, &none);
        let r = l.budget.as_ref().expect("default budget").rejection();
        assert_eq!((r.status.as_u16(), r.nhs_code), (504, "REC_TIMEOUT"));
        assert_eq!(l.accept_versions, ["1.4.0"]);
        let own = yaml("{response_timeout: 1s, accept_versions: []}");
        let l = Levels::resolve("r", Some(&own), &default, &ls, &none);
        let b = l.budget.expect("own budget");
        assert_eq!(b.limit, Duration::from_secs(1));
        assert_eq!(
            b.rejection().status,
            StatusCode::REQUEST_TIMEOUT,
            "BaRS default 408"
        );
        assert!(l.accept_versions.is_empty(), "[] turns the check off");
        let l = Levels::resolve("", None, &ServiceLevelsConfig::default(), &ls, &none);
        assert!(l.budget.is_none() && l.accept_versions.is_empty() && l.limiter.is_none());
    }

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::ACCEPT, v.parse().expect("hv"));
        h
    }

    #[test]
    fn accept_versions() {
        let s = vec!["1.4.0".to_string(), "1.3.0".to_string()];
        let ok = |v: &str| check_accept(&accept(v), &s).is_ok();
        assert!(check_accept(&HeaderMap::new(), &s).is_ok(), "no Accept");
        assert!(ok("application/fhir+json; version=1.4.0"));
        assert!(ok("application/fhir+json;version=\"1.3.0\""));
        assert!(ok("application/fhir+json"), "no version parameter");
        assert!(!ok("application/fhir+json; version=1.2.0"));
        assert!(!ok("application/fhir+json; version=1.4"), "exact match");
        assert!(ok(
            "application/fhir+json; version=9, application/fhir+json; version=1.4.0"
        ));
        assert!(ok("application/fhir+json; version=9, */*;q=0.1"));
        assert!(!ok("application/fhir+json; version=9, */*;q=0"));
        assert!(ok("not a media type"), "left to the upstream");
        let r = check_accept(&accept("application/fhir+json; version=2"), &s).expect_err("406");
        assert_eq!(r.status, StatusCode::NOT_ACCEPTABLE);
        assert_eq!(r.nhs_code, "REC_NOT_ACCEPTABLE");
        assert!(r.diagnostics.contains("1.4.0, 1.3.0"), "{}", r.diagnostics);
        assert!(check_accept(&accept("application/fhir+json; version=2"), &[]).is_ok());
    }
}
