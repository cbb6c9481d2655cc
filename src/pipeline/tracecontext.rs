//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): `traceparent` and
//! `tracestate` are accepted from the client and propagated upstream.
//!
//! The gateway is a hop: the upstream request keeps the trace-id and carries a new
//! parent-id, the gateway's own span id. A missing or invalid `traceparent` starts a new
//! trace (and then `tracestate` is dropped, since it belongs to the trace it came with).

use std::time::Duration;

use http::header::{HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::config::error::{err, ConfigError};

/// `telemetry`: OTLP/HTTP span export (a build with the `otlp` cargo feature only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP traces URL, e.g. `http://127.0.0.1:4318/v1/traces`; absent: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// How often queued spans are sent.
    #[serde(with = "crate::config::duration")]
    pub export_interval: Duration,
    #[serde(with = "crate::config::duration")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "fhirgate".into(),
            export_interval: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
        }
    }
}

impl TelemetryConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let Some(url) = &self.otlp_endpoint else {
            return Ok(());
        };
        if !cfg!(feature = "otlp") {
            return Err(err(
                "telemetry.otlp_endpoint",
                "this build has no OTLP export; build with `--features otlp` or remove it",
            ));
        }
        let uri: http::Uri = url
            .parse()
            .map_err(|_| err("telemetry.otlp_endpoint", "not a valid URL"))?;
        if uri.scheme_str() != Some("http") || uri.authority().is_none() {
            return Err(err(
                "telemetry.otlp_endpoint",
                "must be an http:// URL with a host (a local collector or sidecar)",
            ));
        }
        crate::config::error::no_userinfo(&uri).map_err(|r| err("telemetry.otlp_endpoint", r))?;
        if self.service_name.trim().is_empty() {
            return Err(err("telemetry.service_name", "must not be empty"));
        }
        if self.export_interval.is_zero() || self.export_timeout.is_zero() {
            return Err(err(
                "telemetry.export_interval",
                "export_interval and export_timeout must be greater than zero",
            ));
        }
        Ok(())
    }
}

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Upper bound on the `tracestate` forwarded (the spec asks vendors to propagate at
/// least 512 characters; 32 members of up to 256 + 1 + 256 is the theoretical maximum).
const MAX_TRACESTATE: usize = 8192;

/// The trace a request belongs to and the gateway's span in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span (the incoming parent-id), when the trace was continued.
    pub parent_id: Option<[u8; 8]>,
    /// The gateway's span: sent upstream as the parent-id.
    pub span_id: [u8; 8],
    pub sampled: bool,
    /// Forwarded unchanged with a continued trace.
    pub tracestate: Option<HeaderValue>,
}

impl TraceContext {
    /// Continues the client's trace if its `traceparent` is valid, else starts one.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let mut all = h.get_all(TRACEPARENT).iter();
        let parsed = match (all.next(), all.next()) {
            (Some(v), None) => v.to_str().ok().and_then(parse_traceparent),
            // Absent, or sent twice (which one would count?): a new trace.
            _ => None,
        };
        match parsed {
            Some((trace_id, parent_id, flags)) => TraceContext {
                trace_id,
                parent_id: Some(parent_id),
                span_id: new_span_id(),
                sampled: flags & 0x01 == 0x01,
                tracestate: tracestate(h),
            },
            None => TraceContext {
                trace_id: new_trace_id(),
                parent_id: None,
                span_id: new_span_id(),
                sampled: true,
                tracestate: None,
            },
        }
    }

    pub fn trace_id_hex(&self) -> Hex<32> {
        Hex::of(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> Hex<16> {
        Hex::of(&self.span_id)
    }

    /// The `traceparent` for the upstream request: version 00, this trace, the
    /// gateway's span as parent-id, and the sampled flag (the only flag level 1 defines;
    /// "vendors MUST set [other flags] to zero" when they do not know them).
    pub fn traceparent(&self) -> HeaderValue {
        // 00-<32 hex>-<16 hex>-0x: written in place (this runs for every request).
        let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let _ = hex::encode_to_slice(self.trace_id, &mut b[3..35]);
        let _ = hex::encode_to_slice(self.span_id, &mut b[36..52]);
        b[54] = if self.sampled { b'1' } else { b'0' };
        HeaderValue::from_bytes(&b).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// Replaces whatever trace headers the client sent with the gateway's.
    pub fn set_upstream(&self, h: &mut HeaderMap) {
        h.remove(TRACEPARENT);
        h.remove(TRACESTATE);
        h.insert(TRACEPARENT, self.traceparent());
        if let Some(ts) = &self.tracestate {
            h.insert(TRACESTATE, ts.clone());
        }
    }
}

/// Lower-case hex of an id, `L` characters on the stack (logged with every request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hex<const L: usize>([u8; L]);

impl<const L: usize> Hex<L> {
    fn of(bytes: &[u8]) -> Self {
        let mut out = [b'0'; L];
        // The length always matches (the callers' ids are L/2 bytes); on a mismatch the
        // id would read as zeros, never as anything else.
        let _ = hex::encode_to_slice(bytes, &mut out);
        Hex(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl<const L: usize> PartialEq<&str> for Hex<L> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<const L: usize> std::fmt::Display for Hex<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `version-traceid-parentid-flags` per W3C Trace Context §3.2. Returns `None` for
/// anything invalid: the caller then starts a new trace.
fn parse_traceparent(s: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let b = s.as_bytes();
    // §3.2.2.1: "version (2 HEXDIGLC) … Version ff is forbidden".
    let version = hex_lc::<1>(b.get(0..2)?)?[0];
    if version == 0xff {
        return None;
    }
    // Version 00 is exactly 55 characters. §4.3: for a higher version, parse the
    // version-00 fields and accept more only after a '-'.
    let ok_len = match version {
        0 => b.len() == 55,
        _ => b.len() == 55 || (b.len() > 55 && b[55] == b'-'),
    };
    if !ok_len || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = hex_lc::<16>(&b[3..35])?;
    let parent_id = hex_lc::<8>(&b[36..52])?;
    let flags = hex_lc::<1>(&b[53..55])?[0];
    // §3.2.2.3/§3.2.2.4: "All bytes as zero … is considered an invalid value."
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

/// Lowercase hex only (HEXDIGLC); uppercase is invalid per the spec.
fn hex_lc<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
    if b.len() != 2 * N || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(b, &mut out).ok()?;
    Some(out)
}

/// All `tracestate` fields combined into one list (§3.3.1.1: a vendor MAY combine
/// multiple headers), unless too large or not visible ASCII.
fn tracestate(h: &HeaderMap) -> Option<HeaderValue> {
    let parts: Vec<&str> = h
        .get_all(TRACESTATE)
        .iter()
        .map(|v| v.to_str().ok())
        .collect::<Option<_>>()?;
    let joined = parts.join(",");
    if joined.trim().is_empty() || joined.len() > MAX_TRACESTATE {
        return None;
    }
    HeaderValue::from_str(&joined).ok()
}

/// 16 random bytes, never all zero. uuid v4 fixes 6 bits of each value, so the id takes
/// the fully random bytes of two.
fn new_trace_id() -> [u8; 16] {
    loop {
        let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let (a, b) = (a.as_bytes(), b.as_bytes());
        let mut id = [0u8; 16];
        id[..6].copy_from_slice(&a[..6]);
        id[6..12].copy_from_slice(&a[10..16]);
        id[12..16].copy_from_slice(&b[..4]);
        if id != [0; 16] {
            return id;
        }
    }
}

fn new_span_id() -> [u8; 8] {
    loop {
        let u = uuid::Uuid::new_v4();
        let u = u.as_bytes();
        let mut id = [0u8; 8];
        id[..6].copy_from_slice(&u[..6]);
        id[6..].copy_from_slice(&u[10..12]);
        if id != [0; 8] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn headers(tp: &[&str], ts: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in tp {
            h.append(TRACEPARENT, v.parse().expect("hv"));
        }
        for v in ts {
            h.append(TRACESTATE, v.parse().expect("hv"));
        }
        h
    }

    #[test]
    fn valid_traceparent_is_continued_with_a_new_parent_id() {
        let c = TraceContext::from_headers(&headers(&[VALID], &["congo=t61rcWkgMzE"]));
        assert_eq!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(
            c.parent_id.map(hex::encode).as_deref(),
            Some("b7ad6b7169203331")
        );
        assert_ne!(c.span_id_hex(), "b7ad6b7169203331");
        assert!(c.sampled);
        let mut up = headers(&[VALID], &["congo=t61rcWkgMzE"]);
        c.set_upstream(&mut up);
        let tp = up[TRACEPARENT].to_str().expect("ascii");
        assert_eq!(
            tp,
            format!("00-0af7651916cd43dd8448eb211c80319c-{}-01", c.span_id_hex())
        );
        assert_eq!(parse_traceparent(tp).map(|p| p.0), Some(c.trace_id));
        assert_eq!(up[TRACESTATE], "congo=t61rcWkgMzE");
        assert_eq!(up.get_all(TRACEPARENT).iter().count(), 1);
    }

    #[test]
    fn invalid_traceparent_starts_a_new_trace_and_drops_tracestate() {
        for bad in [
            // Uppercase hex: "HEXDIGLC … lowercase hex".
            "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
            // "All bytes as zero … invalid"
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            // Version ff is forbidden.
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            // Version 00 has exactly four fields.
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            "00_0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "0af7651916cd43dd8448eb211c80319c",
            "",
        ] {
            let c = TraceContext::from_headers(&headers(&[bad], &["congo=x"]));
            assert_eq!(c.parent_id, None, "{bad:?} must restart the trace");
            assert_ne!(c.trace_id, [0; 16]);
            assert_eq!(c.tracestate, None, "{bad:?}: tracestate dropped");
        }
        let twice = TraceContext::from_headers(&headers(&[VALID, VALID], &[]));
        assert_eq!(twice.parent_id, None, "two traceparent headers");
        let none = TraceContext::from_headers(&HeaderMap::new());
        assert_eq!(none.parent_id, None);
        assert_ne!(
            none.trace_id,
            TraceContext::from_headers(&HeaderMap::new()).trace_id
        );
    }

    #[test]
    fn higher_version_is_parsed_as_00() {
        let future = "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra";
        let c = TraceContext::from_headers(&headers(&[future], &[]));
        assert_eq!(c.trace_id_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert!(c.traceparent().as_bytes().starts_with(b"00-"));
        let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
        assert!(!TraceContext::from_headers(&headers(&[unsampled], &[])).sampled);
    }

    #[test]
    fn multiple_tracestate_headers_are_combined() {
        let c = TraceContext::from_headers(&headers(&[VALID], &["a=1", "b=2"]));
        assert_eq!(c.tracestate.expect("kept"), "a=1,b=2");
    }
}
