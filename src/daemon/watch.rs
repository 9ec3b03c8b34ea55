//! Watching the config file. The directory is watched, not the file: editors write a new
//! file and rename it over the old one, and Kubernetes swaps a `..data` symlink, and either
//! would leave a watch on the old inode blind. Only events that name the config file (or a
//! Kubernetes `..data`-style entry) lead to a read of it, so a log or state written into the
//! same directory never wakes the daemon; only a change of its content is reported, after a
//! short debounce.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// How long the file must be quiet before a change is reported.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

fn digest(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path)
        .ok()
        .map(|b| Sha256::digest(&b).to_vec())
}

/// Whether an event on `p` may change the config named `name`: the file itself, or an entry
/// like Kubernetes' `..data` symlink that it reaches through.
fn concerns_config(p: &Path, name: &std::ffi::OsStr) -> bool {
    p.file_name()
        .is_some_and(|f| f == name || f.as_encoded_bytes().starts_with(b".."))
}

/// Starts watching; `changed` receives `()` after each settled change of the content.
/// The returned watcher must be kept alive; the task ends once it is dropped.
pub fn spawn(
    path: &Path,
    changed: mpsc::Sender<()>,
) -> notify::Result<(notify::RecommendedWatcher, tokio::task::JoinHandle<()>)> {
    let path: PathBuf = path.to_path_buf();
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Access events are ignored: reading the config to compare it raises them, and
        // reacting would read it again, waking the daemon forever. Events about other files
        // are ignored: a log written beside the config would otherwise wake us at every line.
        if let Ok(e) = res
            && !matches!(e.kind, notify::EventKind::Access(_))
            && e.paths.iter().any(|p| concerns_config(p, &name))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let mut last = digest(&path);
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until no event arrives for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let now = digest(&path);
            if now.is_some() && now != last {
                last = now;
                if changed.send(()).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok((watcher, task))
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
