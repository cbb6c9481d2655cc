//! RFC 7662 introspection response bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(i) = fhirgate::pipeline::auth::introspect::parse_introspection(data) {
        let _ = fhirgate::pipeline::auth::cache::binding(&i);
    }
});
