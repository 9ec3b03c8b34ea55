//! The rotation journal: an intent is committed before the PUT, becomes sealed with the
//! payloads, and ends done or aborted.

use super::db::{Sql, vals};
use super::{StateError, update_portal};

/// Where an unfinished journal entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Committed before the PUT: the PUT may have happened, or may still happen.
    Intent,
    /// The set is in the spool; only delivery and the close remain.
    Sealed,
}

/// How a journal entry ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// The set was sealed and delivered (or its delivery left to the spool).
    Done,
    /// No set came of it: the portal refused the PUT, the settle found the old set after
    /// the window, or an operator closed it (`abandon`, `forget`).
    Aborted,
}

impl Closed {
    /// Its `phase` in the journal table.
    pub fn as_str(self) -> &'static str {
        match self {
            Closed::Done => "done",
            Closed::Aborted => "aborted",
        }
    }
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
    /// In a cluster: after this time (the database's clock) the instance that wrote the
    /// intent sends no PUT for it; nobody settles it as not applied before then.
    pub put_deadline: Option<i64>,
}

/// Records the start of a rotation, with the settle window that applies if its PUT's outcome
/// turns out unknown. Fails if one is already open. Call it through [`Store::write`]: the
/// commit (fsync'd) must precede the PUT.
pub fn begin_intent(
    c: &dyn Sql,
    portal: &str,
    kind: &str,
    before_fp: Option<&str>,
    window_ms: i64,
) -> Result<i64, StateError> {
    begin(c, portal, kind, before_fp, window_ms, None)
}

/// A rotation's intent, with what its preflight saw (the set `before_fp` of `unused` of
/// `total` codes, as [`super::record_seen`] records it) in the same statement as the attempt.
pub fn begin_rotation(
    c: &dyn Sql,
    portal: &str,
    before_fp: Option<&str>,
    (unused, total): (usize, usize),
    window_ms: i64,
) -> Result<i64, StateError> {
    begin(
        c,
        portal,
        "rotate",
        before_fp,
        window_ms,
        Some((unused, total)),
    )
}

fn begin(
    c: &dyn Sql,
    portal: &str,
    kind: &str,
    before_fp: Option<&str>,
    window_ms: i64,
    seen: Option<(usize, usize)>,
) -> Result<i64, StateError> {
    // In a cluster this is the fence: no intent (so no PUT) unless our claim holds.
    let deadline = c.license_put(portal)?;
    let now = c.now()?;
    let id = c
        .row(
            "recording the intent",
            "INSERT INTO journal (portal, kind, phase, before_fp, started_at, updated_at, window_ms, put_deadline)
             VALUES (?1, ?2, 'intent', ?3, ?4, ?4, ?5, ?6) RETURNING id",
            vals![portal, kind, before_fp, now, window_ms, deadline],
        )?
        .map(|r| r.int(0))
        .transpose()?
        .unwrap_or_default();
    match seen {
        None => update_portal(
            c,
            portal,
            "recording the attempt",
            "UPDATE portals SET last_attempt_at = ?2 WHERE name = ?1",
            vals![portal, now],
        )?,
        Some((unused, total)) => update_portal(
            c,
            portal,
            "recording the attempt",
            "UPDATE portals SET last_attempt_at = ?2, set_fp = ?3, unused = ?4, total = ?5, seen_at = ?2
              WHERE name = ?1",
            vals![portal, now, before_fp.unwrap_or_default(), unused, total],
        )?,
    }
    Ok(id)
}

/// Intents and sealed rotations that no process finished.
pub fn open_journal(c: &dyn Sql, portal: Option<&str>) -> Result<Vec<OpenJournal>, StateError> {
    const COLUMNS: &str =
        "SELECT id, portal, CASE WHEN phase = 'intent' THEN 1 ELSE 0 END, before_fp, started_at,
                                  window_ms, checks, next_check_at, put_deadline FROM journal";
    // Two statements rather than `?1 IS NULL OR portal = ?1`, which would keep SQLite from
    // using the `journal_open` index.
    let rows = match portal {
        Some(p) => c.rows(
            "reading the journal",
            &format!("{COLUMNS} WHERE phase IN ('intent', 'sealed') AND portal = ?1 ORDER BY id"),
            vals![p],
        )?,
        None => c.rows(
            "reading the journal",
            &format!("{COLUMNS} WHERE phase IN ('intent', 'sealed') ORDER BY id"),
            vals![],
        )?,
    };
    rows.iter()
        .map(|r| {
            Ok(OpenJournal {
                id: r.int(0)?,
                portal: r.text(1)?,
                phase: if r.flag(2)? {
                    Phase::Intent
                } else {
                    Phase::Sealed
                },
                before_fp: r.opt_text(3)?,
                started_at: r.int(4)?,
                window_ms: r.opt_int(5)?,
                checks: r.int(6)?,
                next_check_at: r.opt_int(7)?,
                put_deadline: r.opt_int(8)?,
            })
        })
        .collect()
}

/// Stores every sealed payload of a set and marks the journal entry sealed; returns the
/// payloads' spool ids, in order. Call it through [`Store::write`]: after that one commit,
/// the set survives any crash. It must be the transaction's last write of the entry and of
/// the portal's sink sets (two of its writes go with the COMMIT, see [`Sql::defer`]).
pub fn seal(
    c: &dyn Sql,
    journal_id: i64,
    portal: &str,
    set_fp: &str,
    unused: usize,
    total: usize,
    payloads: &[(String, zeroize::Zeroizing<Vec<u8>>)],
) -> Result<Vec<i64>, StateError> {
    seal_pinned(c, journal_id, portal, set_fp, unused, total, payloads, None)
}

/// What a rotation's seal also records of the portal: the account its entry acts as (a
/// later rotation with another account's key is refused unless forced), and that it was
/// the rotation for the entry and consumed every fire up to `fires_to` (see
/// [`super::record_schedule`]).
pub struct Pin<'a> {
    /// The account the portal's key acts as.
    pub account_id: &'a str,
    /// The fingerprint of the portal's effective config entry.
    pub entry_fp: &'a str,
    /// The last fire acted on (Unix ms); it only moves forward.
    pub fires_to: i64,
}

/// [`seal`], and a rotation's [`Pin`] in the same statement as the new set.
#[allow(clippy::too_many_arguments)]
pub fn seal_pinned(
    c: &dyn Sql,
    journal_id: i64,
    portal: &str,
    set_fp: &str,
    unused: usize,
    total: usize,
    payloads: &[(String, zeroize::Zeroizing<Vec<u8>>)],
    pin: Option<&Pin>,
) -> Result<Vec<i64>, StateError> {
    let now = c.now()?;
    let mut ids = Vec::with_capacity(payloads.len());
    for (sink, payload) in payloads {
        let id = c
            .row(
                "spooling a payload",
                "INSERT INTO spool (journal_id, portal, sink, set_fp, payload, created_at, next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6) RETURNING id",
                vals![journal_id, portal, sink, set_fp, &payload[..], now],
            )?
            .map(|r| r.int(0))
            .transpose()?
            .unwrap_or_default();
        ids.push(id);
    }
    // Nothing of the seal's transaction reads the entry after this, nor writes it (its
    // callers commit right after): it may go with the COMMIT.
    c.defer(
        "marking the journal sealed",
        "UPDATE journal SET phase = 'sealed', after_fp = ?2, updated_at = ?3 WHERE id = ?1",
        vals![journal_id, set_fp, now],
    )?;
    update_portal(
        c,
        portal,
        "recording the new set",
        concat!(
            "UPDATE portals SET ",
            super::portals::schedule_assignments!(),
            ", set_fp = ?4, unused = ?5, total = ?6, seen_at = ?7,
               account_id = COALESCE(CAST(?8 AS TEXT), account_id),
               account_entry_fp = COALESCE(CAST(?2 AS TEXT), account_entry_fp)
             WHERE name = ?1"
        ),
        vals![
            portal,
            pin.map(|p| p.entry_fp),
            pin.map(|p| p.fires_to),
            set_fp,
            unused,
            total,
            now,
            pin.map(|p| p.account_id)
        ],
    )?;
    // What each sink holds from now on (or will, once delivered): the baseline of drift.
    // Deferred as the entry's phase is.
    for (sink, _) in payloads {
        c.defer(
            "recording the set a sink holds",
            "INSERT INTO sink_sets (portal, sink, set_fp, sealed_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (portal, sink) DO UPDATE SET set_fp = excluded.set_fp, sealed_at = excluded.sealed_at",
            vals![portal, sink, set_fp, now],
        )?;
    }
    Ok(ids)
}

/// A settle GET of an open intent found the old set before its window closed: count it and
/// say when the next one is due.
pub fn settle_checked(c: &dyn Sql, journal_id: i64, next_check_at: i64) -> Result<(), StateError> {
    c.exec(
        "recording a settle check",
        "UPDATE journal SET checks = checks + 1, next_check_at = ?2, updated_at = ?3 WHERE id = ?1 AND phase = 'intent'",
        vals![journal_id, next_check_at, c.now()?],
    )?;
    Ok(())
}

/// The journal entry ends: `done` or `aborted`, with a note.
pub fn close_journal(
    c: &dyn Sql,
    journal_id: i64,
    closed: Closed,
    note: Option<&str>,
) -> Result<(), StateError> {
    c.exec(
        "closing the journal entry",
        "UPDATE journal SET phase = ?2, note = ?3, updated_at = ?4 WHERE id = ?1",
        vals![journal_id, closed.as_str(), note, c.now()?],
    )?;
    Ok(())
}

/// Portals with an intent closed by hand or as not applied (`aborted`) since `since` (Unix
/// ms), with when: a PUT may still have been applied after all, so they are read for drift.
pub fn closed_since(c: &dyn Sql, since: i64) -> Result<Vec<(String, i64)>, StateError> {
    c.rows(
        "reading closed intents",
        "SELECT portal, MAX(updated_at) FROM journal WHERE phase = ?2 AND updated_at > ?1 GROUP BY portal",
        vals![since, Closed::Aborted.as_str()],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, r.int(1)?)))
    .collect()
}
