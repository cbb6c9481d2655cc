//! Scope strings from an authorisation server, checked against request paths and queries.
#![no_main]
use fhirgate::pipeline::auth::scope;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (scopes, target) = s.split_once('\n').unwrap_or((s, "/Patient/1"));
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let granted = scope::parse_scope_list(scopes);
    for m in [http::Method::GET, http::Method::POST, http::Method::DELETE] {
        let need = scope::classify(&m, path).with_query(query);
        let _ = scope::permits(&granted, &need, &[scope::Context::System]);
    }
});
