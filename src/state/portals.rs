//! What the state knows of each portal: attempts, results, the set last seen, schedule state.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{StateError, ensure_portal, exec, now_ms, query_row, sql};

/// What the state knows of a portal.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PortalRow {
    /// Portal.
    pub name: String,
    /// Last rotation attempt.
    pub last_attempt_at: Option<i64>,
    /// Last successful rotation.
    pub last_success_at: Option<i64>,
    /// `ok`, `failed`, `delivery_pending`, …
    pub last_result: Option<String>,
    /// The last error, without secrets.
    pub last_error: Option<String>,
    /// Failures in a row.
    pub failures: i64,
    /// Earliest automatic retry after a failure.
    pub retry_at: Option<i64>,
    /// Fingerprint of the set last seen.
    pub set_fp: Option<String>,
    /// Unused codes last seen.
    pub unused: Option<i64>,
    /// Codes in the set last seen.
    pub total: Option<i64>,
    /// When the codes were last read.
    pub seen_at: Option<i64>,
    /// Fingerprint of the effective config entry.
    pub entry_fp: Option<String>,
    /// The last scheduled fire time that was acted on.
    pub last_fire_at: Option<i64>,
    /// The account id (`people/@self`) pinned at the first rotation.
    pub account_id: Option<String>,
    /// The entry fingerprint the account was pinned under; another entry may re-pin.
    pub account_entry_fp: Option<String>,
    /// When drift was last found.
    pub drift_at: Option<i64>,
    /// How often drift was found.
    pub drifts: i64,
    /// When the planner last said it is next due.
    pub next_due_at: Option<i64>,
    /// And why.
    pub next_reason: Option<String>,
    /// After a failed watch read, not before then.
    pub watch_retry_at: Option<i64>,
}

/// A rotation succeeded (its payloads may still be pending).
pub fn record_rotated(c: &Connection, portal: &str, result: &str) -> Result<(), StateError> {
    let now = now_ms();
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET last_success_at = ?2, last_result = ?3, last_error = NULL, failures = 0, retry_at = NULL,
                failing_since = NULL, streak_alerted = 0 WHERE name = ?1",
        params![portal, now, result],
    )
    .map_err(sql("recording the rotation"))?;
    add_history(c, portal, "rotated", result)
}

/// Every pending delivery of a portal went through: a `delivery_pending` result becomes `ok`.
pub fn deliveries_cleared(c: &Connection, portal: &str) -> Result<(), StateError> {
    exec(
        c,
        "UPDATE portals SET last_result = 'ok' WHERE name = ?1 AND last_result = 'delivery_pending'
           AND NOT EXISTS (SELECT 1 FROM spool WHERE portal = ?1)",
        params![portal],
    )
    .map_err(sql("recording the deliveries cleared"))?;
    Ok(())
}

/// Pins the account a portal's entry acts as (after a successful rotation).
pub fn pin_account(
    c: &Connection,
    portal: &str,
    account_id: &str,
    entry_fp: &str,
) -> Result<(), StateError> {
    exec(
        c,
        "UPDATE portals SET account_id = ?2, account_entry_fp = ?3 WHERE name = ?1",
        params![portal, account_id, entry_fp],
    )
    .map_err(sql("pinning the account"))?;
    Ok(())
}

/// The portal's set differs from what its sinks hold while no intent is open.
pub fn record_drift(c: &Connection, portal: &str, detail: &str) -> Result<(), StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET drift_at = ?2, drifts = drifts + 1 WHERE name = ?1",
        params![portal, now_ms()],
    )
    .map_err(sql("recording drift"))?;
    add_history(c, portal, "drift", detail)
}

/// A rotation's PUT had an unknown outcome: its intent stays open and is settled later.
/// Not a failure (no backoff, no streak): the portal is simply not rotated meanwhile.
pub fn record_settling(c: &Connection, portal: &str, detail: &str) -> Result<(), StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET last_result = 'settling', last_error = ?2 WHERE name = ?1",
        params![portal, detail],
    )
    .map_err(sql("recording a rotation being settled"))?;
    add_history(c, portal, "settling", detail)
}

/// An attempt failed; returns the failures in a row.
pub fn record_failure(
    c: &Connection,
    portal: &str,
    error: &str,
    retry_at: Option<i64>,
) -> Result<i64, StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET last_attempt_at = ?2, last_result = 'failed', last_error = ?3, failures = failures + 1, retry_at = ?4,
                failing_since = COALESCE(failing_since, ?2) WHERE name = ?1",
        params![portal, now_ms(), error, retry_at],
    )
    .map_err(sql("recording the failure"))?;
    add_history(c, portal, "failed", error)?;
    query_row(
        c,
        "SELECT failures FROM portals WHERE name = ?1",
        params![portal],
        |r| r.get(0),
    )
    .map_err(sql("reading the failure count"))
}

/// The codes were read: remember what was seen.
pub fn record_seen(
    c: &Connection,
    portal: &str,
    set_fp: &str,
    unused: usize,
    total: usize,
) -> Result<(), StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET set_fp = ?2, unused = ?3, total = ?4, seen_at = ?5 WHERE name = ?1",
        params![portal, set_fp, unused as i64, total as i64, now_ms()],
    )
    .map_err(sql("recording the codes seen"))?;
    Ok(())
}

/// Stores the fingerprint of a portal's effective config entry and the last fire time acted on.
pub fn record_schedule(
    c: &Connection,
    portal: &str,
    entry_fp: Option<&str>,
    last_fire_at: Option<i64>,
) -> Result<(), StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        // The last fire acted on only moves forward: a rotation consumes every fire up to
        // its time, and nothing un-consumes one.
        "UPDATE portals SET entry_fp = COALESCE(?2, entry_fp),
                last_fire_at = CASE WHEN ?3 IS NULL THEN last_fire_at
                                    WHEN last_fire_at IS NULL OR ?3 > last_fire_at THEN ?3
                                    ELSE last_fire_at END
         WHERE name = ?1",
        params![portal, entry_fp, last_fire_at],
    )
    .map_err(sql("recording the schedule state"))?;
    Ok(())
}

/// Stores the planner's answer for a portal, and when a failed watch read may be retried.
pub fn record_plan(
    c: &Connection,
    portal: &str,
    next_due_at: Option<i64>,
    reason: Option<&str>,
    watch_retry_at: Option<i64>,
) -> Result<(), StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET next_due_at = ?2, next_reason = ?3, watch_retry_at = ?4 WHERE name = ?1",
        params![portal, next_due_at, reason, watch_retry_at],
    )
    .map_err(sql("recording the plan"))?;
    Ok(())
}

/// Appends to a portal's history.
pub fn add_history(
    c: &Connection,
    portal: &str,
    event: &str,
    detail: &str,
) -> Result<(), StateError> {
    exec(
        c,
        "INSERT INTO history (portal, at, event, detail) VALUES (?1, ?2, ?3, ?4)",
        params![portal, now_ms(), event, detail],
    )
    .map_err(sql("writing history"))?;
    Ok(())
}

const PORTAL_COLUMNS: &str =
    "name, last_attempt_at, last_success_at, last_result, last_error, failures, retry_at,
     set_fp, unused, total, seen_at, entry_fp, last_fire_at, account_id, account_entry_fp,
     drift_at, drifts, next_due_at, next_reason, watch_retry_at";

fn portal_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PortalRow> {
    Ok(PortalRow {
        name: r.get(0)?,
        last_attempt_at: r.get(1)?,
        last_success_at: r.get(2)?,
        last_result: r.get(3)?,
        last_error: r.get(4)?,
        failures: r.get(5)?,
        retry_at: r.get(6)?,
        set_fp: r.get(7)?,
        unused: r.get(8)?,
        total: r.get(9)?,
        seen_at: r.get(10)?,
        entry_fp: r.get(11)?,
        last_fire_at: r.get(12)?,
        account_id: r.get(13)?,
        account_entry_fp: r.get(14)?,
        drift_at: r.get(15)?,
        drifts: r.get(16)?,
        next_due_at: r.get(17)?,
        next_reason: r.get(18)?,
        watch_retry_at: r.get(19)?,
    })
}

/// Every portal the state knows.
pub fn portal_rows(c: &Connection) -> Result<Vec<PortalRow>, StateError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {PORTAL_COLUMNS} FROM portals ORDER BY name"
        ))
        .map_err(sql("reading portals"))?;
    let rows = st
        .query_map([], portal_from_row)
        .map_err(sql("reading portals"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("reading portals"))
}

/// One portal's row, if the state knows it.
pub fn portal_row(c: &Connection, portal: &str) -> Result<Option<PortalRow>, StateError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {PORTAL_COLUMNS} FROM portals WHERE name = ?1"
        ))
        .map_err(sql("reading a portal"))?;
    st.query_row(params![portal], portal_from_row)
        .optional()
        .map_err(sql("reading a portal"))
}
