//! How `--json` output writes times (SPEC §2): every time an RFC 3339 UTC string with
//! milliseconds (`2026-12-07T03:00:00.000Z`), never Unix milliseconds. The state keeps Unix
//! milliseconds; the report types keep them too and serialize through these.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serializer;

/// Unix milliseconds as RFC 3339 UTC; a time chrono cannot hold is written as null.
pub fn rfc3339(ms: i64) -> Option<String> {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// `#[serde(serialize_with = "crate::json::time")]` for an `i64` of Unix milliseconds.
pub fn time<S: Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    match rfc3339(*ms) {
        Some(t) => s.serialize_str(&t),
        None => s.serialize_none(),
    }
}

/// [`time`] for an `Option<i64>`.
pub fn opt_time<S: Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms.and_then(rfc3339) {
        Some(t) => s.serialize_str(&t),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn milliseconds_become_rfc3339_utc() {
        assert_eq!(
            super::rfc3339(1_796_612_400_123).as_deref(),
            Some("2026-12-07T03:00:00.123Z")
        );
        assert_eq!(super::rfc3339(i64::MAX), None);
    }
}
