//! Encryption and fingerprints: OpenPGP ([`pgp`]), age ([`age`]) and keyed hashes of code
//! sets ([`fingerprint`]). Nothing here does I/O beyond reading a key file it is given.

pub mod age;
pub mod fingerprint;
pub mod pgp;

pub use fingerprint::Fingerprinter;
