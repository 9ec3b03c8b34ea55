//! Encryption and fingerprints: OpenPGP ([`pgp`]), S/MIME ([`smime`]), age ([`age`]) and
//! keyed hashes of code sets ([`fingerprint`]). Nothing here does I/O beyond reading a key file it is given.

pub mod age;
pub mod fingerprint;
pub mod pgp;
pub mod smime;

pub use fingerprint::Fingerprinter;

/// A key's or certificate's date as people read it in messages: `2027-01-05` (UTC).
pub fn day(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%Y-%m-%d")
        .to_string()
}

/// A bare address `local@domain`, no display name.
pub fn valid_address(addr: &str) -> bool {
    let mut parts = addr.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !addr
            .chars()
            .any(|c| c.is_whitespace() || c == '<' || c == '>' || c == ',')
}
