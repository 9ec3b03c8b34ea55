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

/// A growable buffer for secret bytes (a portal's answer, a rendered set) that leaves no
/// copy behind. A `Vec` that grows moves its bytes to a new allocation and frees the old
/// one as it is, codes and all, for the allocator to hand out again; this buffer grows into
/// a new allocation itself and wipes the old one (every byte of its capacity), and wipes
/// its own when dropped.
#[derive(Default)]
pub struct SecretBuf {
    bytes: zeroize::Zeroizing<Vec<u8>>,
}

impl SecretBuf {
    /// An empty buffer with room for `n` bytes.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            bytes: zeroize::Zeroizing::new(Vec::with_capacity(n)),
        }
    }

    /// Appends `data`, growing (and wiping the old allocation) when there is no room.
    pub fn extend(&mut self, data: &[u8]) {
        if self.bytes.capacity() - self.bytes.len() < data.len() {
            let want = (self.bytes.len() + data.len())
                .max(self.bytes.capacity().saturating_mul(2))
                .max(64);
            let mut grown = zeroize::Zeroizing::new(Vec::with_capacity(want));
            grown.extend_from_slice(&self.bytes);
            // The old allocation is wiped as it is dropped.
            let old = std::mem::replace(&mut self.bytes, grown);
            wiped::note(old.capacity());
            drop(old);
        }
        self.bytes.extend_from_slice(data);
    }

    /// The bytes so far.
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes
    }

    /// How many bytes it holds.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes as text, moved (not copied) into a zeroizing `String`; `None` when they are
    /// not UTF-8 (they are then wiped).
    pub fn into_string(mut self) -> Option<zeroize::Zeroizing<String>> {
        let bytes = std::mem::take(&mut *self.bytes);
        match String::from_utf8(bytes) {
            Ok(s) => Some(zeroize::Zeroizing::new(s)),
            Err(e) => {
                drop(zeroize::Zeroizing::new(e.into_bytes()));
                None
            }
        }
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        wiped::note(self.bytes.capacity());
    }
}

impl fmt::Write for SecretBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.extend(s.as_bytes());
        Ok(())
    }
}

impl fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBuf([REDACTED; {}])", self.len())
    }
}

/// What the tests read to prove that every allocation a [`SecretBuf`] gave up was wiped:
/// the bytes of capacity let go, per thread. Nothing in a release build.
pub mod wiped {
    #[cfg(test)]
    thread_local! {
        static WIPED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// Records `capacity` bytes let go (and wiped by `Zeroizing`).
    #[inline]
    pub fn note(capacity: usize) {
        #[cfg(test)]
        WIPED.with(|w| w.set(w.get() + capacity));
        #[cfg(not(test))]
        let _ = capacity;
    }

    /// Bytes let go on this thread so far.
    #[cfg(test)]
    pub fn total() -> usize {
        WIPED.with(|w| w.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    /// Growing never hands an allocation back unwiped: every allocation the buffer held is
    /// let go through `Zeroizing` (counted), and their sizes add up to what it allocated.
    #[test]
    fn a_growing_secret_buffer_wipes_every_allocation_it_leaves() {
        let before = wiped::total();
        let mut allocated = 0;
        {
            let mut b = SecretBuf::default();
            let mut cap = b.bytes.capacity();
            for i in 0..2000 {
                let _ = writeln!(b, "code-{i:04}");
                if b.bytes.capacity() != cap {
                    allocated += cap;
                    cap = b.bytes.capacity();
                }
            }
            allocated += cap;
            assert!(b.as_slice().starts_with(b"code-0000\ncode-0001\n"));
            assert_eq!(b.len(), 2000 * 10);
        }
        assert_eq!(wiped::total() - before, allocated);
        // Moved out as a String: no copy, and the buffer's empty shell is all that is left.
        let mut b = SecretBuf::with_capacity(4);
        b.extend(b"abc");
        let s = b.into_string().unwrap();
        assert_eq!(s.as_str(), "abc");
    }
}
