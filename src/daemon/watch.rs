//! Watching the config file and the files it includes. Directories are watched, not files:
//! editors write a new file and rename it over the old one, and Kubernetes swaps a `..data`
//! symlink, and either would leave a watch on the old inode blind. In the config file's
//! directory only events that name the config file (or a Kubernetes `..data`-style entry)
//! lead to a read, so a log or state written beside it never wakes the daemon; in an
//! `include` directory every entry counts (a new file may match a glob). Only a change of
//! the content is reported, after a short debounce. A reload that changes `include` moves
//! the watch with [`Follow::dirs`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// How long the files must be quiet before a change is reported.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// The config file's bytes, then each include directory's regular files (name and bytes).
fn digest(path: &Path, dirs: &[PathBuf]) -> Option<Vec<u8>> {
    let mut h = Sha256::new();
    h.update(std::fs::read(path).ok()?);
    for dir in dirs {
        h.update(b"\0dir\0");
        h.update(dir.as_os_str().as_encoded_bytes());
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        for e in entries.iter().filter(|e| e.is_file()) {
            h.update(b"\0file\0");
            h.update(e.as_os_str().as_encoded_bytes());
            h.update(b"\0");
            h.update(std::fs::read(e).unwrap_or_default());
        }
    }
    Some(h.finalize().to_vec())
}

/// Whether an event on `p` may change the config named `name`: the file itself, or an entry
/// like Kubernetes' `..data` symlink that it reaches through.
fn concerns_config(p: &Path, name: &std::ffi::OsStr) -> bool {
    p.file_name()
        .is_some_and(|f| f == name || f.as_encoded_bytes().starts_with(b".."))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The watch, kept alive while it is held; [`Follow::dirs`] moves it to a new config's
/// `include` directories.
#[derive(Clone)]
pub struct Follow {
    watcher: Arc<Mutex<notify::RecommendedWatcher>>,
    /// The include directories watched; the event callback reads them, so it has its own
    /// lock (the watcher's is never held while waiting for the callback's thread).
    dirs: Arc<Mutex<Vec<PathBuf>>>,
    config_dir: PathBuf,
}

impl Follow {
    /// Watches `dirs` (a config's `include_dirs`) instead of the directories watched so far.
    pub fn dirs(&self, dirs: &[PathBuf]) {
        let old = std::mem::replace(&mut *lock(&self.dirs), dirs.to_vec());
        let mut w = lock(&self.watcher);
        for d in old
            .iter()
            .filter(|d| !dirs.contains(d) && **d != self.config_dir)
        {
            let _ = w.unwatch(d);
        }
        for d in dirs
            .iter()
            .filter(|d| !old.contains(d) && **d != self.config_dir)
        {
            if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch an include directory; reload with SIGHUP after a change there");
            }
        }
    }
}

/// Starts watching the config file and its `include` directories; `changed` receives `()`
/// after each settled change of the content. The task ends at `stop`, or once every
/// [`Follow`] is dropped.
pub fn spawn(
    path: &Path,
    include_dirs: &[PathBuf],
    changed: mpsc::Sender<()>,
    stop: tokio_util::sync::CancellationToken,
) -> notify::Result<(Follow, tokio::task::JoinHandle<()>)> {
    let path: PathBuf = path.to_path_buf();
    let config_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let dirs: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
    let seen = dirs.clone();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Access events are ignored: reading the config to compare it raises them, and
        // reacting would read it again, waking the daemon forever. Events about other files
        // of the config's directory are ignored: a log written beside the config would
        // otherwise wake us at every line.
        if let Ok(e) = res
            && !matches!(e.kind, notify::EventKind::Access(_))
            && e.paths.iter().any(|p| {
                concerns_config(p, &name)
                    || p.parent()
                        .is_some_and(|d| lock(&seen).iter().any(|s| s == d))
            })
        {
            let _ = tx.send(());
        }
    })?;
    let follow = Follow {
        watcher: Arc::new(Mutex::new(watcher)),
        dirs,
        config_dir: config_dir.clone(),
    };
    lock(&follow.watcher).watch(&config_dir, RecursiveMode::NonRecursive)?;
    follow.dirs(include_dirs);
    let watched = follow.dirs.clone();
    let mut last = digest(&path, &lock(&watched));
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            // Debounce: wait until no event arrives for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let dirs = lock(&watched).clone();
            let now = digest(&path, &dirs);
            if now.is_some() && now != last {
                last = now;
                if changed.send(()).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok((follow, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_config_and_kubernetes_entries_matter() {
        let name = std::ffi::OsStr::new("config.toml");
        assert!(concerns_config(Path::new("/etc/t/config.toml"), name));
        assert!(concerns_config(Path::new("/etc/t/..data"), name));
        assert!(concerns_config(Path::new("/etc/t/..2026_11_28"), name));
        assert!(!concerns_config(Path::new("/etc/t/tfa.log"), name));
        assert!(!concerns_config(Path::new("/etc/t/config.toml.swp"), name));
        assert!(!concerns_config(Path::new("/etc/t/state.sqlite-wal"), name));
    }
}
