//! The spool of sealed payloads: what waits for delivery, and what a delivery changes.

use serde::Serialize;

use super::StateError;
use super::db::{Sql, vals};
use super::history::{Cause, Event, Record};

/// A sealed payload waiting for delivery.
pub struct SpoolEntry {
    /// Row id.
    pub id: i64,
    /// Portal.
    pub portal: String,
    /// Sink name.
    pub sink: String,
    /// Fingerprint of the set inside.
    pub set_fp: String,
    /// The sealed bytes.
    pub payload: zeroize::Zeroizing<Vec<u8>>,
    /// When it was sealed.
    pub created_at: i64,
    /// Delivery attempts so far.
    pub attempts: i64,
}

/// A pending delivery as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PendingRow {
    /// Portal.
    pub portal: String,
    /// Sink.
    pub sink: String,
    /// Sealed at.
    #[serde(serialize_with = "crate::json::time")]
    pub created_at: i64,
    /// Attempts.
    pub attempts: i64,
    /// Next automatic attempt.
    #[serde(serialize_with = "crate::json::time")]
    pub next_attempt_at: i64,
    /// Last error.
    pub last_error: Option<String>,
    /// The server refused it permanently; `deliver` retries it.
    pub permanent: bool,
}

/// For each (portal, sink), the newest payload waiting; older ones are superseded by it.
/// `due_before`: only those whose next attempt is due (the daemon); `None`: all (`deliver`).
pub fn pending(
    c: &dyn Sql,
    portal: Option<&str>,
    due_before: Option<i64>,
) -> Result<Vec<SpoolEntry>, StateError> {
    let mut rows = c.rows(
        "reading the spool",
        "SELECT s.id, s.portal, s.sink, s.set_fp, s.payload, s.created_at, s.attempts FROM spool s
         WHERE s.id = (SELECT MAX(id) FROM spool t WHERE t.portal = s.portal AND t.sink = s.sink)
           AND (CAST(?1 AS TEXT) IS NULL OR s.portal = ?1)
           AND (CAST(?2 AS BIGINT) IS NULL OR s.next_attempt_at <= ?2)
         ORDER BY s.id",
        vals![portal, due_before],
    )?;
    rows.iter_mut()
        .map(|r| {
            Ok(SpoolEntry {
                id: r.int(0)?,
                portal: r.text(1)?,
                sink: r.text(2)?,
                set_fp: r.text(3)?,
                payload: zeroize::Zeroizing::new(r.take_blob(4)?),
                created_at: r.int(5)?,
                attempts: r.int(6)?,
            })
        })
        .collect()
}

/// A payload arrived: drop it and every older one for the same portal and sink (through
/// [`Store::write`]).
pub fn delivered(c: &dyn Sql, entry_id: i64, cause: &Cause) -> Result<(), StateError> {
    // One statement finds the entry and drops it with the older ones of its sink.
    let dropped = c.rows(
        "dropping delivered payloads",
        "DELETE FROM spool
          WHERE portal = (SELECT portal FROM spool WHERE id = ?1)
            AND sink = (SELECT sink FROM spool WHERE id = ?1)
            AND id <= ?1
         RETURNING id, portal, sink, attempts",
        vals![entry_id],
    )?;
    let Some(r) = dropped
        .iter()
        .find(|r| r.int(0).is_ok_and(|id| id == entry_id))
    else {
        return Err(super::StateError::Db {
            action: "finding the delivered payload",
            detail: format!("spool row {entry_id} is gone"),
        });
    };
    let (portal, sink, attempts) = (r.text(1)?, r.text(2)?, r.int(3)?);
    let mut rec = Record::new(Event::Delivered, &portal, cause).outcome("delivered");
    rec.sink = Some(sink);
    rec.attempt = Some(attempts + 1);
    super::history::append(c, rec).map(drop)
}

/// A delivery failed; it is tried again at `next_attempt_at`. `rest`: a partial delivery
/// (some mail recipients took it), what is left to deliver replaces the payload. A
/// permanent refusal is alerted at once (`alerted_at` is left for the alert to set).
pub fn delivery_failed(
    c: &dyn Sql,
    entry_id: i64,
    error: &str,
    next_attempt_at: i64,
    permanent: bool,
    rest: Option<&[u8]>,
    cause: &Cause,
) -> Result<(), StateError> {
    let row = c.row(
        "recording a failed delivery",
        "UPDATE spool SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3, permanent = ?4,
                          payload = COALESCE(?5, payload) WHERE id = ?1 RETURNING portal, sink, attempts",
        vals![entry_id, error, next_attempt_at, permanent, rest],
    )?;
    let Some(r) = row else { return Ok(()) };
    let portal = r.text(0)?;
    let mut rec = Record::new(Event::DeliveryFailed, &portal, cause)
        .outcome(if permanent { "refused" } else { "failed" })
        .reason(error);
    rec.sink = Some(r.text(1)?);
    rec.attempt = Some(r.int(2)?);
    super::history::append(c, rec).map(drop)
}

/// Payloads waiting, per portal.
pub fn pending_by_portal(c: &dyn Sql) -> Result<Vec<(String, i64)>, StateError> {
    c.rows(
        "counting the spool",
        "SELECT portal, COUNT(*) FROM spool GROUP BY portal",
        vals![],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, r.int(1)?)))
    .collect()
}

/// Payloads waiting for one portal (by the `spool_by_target` index).
pub fn pending_count_of(c: &dyn Sql, portal: &str) -> Result<i64, StateError> {
    c.row(
        "counting the spool",
        "SELECT COUNT(*) FROM spool WHERE portal = ?1",
        vals![portal],
    )?
    .map_or(Ok(0), |r| r.int(0))
}

/// The earliest time a pending delivery is due, if any.
pub fn next_delivery_due(c: &dyn Sql) -> Result<Option<i64>, StateError> {
    c.row(
        "reading the spool",
        "SELECT MIN(next_attempt_at) FROM spool",
        vals![],
    )?
    .map_or(Ok(None), |r| r.opt_int(0))
}

/// Every pending delivery, for `status`.
pub fn pending_rows(c: &dyn Sql) -> Result<Vec<PendingRow>, StateError> {
    c.rows(
        "reading the spool",
        "SELECT portal, sink, created_at, attempts, next_attempt_at, last_error, permanent FROM spool ORDER BY id",
        vals![],
    )?
    .iter()
    .map(|r| {
        Ok(PendingRow {
            portal: r.text(0)?,
            sink: r.text(1)?,
            created_at: r.int(2)?,
            attempts: r.int(3)?,
            next_attempt_at: r.int(4)?,
            last_error: r.opt_text(5)?,
            permanent: r.flag(6)?,
        })
    })
    .collect()
}

/// Per sink of `portal`, the fingerprint of the newest set sealed for it; a sink the state
/// has no row for falls back to the portal's `'*'` row (filled by the upgrade).
pub fn sink_sets(
    c: &dyn Sql,
    portal: &str,
) -> Result<std::collections::HashMap<String, String>, StateError> {
    c.rows(
        "reading the sets the sinks hold",
        "SELECT sink, set_fp FROM sink_sets WHERE portal = ?1",
        vals![portal],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, r.text(1)?)))
    .collect()
}

/// Drops every pending payload of `portal` for the sinks `keep` does not name (all of them
/// when `keep` is empty); returns how many went. For `forget`.
pub fn drop_pending(c: &dyn Sql, portal: &str, keep: &[String]) -> Result<usize, StateError> {
    let rows = c.rows(
        "reading the spool",
        "SELECT id, sink FROM spool WHERE portal = ?1",
        vals![portal],
    )?;
    let mut n = 0;
    for r in rows {
        if !keep.contains(&r.text(1)?) {
            c.exec(
                "dropping a payload",
                "DELETE FROM spool WHERE id = ?1",
                vals![r.int(0)?],
            )?;
            n += 1;
        }
    }
    Ok(n)
}

/// Records `set_fp` as the set every sink of `portal` holds, where the state knows of none
/// (`'*'` row, kept if one exists).
pub fn assume_sinks_hold(c: &dyn Sql, portal: &str, set_fp: &str) -> Result<(), StateError> {
    c.exec(
        "recording the set the sinks hold",
        "INSERT INTO sink_sets (portal, sink, set_fp, sealed_at) VALUES (?1, '*', ?2, ?3)
         ON CONFLICT (portal, sink) DO NOTHING",
        vals![portal, set_fp, c.now()?],
    )?;
    Ok(())
}
