//! Process logs, the access log included: `tracing` to stderr through a non-blocking
//! writer.
//!
//! Requests never wait for stderr: a line is formatted on the request's thread, handed to
//! a bounded queue and written by a dedicated thread through a buffer that is flushed
//! whenever the queue runs empty (so a quiet gateway's lines appear at once, and a busy
//! one writes many lines per `write`). If stderr cannot keep up (a stalled journald or
//! pipe) and the queue is full, lines are dropped rather than block requests, and every
//! dropped line is counted in `fhirgate_log_lines_dropped_total`.

use std::io::BufWriter;
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

/// Lines the queue holds before dropping: at 100k req/s, about a second of access lines.
const QUEUE_LINES: usize = 128_000;
/// One `write` carries up to this much of a batch.
const WRITE_BUFFER: usize = 64 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Starts logging to stderr (`FHIRGATE_LOG` filter, default `info`; JSON lines when
/// `json`). Keep the guard alive for the life of the process: dropping it writes out
/// what is still queued.
pub fn init(json: bool) -> WorkerGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FHIRGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal, so files and journald stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES)
        .thread_name("fhirgate-log")
        .finish(BufWriter::with_capacity(WRITE_BUFFER, std::io::stderr()));
    let _ = DROPPED.set(writer.error_counter());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    guard
}

/// Log lines dropped because the queue to stderr was full (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED
        .get()
        .map_or(0, |c| u64::try_from(c.dropped_lines()).unwrap_or(u64::MAX))
}
