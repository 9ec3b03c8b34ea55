//! The file sink (SPEC §5): codes written atomically to a file, optionally encrypted.
//!
//! A write goes to a temporary file in the target's directory, created exclusively with the
//! final mode and `O_NOFOLLOW`, fsync'd, renamed over the target, and the directory fsync'd:
//! a reader sees the old file or the new one, never a mix, and after a crash the rename is
//! durable. The target is never a symbolic link, and the directory must not be writable by
//! others (who could swap the file).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;

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
        let how = match &self.cipher {
            FileCipher::Plain => "plain text".to_string(),
            FileCipher::Age(_) => "age".to_string(),
            FileCipher::Pgp(k) => format!("OpenPGP to {} key(s)", k.len()),
        };
        format!(
            "file {} ({how}, mode {:04o})",
            self.target(portal).display(),
            self.mode
        )
    }

    /// What identifies where and to whom this sink writes for `portal` (no secrets).
    pub fn identity(&self, portal: &str) -> String {
        let cipher = match &self.cipher {
            FileCipher::Plain => "plain".to_string(),
            FileCipher::Age(r) => format!("age {}", r.written.join(",")),
            FileCipher::Pgp(k) => format!(
                "pgp {}",
                k.iter()
                    .map(|k| k.fingerprint.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        format!(
            "file {} mode {:o} {cipher}",
            self.target(portal).display(),
            self.mode
        )
    }

    /// Encrypts the rendered text into the file's content.
    pub fn seal(&self, text: &[u8]) -> Result<Vec<u8>, SinkError> {
        let err = |m: String| SinkError {
            sink: self.name.clone(),
            message: m,
        };
        match &self.cipher {
            FileCipher::Plain => Ok(text.to_vec()),
            FileCipher::Age(r) => r.encrypt(text).map_err(err),
            FileCipher::Pgp(keys) => {
                let refs: Vec<&PgpKey> = keys.iter().collect();
                pgp::encrypt(&refs, text)
                    .map(String::into_bytes)
                    .map_err(err)
            }
        }
    }

    fn check_target(&self, target: &Path) -> Result<PathBuf, String> {
        let dir = target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let meta = fs::metadata(&dir).map_err(|e| format!("directory {}: {e}", dir.display()))?;
        if !meta.is_dir() {
            return Err(format!("{} is not a directory", dir.display()));
        }
        if meta.mode() & 0o002 != 0 {
            return Err(format!(
                "directory {} is writable by others (mode {:04o}); another user could replace the file",
                dir.display(),
                meta.mode() & 0o7777
            ));
        }
        match fs::symlink_metadata(target) {
            Ok(m) if m.file_type().is_symlink() => Err(format!(
                "{} is a symbolic link; refusing to write through it",
                target.display()
            )),
            Ok(m) if !m.is_file() => Err(format!(
                "{} exists and is not a regular file",
                target.display()
            )),
            _ => Ok(dir),
        }
    }

    fn temp_path(dir: &Path, target: &Path) -> PathBuf {
        let base = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag: u64 = rand::thread_rng().r#gen();
        dir.join(format!(".{base}.tmp-{tag:016x}"))
    }

    fn create_exclusive(&self, path: &Path) -> std::io::Result<fs::File> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        // The umask may have narrowed the mode; set exactly what was configured.
        f.set_permissions(fs::Permissions::from_mode(self.mode))?;
        Ok(f)
    }

    /// Proves the file can be written: checks the directory and target, then creates and
    /// removes a temporary file beside the target.
    pub fn preflight(&self, portal: &str) -> Result<(), SinkError> {
        let target = self.target(portal);
        let err = |m: String| SinkError {
            sink: self.name.clone(),
            message: m,
        };
        let dir = self.check_target(&target).map_err(err)?;
        let tmp = Self::temp_path(&dir, &target);
        self.create_exclusive(&tmp)
            .map_err(|e| err(format!("creating a file in {}: {e}", dir.display())))?;
        fs::remove_file(&tmp).map_err(|e| err(format!("removing {}: {e}", tmp.display())))?;
        Ok(())
    }

    /// Writes the payload atomically over the target.
    pub fn deliver(&self, portal: &str, payload: &[u8]) -> Result<(), DeliveryError> {
        let target = self.target(portal);
        let dir = self
            .check_target(&target)
            .map_err(DeliveryError::temporary)?;
        let tmp = Self::temp_path(&dir, &target);
        let write = || -> std::io::Result<()> {
            let mut f = self.create_exclusive(&tmp)?;
            f.write_all(payload)?;
            f.sync_all()?;
            drop(f);
            fail::fail_point!("file_sink::before_rename", |_| Err(std::io::Error::other(
                "failpoint before rename"
            )));
            fs::rename(&tmp, &target)?;
            fs::File::open(&dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            DeliveryError::temporary(format!("writing {}: {e}", target.display()))
        })
    }
}
