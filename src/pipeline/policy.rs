//! Route policy: which verified clients may use which paths.
//!
//! Pure functions over the request path and the [`ClientIdentity`]; no I/O. Paths are
//! matched as sent, so anything an upstream could read as another path (dot segments,
//! encoded dots or slashes, backslashes, `;parameters`, needless percent-encoding,
//! another letter case of a route's prefix) is refused outright rather than normalised:
//! a security gateway and its upstream must never disagree about which resource a
//! request names.

use wildmatch::WildMatch;

use serde::Deserialize;

use crate::pipeline::identity::ClientIdentity;
use crate::pipeline::nhsd::NhsdPolicy;
use crate::pipeline::outcome::{ErrorSource, Refuse, Rejection};
use crate::pipeline::service::ServiceLevelsConfig;

/// A compiled route.
#[derive(Debug)]
pub struct Route {
    /// Shared, so metrics label a request with it without copying.
    pub name: std::sync::Arc<str>,
    pub path_prefix: String,
    bundles: Vec<String>,
    subjects: Vec<WildMatch>,
    sans: Vec<WildMatch>,
    /// Route-specific NHSD header policy, if any.
    pub nhsd: Option<NhsdPolicy>,
    pub token: TokenRequirement,
    pub required_scopes: Vec<String>,
    /// Whether the client's token goes upstream (`forward_token`).
    pub forward_token: bool,
    /// The route's request metrics, resolved on its first request.
    pub metrics: crate::metrics::RouteMetrics,
}

impl Route {
    pub fn from_config(c: &RouteConfig) -> Self {
        Route {
            name: c.name.as_str().into(),
            path_prefix: c.path_prefix.clone(),
            bundles: c.bundles.clone(),
            subjects: c.allow_subjects.iter().map(|p| WildMatch::new(p)).collect(),
            sans: c
                .allow_sans
                .iter()
                .map(|p| WildMatch::new(&p.to_ascii_lowercase()))
                .collect(),
            nhsd: c.nhsd.clone(),
            token: c.token,
            required_scopes: c.required_scopes.clone(),
            forward_token: c.forward_token,
            metrics: Default::default(),
        }
    }

    fn covers(&self, path: &str) -> bool {
        prefix_covers(&self.path_prefix, path)
    }

    fn covers_ignoring_case(&self, path: &str) -> bool {
        let prefix = &self.path_prefix;
        prefix == "/"
            || path.get(..prefix.len()).is_some_and(|head| {
                head.eq_ignore_ascii_case(prefix)
                    && path.as_bytes().get(prefix.len()).is_none_or(|b| *b == b'/')
            })
    }

    /// Whether this client may use the route. With no subject or SAN patterns, any client
    /// of an allowed bundle may; otherwise one pattern must match.
    pub fn permits(&self, id: &ClientIdentity) -> bool {
        if !self.bundles.is_empty() && !self.bundles.contains(&id.bundle) {
            return false;
        }
        if self.subjects.is_empty() && self.sans.is_empty() {
            return true;
        }
        self.subjects.iter().any(|p| p.matches(&id.subject))
            || self
                .sans
                .iter()
                .any(|p| id.dns_sans.iter().any(|s| p.matches(s)))
    }
}

/// Whether `path` lies under `prefix`, on a segment boundary: `/Patient` covers
/// `/Patient` and `/Patient/1`, not `/Patients`.
pub fn prefix_covers(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// All routes, longest prefix first.
#[derive(Debug)]
pub struct RoutePolicy {
    routes: Vec<Route>,
}

impl RoutePolicy {
    pub fn new(configs: &[RouteConfig]) -> Self {
        let mut routes: Vec<Route> = configs.iter().map(Route::from_config).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        RoutePolicy { routes }
    }

    /// The route covering `path`, whoever asks (for per-route settings needed before the
    /// route decision, such as the time budget).
    pub fn covering(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.covers(path))
    }

    /// The route for `path`, if the client may use it.
    pub fn decide(&self, path: &str, id: &ClientIdentity) -> Result<&Route, PolicyError> {
        check_path(path)?;
        let route = self
            .routes
            .iter()
            .find(|r| r.covers(path))
            .ok_or(PolicyError::NoRoute)?;
        // Upstreams that match paths without regard to case (ASP.NET, IIS) read
        // `/PATIENT/1` as `/Patient/1`; the route must not depend on which kind it is.
        // (Config refuses two prefixes that differ only in case, so a longer match is
        // the only way the two choices can differ.)
        let ignoring_case = self.routes.iter().find(|r| r.covers_ignoring_case(path));
        if !ignoring_case.is_some_and(|r| std::ptr::eq(r, route)) {
            return Err(PolicyError::BadPath(
                "The path differs only in letter case from a route's path; write it as the route does",
            ));
        }
        if route.permits(id) {
            Ok(route)
        } else {
            Err(PolicyError::RouteForbidden(route.name.to_string()))
        }
    }
}

/// Why the policy stage refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// The path could mean something else once decoded or normalised (the text says why).
    BadPath(&'static str),
    /// No route covers the path: default deny.
    NoRoute,
    /// A route covers the path, but not for this client certificate.
    RouteForbidden(String),
}

impl Refuse for PolicyError {
    fn rejection(&self) -> Rejection {
        match self {
            PolicyError::BadPath(why) => Rejection::bad_path(*why),
            PolicyError::NoRoute => Rejection::no_route(),
            PolicyError::RouteForbidden(route) => Rejection::route_forbidden(route),
        }
    }

    fn source(&self) -> ErrorSource {
        ErrorSource::Client
    }
}

/// Refuses paths whose meaning could change when decoded or normalised downstream.
pub fn check_path(path: &str) -> Result<(), PolicyError> {
    if !path.starts_with('/') {
        return Err(PolicyError::BadPath("The request path must start with '/'"));
    }
    // Raw control characters, spaces or non-ASCII bytes are not a valid URI path;
    // upstreams disagree about what they mean.
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(PolicyError::BadPath(
            "The path must be printable ASCII; percent-encode anything else",
        ));
    }
    if path.contains('\\') {
        return Err(PolicyError::BadPath(
            "Backslashes are not allowed in the path",
        ));
    }
    // Servlet containers (Tomcat, Jetty) drop `;parameters` from a segment, so
    // `/Patient;x=1/1` is `/Patient/1` to them but not to a prefix match, and
    // `/metadata/..;/Patient` is `/Patient`. FHIR paths never carry them.
    if path.contains(';') {
        return Err(PolicyError::BadPath(
            "Path parameters (';') are not allowed in the path",
        ));
    }
    // Without a `%` (most paths) the path is its own decoding: nothing to copy.
    let decoded = if path.contains('%') {
        let lower = path.to_ascii_lowercase();
        for enc in ["%2e", "%2f", "%5c", "%00", "%25"] {
            if lower.contains(enc) {
                return Err(PolicyError::BadPath(
                    "Encoded dots, slashes, backslashes, NULs or percent signs are not allowed in the path",
                ));
            }
        }
        // A character a path may hold as it is means the same encoded (RFC 3986
        // §6.2.2.2) to an upstream that decodes it, but not to a prefix match:
        // `/P%61tient/1` would miss the `/Patient` route.
        if path.split('%').skip(1).any(|esc| {
            esc.get(..2)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .is_some_and(is_pchar)
        }) {
            return Err(PolicyError::BadPath(
                "Letters, digits and the characters - . _ ~ ! $ & ' ( ) * + , ; = : @ must not be percent-encoded in the path; write them as they are",
            ));
        }
        // Overlong or otherwise invalid UTF-8 (`%c0%ae` is '.' to some old decoders) and
        // malformed escapes are decoded differently by different servers.
        Some(
            percent_decode(path)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or(PolicyError::BadPath(
                    "Percent-encoding in the path must be valid UTF-8",
                ))?,
        )
    } else {
        None
    };
    for p in std::iter::once(path).chain(decoded.as_deref()) {
        for seg in p.split('/').skip(1) {
            if seg == "." || seg == ".." {
                return Err(PolicyError::BadPath(
                    "Dot segments are not allowed in the path",
                ));
            }
        }
    }
    if path.contains("//") {
        return Err(PolicyError::BadPath("Empty path segments are not allowed"));
    }
    Ok(())
}

/// RFC 3986 §3.3 `pchar` less `pct-encoded`: what a path segment may hold as it is.
fn is_pchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b)
}

/// Percent-decodes `s` (the `percent-encoding` crate); `None` when a `%` is not followed
/// by two hex digits, which the crate would pass through as text.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let well_formed = b
        .iter()
        .enumerate()
        .filter(|(_, c)| **c == b'%')
        .all(|(i, _)| {
            b.get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
        });
    well_formed.then(|| percent_encoding::percent_decode(b).collect())
}

/// A path prefix and who may use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// Matched on whole path segments: `/Patient` matches `/Patient/1`, not `/Patients`.
    pub path_prefix: String,
    /// Trust bundles whose clients may use this route; empty means every bundle.
    #[serde(default)]
    pub bundles: Vec<String>,
    /// Glob patterns (`*`, `?`) on the RFC 4514 subject DN.
    #[serde(default)]
    pub allow_subjects: Vec<String>,
    /// Glob patterns on the DNS subject alternative names (case-insensitive).
    #[serde(default)]
    pub allow_sans: Vec<String>,
    /// `required` (default): a valid bearer token; `none`: no token (e.g. /metadata).
    #[serde(default)]
    pub token: TokenRequirement,
    /// Scopes the token must list verbatim, on top of the SMART interaction check.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// NHSD header policy for this route, replacing `nhsd.headers`.
    #[serde(default)]
    pub nhsd: Option<NhsdPolicy>,
    /// Send the client's `Authorization` header (and an `access_token` query parameter)
    /// on to the upstream. Off by default: the upstream gets the verified facts as
    /// `X-Fhirgate-*` headers, never a replayable token.
    #[serde(default)]
    pub forward_token: bool,
    /// Replaces the top-level `service_levels` field by field for this route.
    #[serde(default)]
    pub service_levels: ServiceLevelsConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TokenRequirement {
    #[default]
    Required,
    None,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn id(subject: &str, sans: &[&str], bundle: &str) -> ClientIdentity {
        ClientIdentity {
            subject: subject.into(),
            common_name: None,
            issuer: "CN=SubCA".into(),
            dns_sans: sans.iter().map(|s| s.to_string()).collect(),
            serial: "01".into(),
            fingerprint_sha256: "00".into(),
            not_after: 0,
            bundle: bundle.into(),
        }
    }

    fn route(
        name: &str,
        prefix: &str,
        bundles: &[&str],
        subj: &[&str],
        sans: &[&str],
    ) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            path_prefix: prefix.into(),
            bundles: bundles.iter().map(|s| s.to_string()).collect(),
            allow_subjects: subj.iter().map(|s| s.to_string()).collect(),
            allow_sans: sans.iter().map(|s| s.to_string()).collect(),
            nhsd: None,
            token: TokenRequirement::Required,
            required_scopes: vec![],
            forward_token: false,
            service_levels: Default::default(),
        }
    }

    fn policy() -> RoutePolicy {
        RoutePolicy::new(&[
            route("metadata", "/metadata", &[], &[], &[]),
            route(
                "patient",
                "/Patient",
                &["nhs-int"],
                &[],
                &["bars-x26.*.nhs.uk"],
            ),
            route(
                "admin",
                "/admin",
                &["nhs-prod"],
                &["*CN=ops.example.nhs.uk*"],
                &[],
            ),
            route("messaging", "/$process-message", &["nhs-int"], &[], &[]),
        ])
    }

    #[test]
    fn route_table() {
        let p = policy();
        let x26 = id(
            "C=GB, CN=BaRS-X26.a.nhs.uk",
            &["bars-x26.a.nhs.uk"],
            "nhs-int",
        );
        let other = id("C=GB, CN=BaRS-Y.b.nhs.uk", &["bars-y.b.nhs.uk"], "nhs-int");
        let prod = id("C=GB, CN=ops.example.nhs.uk", &[], "nhs-prod");
        let cases: &[(&str, &ClientIdentity, Result<&str, StatusCode>)] = &[
            ("/metadata", &x26, Ok("metadata")),
            ("/metadata", &prod, Ok("metadata")),
            ("/Patient/1", &x26, Ok("patient")),
            ("/Patient", &x26, Ok("patient")),
            ("/Patient/1", &other, Err(StatusCode::FORBIDDEN)),
            ("/Patient/1", &prod, Err(StatusCode::FORBIDDEN)),
            ("/Patients", &x26, Err(StatusCode::FORBIDDEN)),
            ("/admin/x", &prod, Ok("admin")),
            ("/admin/x", &x26, Err(StatusCode::FORBIDDEN)),
            ("/$process-message", &other, Ok("messaging")),
            ("/Observation", &x26, Err(StatusCode::FORBIDDEN)),
            ("/metadata/../Patient", &x26, Err(StatusCode::BAD_REQUEST)),
            (
                "/metadata/%2e%2e/Patient",
                &x26,
                Err(StatusCode::BAD_REQUEST),
            ),
            ("/metadata%2FPatient", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/./x", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata\\..\\Patient", &x26, Err(StatusCode::BAD_REQUEST)),
            ("//metadata", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata%252e", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/..;/Patient", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/.;x=1/y", &x26, Err(StatusCode::BAD_REQUEST)),
            (
                "/metadata/..%3b/Patient",
                &x26,
                Err(StatusCode::BAD_REQUEST),
            ),
            (
                "/metadata/%c0%ae%c0%ae/Patient",
                &x26,
                Err(StatusCode::BAD_REQUEST),
            ),
            ("/metadata/%e0%80%ae", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/%zz", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/%4", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/%+0", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/%C3%A9", &x26, Ok("metadata")),
            ("/metadata/\u{e9}", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/\0", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/a b", &x26, Err(StatusCode::BAD_REQUEST)),
            // Each of these names a route's resource to an upstream that decodes
            // unreserved characters (RFC 3986 §6.2.2.2: "URIs that differ in the
            // replacement of an unreserved character with its corresponding
            // percent-encoded US-ASCII octet are equivalent"), drops `;parameters`
            // (servlet containers) or ignores case (ASP.NET), but would miss that route
            // in a byte-wise prefix match.
            ("/metadata/a;b", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/Patient;x=1/1", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/P%61tient/1", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/%50atient", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/%24process-message", &other, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/%7E", &x26, Err(StatusCode::BAD_REQUEST)),
            ("/metadata/%40", &x26, Err(StatusCode::BAD_REQUEST)),
            // With no `/` route another case finds no route at all: default deny.
            ("/patient/1", &x26, Err(StatusCode::FORBIDDEN)),
            ("/$Process-Message", &other, Err(StatusCode::FORBIDDEN)),
            // Encodings with no literal form in a path stay as they are.
            ("/metadata/a%20b", &x26, Ok("metadata")),
            ("/metadata/%3F%23%5B", &x26, Ok("metadata")),
            ("/metadata/ABC", &x26, Ok("metadata")),
            ("/metadata/...", &x26, Ok("metadata")),
            ("*", &x26, Err(StatusCode::BAD_REQUEST)),
        ];
        for (path, who, want) in cases {
            let got = p
                .decide(path, who)
                .map(|r| &*r.name)
                .map_err(|r| r.status());
            assert_eq!(&got, want, "path {path} for {}", who.subject);
        }
    }

    #[test]
    fn longest_prefix_wins_and_root_route_catches_rest() {
        let p = RoutePolicy::new(&[
            route("all", "/", &[], &["*CN=any*"], &[]),
            route("meta", "/metadata", &[], &[], &[]),
        ]);
        let c = id("CN=someone", &[], "b");
        assert_eq!(p.decide("/metadata", &c).map(|r| &*r.name), Ok("meta"));
        assert_eq!(
            p.decide("/Patient", &c)
                .map(|r| &*r.name)
                .map_err(|r| r.reason()),
            Err("route_forbidden")
        );
        let any = id("CN=anyone", &[], "b");
        assert_eq!(p.decide("/Patient", &any).map(|r| &*r.name), Ok("all"));
        // Under the `/` route, a path that a case-insensitive upstream reads as
        // `/metadata` is refused rather than sent there by another route's rules.
        for path in ["/METADATA", "/Metadata/x"] {
            assert_eq!(
                p.decide(path, &any)
                    .map_err(|r| r.reason())
                    .map(|r| &*r.name),
                Err("bad_path"),
                "{path}"
            );
        }
        assert_eq!(p.decide("/metadataX", &any).map(|r| &*r.name), Ok("all"));
        assert_eq!(p.decide("/metadata/X", &c).map(|r| &*r.name), Ok("meta"));
    }

    #[test]
    fn no_route_is_default_deny() {
        let p = RoutePolicy::new(&[route("meta", "/metadata", &[], &[], &[])]);
        let r = p
            .decide("/Patient", &id("CN=x", &[], "b"))
            .map(|r| r.name.clone());
        assert_eq!(r.map_err(|e| e.reason()), Err("no_route"));
    }
}
