//! Which alerts are due, and the marks that announce each one only once.

use rusqlite::{Connection, params};

use super::{StateError, exec, now_ms, sql};

/// Something an alert should announce.
#[derive(Debug, Clone)]
pub enum AlertDue {
    /// A portal has failed `failures` times in a row since `since`.
    Streak {
        /// Portal.
        portal: String,
        /// Failures in a row.
        failures: i64,
        /// First failure of the streak.
        since: i64,
        /// The last error.
        error: String,
    },
    /// A payload has waited since `since`.
    Pending {
        /// Spool row.
        id: i64,
        /// Portal.
        portal: String,
        /// Sink.
        sink: String,
        /// Sealed at.
        since: i64,
        /// Attempts so far.
        attempts: i64,
        /// The last error.
        error: Option<String>,
    },
    /// An intent has been open for more than twice its settle window.
    Unsettled {
        /// Journal row.
        id: i64,
        /// Portal.
        portal: String,
        /// When the intent was committed.
        since: i64,
        /// Settle GETs made.
        checks: i64,
    },
    /// A queued notice (drift, another account).
    Notice {
        /// Notice row.
        id: i64,
        /// Portal.
        portal: String,
        /// Subject line.
        subject: String,
        /// Body text.
        body: String,
    },
}

/// Queues a notice for `[alerts]` unless one of the same `kind` for the portal was queued
/// at or after `once_since` (so a condition seen at every attempt is announced once).
pub fn add_notice(
    c: &Connection,
    portal: &str,
    kind: &str,
    subject: &str,
    body: &str,
    once_since: i64,
) -> Result<(), StateError> {
    exec(
        c,
        "INSERT INTO notices (portal, kind, subject, body, created_at)
         SELECT ?1, ?2, ?3, ?4, ?5
         WHERE NOT EXISTS (SELECT 1 FROM notices WHERE portal = ?1 AND kind = ?2 AND created_at >= ?6)",
        params![portal, kind, subject, body, now_ms(), once_since],
    )
    .map_err(sql("queueing a notice"))?;
    Ok(())
}

/// Streaks of at least `after_failures` and payloads older than `pending_before` that were
/// not announced yet.
pub fn alerts_due(
    c: &Connection,
    after_failures: i64,
    pending_before: i64,
) -> Result<Vec<AlertDue>, StateError> {
    let mut out = Vec::new();
    let mut st = c
        .prepare_cached(
            "SELECT name, failures, COALESCE(failing_since, last_attempt_at, 0), COALESCE(last_error, '') FROM portals
             WHERE failures >= ?1 AND streak_alerted = 0 ORDER BY name",
        )
        .map_err(sql("reading failure streaks"))?;
    let rows = st
        .query_map(params![after_failures], |r| {
            Ok(AlertDue::Streak {
                portal: r.get(0)?,
                failures: r.get(1)?,
                since: r.get(2)?,
                error: r.get(3)?,
            })
        })
        .map_err(sql("reading failure streaks"))?;
    for r in rows {
        out.push(r.map_err(sql("reading failure streaks"))?);
    }
    let mut st = c
        .prepare_cached(
            "SELECT id, portal, sink, created_at, attempts, last_error FROM spool
             WHERE (created_at <= ?1 OR permanent = 1) AND alerted_at IS NULL ORDER BY id",
        )
        .map_err(sql("reading the spool"))?;
    let rows = st
        .query_map(params![pending_before], |r| {
            Ok(AlertDue::Pending {
                id: r.get(0)?,
                portal: r.get(1)?,
                sink: r.get(2)?,
                since: r.get(3)?,
                attempts: r.get(4)?,
                error: r.get(5)?,
            })
        })
        .map_err(sql("reading the spool"))?;
    for r in rows {
        out.push(r.map_err(sql("reading the spool"))?);
    }
    let mut st = c
        .prepare_cached(
            "SELECT id, portal, started_at, checks FROM journal
             WHERE phase = 'intent' AND alerted_at IS NULL
               AND started_at + 2 * COALESCE(window_ms, 900000) <= ?1 ORDER BY id",
        )
        .map_err(sql("reading open intents"))?;
    let rows = st
        .query_map(params![now_ms()], |r| {
            Ok(AlertDue::Unsettled {
                id: r.get(0)?,
                portal: r.get(1)?,
                since: r.get(2)?,
                checks: r.get(3)?,
            })
        })
        .map_err(sql("reading open intents"))?;
    for r in rows {
        out.push(r.map_err(sql("reading open intents"))?);
    }
    let mut st = c
        .prepare_cached(
            "SELECT id, portal, subject, body FROM notices WHERE sent_at IS NULL ORDER BY id",
        )
        .map_err(sql("reading notices"))?;
    let rows = st
        .query_map([], |r| {
            Ok(AlertDue::Notice {
                id: r.get(0)?,
                portal: r.get(1)?,
                subject: r.get(2)?,
                body: r.get(3)?,
            })
        })
        .map_err(sql("reading notices"))?;
    for r in rows {
        out.push(r.map_err(sql("reading notices"))?);
    }
    Ok(out)
}

/// Records that an alert was sent, so it is not sent again.
pub fn alert_sent(c: &Connection, due: &AlertDue) -> Result<(), StateError> {
    match due {
        AlertDue::Streak { portal, .. } => {
            exec(
                c,
                "UPDATE portals SET streak_alerted = 1 WHERE name = ?1",
                params![portal],
            )
            .map_err(sql("recording an alert"))?;
        }
        AlertDue::Pending { id, .. } => {
            exec(
                c,
                "UPDATE spool SET alerted_at = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )
            .map_err(sql("recording an alert"))?;
        }
        AlertDue::Unsettled { id, .. } => {
            exec(
                c,
                "UPDATE journal SET alerted_at = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )
            .map_err(sql("recording an alert"))?;
        }
        AlertDue::Notice { id, .. } => {
            exec(
                c,
                "UPDATE notices SET sent_at = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )
            .map_err(sql("recording an alert"))?;
        }
    }
    Ok(())
}
