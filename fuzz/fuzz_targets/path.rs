//! Request paths: `policy::check_path` must never panic, and a path it accepts must mean
//! the same to an upstream that percent-decodes it once and drops `;parameters` from each
//! segment before resolving dot segments (Tomcat, Jetty). Declare it in fuzz/Cargo.toml:
//!
//! ```toml
//! [[bin]]
//! name = "path"
//! path = "fuzz_targets/path.rs"
//! test = false
//! doc = false
//! bench = false
//! ```
#![no_main]
use libfuzzer_sys::fuzz_target;

// The same percent-decoding oracle as the property tests in tests/it/.
#[path = "../../tests/it/harness/percent.rs"]
#[allow(dead_code)] // decode_fully is for the property tests
mod percent;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if fhirgate::pipeline::policy::check_path(path).is_err() {
        return;
    }
    let decoded = percent::decode_once_utf8(path).expect("accepted path decodes to UTF-8");
    assert_eq!(path.matches('/').count(), decoded.matches('/').count());
    for view in [path, decoded.as_str()] {
        for seg in view.split('/') {
            let name = seg.split(';').next().unwrap_or("");
            assert!(name != "." && name != "..", "{path} escapes as {view}");
        }
        assert!(!view.contains('\\') && !view.contains('\0') && !view.contains("//"));
    }
});
