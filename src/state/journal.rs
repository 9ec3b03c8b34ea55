//! The rotation journal: an intent is committed before the PUT, becomes sealed with the
//! payloads, and ends done or aborted.

use rusqlite::{Connection, params};

use super::{StateError, ensure_portal, exec, now_ms, sql};

/// A journal entry that is not finished.
#[derive(Debug, Clone)]
pub struct OpenJournal {
    /// Row id.
    pub id: i64,
    /// Portal.
    pub portal: String,
    /// `intent` or `sealed`.
    pub phase: String,
    /// Fingerprint of the set seen before the PUT.
    pub before_fp: Option<String>,
}

/// Records the start of a rotation. Fails if one is already open. Call it through
/// [`Store::write`]: the commit (fsync'd) must precede the PUT.
pub fn begin_intent(
    c: &Connection,
    portal: &str,
    kind: &str,
    before_fp: Option<&str>,
) -> Result<i64, StateError> {
    let now = now_ms();
    ensure_portal(c, portal)?;
    exec(
        c,
        "INSERT INTO journal (portal, kind, phase, before_fp, started_at, updated_at) VALUES (?1, ?2, 'intent', ?3, ?4, ?4)",
        params![portal, kind, before_fp, now],
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
            "SELECT id, portal, phase, before_fp FROM journal
             WHERE phase IN ('intent', 'sealed') AND portal = ?1 ORDER BY id"
        } else {
            "SELECT id, portal, phase, before_fp FROM journal
             WHERE phase IN ('intent', 'sealed') AND ?1 IS NULL ORDER BY id"
        })
        .map_err(sql("reading the journal"))?;
    let rows = st
        .query_map(params![portal], |r| {
            Ok(OpenJournal {
                id: r.get(0)?,
                portal: r.get(1)?,
                phase: r.get(2)?,
                before_fp: r.get(3)?,
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
    Ok(ids)
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
