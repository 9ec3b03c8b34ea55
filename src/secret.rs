//! Secrets and backup codes as types.
//!
//! API keys, SMTP passwords and backup codes are held in [`SecretString`] (from `secrecy`):
//! its `Debug` prints `[REDACTED]`, it has no `Display`, and its memory is zeroized on drop.
//! Reading the value takes an explicit `expose_secret()`, so leaking one into a log or an
//! error takes deliberate effort. A [`CodeSet`] is what the portal returned; its `Debug` shows
//! only counts.

use std::fmt;

pub use secrecy::{ExposeSecret, SecretString};

/// One backup code as the portal reports it.
pub struct BackupCode {
    /// The code itself; case-sensitive, any length the portal chose.
    pub code: SecretString,
    /// Whether the code has been spent on a login.
    pub used: bool,
}

impl fmt::Debug for BackupCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackupCode")
            .field("code", &"[REDACTED]")
            .field("used", &self.used)
            .finish()
    }
}

/// A whole set of backup codes, in the order the portal gave them.
pub struct CodeSet {
    codes: Vec<BackupCode>,
}

impl CodeSet {
    /// Wraps the codes the portal returned.
    pub fn new(codes: Vec<BackupCode>) -> Self {
        Self { codes }
    }

    /// How many codes the set holds, used ones included.
    pub fn total(&self) -> usize {
        self.codes.len()
    }

    /// How many codes can still be used to log in.
    pub fn unused(&self) -> usize {
        self.codes.iter().filter(|c| !c.used).count()
    }

    /// The codes, in the portal's order.
    pub fn iter(&self) -> impl Iterator<Item = &BackupCode> {
        self.codes.iter()
    }

    /// True when the portal returned no codes at all.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
}

impl fmt::Debug for CodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CodeSet")
            .field("total", &self.total())
            .field("unused", &self.unused())
            .finish()
    }
}
