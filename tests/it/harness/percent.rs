//! The percent-decoding oracle (RFC 3986 §2.1) the path properties judge
//! `policy::check_path` by: tests/it/path_props.rs and the
//! cargo-fuzz target fuzz/fuzz_targets/path.rs (which includes this file with
//! `#[path]`, so it uses nothing but std). Written apart from the gateway's own decoder
//! on purpose: an oracle that shared the code under test could not disagree with it.

/// One percent-decoding pass, strict: `None` for a malformed escape (`%zz`, `%4`, `%+0`:
/// exactly two hex digits must follow `%`).
pub fn decode_once(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
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
    Some(out)
}

/// One pass to text: `None` for a malformed escape or bytes that are not UTF-8.
pub fn decode_once_utf8(s: &str) -> Option<String> {
    String::from_utf8(decode_once(s)?).ok()
}

/// The most generous reading an upstream could apply: decodes again while that changes
/// anything (at most four passes), stopping at the first malformed escape; invalid UTF-8
/// is read lossily.
pub fn decode_fully(s: &str) -> String {
    let mut s = s.to_owned();
    for _ in 0..4 {
        let Some(d) = decode_once(&s) else { break };
        let d = String::from_utf8_lossy(&d).into_owned();
        if d == s {
            break;
        }
        s = d;
    }
    s
}
