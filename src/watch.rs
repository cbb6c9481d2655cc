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

use notify::RecursiveMode;
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
    let u = &cfg.upstream;
    out.extend(
        [&u.ca_file, &u.client_cert, &u.client_key, &cfg.auth.ca_file]
            .into_iter()
            .flatten()
            .cloned(),
    );
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
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
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

/// Starts watching `path` and the files it names. The receiver yields once per change
/// (several changes close together yield once); it ends if the watcher fails.
pub fn spawn(
    path: &Path,
    debounce: Duration,
) -> Result<tokio::sync::mpsc::Receiver<()>, notify::Error> {
    let path = path.to_path_buf();
    let (events_tx, events_rx) = std::sync::mpsc::channel();
    let mut debouncer = notify_debouncer_mini::new_debouncer(debounce, events_tx)?;
    let mut files = watched_files(&path, Config::load(&path).ok().as_ref());
    let mut dirs = directories(&files);
    for d in &dirs {
        debouncer.watcher().watch(d, RecursiveMode::NonRecursive)?;
    }
    let mut last = fingerprint(&files);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    std::thread::Builder::new()
        .name("fhirgate-watch".into())
        .spawn(move || {
            // Ends when the debouncer stops or the gateway no longer listens.
            while let Ok(batch) = events_rx.recv() {
                if let Err(e) = batch {
                    tracing::warn!(error = %e, "file watch error");
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
                    let _ = debouncer.watcher().unwatch(d);
                }
                for d in &new_dirs {
                    let _ = debouncer.watcher().watch(d, RecursiveMode::NonRecursive);
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
