//! What the state knows of each portal: attempts, results, the set last seen, schedule state.

use serde::Serialize;

use super::db::{Row, Sql, Val, vals};
use super::history::{Cause, Event, Record};
use super::{StateError, update_portal};

/// The assignments that record a portal's schedule state, with the entry's fingerprint in
/// `?2` (kept when NULL) and the last fire acted on in `?3`, which only moves forward: a
/// rotation consumes every fire up to its time, and nothing un-consumes one.
macro_rules! schedule_assignments {
    () => {
        "entry_fp = COALESCE(CAST(?2 AS TEXT), entry_fp),
         last_fire_at = CASE WHEN CAST(?3 AS BIGINT) IS NULL THEN last_fire_at
                             WHEN last_fire_at IS NULL OR CAST(?3 AS BIGINT) > last_fire_at THEN CAST(?3 AS BIGINT)
                             ELSE last_fire_at END"
    };
}
pub(crate) use schedule_assignments;

/// What the state knows of a portal.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PortalRow {
    /// Portal.
    pub name: String,
    /// Last rotation attempt.
    pub last_attempt_at: Option<i64>,
    /// Last successful rotation.
    pub last_success_at: Option<i64>,
    /// How its last attempt ended.
    pub last_result: Option<LastResult>,
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
    /// Since when its set changes more often than drift may be acted on (SPEC §6).
    pub flapping_since: Option<i64>,
    /// Its host answered 429: no request before then.
    pub paused_until: Option<i64>,
}

/// How a portal's last attempt ended, as the state stores it (`last_result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LastResult {
    /// Rotated, and every payload delivered.
    Ok,
    /// Rotated; a payload waits in the spool.
    DeliveryPending,
    /// A PUT's outcome is unknown; its intent is being settled.
    Settling,
    /// The attempt failed (see `last_error`).
    Failed,
}

impl LastResult {
    /// Its text in the state (and in `status --json`).
    pub fn as_str(self) -> &'static str {
        match self {
            LastResult::Ok => "ok",
            LastResult::DeliveryPending => "delivery_pending",
            LastResult::Settling => "settling",
            LastResult::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self, StateError> {
        [
            LastResult::Ok,
            LastResult::DeliveryPending,
            LastResult::Settling,
            LastResult::Failed,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| StateError::Db {
            action: "reading a portal",
            detail: format!("unknown last_result {s:?}"),
        })
    }
}

/// A rotation succeeded (its payloads may still be pending), recorded as `record` (with the
/// result as its outcome) unless the caller recorded it already. Returns the portal's
/// [`Outlook`] after it (without the sink sets), from the update's own `RETURNING`.
pub fn record_rotated(
    c: &dyn Sql,
    portal: &str,
    result: LastResult,
    record: Option<Record>,
) -> Result<Outlook, StateError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "UPDATE portals SET last_success_at = ?2, last_result = ?3, last_error = NULL, failures = 0,
                    retry_at = NULL, failing_since = NULL, streak_alerted = 0
              WHERE name = ?1 RETURNING {PORTAL_COLUMNS}, {OUTLOOK_COUNTS}"
        )
    });
    let result = result.as_str();
    let now = c.now()?;
    let params = vals![portal, now, result];
    let row = match c.row("recording the rotation", &SQL, params)? {
        Some(r) => r,
        None => {
            super::ensure_portal(c, portal)?;
            c.row("recording the rotation", &SQL, params)?
                .ok_or_else(|| StateError::Db {
                    action: "recording the rotation",
                    detail: format!("the row of portal {portal} is gone"),
                })?
        }
    };
    if let Some(record) = record {
        super::history::append(c, record.outcome(result))?;
    }
    outlook_of(c, portal, Some(&row), false)
}

/// Every pending delivery of a portal went through: a `delivery_pending` result becomes `ok`.
pub fn deliveries_cleared(c: &dyn Sql, portal: &str) -> Result<(), StateError> {
    c.exec(
        "recording the deliveries cleared",
        "UPDATE portals SET last_result = ?2 WHERE name = ?1 AND last_result = ?3
           AND NOT EXISTS (SELECT 1 FROM spool WHERE portal = ?1)",
        vals![
            portal,
            LastResult::Ok.as_str(),
            LastResult::DeliveryPending.as_str()
        ],
    )?;
    Ok(())
}

/// The rolling window drift actions are counted in.
pub const DRIFT_WINDOW_MS: i64 = 3_600_000;
/// Drift actions (resend or rotate) allowed per portal in [`DRIFT_WINDOW_MS`].
pub const DRIFT_ACTIONS: i64 = 2;

/// What may be done about drift just found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriftVerdict {
    /// Converge: resend or rotate, as `on_drift` says.
    Act,
    /// Found by a step that converges anyway (a rotation's preflight): only recorded.
    Noted,
    /// More drift than may be acted on: recorded, not acted on; `began` is true the first
    /// time, when one notice goes out.
    Flapping {
        /// Flapping began with this drift.
        began: bool,
    },
}

/// Whether a portal whose `flapping_since` is `since` still flaps at `now`, with `recent`
/// drifts found in the last window: FLAPPING clears after a rolling hour with at most one.
pub fn still_flapping(since: Option<i64>, recent: i64, now: i64) -> bool {
    since.is_some_and(|s| now - s < DRIFT_WINDOW_MS || recent > 1)
}

/// Drift found in the last window, per portal.
pub fn recent_drifts(c: &dyn Sql, portal: &str) -> Result<i64, StateError> {
    let now = c.now()?;
    c.row(
        "counting drift",
        "SELECT COUNT(*) FROM drift_log WHERE portal = ?1 AND at > ?2",
        vals![portal, now - DRIFT_WINDOW_MS],
    )?
    .map_or(Ok(0), |r| r.int(0))
}

/// The portal's set differs from what its sinks hold while no intent is open: records it
/// and decides, in the same transaction (so instances of a cluster share the count), whether
/// it may be acted on (`acts`: the caller would resend or rotate because of it).
pub fn record_drift(
    c: &dyn Sql,
    portal: &str,
    acts: bool,
    detail: &str,
    cause: &Cause,
) -> Result<DriftVerdict, StateError> {
    let now = c.now()?;
    c.exec(
        "pruning drift",
        "DELETE FROM drift_log WHERE portal = ?1 AND at <= ?2",
        vals![portal, now - 2 * DRIFT_WINDOW_MS],
    )?;
    let recent = recent_drifts(c, portal)?;
    let acted = c
        .row(
            "counting drift actions",
            "SELECT COUNT(*) FROM drift_log WHERE portal = ?1 AND at > ?2 AND acted = 1",
            vals![portal, now - DRIFT_WINDOW_MS],
        )?
        .map_or(Ok(0), |r| r.int(0))?;
    let since = c
        .row(
            "reading flapping",
            "SELECT flapping_since FROM portals WHERE name = ?1",
            vals![portal],
        )?
        .map_or(Ok(None), |r| r.opt_int(0))?;
    let flapping = still_flapping(since, recent, now);
    let verdict = match (flapping, acts) {
        (true, _) => DriftVerdict::Flapping { began: false },
        (false, false) => DriftVerdict::Noted,
        (false, true) if acted < DRIFT_ACTIONS => DriftVerdict::Act,
        (false, true) => DriftVerdict::Flapping { began: true },
    };
    let flapping_since = match verdict {
        DriftVerdict::Flapping { began: true } => Some(now),
        DriftVerdict::Flapping { began: false } => since,
        _ => None,
    };
    c.exec(
        "recording drift",
        "INSERT INTO drift_log (portal, at, acted) VALUES (?1, ?2, ?3)",
        vals![portal, now, i64::from(verdict == DriftVerdict::Act)],
    )?;
    update_portal(
        c,
        portal,
        "recording drift",
        "UPDATE portals SET drift_at = ?2, drifts = drifts + 1, flapping_since = ?3 WHERE name = ?1",
        vals![portal, now, flapping_since],
    )?;
    let outcome = match verdict {
        DriftVerdict::Act => "acted",
        DriftVerdict::Noted => "noted",
        DriftVerdict::Flapping { .. } => "flapping",
    };
    let drift = Record::new(Event::Drift, portal, cause)
        .outcome(outcome)
        .reason(detail);
    super::history::append(c, drift)?;
    if verdict == (DriftVerdict::Flapping { began: true }) {
        let flapping = Record::new(Event::Flapping, portal, cause).reason(format!(
            "more than {DRIFT_ACTIONS} drift actions in an hour: drift is no longer acted on until it calms down"
        ));
        super::history::append(c, flapping)?;
    }
    Ok(verdict)
}

/// A 429 paused the portal's host until `until` (Unix ms): kept, so `status` shows it and
/// a restarted process honours it.
pub fn record_pause(c: &dyn Sql, portal: &str, until: i64) -> Result<(), StateError> {
    update_portal(
        c,
        portal,
        "recording a 429 pause",
        "UPDATE portals SET paused_until = ?2 WHERE name = ?1",
        vals![portal, until],
    )
}

/// A rotation's PUT had an unknown outcome: its intent stays open and is settled later.
/// Not a failure (no backoff, no streak): the portal is simply not rotated meanwhile.
pub fn record_settling(
    c: &dyn Sql,
    portal: &str,
    detail: &str,
    cause: &Cause,
) -> Result<(), StateError> {
    update_portal(
        c,
        portal,
        "recording a rotation being settled",
        "UPDATE portals SET last_result = ?3, last_error = ?2 WHERE name = ?1",
        vals![portal, detail, LastResult::Settling.as_str()],
    )?;
    let rec = Record::new(Event::RotationFailed, portal, cause)
        .outcome("unknown")
        .reason(detail);
    super::history::append(c, rec).map(drop)
}

/// An attempt failed; returns the failures in a row.
pub fn record_failure(
    c: &dyn Sql,
    portal: &str,
    error: &str,
    retry_at: Option<i64>,
    cause: &Cause,
) -> Result<i64, StateError> {
    update_portal(
        c,
        portal,
        "recording the failure",
        "UPDATE portals SET last_attempt_at = ?2, last_result = ?5, last_error = ?3, failures = failures + 1, retry_at = ?4,
                failing_since = COALESCE(failing_since, ?2) WHERE name = ?1",
        vals![portal, c.now()?, error, retry_at, LastResult::Failed.as_str()],
    )?;
    let rec = Record::new(Event::RotationFailed, portal, cause)
        .outcome("failed")
        .reason(error);
    super::history::append(c, rec)?;
    c.row(
        "reading the failure count",
        "SELECT failures FROM portals WHERE name = ?1",
        vals![portal],
    )?
    .map_or(Ok(0), |r| r.int(0))
}

/// The codes were read: remember what was seen.
pub fn record_seen(
    c: &dyn Sql,
    portal: &str,
    set_fp: &str,
    unused: usize,
    total: usize,
) -> Result<(), StateError> {
    update_portal(
        c,
        portal,
        "recording the codes seen",
        "UPDATE portals SET set_fp = ?2, unused = ?3, total = ?4, seen_at = ?5 WHERE name = ?1",
        vals![portal, set_fp, unused, total, c.now()?],
    )?;
    Ok(())
}

/// Stores the fingerprint of a portal's effective config entry and the last fire time acted on.
pub fn record_schedule(
    c: &dyn Sql,
    portal: &str,
    entry_fp: Option<&str>,
    last_fire_at: Option<i64>,
) -> Result<(), StateError> {
    update_portal(
        c,
        portal,
        "recording the schedule state",
        concat!(
            "UPDATE portals SET ",
            schedule_assignments!(),
            " WHERE name = ?1"
        ),
        vals![portal, entry_fp, last_fire_at],
    )?;
    Ok(())
}

/// Stores the planner's answer for a portal, and when a failed watch read may be retried.
pub fn record_plan(
    c: &dyn Sql,
    portal: &str,
    next_due_at: Option<i64>,
    reason: Option<&str>,
    watch_retry_at: Option<i64>,
) -> Result<(), StateError> {
    update_portal(
        c,
        portal,
        "recording the plan",
        "UPDATE portals SET next_due_at = ?2, next_reason = ?3, watch_retry_at = ?4 WHERE name = ?1",
        vals![portal, next_due_at, reason, watch_retry_at],
    )?;
    Ok(())
}

/// A new portal's first plan, for [`insert_plans`]: the columns
/// [`record_plan_and_schedule`] writes.
pub struct NewPlan<'a> {
    /// The portal.
    pub portal: &'a str,
    /// The entry it adopts.
    pub entry_fp: Option<&'a str>,
    /// The last fire acted on.
    pub last_fire_at: Option<i64>,
    /// When it is next due, and why.
    pub next_due_at: Option<i64>,
    /// Why it is next due.
    pub reason: Option<&'a str>,
    /// When a failed watch is tried again.
    pub watch_retry_at: Option<i64>,
}

/// Adds the rows of new portals with their first plans, up to 200 per statement (a first
/// start over 10,000 new portals: 50 statements, not 20,000). Returns the portals added; one
/// that had a row already (another instance, a `rotate` meanwhile) is left as it was, for
/// [`record_plan_and_schedule`].
pub fn insert_plans(
    c: &dyn Sql,
    plans: &[NewPlan<'_>],
) -> Result<std::collections::HashSet<String>, StateError> {
    let mut added = std::collections::HashSet::with_capacity(plans.len());
    for chunk in plans.chunks(super::ROWS_PER_INSERT) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| {
                let n = i * 6;
                format!(
                    "(?{}, ?{}, ?{}, ?{}, ?{}, ?{})",
                    n + 1,
                    n + 2,
                    n + 3,
                    n + 4,
                    n + 5,
                    n + 6
                )
            })
            .collect();
        let mut params = Vec::with_capacity(chunk.len() * 6);
        for p in chunk {
            params.extend([
                Val::from(p.portal),
                Val::from(p.entry_fp),
                Val::from(p.last_fire_at),
                Val::from(p.next_due_at),
                Val::from(p.reason),
                Val::from(p.watch_retry_at),
            ]);
        }
        for r in c.rows(
            "adding portal rows",
            &format!(
                "INSERT INTO portals (name, entry_fp, last_fire_at, next_due_at, next_reason, watch_retry_at)
                 VALUES {} ON CONFLICT (name) DO NOTHING RETURNING name",
                values.join(", ")
            ),
            &params,
        )? {
            added.insert(r.text(0)?);
        }
    }
    Ok(added)
}

/// [`record_schedule`] and [`record_plan`] in one statement (the daemon's plans at start,
/// where every new portal adopts its entry).
pub fn record_plan_and_schedule(
    c: &dyn Sql,
    portal: &str,
    entry_fp: Option<&str>,
    last_fire_at: Option<i64>,
    next_due_at: Option<i64>,
    reason: Option<&str>,
    watch_retry_at: Option<i64>,
) -> Result<(), StateError> {
    update_portal(
        c,
        portal,
        "recording the plan",
        concat!(
            "UPDATE portals SET ",
            schedule_assignments!(),
            ", next_due_at = ?4, next_reason = ?5, watch_retry_at = ?6 WHERE name = ?1"
        ),
        vals![
            portal,
            entry_fp,
            last_fire_at,
            next_due_at,
            reason,
            watch_retry_at
        ],
    )?;
    Ok(())
}

const PORTAL_COLUMNS: &str =
    "name, last_attempt_at, last_success_at, last_result, last_error, failures, retry_at,
     set_fp, unused, total, seen_at, entry_fp, last_fire_at, account_id, account_entry_fp,
     drift_at, drifts, next_due_at, next_reason, watch_retry_at, flapping_since, paused_until";

fn portal_from_row(r: &Row) -> Result<PortalRow, StateError> {
    Ok(PortalRow {
        name: r.text(0)?,
        last_attempt_at: r.opt_int(1)?,
        last_success_at: r.opt_int(2)?,
        last_result: r
            .opt_text(3)?
            .as_deref()
            .map(LastResult::parse)
            .transpose()?,
        last_error: r.opt_text(4)?,
        failures: r.int(5)?,
        retry_at: r.opt_int(6)?,
        set_fp: r.opt_text(7)?,
        unused: r.opt_int(8)?,
        total: r.opt_int(9)?,
        seen_at: r.opt_int(10)?,
        entry_fp: r.opt_text(11)?,
        last_fire_at: r.opt_int(12)?,
        account_id: r.opt_text(13)?,
        account_entry_fp: r.opt_text(14)?,
        drift_at: r.opt_int(15)?,
        drifts: r.int(16)?,
        next_due_at: r.opt_int(17)?,
        next_reason: r.opt_text(18)?,
        watch_retry_at: r.opt_int(19)?,
        flapping_since: r.opt_int(20)?,
        paused_until: r.opt_int(21)?,
    })
}

/// Every portal the state knows.
pub fn portal_rows(c: &dyn Sql) -> Result<Vec<PortalRow>, StateError> {
    c.rows(
        "reading portals",
        // The config's own audit chain has a row for its head, and is no portal.
        &format!("SELECT {PORTAL_COLUMNS} FROM portals WHERE name <> '*' ORDER BY name"),
        vals![],
    )?
    .iter()
    .map(portal_from_row)
    .collect()
}

/// One portal's row, if the state knows it.
pub fn portal_row(c: &dyn Sql, portal: &str) -> Result<Option<PortalRow>, StateError> {
    c.row(
        "reading a portal",
        &format!("SELECT {PORTAL_COLUMNS} FROM portals WHERE name = ?1"),
        vals![portal],
    )?
    .as_ref()
    .map(portal_from_row)
    .transpose()
}

/// What a rotation reads first, and a finished job last, of one portal: its row, and how
/// many payloads, open journal entries and sink sets it has, in one statement; the open
/// entries and the sink sets themselves only when there are some (a portal in steady
/// state has no open entry; a new one has no sink set either).
pub struct Outlook {
    /// The portal's row, if it has one.
    pub row: Option<PortalRow>,
    /// Its payloads waiting in the spool.
    pub pending: i64,
    /// Its open journal entries, oldest first.
    pub open: Vec<super::OpenJournal>,
    /// The set each sink holds (empty unless asked for).
    pub sink_sets: std::collections::HashMap<String, String>,
}

/// What [`Outlook`] reads beside a portal's row, in the row's statement (`?1`: the portal).
/// `phase IN ('intent', 'sealed')` as the `journal_open` index has it.
const OUTLOOK_COUNTS: &str = "(SELECT COUNT(*) FROM spool WHERE portal = ?1),
    (SELECT COUNT(*) FROM journal WHERE phase IN ('intent', 'sealed') AND portal = ?1),
    (SELECT COUNT(*) FROM sink_sets WHERE portal = ?1)";

/// Reads the [`Outlook`] of `portal`. `with_sink_sets`: the sink sets are wanted (a
/// rotation's baseline of drift), not only their number.
pub fn outlook(c: &dyn Sql, portal: &str, with_sink_sets: bool) -> Result<Outlook, StateError> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("SELECT {PORTAL_COLUMNS}, {OUTLOOK_COUNTS} FROM portals WHERE name = ?1")
    });
    let row = c.row("reading a portal", &SQL, vals![portal])?;
    outlook_of(c, portal, row.as_ref(), with_sink_sets)
}

/// The [`Outlook`] from `r`, a row of PORTAL_COLUMNS and OUTLOOK_COUNTS (`None`: the portal
/// has no row), reading the open entries and the sink sets only when there are some.
fn outlook_of(
    c: &dyn Sql,
    portal: &str,
    r: Option<&Row>,
    with_sink_sets: bool,
) -> Result<Outlook, StateError> {
    // The columns after PORTAL_COLUMNS.
    let more = PORTAL_COLUMNS.split(',').count();
    let (row, pending, open, sets) = match r {
        Some(r) => (
            Some(portal_from_row(r)?),
            r.int(more)?,
            r.int(more + 1)?,
            r.int(more + 2)?,
        ),
        // No row: no rotation yet, but what another path left (a payload, an entry) is
        // read all the same.
        None => (None, super::pending_count_of(c, portal)?, 1, 1),
    };
    Ok(Outlook {
        row,
        pending,
        open: if open > 0 {
            super::open_journal(c, Some(portal))?
        } else {
            Vec::new()
        },
        sink_sets: if with_sink_sets && sets > 0 {
            super::sink_sets(c, portal)?
        } else {
            std::collections::HashMap::new()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flapping_clears_after_an_hour_with_at_most_one_drift() {
        let h = DRIFT_WINDOW_MS;
        assert!(!still_flapping(None, 9, 0), "never began");
        assert!(still_flapping(Some(0), 0, h - 1), "within its first hour");
        assert!(still_flapping(Some(0), 2, 5 * h), "still drifting often");
        assert!(!still_flapping(Some(0), 1, h), "an hour with one drift");
        assert!(!still_flapping(Some(0), 0, 3 * h), "quiet");
    }
}

#[cfg(test)]
mod last_result_tests {
    use super::LastResult;

    /// The stored text is the state's format (states written by earlier versions hold it)
    /// and `status --json`'s: both are pinned here, and they are one.
    #[test]
    fn last_result_texts_are_the_state_format_and_the_json() {
        for (r, text) in [
            (LastResult::Ok, "ok"),
            (LastResult::DeliveryPending, "delivery_pending"),
            (LastResult::Settling, "settling"),
            (LastResult::Failed, "failed"),
        ] {
            assert_eq!(r.as_str(), text);
            assert_eq!(LastResult::parse(text).unwrap(), r);
            assert_eq!(serde_json::to_value(r).unwrap(), text);
        }
        assert!(LastResult::parse("pending").is_err());
    }
}
