//! Reload on file change (`reload.watch_files`).
//!
//! The directories holding the config file and every certificate, key and CRL file it
//! names are watched, not the files: editors, `mv` and Kubernetes replace files (a
//! Secret or ConfigMap volume swaps its `..data` symlink atomically), which a watch on
//! the old inode would miss. Events are debounced; then the contents of the named files
//! are hashed and a reload is asked for only if they changed, so unrelated files in the
//! same directory (or the CRL cache) never cause one. The reload itself is the SIGHUP
//! one: a bad file is refused and the running configuration keeps serving.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// The config file and every file it names (the ones that exist are hashed).
pub fn watched_files(path: &Path, cfg: Option<&Config>) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let Some(cfg) = cfg else { return out };
    let t = &cfg.tls;
    out.push(t.server_cert.clone());
    out.push(t.server_key.clone());
    for b in &t.trust_bundles {
        out.extend(b.ca_files.iter().cloned());
        out.extend(b.crl_files.iter().cloned());
    }
    out.extend(gateway_files(cfg));
    out
}

/// The files the request pipeline reads when it is built (upstream TLS, the
/// authorisation server's CA, the gateway's own client credentials).
pub fn gateway_files(cfg: &Config) -> Vec<PathBuf> {
    let u = &cfg.upstream;
    let mut out: Vec<PathBuf> = [&u.ca_file, &u.client_cert, &u.client_key, &cfg.auth.ca_file]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    if let Some(c) = &cfg.auth.client_auth {
        out.extend(
            [&c.client_secret_file, &c.private_key_file]
                .into_iter()
                .flatten()
                .cloned(),
        );
    }
    out
}

/// The directories to watch: each file's own directory and, when it is a symlink, the
/// directory of its target (a file linked from elsewhere changes there).
fn directories(files: &[PathBuf]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for f in files {
        let named = f.parent().filter(|p| !p.as_os_str().is_empty());
        dirs.insert(named.unwrap_or(Path::new(".")).to_path_buf());
        if let Some(d) = std::fs::canonicalize(f)
            .ok()
            .and_then(|c| c.parent().map(Path::to_path_buf))
        {
            dirs.insert(d);
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs
}

/// A hash of the names and contents of `files` (a missing file hashes as missing).
pub fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.as_os_str().as_encoded_bytes());
        match std::fs::read(f) {
            Ok(b) => {
                h.update([1]);
                h.update((b.len() as u64).to_be_bytes());
                h.update(&b);
            }
            Err(_) => h.update([0]),
        }
    }
    h.finalize().into()
}

/// Whether a file-system event can mean a watched file changed. Opening or reading a
/// file (the watcher's own reads included, which would otherwise re-trigger it forever)
/// cannot, and neither can a write still in progress: a finished write ends in a
/// close-after-write, a create or a rename, which are kept. So a log file that is
/// written continuously in a watched directory costs no work past this check.
fn matters(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Data(_)) => false,
        _ => true,
    }
}

/// Starts watching `path` and the files it names. The receiver yields once per change
/// (changes within `debounce` of the first yield once); it ends if the watcher
/// fails.
pub fn spawn(
    path: &Path,
    debounce: Duration,
) -> Result<tokio::sync::mpsc::Receiver<()>, notify::Error> {
    let path = path.to_path_buf();
    let (events_tx, events_rx) = std::sync::mpsc::channel::<notify::Result<()>>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match event {
            Ok(e) if !matters(&e) => return,
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        let _ = events_tx.send(relevant);
    })?;
    let mut files = watched_files(&path, Config::load(&path).ok().as_ref());
    let mut dirs = directories(&files);
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    let mut last = fingerprint(&files);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("fhirgate-watch".into())
        .spawn(move || {
            // Ends when the watcher stops or the gateway no longer listens.
            while let Ok(first) = events_rx.recv() {
                if let Err(e) = first {
                    tracing::warn!(error = %e, "file watch error");
                }
                // Debounce: gather what else happens within `debounce` of the first event.
                let until = std::time::Instant::now() + debounce;
                loop {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match events_rx.recv_timeout(left) {
                        Ok(Err(e)) => tracing::warn!(error = %e, "file watch error"),
                        Ok(Ok(())) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                }
                // The config may now name other files (or be half-written: keep the
                // previous list until it parses).
                if let Ok(cfg) = Config::load(&path) {
                    files = watched_files(&path, Some(&cfg));
                }
                let now = fingerprint(&files);
                // Re-watch: a directory may have been replaced (symlink target swapped).
                let new_dirs = directories(&files);
                for d in dirs.difference(&new_dirs) {
                    let _ = watcher.unwatch(d);
                }
                for d in &new_dirs {
                    let _ = watcher.watch(d, RecursiveMode::NonRecursive);
                }
                dirs = new_dirs;
                if now == last {
                    continue;
                }
                last = now;
                tracing::info!(config = %path.display(), "watched file changed; reloading");
                match tx.try_send(()) {
                    // Full: a reload is already pending and will read the new files.
                    Ok(()) | Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {}
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        })
        .map_err(notify::Error::io)?;
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens, reads and in-progress writes are not changes; a finished write, a create,
    /// a rename or a removal may be.
    #[test]
    fn only_finished_changes_matter() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, EventKind, ModifyKind, RemoveKind,
            RenameMode,
        };
        let ev = |kind| notify::Event::new(kind);
        assert!(!matters(&ev(EventKind::Access(AccessKind::Open(
            AccessMode::Any
        )))));
        assert!(!matters(&ev(EventKind::Access(AccessKind::Close(
            AccessMode::Read
        )))));
        assert!(!matters(&ev(EventKind::Modify(ModifyKind::Data(
            DataChange::Any
        )))));
        assert!(matters(&ev(EventKind::Access(AccessKind::Close(
            AccessMode::Write
        )))));
        assert!(matters(&ev(EventKind::Create(CreateKind::File))));
        assert!(matters(&ev(EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        )))));
        assert!(matters(&ev(EventKind::Remove(RemoveKind::File))));
    }

    #[test]
    fn fingerprint_follows_contents_not_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("a.crl");
        std::fs::write(&f, b"one").unwrap();
        let files = vec![f.clone()];
        let a = fingerprint(&files);
        std::fs::write(&f, b"one").unwrap();
        assert_eq!(a, fingerprint(&files));
        std::fs::write(&f, b"two").unwrap();
        assert_ne!(a, fingerprint(&files));
        std::fs::remove_file(&f).unwrap();
        assert_ne!(a, fingerprint(&files));
    }

    #[test]
    fn symlinked_files_watch_both_directories() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("..2026_12_01");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("ca.crl"), b"x").unwrap();
        let link = dir.path().join("ca.crl");
        std::os::unix::fs::symlink(data.join("ca.crl"), &link).unwrap();
        let dirs = directories(&[link]);
        assert!(dirs.contains(dir.path()), "{dirs:?}");
        assert!(
            dirs.contains(&std::fs::canonicalize(&data).unwrap()),
            "{dirs:?}"
        );
    }
}
