//! One current-thread runtime per CPU, each on a thread of its own, serving the
//! connections the accept loop hands it: nginx's worker model, with the accept loop on
//! the process's own runtime.
//!
//! Why not tokio's multi-thread scheduler: a connection's tasks (its HTTP/2 streams, its
//! pinned upstream connections) then move between workers, and every wake-up may cross
//! threads. On one runtime per CPU a connection and everything it drives stay on one
//! thread: on two CPUs that cost 16–22% less CPU per request on HTTP/2, 4–14% less on
//! keep-alive GETs and 6–7% less on 16 KiB POSTs (bench/README.md, twentieth pass).
//! The price is nginx's too: a connection never moves, so one very busy connection gets
//! at most one CPU; new connections go to the runtime with the fewest open, so
//! long-lived ones spread evenly.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;
use tokio::sync::watch;

/// The connection-serving runtimes. Stopped (their threads joined, their tasks dropped)
/// by [`Shards::stop`] or when dropped.
pub struct Shards {
    shards: Vec<Shard>,
    stop: watch::Sender<bool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Shard {
    handle: tokio::runtime::Handle,
    /// Connections this runtime serves now: where the next one goes. Its own `Arc`, so
    /// that no task holds the `Shards` (whose drop joins the threads the tasks run on).
    open: Arc<AtomicUsize>,
}

impl Shards {
    /// Starts `n` runtimes, each on a thread named `fhirgate-cpuN`.
    pub fn start(n: usize) -> std::io::Result<Arc<Self>> {
        let mut this = Shards {
            shards: Vec::with_capacity(n),
            stop: watch::channel(false).0,
            threads: Mutex::new(Vec::with_capacity(n)),
        };
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let handle = rt.handle().clone();
            let mut stop = this.stop.subscribe();
            // On failure `this` is dropped, which stops the threads already started.
            let thread = std::thread::Builder::new()
                .name(format!("fhirgate-cpu{i}"))
                .spawn(move || {
                    // A current-thread runtime runs its tasks only inside `block_on`.
                    rt.block_on(async move {
                        let _ = stop.wait_for(|stopped| *stopped).await;
                    });
                })?;
            this.threads
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .push(thread);
            this.shards.push(Shard {
                handle,
                open: Arc::default(),
            });
        }
        Ok(Arc::new(this))
    }

    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// Connections each runtime serves now.
    pub fn open(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|s| s.open.load(Ordering::Relaxed))
            .collect()
    }

    /// Each runtime's count of open connections, shared (for the metrics).
    pub fn counters(&self) -> Vec<Arc<AtomicUsize>> {
        self.shards.iter().map(|s| s.open.clone()).collect()
    }

    /// Moves an accepted connection to the runtime with the fewest open and serves it
    /// there with `serve`. An error (the socket could not leave this runtime's reactor)
    /// drops the connection and `serve` unrun.
    pub(super) fn spawn<F, Fut>(&self, tcp: TcpStream, serve: F) -> std::io::Result<()>
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self
            .shards
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.open.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        let tcp = tcp.into_std()?;
        let counted = Counted::new(&self.shards[i].open);
        self.shards[i].handle.spawn(async move {
            // Counted until the task ends, or is dropped when the runtime stops.
            let _counted = counted;
            match TcpStream::from_std(tcp) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => tracing::warn!(error = %e, "cannot serve an accepted connection"),
            }
        });
        Ok(())
    }

    /// Stops every runtime and waits for its thread; the connections they still serve are
    /// dropped. Called after the drain.
    pub fn stop(&self) {
        self.stop.send_replace(true);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One open connection on a runtime, uncounted when dropped.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Counted(open.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
