//! Process logs, the access log included: `tracing` to stderr through a batching writer.
//!
//! Requests never wait for stderr, and a busy gateway does not pay a `write` (nor a
//! thread wake-up) per line: a line is formatted on the request's thread and appended to
//! a shared buffer; a dedicated thread, woken when the buffer stops being empty, waits
//! [`BATCH_WINDOW`] for more lines, then writes everything gathered in one `write`. A
//! quiet gateway's lines therefore appear within a few milliseconds. If stderr cannot
//! keep up (a stalled journald or pipe) and [`MAX_PENDING`] bytes are waiting, new lines
//! are dropped rather than block requests, and each one is counted in
//! `fhirgate_log_lines_dropped_total`. (tracing-appender's non-blocking writer was tried
//! first: it wakes its thread for every line, which cost more than the `write` it saved;
//! see bench/README.md.)

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::writer::BoxMakeWriter;

mod format;
pub use format::{AccessLine, Escaped, ACCESS};

/// How long the log thread gathers lines before writing them.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
/// Bytes waiting to be written before new lines are dropped (about 40,000 access lines).
const MAX_PENDING: usize = 16 << 20;

static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Set by [`init`] when access lines can be written straight to the log thread's
/// buffer: text format, no colour, the log thread running.
static DIRECT: AtomicBool = AtomicBool::new(false);
static SHARED: OnceLock<Arc<Shared>> = OnceLock::new();

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    closed: bool,
}

/// Writes out what is still waiting when dropped (at the end of `main`).
pub struct FlushGuard {
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        if let Some(shared) = SHARED.get() {
            if let Ok(mut p) = shared.pending.lock() {
                p.closed = true;
            }
            shared.wake.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts logging to stderr (`FHIRGATE_LOG` filter, default `info`; JSON lines when
/// `json`). Keep the guard alive for the life of the process.
pub fn init(json: bool) -> FlushGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FHIRGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal, so files and journald stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let shared = SHARED.get_or_init(Arc::default).clone();
    let thread = std::thread::Builder::new()
        .name("fhirgate-log".into())
        .spawn(move || writer_thread(&shared, &mut std::io::stderr()));
    // Without the thread there is no batching: write directly rather than lose the logs.
    let (writer, thread) = match thread {
        Ok(t) => (BoxMakeWriter::new(|| LineSink), Some(t)),
        Err(_) => (BoxMakeWriter::new(std::io::stderr), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
        DIRECT.store(!ansi && thread.is_some(), Ordering::Relaxed);
    }
    FlushGuard { thread }
}

/// Logs one request's access line (target [`ACCESS`], level INFO, so `FHIRGATE_LOG`
/// filters it as any other event). In plain text logs it is formatted here, with the
/// bytes the `tracing` formatter would write, and appended to the log thread's buffer.
pub fn access(line: &AccessLine<'_>) {
    thread_local! {
        static TEXT: RefCell<String> = const { RefCell::new(String::new()) };
    }
    if DIRECT.load(Ordering::Relaxed) {
        if !tracing::enabled!(target: ACCESS, tracing::Level::INFO) {
            return;
        }
        let written = TEXT.with(|t| {
            let mut t = t.try_borrow_mut().ok()?;
            t.clear();
            line.write_text(std::time::SystemTime::now(), &mut t)?;
            let _ = LineSink.write(t.as_bytes());
            // A burst's odd long line does not stay allocated.
            t.shrink_to(4096);
            Some(())
        });
        if written.is_some() {
            return;
        }
    }
    line.emit();
}

/// Log lines dropped because stderr could not keep up (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

fn writer_thread(shared: &Shared, out: &mut impl Write) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let Ok(mut p) = shared.pending.lock() else {
                return;
            };
            while p.buf.is_empty() && !p.closed {
                p = match shared.wake.wait(p) {
                    Ok(p) => p,
                    Err(_) => return,
                };
            }
            p.closed
        };
        if !closed {
            // Let more lines arrive, so one write carries many.
            std::thread::sleep(BATCH_WINDOW);
        }
        if let Ok(mut p) = shared.pending.lock() {
            std::mem::swap(&mut p.buf, &mut batch);
        }
        // A failed write (stderr closed) loses this batch only; nothing else can be done
        // with a log line that cannot be written.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        settle(&mut batch);
        if closed {
            return;
        }
    }
}

/// Empties a written batch, keeping room for twice it (64 KiB to 1 MiB) rather than a
/// fixed size: under steady load a buffer cut to 64 KiB grew again in every batch, the
/// request path appending to it faulted fresh pages in (0.1 page faults per request at
/// 60k req/s, bench/README.md). The cap gives a burst's room back at once, since an idle
/// log may not bring another batch for a long time.
fn settle(batch: &mut Vec<u8>) {
    let keep = (2 * batch.len()).clamp(64 * 1024, 1 << 20);
    batch.clear();
    batch.shrink_to(keep);
}

/// What `tracing` writes one formatted event (one line) to.
struct LineSink;

impl Write for LineSink {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let Some(shared) = SHARED.get() else {
            return std::io::stderr().write(line);
        };
        let was_empty = match shared.pending.lock() {
            Ok(p) if p.closed => return std::io::stderr().write(line),
            Ok(mut p) if p.buf.len() + line.len() <= MAX_PENDING => {
                let was_empty = p.buf.is_empty();
                p.buf.extend_from_slice(line);
                was_empty
            }
            _ => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
                return Ok(line.len());
            }
        };
        // Only the first line of a batch wakes the log thread.
        if was_empty {
            shared.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines written while the thread gathers a batch come out together, in order, and
    /// everything pending is written when the guard closes the writer.
    #[test]
    fn lines_are_batched_in_order_and_flushed_on_close() {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        struct Chan(std::sync::mpsc::Sender<Vec<u8>>);
        impl Write for Chan {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let _ = self.0.send(b.to_vec());
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let s = shared.clone();
        let t = std::thread::spawn(move || writer_thread(&s, &mut Chan(tx)));
        {
            // The thread cannot take the batch while this lock is held.
            let mut p = shared.pending.lock().unwrap();
            p.buf.extend_from_slice(b"a\n");
            shared.wake.notify_one();
            p.buf.extend_from_slice(b"b\n");
        }
        let first = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(first, b"a\nb\n");
        {
            let mut p = shared.pending.lock().unwrap();
            p.buf.extend_from_slice(b"c\n");
            p.closed = true;
        }
        shared.wake.notify_one();
        t.join().unwrap();
        let rest: Vec<u8> = rx.try_iter().flatten().collect();
        assert_eq!(rest, b"c\n");
    }

    /// A batch buffer keeps its room while batches stay the same size, so appending the
    /// next one allocates nothing; a burst's room above 1 MiB is given back at once, the
    /// rest after an ordinary batch.
    #[test]
    fn a_batch_buffer_keeps_a_steady_batch_and_not_a_burst() {
        let mut batch = Vec::new();
        batch.resize(200 * 1024, b'x');
        settle(&mut batch);
        assert!(batch.is_empty());
        let room = batch.capacity();
        assert!(room >= 200 * 1024, "{room}");
        batch.resize(200 * 1024, b'x');
        assert_eq!(batch.capacity(), room, "the next batch of that size fits");
        settle(&mut batch);
        batch.resize(16 << 20, b'x');
        settle(&mut batch);
        assert_eq!(batch.capacity(), 1 << 20);
        batch.resize(1000, b'x');
        settle(&mut batch);
        assert!(
            (64 * 1024..128 * 1024).contains(&batch.capacity()),
            "{}",
            batch.capacity()
        );
    }
}
