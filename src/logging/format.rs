//! The access line in text logs, written directly: tracing-subscriber's default text
//! format (`Full`, no colour) byte for byte, without its per-field machinery.
//!
//! Every request logs one access line, and the default formatter's generic field
//! machinery (a visitor call, `core::fmt` and a styling wrapper for every field, even with
//! colour off) was 8-10% of the gateway's CPU time on a keep-alive GET (bench/README.md,
//! issue 14). Every other event, and the access line in JSON or colour, goes through
//! `tracing` as usual, so operators' parsers see one format.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

/// The target of the one-per-request access line.
pub const ACCESS: &str = "fhirgate::access";

/// 9999-12-31T23:59:59Z: the last second the default timer writes with four digits.
const LAST_FOUR_DIGIT_SECOND: u64 = 253_402_300_799;

/// One request's access line, its fields in the order they are written.
pub struct AccessLine<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub latency_ms: f64,
    pub client_subject: &'a str,
    pub client_fingerprint: &'a str,
    pub bundle: &'a str,
    pub peer: std::net::SocketAddr,
    pub route: &'a str,
    pub ods_code: &'a str,
    pub client_id: &'a str,
    pub token_hash: &'a str,
    pub auth: &'a str,
    pub upstream_status: u16,
    pub upstream_ms: f64,
    pub rejection: &'a str,
    pub request_id: &'a str,
    pub correlation_id: &'a str,
    pub trace_id: &'a str,
    pub span_id: &'a str,
}

impl AccessLine<'_> {
    /// The line as a `tracing` event (JSON logs, colour, or before [`super::init`]).
    pub fn emit(&self) {
        tracing::info!(
            target: ACCESS,
            method = %Escaped(self.method),
            path = %Escaped(self.path),
            status = self.status,
            latency_ms = self.latency_ms,
            client_subject = %Escaped(self.client_subject),
            client_fingerprint = %Escaped(self.client_fingerprint),
            bundle = %Escaped(self.bundle),
            peer = %self.peer,
            route = self.route,
            ods_code = self.ods_code,
            client_id = self.client_id,
            token_hash = self.token_hash,
            auth = self.auth,
            upstream_status = self.upstream_status,
            upstream_ms = self.upstream_ms,
            rejection = self.rejection,
            request_id = self.request_id,
            correlation_id = self.correlation_id,
            trace_id = self.trace_id,
            span_id = self.span_id,
            "request"
        );
    }

    /// The line as the default formatter writes [`AccessLine::emit`]'s event (the same bytes, but
    /// for the digits of a float in an exact tie: [`Text::float`]), without `tracing`'s
    /// per-field dispatch and the formatting machinery (8-10% of a keep-alive GET's CPU
    /// time; bench/README.md, ninth pass). `None` when the clock is outside what the
    /// default timer writes.
    pub fn write_text(&self, now: SystemTime, out: &mut String) -> Option<()> {
        let in_range = now
            .duration_since(UNIX_EPOCH)
            .is_ok_and(|d| d.as_secs() <= LAST_FOUR_DIGIT_SECOND);
        if !in_range {
            return None;
        }
        timestamp(now, out);
        out.push_str("  INFO ");
        out.push_str(ACCESS);
        out.push_str(": request");
        let mut t = Text(out);
        t.shown("method", self.method);
        t.shown("path", self.path);
        t.number("status", self.status.into());
        t.float("latency_ms", self.latency_ms);
        t.shown("client_subject", self.client_subject);
        t.shown("client_fingerprint", self.client_fingerprint);
        t.shown("bundle", self.bundle);
        t.peer(self.peer);
        t.quoted("route", self.route);
        t.quoted("ods_code", self.ods_code);
        t.quoted("client_id", self.client_id);
        t.quoted("token_hash", self.token_hash);
        t.quoted("auth", self.auth);
        t.number("upstream_status", self.upstream_status.into());
        t.float("upstream_ms", self.upstream_ms);
        t.quoted("rejection", self.rejection);
        t.quoted("request_id", self.request_id);
        t.quoted("correlation_id", self.correlation_id);
        t.quoted("trace_id", self.trace_id);
        t.quoted("span_id", self.span_id);
        out.push('\n');
        Some(())
    }
}

/// `now` as the default timer writes it (humantime's RFC 3339 with microseconds), the
/// date and time of day formatted once per second per thread: the per-request part is
/// the microseconds.
fn timestamp(now: SystemTime, out: &mut String) {
    thread_local! {
        // The second last formatted, and its `YYYY-MM-DDTHH:MM:SS` (19 bytes).
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        let whole = UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let text = humantime::format_rfc3339_seconds(whole).to_string();
        match text.as_bytes().get(..19) {
            Some(p) => prefix.copy_from_slice(p),
            None => {
                let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
                return;
            }
        }
        SECOND.set((secs, prefix));
    }
    // The prefix is ASCII digits and separators, written from a `str`.
    out.push_str(std::str::from_utf8(&prefix).unwrap_or_default());
    out.push('.');
    let mut digits = itoa::Buffer::new();
    let micros = digits.format(since.subsec_micros());
    for _ in micros.len()..6 {
        out.push('0');
    }
    out.push_str(micros);
    out.push('Z');
}

/// The access line's fields, appended as the default formatter writes them.
struct Text<'a>(&'a mut String);

impl Text<'_> {
    /// ` peer=` and the address as `Display` writes it; IPv4 without `core::fmt`.
    fn peer(&mut self, peer: std::net::SocketAddr) {
        self.0.push_str(" peer=");
        match peer {
            std::net::SocketAddr::V4(a) => {
                let mut digits = itoa::Buffer::new();
                for (i, octet) in a.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        self.0.push('.');
                    }
                    self.0.push_str(digits.format(octet));
                }
                self.0.push(':');
                self.0.push_str(digits.format(a.port()));
            }
            std::net::SocketAddr::V6(a) => {
                let _ = write!(self.0, "{a}");
            }
        }
    }

    /// ` name=value`: a `name = %Escaped(value)` field.
    fn shown(&mut self, name: &str, value: &str) {
        self.0.push(' ');
        self.0.push_str(name);
        self.0.push('=');
        if has_control(value) {
            let _ = write!(self.0, "{}", Escaped(value));
        } else {
            self.0.push_str(value);
        }
    }

    /// A `name = value` string field: quoted, escaped as `Debug` escapes it.
    fn quoted(&mut self, name: &str, value: &str) {
        if plain(value) {
            self.0.push(' ');
            self.0.push_str(name);
            self.0.push_str("=\"");
            self.0.push_str(value);
            self.0.push('"');
        } else {
            let _ = write!(self.0, " {name}={value:?}");
        }
    }

    fn number(&mut self, name: &str, value: u64) {
        self.0.push(' ');
        self.0.push_str(name);
        self.0.push('=');
        self.0.push_str(itoa::Buffer::new().format(value));
    }

    /// As `Debug` writes an `f64`. In [1e-4, 1e16) that is the shortest digits that read
    /// back as the same number, in positional notation, which zmij writes too, faster
    /// (in an exact tie between two such digit strings it may pick the other one, which
    /// reads back the same); elsewhere, where `Debug` switches to an exponent at
    /// another point than zmij, `Debug` itself.
    fn float(&mut self, name: &str, value: f64) {
        self.0.push(' ');
        self.0.push_str(name);
        self.0.push('=');
        if value == 0.0 || (1e-4..1e16).contains(&value.abs()) {
            self.0.push_str(zmij::Buffer::new().format_finite(value));
        } else {
            let _ = write!(self.0, "{value:?}");
        }
    }
}

/// A log field value that may come from a client (a certificate's subject or issuer: any
/// self-signed certificate reaches the "handshake refused" line), written with its
/// control characters (C0, DEL, C1) escaped as Rust writes them (`\n`, `\u{1b}`), so it
/// cannot end the line and forge the next one, nor drive a terminal (CWE-117, OWASP
/// Logging Cheat Sheet). tracing-subscriber escapes only some of them, and only in the
/// message, not in `%` fields; JSON logs escape them anyway.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !has_control(self.0) {
            return f.write_str(self.0);
        }
        for c in self.0.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_char(c)?;
            }
        }
        Ok(())
    }
}

/// Whether `value` holds a control character: printable ASCII (nearly every value) is
/// told by its bytes alone.
fn has_control(value: &str) -> bool {
    !value.bytes().all(|b| (0x20..0x7f).contains(&b)) && value.chars().any(char::is_control)
}

/// A string whose `Debug` form is itself in quotes: printable ASCII without `"` or `\`.
fn plain(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// `line` as `tracing`'s default formatter writes it, without colour.
    fn by_default_formatter(line: &AccessLine<'_>) -> String {
        let buf = Buf::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || line.emit());
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        out
    }

    /// Everything after the timestamp, which differs between two lines.
    fn without_time(line: &str) -> &str {
        line.split_once(' ').unwrap().1
    }

    fn awkward_line(subject: &str) -> AccessLine<'_> {
        AccessLine {
            method: "PATCH",
            path: "/Patient/1?name=\"o'brien\"\\x",
            status: 403,
            latency_ms: 0.1234,
            client_subject: subject,
            client_fingerprint: "ab01",
            bundle: "nhs-int",
            peer: "[::1]:50443".parse().unwrap(),
            route: "fhir \"r\"",
            ods_code: "-",
            client_id: "caf\u{e9}\u{7}",
            token_hash: "",
            auth: "checked",
            upstream_status: 0,
            upstream_ms: 1e-7,
            rejection: "forbidden\\scope",
            request_id: "\u{1b}[31m",
            correlation_id: "-",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            span_id: "",
        }
    }

    /// The access line written directly is the line `tracing`'s default formatter
    /// writes for the same event, byte for byte (awkward values included), so log
    /// parsers cannot tell which path wrote it.
    #[test]
    fn direct_access_line_is_the_default_formatters_line() {
        let subject = "CN=client.example,O=NHS Trust \u{fc}";
        let line = awkward_line(subject);
        let theirs = by_default_formatter(&line);
        let mut ours = String::new();
        line.write_text(SystemTime::now(), &mut ours).unwrap();
        assert_eq!(without_time(&ours), without_time(&theirs));
        // And the timestamps have the default's shape, e.g. 2026-12-01T15:23:57.123456Z.
        for l in [&ours, &theirs] {
            let ts = l.split_once(' ').unwrap().0;
            assert_eq!(ts.len(), 27, "{ts}");
            assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
        }
        assert!(ours.ends_with('\n') && ours.matches('\n').count() == 1);
        assert!(ours.contains(" upstream_ms=1e-7 "), "{ours}");
        // A clock past what the default timer writes is left to it.
        let far = UNIX_EPOCH + std::time::Duration::from_secs(LAST_FOUR_DIGIT_SECOND + 1);
        assert!(line.write_text(far, &mut String::new()).is_none());
    }

    /// CWE-117: a client certificate's subject is the client's text. Written either way
    /// (directly or by `tracing`), its CR, LF, ESC, DEL and C1 characters are escaped:
    /// the line stays one line, and no terminal sequence reaches the log.
    #[test]
    fn control_characters_in_shown_fields_cannot_forge_lines() {
        let subject = "CN=x\r\n2026-12-01T00:00:00.000000Z  INFO fhirgate::access: request forged\u{1b}[2J\u{7f}\u{9b}";
        let mut line = awkward_line(subject);
        line.bundle = "nhs\n-int";
        let mut ours = String::new();
        line.write_text(SystemTime::now(), &mut ours).unwrap();
        assert_eq!(ours.matches('\n').count(), 1, "{ours}");
        assert!(ours.ends_with('\n'));
        assert!(
            !ours.contains(['\r', '\u{1b}', '\u{7f}', '\u{9b}']),
            "{ours}"
        );
        assert!(
            ours.contains(r"client_subject=CN=x\r\n2026-12-01T00:00:00.000000Z  INFO fhirgate::access: request forged\u{1b}[2J\u{7f}\u{9b} "),
            "{ours}"
        );
        assert!(ours.contains(r" bundle=nhs\n-int "), "{ours}");

        let theirs = by_default_formatter(&line);
        assert_eq!(without_time(&ours), without_time(&theirs));
    }

    /// The timestamp and the peer, written without `core::fmt`, are what humantime and
    /// `Display` write: across second boundaries (the cached date and time of day must
    /// change), with leading zeros in the microseconds, and for IPv4 and IPv6 peers.
    #[test]
    fn timestamp_and_peer_are_written_as_humantime_and_display_write_them() {
        let base = UNIX_EPOCH + std::time::Duration::from_secs(1_764_633_599); // 23:59:59
        for micros in [
            0u64,
            1,
            9,
            10,
            999,
            1_000,
            99_999,
            100_000,
            999_999,
            1_000_000,
            1_000_001,
            86_400_000_123,
        ] {
            for nanos in [0u64, 999] {
                let t = base + std::time::Duration::from_nanos(micros * 1_000 + nanos);
                let mut out = String::new();
                timestamp(t, &mut out);
                assert_eq!(
                    out,
                    humantime::format_rfc3339_micros(t).to_string(),
                    "{micros} µs {nanos} ns"
                );
            }
        }
        for peer in [
            "127.0.0.1:443",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "10.2.30.4:50443",
            "[::1]:50443",
            "[fe80::1%2]:8443",
        ] {
            let peer: std::net::SocketAddr = peer.parse().unwrap();
            let mut out = String::new();
            Text(&mut out).peer(peer);
            assert_eq!(out, format!(" peer={peer}"));
        }
    }

    /// The fast float path writes the number `Debug` writes: millisecond figures as the
    /// gateway computes them from nanoseconds, pseudo-random bit patterns across the whole
    /// range, and the edges where notations switch.
    #[test]
    fn floats_are_written_as_debug_writes_them() {
        let ties = std::cell::Cell::new(0);
        let check = |v: f64| {
            let mut ours = String::new();
            Text(&mut ours).float("x", v);
            let theirs = format!(" x={v:?}");
            if ours != theirs {
                // Where two shortest digit strings are exactly as close to the value,
                // the two algorithms may break the tie differently: same length, and
                // both read back as the same f64.
                let back = |s: &str| s[3..].parse::<f64>().unwrap().to_bits();
                assert_eq!(ours.len(), theirs.len(), "{ours} {theirs}");
                assert_eq!(back(&ours), v.to_bits(), "{ours} {theirs}");
                assert_eq!(back(&theirs), v.to_bits(), "{ours} {theirs}");
                ties.set(ties.get() + 1);
            }
        };
        for v in [
            0.0,
            -0.0,
            1.0,
            -1.0,
            1e-4,
            9.999_999_999_999_999e-5,
            1e-5,
            1e15,
            9.999e15,
            1e16,
            1e21,
            0.1,
            0.3,
            2.5e-8,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ] {
            check(v);
        }
        for nanos in (0..2_000_000u64)
            .step_by(7)
            .chain((0..40).map(|i| 1u64 << i))
        {
            check(std::time::Duration::from_nanos(nanos).as_secs_f64() * 1000.0);
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            // xorshift64: deterministic bit patterns, every exponent.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            check(f64::from_bits(x));
        }
        // Ties are rare: the exact value must have one digit more than the shortest.
        assert!(ties.get() < 100, "{} ties", ties.get());
    }
}
