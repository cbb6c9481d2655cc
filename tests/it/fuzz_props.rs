//! Stable-toolchain property tests for every parser that takes input from the network or
//! an operator: arbitrary input never panics, and what is accepted satisfies the
//! invariant the gateway relies on. The coverage-guided versions of the same entry points
//! are the cargo-fuzz targets in `fuzz/` (see fuzz/README.md). NHSD header decoding has
//! its own properties in src/pipeline/nhsd/proptests.rs, request paths in path_props.rs.

use std::path::Path;

use fhirgate::config::Config;
use fhirgate::pipeline::auth::{bearer, introspect, scope};
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;

const VALID_CONFIG: &str = "environment: development
listeners:
  - address: 127.0.0.1:0
tls:
  server_cert: /nonexistent/server.crt
  server_key: /nonexistent/server.key
  trust_bundles:
    - name: nhs-int
      ca_files: [/nonexistent/root.crt]
upstream:
  url: http://127.0.0.1:8081
auth:
  mode: development
routes:
  - name: all
    path_prefix: /
";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Scope strings from the authorisation server: never panic; a token granting
    /// nothing parseable permits nothing.
    #[test]
    fn scope_lists_parse_totally(s in "[ -~]{0,80}", path in "/[A-Za-z$/0-9]{0,30}") {
        let granted = scope::parse_scope_list(&s);
        let need = scope::classify(&Method::GET, &path);
        let contexts = [scope::Context::System];
        let ok = scope::permits(&granted, &need, &contexts);
        if granted.is_empty() && need != scope::Requirement::none() {
            prop_assert!(!ok, "{s:?} granted {path}");
        }
    }

    /// Query strings naming other types: never panic, and never need less than the
    /// path alone (a query can only add types to cover).
    #[test]
    fn queries_only_add_to_what_a_request_needs(
        s in "(system/[A-Z*][a-z]{0,6}\\.(read|rs|s|r|\\*) ?){0,4}",
        path in "/[A-Z][a-z]{0,6}(/[0-9]{1,3})?",
        query in "((_include|_revinclude|_has|_include:iterate|[a-z]{1,6})(:[A-Za-z*]{0,6}){0,4}(\\.[a-z]{1,5}(:[A-Z][a-z]{0,5})?){0,2}=[A-Za-z:*%3]{0,20}&?){0,4}",
    ) {
        let granted = scope::parse_scope_list(&s);
        let contexts = [scope::Context::System];
        let alone = scope::classify(&Method::GET, &path);
        let with = scope::classify(&Method::GET, &path).with_query(Some(&query));
        if scope::permits(&granted, &with, &contexts) {
            prop_assert!(scope::permits(&granted, &alone, &contexts), "{s:?} {path}?{query}");
        }
    }

    /// Introspection responses: arbitrary bytes never panic; anything accepted has a
    /// boolean `active`.
    #[test]
    fn introspection_bodies_parse_totally(body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = introspect::parse_introspection(&body);
    }

    #[test]
    fn introspection_like_json_parses_totally(
        active in prop_oneof![Just("true"), Just("false"), Just("\"true\""), Just("1"), Just("null")],
        exp in prop_oneof![Just("1900000000"), Just("1.5e9"), Just("-1"), Just("1e400"), Just("\"soon\""), Just("null")],
        aud in prop_oneof![Just("\"a\""), Just("[\"a\",\"b\"]"), Just("5"), Just("[]")],
        cnf in prop_oneof![Just("{}"), Just("{\"x5t#S256\":\"abc\"}"), Just("{\"jkt\":1}"), Just("[]")],
    ) {
        let body = format!("{{\"active\":{active},\"exp\":{exp},\"aud\":{aud},\"cnf\":{cnf}}}");
        if let Ok(i) = introspect::parse_introspection(body.as_bytes()) {
            prop_assert!(active == "true" || active == "false", "{body} -> {i:?}");
        }
    }

    /// `Authorization` headers: never panic; a token is only ever returned for exactly one
    /// `Bearer` header.
    #[test]
    fn bearer_extraction_is_total(values in proptest::collection::vec("[ -~]{0,40}", 0..3)) {
        let mut h = HeaderMap::new();
        for v in &values {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.append(http::header::AUTHORIZATION, v);
            }
        }
        if let Ok(t) = bearer::extract(&h) {
            prop_assert_eq!(h.get_all(http::header::AUTHORIZATION).iter().count(), 1);
            prop_assert!(!t.is_empty());
        }
    }

    /// Config text: arbitrary YAML-ish input and mutations of a valid file never panic,
    /// and every error names a field or the YAML position.
    #[test]
    fn config_parsing_is_total(text in "[ -~\n]{0,200}") {
        if let Err(e) = Config::from_yaml(&text, Path::new("/")) {
            let m = e.to_string();
            prop_assert!(m.split_once(": ").is_some_and(|(f, r)| !f.is_empty() && !r.is_empty()), "{m}");
        }
    }

    #[test]
    fn mutated_configs_fail_with_a_named_field(
        line in 0usize..17,
        replacement in prop_oneof![
            Just(String::new()),
            Just("  bogus: 1".to_string()),
            Just("limits: {idle_timeout: 0s}".to_string()),
            Just("  - address: not-an-address".to_string()),
            Just("*alias".to_string()),
            "[ -~]{0,20}",
        ],
    ) {
        let mut lines: Vec<String> = VALID_CONFIG.lines().map(str::to_owned).collect();
        if line < lines.len() {
            lines[line] = replacement;
        }
        let text = lines.join("\n");
        match Config::from_yaml(&text, Path::new("/")) {
            Ok(_) => {}
            Err(e) => prop_assert!(e.to_string().contains(':'), "{e}"),
        }
    }
}
