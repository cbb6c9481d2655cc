//! Header rewriting between the client and the upstream: pure functions, no I/O.
//!
//! Order matters and is fixed here: first remove hop-by-hop headers and every header the
//! gateway itself is the authority for (identity, forwarding, `x-fhirgate-*`), *then* set
//! the gateway's own values. A client therefore can never smuggle an identity upstream.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::pipeline::identity::ClientIdentity;
use serde::Deserialize;

/// Prefix of headers only the gateway may set (token and NHSD facts use it).
pub const RESERVED_PREFIX: &str = "x-fhirgate-";

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus legacy ones that must not be forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Forwarding headers the gateway rewrites from what it saw itself.
const FORWARDING: [&str; 5] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
];

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        headers.remove(n);
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// Removes every header the gateway is the only authority for.
pub fn strip_reserved(headers: &mut HeaderMap, identity_names: &IdentityHeaders) {
    for n in identity_names.names() {
        headers.remove(n);
    }
    for n in FORWARDING {
        headers.remove(n);
    }
    let reserved: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with(RESERVED_PREFIX))
        .cloned()
        .collect();
    for n in reserved {
        headers.remove(n);
    }
}

/// Makes any text safe as a header value: printable ASCII stays, everything else
/// (and `%`) is percent-encoded, as Envoy does for certificate fields.
pub fn header_value(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    // Every byte is now visible ASCII or space, which HeaderValue always accepts.
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Sets a header by configured name (validated at config load).
pub fn set(headers: &mut HeaderMap, name: &str, value: HeaderValue) {
    if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
        headers.insert(n, value);
    }
}

/// Prepares request headers for the upstream.
pub fn upstream_request_headers(
    headers: &mut HeaderMap,
    names: &IdentityHeaders,
    id: &ClientIdentity,
    peer: SocketAddr,
    original_host: Option<&str>,
) {
    strip_hop_by_hop(headers);
    strip_reserved(headers, names);
    // The upstream's Host comes from the upstream URI; the client's goes in X-Forwarded-Host.
    headers.remove(header::HOST);

    set(headers, &names.subject, header_value(&id.subject));
    set(headers, &names.issuer, header_value(&id.issuer));
    set(
        headers,
        &names.fingerprint,
        header_value(&id.fingerprint_sha256),
    );
    set(headers, &names.serial, header_value(&id.serial));
    if let Some(cn) = &id.common_name {
        set(headers, &names.common_name, header_value(cn));
    }
    set(headers, &names.bundle, header_value(&id.bundle));

    headers.insert("x-forwarded-for", header_value(&peer.ip().to_string()));
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    if let Some(h) = original_host {
        headers.insert("x-forwarded-host", header_value(h));
    }
}

/// Prepares upstream response headers for the client.
pub fn client_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ClientIdentity {
        ClientIdentity {
            subject: "C=GB, CN=BaRS-X26.trust.nhs.uk".into(),
            common_name: Some("BaRS-X26.trust.nhs.uk".into()),
            issuer: "CN=SubCA".into(),
            dns_sans: vec![],
            serial: "20:01".into(),
            fingerprint_sha256: "ab".repeat(32),
            not_after: 0,
            bundle: "nhs-int".into(),
        }
    }

    #[test]
    fn spoofed_identity_and_forwarding_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-client-cert-subject", HeaderValue::from_static("CN=evil"));
        h.append(
            "X-Client-Cert-Subject",
            HeaderValue::from_static("CN=evil2"),
        );
        h.insert("x-client-cert-bundle", HeaderValue::from_static("nhs-prod"));
        h.insert("x-fhirgate-ods-code", HeaderValue::from_static("EVIL"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("forwarded", HeaderValue::from_static("for=10.0.0.1"));
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("host", HeaderValue::from_static("gw.example.nhs.uk"));
        h.insert("accept", HeaderValue::from_static("application/fhir+json"));
        let peer: SocketAddr = "127.0.0.1:5555".parse().unwrap();
        upstream_request_headers(
            &mut h,
            &IdentityHeaders::default(),
            &identity(),
            peer,
            Some("gw.example.nhs.uk"),
        );
        let all: Vec<_> = h.get_all("x-client-cert-subject").iter().collect();
        assert_eq!(all, vec!["C=GB, CN=BaRS-X26.trust.nhs.uk"]);
        assert_eq!(h["x-client-cert-bundle"], "nhs-int");
        assert!(h.get("x-fhirgate-ods-code").is_none());
        assert!(h.get("forwarded").is_none());
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("host").is_none());
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "gw.example.nhs.uk");
        assert_eq!(h["x-client-cert-fingerprint"], "ab".repeat(32).as_str());
        assert_eq!(h["accept"], "application/fhir+json");
    }

    #[test]
    fn header_value_escapes_non_ascii_and_controls() {
        assert_eq!(header_value("CN=Zoë"), "CN=Zo%C3%AB");
        assert_eq!(header_value("a\r\nb"), "a%0D%0Ab");
        assert_eq!(header_value("100%"), "100%25");
        assert_eq!(header_value("plain text"), "plain text");
    }
}

/// Names of the headers that carry the verified client certificate upstream. Any header of
/// these names sent by a client is removed before the gateway sets its own.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityHeaders {
    pub subject: String,
    pub issuer: String,
    pub fingerprint: String,
    pub serial: String,
    pub common_name: String,
    pub bundle: String,
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders {
            subject: "X-Client-Cert-Subject".into(),
            issuer: "X-Client-Cert-Issuer".into(),
            fingerprint: "X-Client-Cert-Fingerprint".into(),
            serial: "X-Client-Cert-Serial".into(),
            common_name: "X-Client-Cert-CN".into(),
            bundle: "X-Client-Cert-Bundle".into(),
        }
    }
}

impl IdentityHeaders {
    pub fn names(&self) -> [&str; 6] {
        [
            &self.subject,
            &self.issuer,
            &self.fingerprint,
            &self.serial,
            &self.common_name,
            &self.bundle,
        ]
    }
}
