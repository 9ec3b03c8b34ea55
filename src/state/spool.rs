//! The spool of sealed payloads: what waits for delivery, and what a delivery changes.

use rusqlite::{Connection, params};
use serde::Serialize;

use super::{StateError, exec, now_ms, query_row, sql};

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
    pub created_at: i64,
    /// Attempts.
    pub attempts: i64,
    /// Next automatic attempt.
    pub next_attempt_at: i64,
    /// Last error.
    pub last_error: Option<String>,
    /// The server refused it permanently; `deliver` retries it.
    pub permanent: bool,
}

/// For each (portal, sink), the newest payload waiting; older ones are superseded by it.
/// `due_before`: only those whose next attempt is due (the daemon); `None`: all (`deliver`).
pub fn pending(
    c: &Connection,
    portal: Option<&str>,
    due_before: Option<i64>,
) -> Result<Vec<SpoolEntry>, StateError> {
    let mut st = c
        .prepare_cached(
            "SELECT s.id, s.portal, s.sink, s.set_fp, s.payload, s.created_at, s.attempts FROM spool s
             WHERE s.id = (SELECT MAX(id) FROM spool t WHERE t.portal = s.portal AND t.sink = s.sink)
               AND (?1 IS NULL OR s.portal = ?1)
               AND (?2 IS NULL OR s.next_attempt_at <= ?2)
             ORDER BY s.id",
        )
        .map_err(sql("reading the spool"))?;
    let rows = st
        .query_map(params![portal, due_before], |r| {
            Ok(SpoolEntry {
                id: r.get(0)?,
                portal: r.get(1)?,
                sink: r.get(2)?,
                set_fp: r.get(3)?,
                payload: zeroize::Zeroizing::new(r.get(4)?),
                created_at: r.get(5)?,
                attempts: r.get(6)?,
            })
        })
        .map_err(sql("reading the spool"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("reading the spool"))
}

/// A payload arrived: drop it and every older one for the same portal and sink (through
/// [`Store::write`]).
pub fn delivered(c: &Connection, entry_id: i64) -> Result<(), StateError> {
    let (portal, sink, created): (String, String, i64) = query_row(
        c,
        "SELECT portal, sink, created_at FROM spool WHERE id = ?1",
        params![entry_id],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
    .map_err(sql("finding the delivered payload"))?;
    exec(
        c,
        "DELETE FROM spool WHERE portal = ?1 AND sink = ?2 AND id <= ?3",
        params![portal, sink, entry_id],
    )
    .map_err(sql("dropping delivered payloads"))?;
    exec(
        c,
        "INSERT INTO history (portal, at, event, detail) VALUES (?1, ?2, 'delivered', ?3)",
        params![
            portal,
            now_ms(),
            format!(
                "sink {sink}, sealed {}s earlier",
                (now_ms() - created) / 1000
            )
        ],
    )
    .map_err(sql("recording the delivery"))?;
    Ok(())
}

/// A delivery failed; it is tried again at `next_attempt_at`. `rest`: a partial delivery
/// (some mail recipients took it), what is left to deliver replaces the payload. A
/// permanent refusal is alerted at once (`alerted_at` is left for the alert to set).
pub fn delivery_failed(
    c: &Connection,
    entry_id: i64,
    error: &str,
    next_attempt_at: i64,
    permanent: bool,
    rest: Option<&[u8]>,
) -> Result<(), StateError> {
    exec(
        c,
        "UPDATE spool SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3, permanent = ?4,
                          payload = COALESCE(?5, payload) WHERE id = ?1",
        params![entry_id, error, next_attempt_at, permanent, rest],
    )
    .map_err(sql("recording a failed delivery"))?;
    Ok(())
}

/// How many payloads wait for delivery.
pub fn pending_count(c: &Connection) -> Result<i64, StateError> {
    query_row(c, "SELECT COUNT(*) FROM spool", [], |r| r.get(0)).map_err(sql("counting the spool"))
}

/// The earliest time a pending delivery is due, if any.
pub fn next_delivery_due(c: &Connection) -> Result<Option<i64>, StateError> {
    query_row(c, "SELECT MIN(next_attempt_at) FROM spool", [], |r| {
        r.get(0)
    })
    .map_err(sql("reading the spool"))
}

/// Every pending delivery, for `status`.
pub fn pending_rows(c: &Connection) -> Result<Vec<PendingRow>, StateError> {
    let mut st = c
        .prepare_cached("SELECT portal, sink, created_at, attempts, next_attempt_at, last_error, permanent FROM spool ORDER BY id")
        .map_err(sql("reading the spool"))?;
    let rows = st
        .query_map([], |r| {
            Ok(PendingRow {
                portal: r.get(0)?,
                sink: r.get(1)?,
                created_at: r.get(2)?,
                attempts: r.get(3)?,
                next_attempt_at: r.get(4)?,
                last_error: r.get(5)?,
                permanent: r.get(6)?,
            })
        })
        .map_err(sql("reading the spool"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("reading the spool"))
}

/// Per sink of `portal`, the fingerprint of the newest set sealed for it; a sink the state
/// has no row for falls back to the portal's `'*'` row (filled by the upgrade).
pub fn sink_sets(
    c: &Connection,
    portal: &str,
) -> Result<std::collections::HashMap<String, String>, StateError> {
    let mut st = c
        .prepare_cached("SELECT sink, set_fp FROM sink_sets WHERE portal = ?1")
        .map_err(sql("reading the sets the sinks hold"))?;
    let rows = st
        .query_map(params![portal], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql("reading the sets the sinks hold"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("reading the sets the sinks hold"))
}

/// Drops every pending payload of `portal` for the sinks `keep` does not name (all of them
/// when `keep` is empty); returns how many went. For `forget`.
pub fn drop_pending(c: &Connection, portal: &str, keep: &[String]) -> Result<usize, StateError> {
    let mut st = c
        .prepare_cached("SELECT id, sink FROM spool WHERE portal = ?1")
        .map_err(sql("reading the spool"))?;
    let rows: Vec<(i64, String)> = st
        .query_map(params![portal], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql("reading the spool"))?
        .collect::<Result<_, _>>()
        .map_err(sql("reading the spool"))?;
    let mut n = 0;
    for (id, sink) in rows {
        if !keep.contains(&sink) {
            exec(c, "DELETE FROM spool WHERE id = ?1", params![id])
                .map_err(sql("dropping a payload"))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Records `set_fp` as the set every sink of `portal` holds, where the state knows of none
/// (`'*'` row, kept if one exists).
pub fn assume_sinks_hold(c: &Connection, portal: &str, set_fp: &str) -> Result<(), StateError> {
    exec(
        c,
        "INSERT OR IGNORE INTO sink_sets (portal, sink, set_fp, sealed_at) VALUES (?1, '*', ?2, ?3)",
        params![portal, set_fp, now_ms()],
    )
    .map_err(sql("recording the set the sinks hold"))?;
    Ok(())
}
