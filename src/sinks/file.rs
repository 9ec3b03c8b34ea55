//! The file sink: codes written atomically to a file, optionally encrypted.
//!
//! A write goes to a temporary file in the target's directory, created exclusively with the
//! final mode and `O_NOFOLLOW`, fsync'd, renamed over the target, and the directory fsync'd:
//! a reader sees the old file or the new one, never a mix, and after a crash the rename is
//! durable. The target is never a symbolic link. The directory is opened by
//! [`crate::trust::open_dir`] (StrictModes: it and its ancestors owned by root or us, not
//! writable by others) and every step goes through its descriptor (`openat`, `renameat`,
//! `fsync`), so swapping a directory on the path cannot redirect the write. Temporary files
//! a crash left (`.NAME.tmp-…`, whole code sets) are removed at the next delivery of their
//! target, which runs under the portal's lock, so no other process is writing one at that
//! moment. Finding them reads the directory, which in a directory of 10,000 portals' files
//! is 10,000 entries: it is read once per [`RESCAN`] per directory, not at every delivery,
//! and what it found waits for the delivery of its target (one that another process left
//! after the read is found by the next read).

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::Rng;
use rustix::fs::{
    AtFlags, FileType, Mode, OFlags, fchmod, fsync, openat, renameat, statat, unlinkat,
};

use super::{DeliveryError, SinkError};
use crate::config::FileSinkConfig;
use crate::crypto::age::AgeRecipients;
use crate::crypto::pgp::{self, PgpKey};

/// How a file sink encrypts.
pub enum FileCipher {
    /// Plain text.
    Plain,
    /// age.
    Age(AgeRecipients),
    /// OpenPGP, ASCII armor.
    Pgp(Vec<PgpKey>),
}

impl FileCipher {
    /// The OpenPGP keys it encrypts to, by fingerprint, with when each expires.
    pub fn expiries(&self) -> Vec<(String, std::time::SystemTime)> {
        match self {
            FileCipher::Pgp(keys) => keys
                .iter()
                .filter_map(|k| k.expires.map(|e| (k.fingerprint.clone(), e)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Encrypts `text` (or not).
    pub fn seal(&self, text: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            FileCipher::Plain => Ok(text.to_vec()),
            FileCipher::Age(r) => r.encrypt(text),
            FileCipher::Pgp(keys) => {
                let refs: Vec<&PgpKey> = keys.iter().collect();
                pgp::encrypt(&refs, text).map(String::into_bytes)
            }
        }
    }

    /// To whom it encrypts, for the entry fingerprint (no secrets).
    pub fn identity(&self) -> String {
        match self {
            FileCipher::Plain => "plain".to_string(),
            FileCipher::Age(r) => format!("age {}", r.written.join(",")),
            FileCipher::Pgp(k) => format!(
                "pgp {}",
                k.iter()
                    .map(|k| k.fingerprint.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    /// How it encrypts, for `check`.
    pub fn describe(&self) -> String {
        match self {
            FileCipher::Plain => "plain text".to_string(),
            FileCipher::Age(_) => "age".to_string(),
            FileCipher::Pgp(k) => format!("OpenPGP to {} key(s)", k.len()),
        }
    }
}

/// A built file sink.
pub struct FileSink {
    /// Sink name.
    pub name: String,
    config_path: String,
    mode: u32,
    cipher: FileCipher,
    /// What the last read of each directory (by device and inode) found.
    leftovers: Mutex<HashMap<(u64, u64), Leftovers>>,
}

/// How often a directory is read again for temporary files a crash left.
pub const RESCAN: Duration = Duration::from_secs(3600);

/// The temporary files a read of a directory found, by the name of their target.
struct Leftovers {
    read_at: Instant,
    by_target: HashMap<String, Vec<std::ffi::OsString>>,
}

impl FileSink {
    /// Its recipients' keys that expire, with when.
    pub fn expiries(&self) -> Vec<(String, std::time::SystemTime)> {
        self.cipher.expiries()
    }

    /// A sink writing `config.path` with the given cipher.
    pub fn new(name: &str, config: &FileSinkConfig, cipher: FileCipher) -> Self {
        Self {
            name: name.to_string(),
            config_path: config.path.clone(),
            mode: config.mode,
            cipher,
            leftovers: Mutex::new(HashMap::new()),
        }
    }

    /// The file written for `portal`.
    pub fn target(&self, portal: &str) -> PathBuf {
        PathBuf::from(self.config_path.replace("{portal}", portal))
    }

    /// Whether the payload is encrypted.
    pub fn encrypted(&self) -> bool {
        !matches!(self.cipher, FileCipher::Plain)
    }

    /// A description for `check`.
    pub fn describe(&self, portal: &str) -> String {
        format!(
            "file {} ({}, mode {:04o})",
            self.target(portal).display(),
            self.cipher.describe(),
            self.mode
        )
    }

    /// What identifies where and to whom this sink writes for `portal` (no secrets).
    pub fn identity(&self, portal: &str) -> String {
        format!(
            "file {} mode {:o} {}",
            self.target(portal).display(),
            self.mode,
            self.cipher.identity()
        )
    }

    /// Encrypts the rendered text into the file's content.
    pub fn seal(&self, text: &[u8]) -> Result<Vec<u8>, SinkError> {
        self.cipher.seal(text).map_err(|message| SinkError {
            sink: self.name.clone(),
            message,
        })
    }

    /// Opens the target's directory (trusted, see [`crate::trust`]) and checks the target
    /// itself; returns the directory's descriptor, its resolved path and the file name.
    fn open_target(&self, target: &Path) -> Result<(OwnedFd, PathBuf, String), String> {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{} names no file", target.display()))?;
        let (fd, resolved) = crate::trust::open_dir(dir).map_err(|e| e.to_string())?;
        match statat(&fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Symlink => Err(format!(
                "{} is a symbolic link; refusing to write through it",
                target.display()
            )),
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => Err(format!(
                "{} exists and is not a regular file",
                target.display()
            )),
            _ => Ok((fd, resolved, name)),
        }
    }

    /// The file this sink writes for `portal`, with its directory's links followed (to find
    /// two portals that would write one file); `None` when the directory cannot be opened.
    pub fn resolved_target(&self, portal: &str) -> Option<PathBuf> {
        let target = self.target(portal);
        let (_, dir, name) = self.open_target(&target).ok()?;
        Some(dir.join(name))
    }

    fn temp_name(name: &str, kind: &str) -> String {
        let tag: u64 = rand::thread_rng().r#gen();
        format!(".{name}.{kind}-{tag:016x}")
    }

    fn create_exclusive(&self, dir: &OwnedFd, name: &str) -> std::io::Result<std::fs::File> {
        let fd = openat(
            dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(self.mode),
        )?;
        // The umask may have narrowed the mode; set exactly what was configured.
        fchmod(&fd, Mode::from_raw_mode(self.mode))?;
        Ok(std::fs::File::from(fd))
    }

    /// Removes the temporary files of this target that a crash left behind (the caller
    /// holds the portal's lock: none of them is being written now).
    fn remove_leftovers(&self, dir: &OwnedFd, name: &str) {
        let Ok(st) = rustix::fs::fstat(dir) else {
            return;
        };
        let key = (st.st_dev, st.st_ino);
        let found = {
            let mut cache = self.leftovers.lock().unwrap_or_else(|p| p.into_inner());
            let stale = cache
                .get(&key)
                .is_none_or(|l| l.read_at.elapsed() >= RESCAN);
            if stale {
                cache.insert(key, read_leftovers(dir));
            }
            cache
                .get_mut(&key)
                .and_then(|l| l.by_target.remove(name))
                .unwrap_or_default()
        };
        for file in found {
            let shown = file.to_string_lossy();
            match unlinkat(dir, file.as_os_str(), AtFlags::empty()) {
                Ok(()) => {
                    tracing::warn!(file = %shown, "removed a temporary file a crash left behind")
                }
                // Renamed into place by the process that was writing it when it was found.
                Err(rustix::io::Errno::NOENT) => {}
                Err(err) => {
                    tracing::warn!(file = %shown, error = %err, "could not remove a leftover temporary file")
                }
            }
        }
    }

    /// Proves the file can be written: checks the directory and target, then creates and
    /// removes a temporary file beside the target. Its name differs from a delivery's, so a
    /// `check` running beside a delivery never removes the other's file.
    pub fn preflight(&self, portal: &str) -> Result<(), SinkError> {
        let target = self.target(portal);
        let err = |m: String| SinkError {
            sink: self.name.clone(),
            message: m,
        };
        let (dir, resolved, name) = self.open_target(&target).map_err(err)?;
        let probe = Self::temp_name(&name, "probe");
        self.create_exclusive(&dir, &probe)
            .map_err(|e| err(format!("creating a file in {}: {e}", resolved.display())))?;
        unlinkat(&dir, probe.as_str(), AtFlags::empty())
            .map_err(|e| err(format!("removing {probe} in {}: {e}", resolved.display())))?;
        Ok(())
    }

    /// Writes the payload atomically over the target. The caller holds the portal's lock.
    pub fn deliver(&self, portal: &str, payload: &[u8]) -> Result<(), DeliveryError> {
        let target = self.target(portal);
        let (dir, _, name) = self
            .open_target(&target)
            .map_err(DeliveryError::temporary)?;
        self.remove_leftovers(&dir, &name);
        let tmp = Self::temp_name(&name, "tmp");
        let write = || -> std::io::Result<()> {
            let mut f = self.create_exclusive(&dir, &tmp)?;
            f.write_all(payload)?;
            f.sync_all()?;
            drop(f);
            fail::fail_point!("file_sink::before_rename", |_| Err(std::io::Error::other(
                "failpoint before rename"
            )));
            renameat(&dir, tmp.as_str(), &dir, name.as_str())?;
            fsync(dir.as_fd())?;
            Ok(())
        };
        write().map_err(|e| {
            let _ = unlinkat(&dir, tmp.as_str(), AtFlags::empty());
            DeliveryError::temporary(format!("writing {}: {e}", target.display()))
        })
    }
}

/// Reads `dir` for temporary files of deliveries (`.NAME.tmp-` and 16 hex digits), by the
/// name of their target.
fn read_leftovers(dir: &OwnedFd) -> Leftovers {
    let mut by_target: HashMap<String, Vec<std::ffi::OsString>> = HashMap::new();
    if let Ok(entries) = rustix::fs::Dir::read_from(dir) {
        for e in entries.flatten() {
            let raw = e.file_name().to_bytes();
            if let Some(target) = leftover_target(&String::from_utf8_lossy(raw)) {
                use std::os::unix::ffi::OsStrExt;
                by_target
                    .entry(target.to_string())
                    .or_default()
                    .push(std::ffi::OsStr::from_bytes(raw).to_os_string());
            }
        }
    }
    Leftovers {
        read_at: Instant::now(),
        by_target,
    }
}

/// The target a delivery's temporary file `.NAME.tmp-XXXXXXXXXXXXXXXX` was for.
fn leftover_target(file: &str) -> Option<&str> {
    let rest = file.strip_prefix('.')?;
    let (target, tag) = rest.rsplit_once(".tmp-")?;
    (!target.is_empty() && tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(target)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::FileEncryption;

    #[test]
    fn a_leftover_is_named_after_its_target_and_a_16_digit_tag() {
        assert_eq!(
            leftover_target(".acme.txt.tmp-00000000deadbeef"),
            Some("acme.txt")
        );
        assert_eq!(
            leftover_target(".a.tmp-b.tmp-0123456789abcdef"),
            Some("a.tmp-b")
        );
        for not in [
            "acme.txt.tmp-00000000deadbeef",    // not hidden
            ".acme.txt.tmp-deadbeef",           // short tag
            ".acme.txt.tmp-00000000deadbeeg",   // not hex
            ".acme.txt.probe-00000000deadbeef", // a check's probe
            "..tmp-00000000deadbeef",           // no target
        ] {
            assert_eq!(leftover_target(not), None, "{not}");
        }
    }

    /// One read of the directory serves every target in it: a leftover it found is removed
    /// when its own target is delivered, later, and none of another target is touched.
    #[test]
    fn one_read_of_a_directory_finds_the_leftovers_of_every_target() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let sink = FileSink::new(
            "plain",
            &FileSinkConfig {
                path: format!("{}/{{portal}}.txt", dir.path().display()),
                encrypt: FileEncryption::Plain,
                mode: 0o600,
                shared: false,
            },
            FileCipher::Plain,
        );
        let left_b = dir.path().join(".b.txt.tmp-00000000deadbeef");
        std::fs::write(&left_b, "old codes\n").unwrap();
        sink.deliver("a", b"codes of a\n").unwrap();
        assert!(left_b.exists(), "another target's leftover is not touched");
        // Made after the read: found by the next read, not now.
        let late_b = dir.path().join(".b.txt.tmp-0000000000c0ffee");
        std::fs::write(&late_b, "old codes\n").unwrap();
        sink.deliver("b", b"codes of b\n").unwrap();
        assert!(
            !left_b.exists(),
            "found by the first read, removed at b's delivery"
        );
        assert!(late_b.exists(), "the directory was read once");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("b.txt")).unwrap(),
            "codes of b\n"
        );
        // A read older than RESCAN is done again.
        let key = {
            let st = std::fs::metadata(dir.path()).unwrap();
            use std::os::unix::fs::MetadataExt;
            (st.dev(), st.ino())
        };
        {
            let mut cache = sink.leftovers.lock().unwrap();
            let read = cache.get_mut(&key).unwrap();
            match read.read_at.checked_sub(RESCAN) {
                Some(t) => read.read_at = t,
                // A machine up for less than RESCAN: no Instant that old exists.
                None => drop(cache.remove(&key)),
            }
        }
        sink.deliver("b", b"codes of b\n").unwrap();
        assert!(!late_b.exists(), "found by the read after RESCAN");
    }
}
