//! The text format for log lines: tracing-subscriber's default (`Full`, no colour) byte
//! for byte, with the access line written directly.
//!
//! Every request logs one access line, and the default formatter's generic field
//! machinery (a styling wrapper around every name and `=`, even with colour off) was 9-10%
//! of the gateway's CPU time on a keep-alive GET (bench/README.md, issue 14). This writes
//! the access line's timestamp, level, target and fields with the same bytes and no
//! styling; anything else (other targets, colour on a terminal, an event inside a span,
//! a clock outside years 1970-9999) goes to the default formatter, so operators' parsers see one format.

use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::SystemTime as DefaultTimer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target of the one-per-request access line.
pub const ACCESS: &str = "fhirgate::access";

/// 9999-12-31T23:59:59Z: the last second the default timer writes with four digits.
const LAST_FOUR_DIGIT_SECOND: u64 = 253_402_300_799;

/// The event formatter for text logs.
#[derive(Default)]
pub struct Lines {
    default: Format<Full, DefaultTimer>,
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        // The clock is read here only for the access line; the default formatter reads
        // its own.
        let now =
            (meta.target() == ACCESS && !writer.has_ansi_escapes() && ctx.event_scope().is_none())
                .then(SystemTime::now)
                .filter(|t| {
                    t.duration_since(UNIX_EPOCH)
                        .is_ok_and(|d| d.as_secs() <= LAST_FOUR_DIGIT_SECOND)
                });
        let Some(now) = now else {
            return self.default.format_event(ctx, writer, event);
        };
        write!(
            writer,
            "{} {} {ACCESS}: ",
            humantime::format_rfc3339_micros(now),
            level_str(meta.level())
        )?;
        let mut fields = PlainFields {
            writer: writer.by_ref(),
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writeln!(writer)
    }
}

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
            method = %self.method,
            path = %self.path,
            status = self.status,
            latency_ms = self.latency_ms,
            client_subject = %self.client_subject,
            client_fingerprint = %self.client_fingerprint,
            bundle = %self.bundle,
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

    /// The line as [`Lines`] writes [`AccessLine::emit`]'s event (the same bytes, but
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
        write!(out, "{}", humantime::format_rfc3339_micros(now)).ok()?;
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
        write!(t.0, " peer={}", self.peer).ok()?;
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

/// The access line's fields, appended as [`PlainFields`] writes them.
struct Text<'a>(&'a mut String);

impl Text<'_> {
    /// ` name=value`: a `name = %value` field.
    fn shown(&mut self, name: &str, value: &str) {
        self.0.push(' ');
        self.0.push_str(name);
        self.0.push('=');
        self.0.push_str(value);
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

/// A string whose `Debug` form is itself in quotes: printable ASCII without `"` or `\`.
fn plain(value: &str) -> bool {
    value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// The default formatter's level column (right-aligned in five characters).
fn level_str(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        _ => "ERROR",
    }
}

/// Fields as the default field formatter writes them without colour: the message bare
/// (control characters escaped), then ` name=value` with values in their `Debug` form
/// (`%` fields' `Debug` is their `Display`; strings are quoted).
struct PlainFields<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl PlainFields<'_> {
    fn pad(&mut self) {
        if self.first {
            self.first = false;
        } else if self.result.is_ok() {
            self.result = self.writer.write_char(' ');
        }
    }
}

impl PlainFields<'_> {
    fn string(&mut self, name: &str, value: &str) {
        self.pad();
        if self.result.is_ok() {
            // Without the escaping machinery where `Debug` would not escape.
            self.result = if plain(value) {
                write!(self.writer, "{name}=\"{value}\"")
            } else {
                write!(self.writer, "{name}={value:?}")
            };
        }
    }

    fn number(&mut self, name: &str, value: u64) {
        self.pad();
        if self.result.is_ok() {
            let mut b = itoa::Buffer::new();
            self.result = write!(self.writer, "{name}={}", b.format(value));
        }
    }
}

impl Visit for PlainFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            return self.record_debug(field, &value);
        }
        self.string(field.name(), value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.number(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.pad();
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            // As the default formatter's message: `Debug` (a format string's text),
            // with terminal control characters escaped.
            write!(Escaping(&mut self.writer), "{value:?}")
        } else {
            write!(self.writer, "{}={value:?}", field.name())
        };
    }
}

/// Escapes what tracing-subscriber escapes in a message (ESC, BEL, BS, FF, DEL and the
/// C1 controls), so a message cannot drive a terminal.
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", ch as u32)?,
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
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

    /// Emits an access line with awkward values (quotes, backslashes, non-ASCII,
    /// control characters, floats, zero, an empty string) and the same fields under
    /// another target, which the default formatter writes.
    fn emit() {
        let path = "/Patient/1?name=\"o'brien\"\\x";
        let subject = "CN=client.example,O=NHS Trust ü";
        for target_is_access in [true, false] {
            macro_rules! line {
                ($target:expr) => {
                    tracing::info!(
                        target: $target,
                        method = %"GET",
                        path = %path,
                        status = 200u16,
                        latency_ms = 0.1234_f64,
                        client_subject = %subject,
                        route = "fhir \"r\"",
                        ods_code = "-",
                        client_id = "caf\u{e9}\u{7}",
                        token_hash = "",
                        upstream_status = 0u16,
                        upstream_ms = 12.0_f64,
                        big = 1e21_f64,
                        negative = -3i64,
                        ok = true,
                        trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736",
                        "request \u{1b}[31m"
                    )
                };
            }
            if target_is_access {
                line!("fhirgate::access");
            } else {
                line!("fhirgate::other");
            }
        }
    }

    /// Everything after the timestamp, which differs between the two lines.
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
        let buf = Buf::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        let subject = "CN=client.example,O=NHS Trust \u{fc}";
        let line = awkward_line(subject);
        tracing::subscriber::with_default(subscriber, || line.emit());
        let theirs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let mut ours = String::new();
        line.write_text(SystemTime::now(), &mut ours).unwrap();
        assert_eq!(without_time(&ours), without_time(&theirs));
        assert!(ours.ends_with('\n') && ours.matches('\n').count() == 1);
        assert!(ours.contains(" upstream_ms=1e-7 "), "{ours}");
        // A clock past what the default timer writes is left to it.
        let far = UNIX_EPOCH + std::time::Duration::from_secs(LAST_FOUR_DIGIT_SECOND + 1);
        assert!(line.write_text(far, &mut String::new()).is_none());
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

    /// The access line is the default formatter's line, byte for byte.
    #[test]
    fn access_line_is_byte_identical_to_the_default_format() {
        let buf = Buf::default();
        let w = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || w.clone())
            .event_format(Lines::default())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let ours = without_time(lines[0]);
        let theirs = without_time(lines[1]).replacen("fhirgate::other", ACCESS, 1);
        assert_eq!(ours, theirs);
        // And the timestamps have the default's shape, e.g. 2026-12-01T15:23:57.123456Z.
        for l in &lines {
            let ts = l.split_once(' ').unwrap().0;
            assert_eq!(ts.len(), 27, "{ts}");
            assert!(humantime::parse_rfc3339(ts).is_ok(), "{ts}");
        }
        assert!(ours.starts_with(" INFO fhirgate::access: request \\x1b[31m method=GET "));
        assert!(ours.contains(" route=\"fhir \\\"r\\\"\" "), "{ours}");
    }
}
