//! The file sink: codes written atomically to a file, optionally encrypted.
//!
//! A write goes to a temporary file in the target's directory, created exclusively with the
//! final mode and `O_NOFOLLOW`, fsync'd, renamed over the target, and the directory fsync'd:
//! a reader sees the old file or the new one, never a mix, and after a crash the rename is
//! durable. The target is never a symbolic link. The directory is opened by
//! [`crate::trust::open_dir`] (StrictModes: it and its ancestors owned by root or us, not
//! writable by others) and every step goes through its descriptor (`openat`, `renameat`,
//! `fsync`), so swapping a directory on the path cannot redirect the write. Temporary files
//! a crash left (`.NAME.tmp-…`, whole code sets) are removed at the next delivery, which
//! runs under the portal's lock, so no other process is writing one at that moment.

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

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
}

impl FileSink {
    /// A sink writing `config.path` with the given cipher.
    pub fn new(name: &str, config: &FileSinkConfig, cipher: FileCipher) -> Self {
        Self {
            name: name.to_string(),
            config_path: config.path.clone(),
            mode: config.mode,
            cipher,
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

    /// Removes the temporary files of this target that a crash left behind.
    fn remove_leftovers(dir: &OwnedFd, name: &str) {
        let prefix = format!(".{name}.tmp-");
        let Ok(entries) = rustix::fs::Dir::read_from(dir) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy();
            if file.starts_with(&prefix) {
                match unlinkat(dir, e.file_name(), AtFlags::empty()) {
                    Ok(()) => {
                        tracing::warn!(file = %file, "removed a temporary file a crash left behind")
                    }
                    Err(err) => {
                        tracing::warn!(file = %file, error = %err, "could not remove a leftover temporary file")
                    }
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
        Self::remove_leftovers(&dir, &name);
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
