//! Keyed fingerprints of code sets and config entries.
//!
//! A fingerprint is HMAC-SHA256 under a secret kept in the state, so the state can tell two
//! sets apart without holding anything from which a code could be guessed (codes are short:
//! a plain hash of a 6-character code would fall to brute force).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::secret::{CodeSet, ExposeSecret};

/// Computes fingerprints under one secret key.
pub struct Fingerprinter {
    key: Zeroizing<Vec<u8>>,
}

impl Fingerprinter {
    /// A fingerprinter keyed with `key` (32 random bytes from the state).
    pub fn new(key: &[u8]) -> Self {
        Self {
            key: Zeroizing::new(key.to_vec()),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length, so this cannot fail.
        <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key).expect("HMAC accepts any key length")
    }

    /// The fingerprint of a set: independent of order and of which codes are used, so that
    /// a login does not look like a rotation.
    pub fn of_set(&self, set: &CodeSet) -> String {
        let mut codes: Vec<&str> = set.iter().map(|c| c.code.expose_secret()).collect();
        codes.sort_unstable();
        let mut mac = self.mac();
        mac.update(b"codeset\0");
        for c in codes {
            mac.update(&(c.len() as u64).to_be_bytes());
            mac.update(c.as_bytes());
        }
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// The fingerprint of a canonical text (a portal's effective config entry).
    pub fn of_text(&self, text: &str) -> String {
        let mut mac = self.mac();
        mac.update(b"entry\0");
        mac.update(text.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{BackupCode, SecretString};

    fn set(codes: &[(&str, bool)]) -> CodeSet {
        CodeSet::new(
            codes
                .iter()
                .map(|(c, u)| BackupCode {
                    code: SecretString::from(*c),
                    used: *u,
                })
                .collect(),
        )
    }

    #[test]
    fn same_codes_same_fingerprint_whatever_order_or_use() {
        let f = Fingerprinter::new(b"k");
        let a = f.of_set(&set(&[("aa", false), ("bb", false)]));
        assert_eq!(a, f.of_set(&set(&[("bb", true), ("aa", false)])));
        assert_ne!(a, f.of_set(&set(&[("aa", false), ("bc", false)])));
        assert_ne!(
            a,
            Fingerprinter::new(b"other").of_set(&set(&[("aa", false), ("bb", false)]))
        );
        // Length-prefixing keeps "a"+"ab" apart from "aa"+"b".
        assert_ne!(
            f.of_set(&set(&[("a", false), ("ab", false)])),
            f.of_set(&set(&[("aa", false), ("b", false)]))
        );
    }
}
