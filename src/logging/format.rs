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

impl Visit for PlainFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // `Debug` of a string of printable ASCII without `"` or `\` is the string in
        // quotes: write it without the escaping machinery.
        let plain = |v: &str| {
            v.bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        };
        if field.name() == "message" || !plain(value) {
            return self.record_debug(field, &value);
        }
        self.pad();
        if self.result.is_ok() {
            self.result = write!(self.writer, "{}=\"{value}\"", field.name());
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.pad();
        if self.result.is_ok() {
            let mut b = itoa::Buffer::new();
            self.result = write!(self.writer, "{}={}", field.name(), b.format(value));
        }
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
