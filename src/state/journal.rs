//! The rotation journal: an intent is committed before the PUT, becomes sealed with the
//! payloads, and ends done or aborted.

use rusqlite::{Connection, params};

use super::{StateError, ensure_portal, exec, now_ms, sql};

/// Where an unfinished journal entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Committed before the PUT: the PUT may have happened, or may still happen.
    Intent,
    /// The set is in the spool; only delivery and the close remain.
    Sealed,
}

/// A journal entry that is not finished.
#[derive(Debug, Clone)]
pub struct OpenJournal {
    /// Row id.
    pub id: i64,
    /// Portal.
    pub portal: String,
    /// Where it stands.
    pub phase: Phase,
    /// Fingerprint of the set seen before the PUT.
    pub before_fp: Option<String>,
    /// When the intent was committed (the PUT followed at once): the settle window's start.
    pub started_at: i64,
    /// The settle window it was opened with; absent for entries of older versions.
    pub window_ms: Option<i64>,
    /// Settle GETs made so far.
    pub checks: i64,
    /// When the next settle GET is due; absent until the first one.
    pub next_check_at: Option<i64>,
}

/// Records the start of a rotation, with the settle window that applies if its PUT's outcome
/// turns out unknown. Fails if one is already open. Call it through [`Store::write`]: the
/// commit (fsync'd) must precede the PUT.
pub fn begin_intent(
    c: &Connection,
    portal: &str,
    kind: &str,
    before_fp: Option<&str>,
    window_ms: i64,
) -> Result<i64, StateError> {
    let now = now_ms();
    ensure_portal(c, portal)?;
    exec(
        c,
        "INSERT INTO journal (portal, kind, phase, before_fp, started_at, updated_at, window_ms) VALUES (?1, ?2, 'intent', ?3, ?4, ?4, ?5)",
        params![portal, kind, before_fp, now, window_ms],
    )
    .map_err(sql("recording the intent"))?;
    let id = c.last_insert_rowid();
    exec(
        c,
        "UPDATE portals SET last_attempt_at = ?2 WHERE name = ?1",
        params![portal, now],
    )
    .map_err(sql("recording the attempt"))?;
    Ok(id)
}

/// Intents and sealed rotations that no process finished.
pub fn open_journal(c: &Connection, portal: Option<&str>) -> Result<Vec<OpenJournal>, StateError> {
    // Two statements rather than `?1 IS NULL OR portal = ?1`, which would keep SQLite from
    // using the `journal_open` index.
    let mut st = c
        .prepare_cached(if portal.is_some() {
            "SELECT id, portal, phase = 'intent', before_fp, started_at, window_ms, checks, next_check_at FROM journal
             WHERE phase IN ('intent', 'sealed') AND portal = ?1 ORDER BY id"
        } else {
            "SELECT id, portal, phase = 'intent', before_fp, started_at, window_ms, checks, next_check_at FROM journal
             WHERE phase IN ('intent', 'sealed') AND ?1 IS NULL ORDER BY id"
        })
        .map_err(sql("reading the journal"))?;
    let rows = st
        .query_map(params![portal], |r| {
            Ok(OpenJournal {
                id: r.get(0)?,
                portal: r.get(1)?,
                phase: if r.get(2)? {
                    Phase::Intent
                } else {
                    Phase::Sealed
                },
                before_fp: r.get(3)?,
                started_at: r.get(4)?,
                window_ms: r.get(5)?,
                checks: r.get(6)?,
                next_check_at: r.get(7)?,
            })
        })
        .map_err(sql("reading the journal"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("reading the journal"))
}

/// Stores every sealed payload of a set and marks the journal entry sealed; returns the
/// payloads' spool ids, in order. Call it through [`Store::write`]: after that one commit,
/// the set survives any crash.
pub fn seal(
    c: &Connection,
    journal_id: i64,
    portal: &str,
    set_fp: &str,
    unused: usize,
    total: usize,
    payloads: &[(String, zeroize::Zeroizing<Vec<u8>>)],
) -> Result<Vec<i64>, StateError> {
    let now = now_ms();
    ensure_portal(c, portal)?;
    let mut ids = Vec::with_capacity(payloads.len());
    for (sink, payload) in payloads {
        exec(c,
            "INSERT INTO spool (journal_id, portal, sink, set_fp, payload, created_at, next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
            params![journal_id, portal, sink, set_fp, &payload[..], now],
        )
        .map_err(sql("spooling a payload"))?;
        ids.push(c.last_insert_rowid());
    }
    exec(
        c,
        "UPDATE journal SET phase = 'sealed', after_fp = ?2, updated_at = ?3 WHERE id = ?1",
        params![journal_id, set_fp, now],
    )
    .map_err(sql("marking the journal sealed"))?;
    exec(
        c,
        "UPDATE portals SET set_fp = ?2, unused = ?3, total = ?4, seen_at = ?5 WHERE name = ?1",
        params![portal, set_fp, unused as i64, total as i64, now],
    )
    .map_err(sql("recording the new set"))?;
    // What each sink holds from now on (or will, once delivered): the baseline of drift.
    for (sink, _) in payloads {
        exec(
            c,
            "INSERT INTO sink_sets (portal, sink, set_fp, sealed_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (portal, sink) DO UPDATE SET set_fp = excluded.set_fp, sealed_at = excluded.sealed_at",
            params![portal, sink, set_fp, now],
        )
        .map_err(sql("recording the set a sink holds"))?;
    }
    Ok(ids)
}

/// A settle GET of an open intent found the old set before its window closed: count it and
/// say when the next one is due.
pub fn settle_checked(
    c: &Connection,
    journal_id: i64,
    next_check_at: i64,
) -> Result<(), StateError> {
    exec(
        c,
        "UPDATE journal SET checks = checks + 1, next_check_at = ?2, updated_at = ?3 WHERE id = ?1 AND phase = 'intent'",
        params![journal_id, next_check_at, now_ms()],
    )
    .map_err(sql("recording a settle check"))?;
    Ok(())
}

/// The journal entry ends: `done` or `aborted`, with a note.
pub fn close_journal(
    c: &Connection,
    journal_id: i64,
    phase: &str,
    note: Option<&str>,
) -> Result<(), StateError> {
    exec(
        c,
        "UPDATE journal SET phase = ?2, note = ?3, updated_at = ?4 WHERE id = ?1",
        params![journal_id, phase, note, now_ms()],
    )
    .map_err(sql("closing the journal entry"))?;
    Ok(())
}
