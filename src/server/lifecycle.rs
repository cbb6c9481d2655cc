//! The process around the server: `check`, start, readiness, sd_notify (READY, STATUS,
//! WATCHDOG, RELOADING, STOPPING), signals, reload on SIGHUP or a watched file, drain.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use super::{admin, Shards};
use crate::config::Config;

/// `fhirgate check`: validate a config the way `run` would load it, print the effective
/// configuration, the trust inventory and warnings.
pub fn check(path: &Path, strict: bool, allow: &[String]) -> anyhow::Result<()> {
    let mut cfg = Config::load(path)?;
    // Judge with the fetched CRLs kept in cache_dir, as `run` starts with (read only).
    cfg.tls.fetched_crls = crate::revocation::cached(&cfg.tls);
    // Parse certificates, keys and CRLs too, as `run` would.
    let snapshot = crate::server::Snapshot::build(&cfg, &Default::default())?;
    print!("{}", cfg.summary());
    let inv = snapshot.inventory();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    print!("{}", inv.render(now, snapshot.warn_before()));
    // Stale CRLs and expiring certificates are reported but do not fail --strict: the
    // systemd unit runs `check --strict` before every start, and a CRL the gateway will
    // fetch itself must not keep it from starting. Weak trust set-ups do count.
    for line in inv.stale(now, snapshot.warn_before()) {
        println!("WARNING: {line}");
    }
    // CRL URLs and what the cache holds for each; no network, no writes.
    print!("{}", crate::revocation::describe(&cfg.tls)?);
    let allowed = |field: &str| {
        allow.iter().any(|a| {
            field == a
                || field
                    .strip_prefix(a.as_str())
                    .is_some_and(|r| r.starts_with(['.', '[', ':']))
        })
    };
    let mut warnings = crate::lint::lint(&cfg);
    warnings.extend(crate::lint::file_modes(&cfg));
    warnings.extend(crate::lint::config_file_mode(&cfg, path));
    warnings.retain(|w| !allowed(&w.field));
    // A finding the linter also made (with its fix) is said once.
    let trust: Vec<&String> = inv
        .warnings
        .iter()
        .filter(|w| !allowed(w))
        .filter(|w| {
            !warnings
                .iter()
                .any(|l| w.starts_with(&format!("{}:", l.field)))
        })
        .collect();
    for w in &trust {
        println!("WARNING: {w}");
    }
    for w in &warnings {
        eprintln!("{w}");
    }
    let total = warnings.len() + trust.len();
    if strict && total > 0 {
        anyhow::bail!(
            "{}: {total} warning(s) and --strict: fix them or accept one with --allow FIELD",
            path.display(),
        );
    }
    match total {
        0 => println!("configuration {} is valid", path.display()),
        n => println!(
            "configuration {} is valid, with {n} warning(s)",
            path.display()
        ),
    }
    Ok(())
}

/// `fhirgate run`: connections are served on `shards` (one runtime per CPU) if given,
/// else on this runtime.
pub async fn run(path: &Path, shards: Option<Arc<Shards>>) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    raise_open_files_limit(cfg.limits.max_connections);
    // The same warnings as `fhirgate check`, in the log of every start.
    for w in crate::lint::lint(&cfg)
        .into_iter()
        .chain(crate::lint::file_modes(&cfg))
        .chain(crate::lint::config_file_mode(&cfg, path))
    {
        tracing::warn!(field = %w.field, fix = %w.fix, "risky setting: {}", w.risk);
    }
    serve(&cfg, path, None, shards).await
}

/// Runs the gateway until SIGTERM/SIGINT; SIGHUP reloads `path`. `banner` is printed to
/// stdout once the gateway is ready. Connections are served on `shards` if given.
pub async fn serve(
    cfg: &Config,
    path: &Path,
    banner: Option<String>,
    shards: Option<Arc<Shards>>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Handlers are installed before anything else, so a signal during start-up is
    // queued rather than killing the process (SIGINT's default) or being lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;

    // reload.watch_files: a changed file reloads exactly as SIGHUP does. The watch takes
    // its first reading before certificates, keys and CRLs are read, so a file changed
    // during start-up (a Secret rotated while the pod starts, or during the wait for
    // OAuth discovery below) is reloaded once start-up is done, not taken as the
    // starting state and never applied.
    let mut watched = None;
    if cfg.reload.watch_files {
        match crate::watch::spawn(path, cfg.reload.debounce) {
            Ok(rx) => watched = Some(rx),
            Err(e) => tracing::warn!(error = %e, "cannot watch files; reload with SIGHUP"),
        }
    }
    let running = super::start_on(cfg, shards).await?;
    for a in &running.addrs {
        tracing::info!(address = %a, "listening (TLS-MA)");
    }
    let rt = tokio::runtime::Handle::current();
    // `runtimes` serve connections, each with `workers` threads.
    let (scheduler, runtimes) = match (running.shards(), rt.runtime_flavor()) {
        (Some(s), _) => ("current-thread", s.len()),
        (None, tokio::runtime::RuntimeFlavor::CurrentThread) => ("current-thread", 1),
        (None, _) => ("multi-thread", 1),
    };
    tracing::info!(
        scheduler,
        runtimes,
        workers = rt.metrics().num_workers(),
        "async runtime"
    );
    let ready = Arc::new(admin::Readiness::default());
    let (admin_stop, admin_rx) = tokio::sync::watch::channel(false);
    if let Some(a) = &cfg.admin {
        let metrics = running.server().metrics().clone();
        let addr = admin::start(a.address, ready.clone(), metrics, admin_rx).await?;
        tracing::info!(address = %addr, "admin listener (healthz, readyz, metrics)");
    }
    let server = running.server().clone();
    ready.add_check("token_verification", Box::new(move || server.auth_status()));
    // Stale CRLs and expiring certificates are reported, not failed: the gateway still
    // serves (what a stale CRL does is `enforce_crl_expiry`'s business).
    let server = running.server().clone();
    ready.add_check(
        "certificates_and_crls",
        Box::new(move || {
            let stale = server.trust_stale();
            if stale.is_empty() {
                (true, "all current".into())
            } else {
                (true, format!("STALE: {}", stale.join("; ")))
            }
        }),
    );
    // At start and hourly: WARN for CRLs near or past nextUpdate and certificates near
    // or past notAfter.
    let server = running.server().clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(3600));
        loop {
            tick.tick().await;
            server.log_trust_warnings();
        }
    });
    ready.serving.store(true, Ordering::Relaxed);
    // READY=1 only once listeners are bound, TLS is loaded and discovery has run. If the
    // authorisation server stays unreachable, report ready after a minute anyway (below
    // systemd's default start timeout, as a restart would not help): requests with
    // unknown tokens are refused with 503 until discovery succeeds.
    // The last configuration applied (for drain_timeout); settings fixed at start are
    // compared with `cfg`, the one the process started with.
    let mut current = cfg.clone();
    // SIGTERM/SIGINT must work from the first moment, also while discovery is pending
    // (otherwise `systemctl stop` or a rollout waits for the minute, then SIGKILLs), and
    // a reload is applied at once (a revocation must not wait on the authorisation
    // server), without telling systemd RELOADING=1 / READY=1 before start-up is over.
    let stopped_early = {
        let waited = std::time::Instant::now();
        let discovery = async {
            while !running.server().auth_status().0 && waited.elapsed() < Duration::from_secs(60) {
                let _ = sd_notify::notify(&[NotifyState::Status("waiting for OAuth discovery")]);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::pin!(discovery);
        loop {
            tokio::select! {
                _ = &mut discovery => break false,
                _ = int.recv() => break true,
                _ = term.recv() => break true,
                _ = hup.recv() => {}
                Some(()) = next_change(&mut watched) => {}
            }
            if let Some(new) = reload_off_thread(running.server(), path, cfg, false).await {
                current = new;
            }
        }
    };
    if !stopped_early {
        let (auth_ok, detail) = running.server().auth_status();
        if !auth_ok {
            tracing::warn!(%detail, "starting without a discovered introspection endpoint");
        }
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
        if let Some(b) = banner {
            println!("{b}");
        }
    }
    if let Some(interval) = sd_notify::watchdog_enabled() {
        // Pinged from the runtime: a wedged runtime stops the pings and systemd restarts us.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        });
    }

    if !stopped_early {
        loop {
            // SIGHUP or a watched file changed: both reload the same way.
            tokio::select! {
                _ = int.recv() => break,
                _ = term.recv() => break,
                _ = hup.recv() => {}
                Some(()) = next_change(&mut watched) => {}
            }
            if let Some(new) = reload_off_thread(running.server(), path, cfg, true).await {
                current = new;
            }
        }
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    ready.draining.store(true, Ordering::Relaxed);
    tracing::info!("shutting down: no new connections, draining");
    let left = running.shutdown(current.limits.drain_timeout).await;
    let _ = admin_stop.send(true);
    if left > 0 {
        tracing::warn!(
            open = left,
            "drain timeout reached with connections still open"
        );
    }
    Ok(())
}

/// The next change the file watch reports; never, without a watch (or once it ended).
async fn next_change(watched: &mut Option<tokio::sync::mpsc::Receiver<()>>) -> Option<()> {
    match watched {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// `reload` on tokio's blocking threads: it reads files and parses certificates and
/// CRLs, which on the current-thread runtime (one CPU) would otherwise hold up every
/// connection until it is done.
async fn reload_off_thread(
    server: &Arc<super::Server>,
    path: &Path,
    started: &Config,
    notify: bool,
) -> Option<Config> {
    let (server, path, started) = (server.clone(), path.to_owned(), started.clone());
    tokio::task::spawn_blocking(move || reload(&server, &path, &started, notify))
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "reload failed; previous configuration still serving");
            None
        })
}

/// Re-reads the config; on any error the running configuration stays in force. Returns
/// the new configuration when it was applied; settings that differ from `started` but
/// are fixed at start are named in a warning. Every refusal counts in
/// `fhirgate_reloads_total{result="error"}`, a file that cannot be read or parsed too.
/// `notify`: tell systemd RELOADING=1, then READY=1 (only once READY=1 was sent: before
/// that, READY=1 would end the start-up).
fn reload(server: &super::Server, path: &Path, started: &Config, notify: bool) -> Option<Config> {
    if notify {
        let mut states = vec![NotifyState::Reloading];
        if let Ok(now) = NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        let _ = sd_notify::notify(&states);
    }
    let result = match Config::load(path) {
        // Building the new snapshot counts its own result (ok or error).
        Ok(cfg) => server.reload(&cfg).map(|()| cfg).map_err(|e| e.to_string()),
        Err(e) => {
            server.metrics().reload(false);
            Err(e.to_string())
        }
    };
    if notify {
        let _ = sd_notify::notify(&[NotifyState::Ready]);
    }
    match result {
        Ok(cfg) => {
            let fixed = started.restart_required_changes(&cfg);
            server.log_trust_warnings();
            if fixed.is_empty() {
                tracing::info!(config = %path.display(), "configuration reloaded");
            } else {
                // Everything else was applied; these keep their running values.
                tracing::warn!(
                    config = %path.display(),
                    restart_required = %fixed.join(", "),
                    "configuration reloaded except settings that need a restart: {}",
                    fixed.join(", ")
                );
            }
            Some(cfg)
        }
        Err(e) => {
            tracing::error!(
                config = %path.display(),
                error = %e,
                "reload refused; previous configuration still serving"
            );
            None
        }
    }
}

/// Open files `limits.max_connections` can need: each client connection and the upstream
/// connection its request goes out on, and room for the listeners, the files read at a
/// reload, CRL and token-endpoint fetches and the admin listener.
pub fn open_files_needed(max_connections: usize) -> u64 {
    u64::try_from(max_connections)
        .unwrap_or(u64::MAX)
        .saturating_mul(2)
        .saturating_add(256)
}

/// Raises the soft RLIMIT_NOFILE to what `max_connections` needs, up to the hard limit
/// (getrlimit(2): an unprivileged process may raise its soft limit that far). Linux
/// starts processes at 1024, and containerd 2.x (unlike 1.x) leaves containers there, so
/// without this accept fails with EMFILE long before `max_connections`. The limit is
/// left alone when it is already enough (systemd's `LimitNOFILE=` sets both), and a hard
/// limit too low for `max_connections` is logged once, at start.
fn raise_open_files_limit(max_connections: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let needed = open_files_needed(max_connections);
    let Rlimit {
        current: soft,
        maximum: hard,
    } = getrlimit(Resource::Nofile);
    // None is unlimited.
    let Some(soft) = soft else { return };
    if soft >= needed {
        return;
    }
    let target = hard.map_or(needed, |h| h.min(needed));
    let mut now = soft;
    if target > soft {
        let raised = Rlimit {
            current: Some(target),
            maximum: hard,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => {
                now = target;
                tracing::info!(
                    from = soft,
                    to = target,
                    max_connections,
                    "raised the soft open-files limit (RLIMIT_NOFILE) for limits.max_connections"
                );
            }
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
        }
    }
    if now < needed {
        tracing::warn!(
            limit = now,
            hard = hard.map_or_else(|| "unlimited".to_owned(), |h| h.to_string()),
            needed,
            max_connections,
            "open-files limit {now} is below the {needed} limits.max_connections {max_connections} \
             needs: connections past it wait unaccepted (EMFILE); raise LimitNOFILE (systemd) \
             or the container's nofile ulimit, or lower limits.max_connections"
        );
    }
}
