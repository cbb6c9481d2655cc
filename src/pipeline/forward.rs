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
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Forwarding headers the gateway rewrites from what it saw itself.
const FORWARDING: [HeaderName; 5] = [
    header::FORWARDED,
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    HeaderName::from_static("x-real-ip"),
];

/// The names a `Connection` header lists: hop-by-hop too (RFC 9110 §7.6.1). Empty (and
/// unallocated) when there is no `Connection` header.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// Removes every header `doomed` picks: one pass over the few headers a request has,
/// rather than a lookup for each of the twenty-odd names that might be there.
fn remove_where(headers: &mut HeaderMap, doomed: impl Fn(&HeaderName) -> bool) {
    // Unallocated when nothing matches, as for most requests.
    let found: Vec<HeaderName> = headers.keys().filter(|k| doomed(k)).cloned().collect();
    for n in found {
        headers.remove(n);
    }
}

fn is_hop_by_hop(name: &HeaderName, listed: &[HeaderName]) -> bool {
    HOP_BY_HOP.contains(name) || listed.contains(name)
}

/// A header the gateway is the only authority for.
fn is_reserved(name: &HeaderName, names: &IdentityNames) -> bool {
    names.0.iter().flatten().any(|n| n == name)
        || FORWARDING.contains(name)
        || name.as_str().starts_with(RESERVED_PREFIX)
}

/// Removes hop-by-hop headers, including any named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    remove_where(headers, |k| is_hop_by_hop(k, &listed));
}

/// Makes any text safe as a header value: printable ASCII stays, everything else
/// (and `%`) is percent-encoded, as Envoy does for certificate fields.
pub fn header_value(text: &str) -> HeaderValue {
    if text.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'%') {
        if let Ok(v) = HeaderValue::from_str(text) {
            return v;
        }
    }
    let mut out = String::with_capacity(text.len() + 8);
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

/// The identity header names of [`IdentityHeaders`], parsed once per configuration
/// in [`IdentityHeaders::names`] order (subject, issuer, fingerprint, serial, CN, bundle).
/// A name that is not a valid header name (refused at config load) is `None`.
#[derive(Debug, Clone)]
pub struct IdentityNames([Option<HeaderName>; 6]);

/// The headers a connection's requests carry upstream for its verified client, built
/// once per connection: they are the same on every request.
#[derive(Debug, Clone, Default)]
pub struct ConnectionHeaders(Vec<(HeaderName, HeaderValue)>);

impl ConnectionHeaders {
    pub fn new(names: &IdentityNames, id: &ClientIdentity, peer: SocketAddr) -> Self {
        // The same order as `IdentityNames`.
        let values = [
            Some(&id.subject),
            Some(&id.issuer),
            Some(&id.fingerprint_sha256),
            Some(&id.serial),
            id.common_name.as_ref(),
            Some(&id.bundle),
        ];
        let mut out: Vec<(HeaderName, HeaderValue)> = names
            .0
            .iter()
            .zip(values)
            .filter_map(|(name, value)| Some((name.clone()?, header_value(value?))))
            .collect();
        out.push((X_FORWARDED_FOR, header_value(&peer.ip().to_string())));
        out.push((X_FORWARDED_PROTO, HeaderValue::from_static("https")));
        ConnectionHeaders(out)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Prepares request headers for the upstream: `conn` from [`ConnectionHeaders::new`].
pub fn upstream_request_headers(
    headers: &mut HeaderMap,
    names: &IdentityNames,
    conn: &ConnectionHeaders,
    original_host: Option<HeaderValue>,
) {
    let listed = connection_listed(headers);
    // The upstream's Host comes from the upstream URI; the client's goes in X-Forwarded-Host.
    remove_where(headers, |k| {
        k == header::HOST || is_hop_by_hop(k, &listed) || is_reserved(k, names)
    });
    for (name, value) in &conn.0 {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(h) = original_host {
        headers.insert(X_FORWARDED_HOST, h);
    }
    join_cookies(headers);
}

/// RFC 9113 §8.2.3: "If there are multiple Cookie header fields after decompression,
/// these MUST be concatenated into a single octet string using the two-octet delimiter
/// of 0x3B, 0x20 ("; ") before being passed into a non-HTTP/2 context, such as an
/// HTTP/1.1 connection". An HTTP/2 client may split its cookie into crumbs; the upstream
/// may be HTTP/1.1, and one field is as good for an HTTP/2 one.
fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    // None or one, as for nearly every request: nothing to join, nothing allocated.
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    let mut sensitive = false;
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
        sensitive |= v.is_sensitive();
    }
    // Valid values joined by "; " are a valid value; were it not, the crumbs stay.
    if let Ok(mut v) = HeaderValue::from_bytes(&joined) {
        v.set_sensitive(sensitive);
        headers.insert(header::COOKIE, v);
    }
}

/// Prepares upstream response headers for the client.
pub fn client_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
}

/// Gives the header values storage of their own: one allocation for all of them, in
/// place of the buffers they were parsed from. hyper parses a header value as a slice of
/// the connection's read buffer (an upstream's: 8 KiB and more), and an HTTP/2
/// connection's HPACK encoder keeps the values it indexes in its dynamic table for the
/// connection's life (RFC 7541 §2.3.2), so a value that is new on each response (`Date`
/// once a second, a `Last-Modified`, an upstream's own request id) would keep a whole
/// read buffer alive per table entry: 0.6 MB for one connection in `tests/heap.rs`.
pub fn detach_values(headers: &mut HeaderMap) {
    let len = headers.values().map(HeaderValue::len).sum();
    let mut store = bytes::BytesMut::with_capacity(len);
    for v in headers.values() {
        store.extend_from_slice(v.as_bytes());
    }
    let store = store.freeze();
    let mut at = 0;
    for v in headers.values_mut() {
        let end = at + v.len();
        // The bytes were a valid value already, so this cannot fail; if it did, the
        // value would stay as it was.
        if let Ok(mut own) = HeaderValue::from_maybe_shared(store.slice(at..end)) {
            own.set_sensitive(v.is_sensitive());
            *v = own;
        }
        at = end;
    }
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
    fn detached_values_are_equal_and_no_longer_in_the_buffer_they_came_from() {
        let read_buf = bytes::Bytes::from(
            b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 05:00:00 GMT\r\nx-b: two\r\n\r\n".to_vec(),
        );
        let slice = |from: &str| {
            let s = std::str::from_utf8(&read_buf).unwrap();
            let at = s.find(from).unwrap();
            HeaderValue::from_maybe_shared(read_buf.slice(at..at + from.len())).unwrap()
        };
        let mut h = HeaderMap::new();
        h.insert(header::DATE, slice("Sun, 06 Dec 2026 05:00:00 GMT"));
        h.append("x-b", slice("two"));
        let mut secret = slice("two");
        secret.set_sensitive(true);
        h.append("x-b", secret);
        h.insert("x-static", HeaderValue::from_static("s"));
        let before = h.clone();

        detach_values(&mut h);

        assert_eq!(h, before, "same names, values and order");
        let range = read_buf.as_ptr_range();
        for v in h.values() {
            assert!(
                !range.contains(&v.as_bytes().as_ptr()),
                "{v:?} still points into the read buffer"
            );
        }
        let sensitive: Vec<bool> = h.get_all("x-b").iter().map(|v| v.is_sensitive()).collect();
        assert_eq!(
            sensitive,
            [false, true],
            "sensitivity kept (RFC 7541 §7.1.3)"
        );
        // Nothing but the test's own handle keeps the read buffer now.
        drop(before);
        assert!(read_buf.is_unique(), "the read buffer is no longer shared");
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
        let names = IdentityHeaders::default().parsed();
        upstream_request_headers(
            &mut h,
            &names,
            &ConnectionHeaders::new(&names, &identity(), peer),
            Some(HeaderValue::from_static("gw.example.nhs.uk")),
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

    /// RFC 9113 §8.2.3: "If there are multiple Cookie header fields after
    /// decompression, these MUST be concatenated into a single octet string using the
    /// two-octet delimiter of 0x3B, 0x20 ("; ")".
    #[test]
    fn cookie_crumbs_become_one_cookie_field() {
        let names = IdentityHeaders::default().parsed();
        let conn = ConnectionHeaders::default();
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1"));
        h.append("cookie", HeaderValue::from_static("b=2"));
        h.append("cookie", HeaderValue::from_static("c=3"));
        upstream_request_headers(&mut h, &names, &conn, None);
        let all: Vec<_> = h.get_all("cookie").iter().collect();
        assert_eq!(all, vec!["a=1; b=2; c=3"]);
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_static("a=1; b=2"));
        upstream_request_headers(&mut h, &names, &conn, None);
        assert_eq!(h["cookie"], "a=1; b=2");
        let mut h = HeaderMap::new();
        upstream_request_headers(&mut h, &names, &conn, None);
        assert!(h.get("cookie").is_none());
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

/// Whether `name` already means something to HTTP or to the gateway, so that carrying a
/// certificate field under it would change the request rather than describe the client:
/// message framing and routing (`Content-Length`, `Host`, hop-by-hop fields, RFC 9110
/// §7.6.1), credentials (`Authorization`, `Cookie`), and what the gateway sets or checks
/// itself (forwarding, `X-Fhirgate-*`, `NHSD-*`, the request ids, trace context).
pub fn is_taken_name(name: &HeaderName) -> bool {
    const TAKEN: [&str; 11] = [
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "authorization",
        "cookie",
        "expect",
        "x-request-id",
        "x-correlation-id",
        "traceparent",
        "tracestate",
    ];
    HOP_BY_HOP.contains(name)
        || FORWARDING.contains(name)
        || TAKEN.contains(&name.as_str())
        || name.as_str().starts_with(RESERVED_PREFIX)
        || name.as_str().starts_with("nhsd-")
}

impl IdentityHeaders {
    /// The names as header names, for stripping client-sent copies.
    pub fn parsed(&self) -> IdentityNames {
        IdentityNames(
            self.names()
                .map(|n| HeaderName::from_bytes(n.as_bytes()).ok()),
        )
    }

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
