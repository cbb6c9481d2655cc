//! Configuration text (YAML), parsed and validated.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = fhirgate::config::Config::from_yaml(s, std::path::Path::new("/"));
    }
});
