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

fn decode_once(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if fhirgate::pipeline::policy::check_path(path).is_err() {
        return;
    }
    let decoded = decode_once(path).expect("accepted path decodes to UTF-8");
    assert_eq!(path.matches('/').count(), decoded.matches('/').count());
    for view in [path, decoded.as_str()] {
        for seg in view.split('/') {
            let name = seg.split(';').next().unwrap_or("");
            assert!(name != "." && name != "..", "{path} escapes as {view}");
        }
        assert!(!view.contains('\\') && !view.contains('\0') && !view.contains("//"));
    }
});
