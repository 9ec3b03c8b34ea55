//! Entry points of the fuzz targets in `fuzz/`, also used to replay their corpus in an
//! ordinary `cargo test`: each takes arbitrary bytes and must neither panic nor hang. They
//! call the code that handles untrusted input, as it runs: the config's parse and
//! validation, the DocSpace answer's decoding, armored key parsing and checking, cron.

use std::path::Path;

/// Parses and validates a config file's text.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::parse(text, Path::new("/fuzz/config.toml"), false);
    }
}

/// Decodes a portal's 2xx answer as codes and as an account, as the client does.
pub fn response(data: &[u8]) {
    let _ = crate::docspace::client::decode_codes(data);
    let _ = crate::docspace::client::decode_envelope::<crate::docspace::Account>(data)
        .map(|a| a.escaped());
    let _ = crate::docspace::client::decode_envelope::<crate::docspace::ApiKeyInfo>(data);
}

/// Parses and checks ASCII-armored public keys.
pub fn keys(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::crypto::pgp::parse_keys(
            text,
            Path::new("fuzz.asc"),
            std::time::SystemTime::now(),
        );
    }
}

/// Parses a cron expression (and looks for its next fire time, as validation does).
pub fn cron(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::schedule::CronSchedule::parse(text, chrono_tz::Tz::UTC);
    }
}
