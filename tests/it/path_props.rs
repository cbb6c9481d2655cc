//! Property tests for request paths (`policy::check_path`, the route-escape defences):
//! a path the gateway accepts means the same resource to an upstream that percent-decodes
//! it (once, or as often as it likes) and drops `;parameters` before resolving dot
//! segments (Tomcat, Jetty), and contains no escape a legacy decoder could read
//! differently; no path makes the check panic. The decoding oracle is
//! harness/percent.rs, shared with the cargo-fuzz target fuzz/fuzz_targets/path.rs.

use fhirgate::pipeline::policy::check_path;
use proptest::prelude::*;

use fhirgate::pipeline::auth::scope;
use http::Method;

use crate::harness::percent::{decode_fully, decode_once};

/// What a servlet container makes of each segment: `;parameters` dropped.
fn servlet_segments(path: &str) -> Vec<String> {
    path.split('/')
        .map(|seg| seg.split(';').next().unwrap_or("").to_owned())
        .collect()
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("..;".to_owned()),
        Just("..;x=1".to_owned()),
        Just(".;".to_owned()),
        Just("..%3b".to_owned()),
        Just("..%3B".to_owned()),
        Just("%2e%2e".to_owned()),
        Just(".%2E".to_owned()),
        Just("%c0%ae".to_owned()),
        Just("%c0%ae%c0%ae".to_owned()),
        Just("%e0%80%ae".to_owned()),
        Just("%c0%af".to_owned()),
        Just("%zz".to_owned()),
        Just("%4".to_owned()),
        Just("%+0".to_owned()),
        Just("%-1".to_owned()),
        Just("%+e".to_owned()),
        Just("%".to_owned()),
        Just("%3b".to_owned()),
        Just(";".to_owned()),
        Just("a;b".to_owned()),
        Just("%C3%A9".to_owned()),
        Just("%20".to_owned()),
        Just("".to_owned()),
        "[A-Za-z0-9_$.-]{1,8}",
        "[ -~]{0,6}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn accepted_paths_mean_the_same_to_a_servlet_container(
        segs in proptest::collection::vec(segment(), 0..6)
    ) {
        let path = format!("/{}", segs.join("/"));
        if check_path(&path).is_ok() {
            prop_assert!(path.bytes().all(|b| b.is_ascii_graphic()), "{path}: raw bytes");
            let decoded = decode_once(&path);
            prop_assert!(decoded.is_some(), "{path}: malformed escape accepted");
            let decoded = decoded.unwrap_or_default();
            let text = String::from_utf8(decoded);
            prop_assert!(text.is_ok(), "{path}: decodes to invalid UTF-8");
            let text = text.unwrap_or_default();
            for view in [path.as_str(), text.as_str()] {
                for seg in servlet_segments(view) {
                    prop_assert!(seg != "." && seg != "..", "{path}: {view} has a dot segment");
                }
            }
            // Decoding adds no separator, and no second decoding pass changes anything
            // structural (no `%25`, so a second pass sees no new escapes).
            prop_assert_eq!(path.matches('/').count(), text.matches('/').count(), "{}", path);
            prop_assert!(!path.to_ascii_lowercase().contains("%25"), "{}", path);
            prop_assert!(!text.contains('\\') && !text.contains('\0'), "{}", path);
        }
    }

    #[test]
    fn any_path_is_judged_without_panicking(path in "\\PC{0,80}") {
        let _ = check_path(&path);
        if check_path(&format!("/{path}")).is_ok() {
            prop_assert!(path.bytes().all(|b| b.is_ascii_graphic()), "{path}");
        }
    }
}

fn path_strategy() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just("%2f".to_string()),
        Just("%5c".to_string()),
        Just("%25".to_string()),
        Just("%00".to_string()),
        Just("\\".to_string()),
        Just("".to_string()),
        "[A-Za-z0-9_$-]{1,8}",
        "[ -~]{0,6}",
    ];
    proptest::collection::vec(seg, 0..8).prop_map(|segs| format!("/{}", segs.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// An accepted path has no segment that any amount of percent-decoding turns into a
    /// dot segment, and no encoded separator: the gateway and the upstream agree on it.
    #[test]
    fn accepted_paths_cannot_escape(path in path_strategy()) {
        if check_path(&path).is_ok() {
            // Percent-decoded repeatedly: the most generous reading an upstream could apply.
            let d = decode_fully(&path);
            for seg in d.split('/') {
                prop_assert!(seg != ".." && seg != ".", "{path} decodes to {d}");
            }
            prop_assert!(!d.contains('\\'), "{path}");
            prop_assert!(!path.contains("//"), "{path}");
            prop_assert!(!d.contains('\0'), "{path}");
        }
    }

    #[test]
    fn any_path_is_checked_without_panicking(path in "\\PC{0,64}") {
        let _ = check_path(&path);
        let _ = scope::classify(&Method::GET, &path);
        let _ = scope::classify(&Method::POST, &path);
    }
}

/// The routes the choice property judges: a type, an operation, an exempt path, the rest.
fn route_table() -> fhirgate::pipeline::policy::RoutePolicy {
    use fhirgate::pipeline::policy::{RouteConfig, RoutePolicy, TokenRequirement};
    let route = |name: &str, prefix: &str| RouteConfig {
        name: name.into(),
        path_prefix: prefix.into(),
        bundles: vec![],
        allow_subjects: vec![],
        allow_sans: vec![],
        token: TokenRequirement::None,
        required_scopes: vec![],
        nhsd: None,
        forward_token: false,
        service_levels: Default::default(),
    };
    RoutePolicy::new(&[
        route("patient", "/Patient"),
        route("messaging", "/$process-message"),
        route("metadata", "/metadata"),
        route("rest", "/"),
    ])
}

/// The route an upstream's reading of `path` falls under, by longest prefix on a segment
/// boundary, with or without regard to letter case: written apart from the gateway's
/// matcher, as the decoding oracle is.
fn oracle_route(path: &str, ignore_case: bool) -> &'static str {
    let fold = |s: &str| {
        if ignore_case {
            s.to_ascii_lowercase()
        } else {
            s.to_owned()
        }
    };
    let p = fold(path);
    for (name, prefix) in [
        ("messaging", "/$process-message"),
        ("metadata", "/metadata"),
        ("patient", "/Patient"),
    ] {
        let prefix = fold(prefix);
        if p == prefix || p.starts_with(&format!("{prefix}/")) {
            return name;
        }
    }
    "rest"
}

fn routed_segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("Patient".to_owned()),
        Just("patient".to_owned()),
        Just("PATIENT".to_owned()),
        Just("P%61tient".to_owned()),
        Just("%50atient".to_owned()),
        Just("Patient;x=1".to_owned()),
        Just("$process-message".to_owned()),
        Just("%24process-message".to_owned()),
        Just("$PROCESS-message".to_owned()),
        Just("metadata".to_owned()),
        Just("metad%61ta".to_owned()),
        Just("Metadata".to_owned()),
        Just("%3b".to_owned()),
        Just("%C3%A9".to_owned()),
        Just("%20".to_owned()),
        "[A-Za-z0-9_$.;-]{1,8}",
        "(%[0-9A-Fa-f]{2}){1,2}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// README stage 4: "the gateway and the upstream can never disagree about which
    /// resource a path names". For every path the route stage accepts, an upstream that
    /// percent-decodes it, drops `;parameters` or ignores letter case puts it under the
    /// same route as the gateway did.
    #[test]
    fn an_accepted_path_is_routed_as_any_upstream_reads_it(
        segs in proptest::collection::vec(routed_segment(), 1..4)
    ) {
        let path = format!("/{}", segs.join("/"));
        let anyone = fhirgate::pipeline::identity::ClientIdentity {
            subject: "CN=client".into(),
            common_name: None,
            issuer: "CN=SubCA".into(),
            dns_sans: vec![],
            serial: "01".into(),
            fingerprint_sha256: "00".into(),
            not_after: 0,
            bundle: "nhs".into(),
        };
        let table = route_table();
        if let Ok(route) = table.decide(&path, &anyone) {
            let decoded = decode_once(&path).map(|b| String::from_utf8_lossy(&b).into_owned());
            prop_assert!(decoded.is_some(), "{path}");
            let decoded = decoded.unwrap_or_default();
            let servlet = servlet_segments(&decoded).join("/");
            for view in [path.as_str(), decoded.as_str(), servlet.as_str()] {
                for ignore_case in [false, true] {
                    prop_assert_eq!(
                        &*route.name,
                        oracle_route(view, ignore_case),
                        "{} read as {} (ignoring case: {})", path, view, ignore_case
                    );
                }
            }
        }
    }
}
