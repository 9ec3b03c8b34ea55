//! Which alerts are due, and the marks that announce each one only once.

use super::StateError;
use super::db::{Sql, vals};

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

impl AlertDue {
    /// The portal it is about; a notice about no portal (a recipient key's expiry) is
    /// recorded in the chain `*`, which no portal can be called.
    pub fn portal_or_config(&self) -> &str {
        let p = match self {
            AlertDue::Streak { portal, .. }
            | AlertDue::Pending { portal, .. }
            | AlertDue::Unsettled { portal, .. }
            | AlertDue::Notice { portal, .. } => portal.as_str(),
        };
        if p.is_empty() {
            super::history::CONFIG_CHAIN
        } else {
            p
        }
    }
}

/// Queues a notice for `[alerts]` unless one of the same `kind` for the portal was queued
/// at or after `once_since` (so a condition seen at every attempt is announced once).
pub fn add_notice(
    c: &dyn Sql,
    portal: &str,
    kind: &str,
    subject: &str,
    body: &str,
    once_since: i64,
) -> Result<(), StateError> {
    c.exec(
        "queueing a notice",
        "INSERT INTO notices (portal, kind, subject, body, created_at)
         SELECT CAST(?1 AS TEXT), CAST(?2 AS TEXT), CAST(?3 AS TEXT), CAST(?4 AS TEXT), CAST(?5 AS BIGINT)
         WHERE NOT EXISTS (SELECT 1 FROM notices WHERE portal = ?1 AND kind = ?2 AND created_at >= ?6)",
        vals![portal, kind, subject, body, c.now()?, once_since],
    )?;
    Ok(())
}

/// Streaks of at least `after_failures` and payloads older than `pending_before` that were
/// not announced yet.
pub fn alerts_due(
    c: &dyn Sql,
    after_failures: i64,
    pending_before: i64,
) -> Result<Vec<AlertDue>, StateError> {
    let mut out = Vec::new();
    for r in c.rows(
        "reading failure streaks",
        "SELECT name, failures, COALESCE(failing_since, last_attempt_at, 0), COALESCE(last_error, '') FROM portals
         WHERE failures >= ?1 AND streak_alerted = 0 ORDER BY name",
        vals![after_failures],
    )? {
        out.push(AlertDue::Streak {
            portal: r.text(0)?,
            failures: r.int(1)?,
            since: r.int(2)?,
            error: r.text(3)?,
        });
    }
    for r in c.rows(
        "reading the spool",
        "SELECT id, portal, sink, created_at, attempts, last_error FROM spool
         WHERE (created_at <= ?1 OR permanent = 1) AND alerted_at IS NULL ORDER BY id",
        vals![pending_before],
    )? {
        out.push(AlertDue::Pending {
            id: r.int(0)?,
            portal: r.text(1)?,
            sink: r.text(2)?,
            since: r.int(3)?,
            attempts: r.int(4)?,
            error: r.opt_text(5)?,
        });
    }
    for r in c.rows(
        "reading open intents",
        // `started_at <= ?1` (implied by the window's test) lets the partial index
        // `journal_unalerted_intents` answer it, whatever the journal's length.
        "SELECT id, portal, started_at, checks FROM journal
         WHERE phase = 'intent' AND alerted_at IS NULL AND started_at <= ?1
           AND started_at + 2 * COALESCE(window_ms, 900000) <= ?1 ORDER BY started_at, id",
        vals![c.now()?],
    )? {
        out.push(AlertDue::Unsettled {
            id: r.int(0)?,
            portal: r.text(1)?,
            since: r.int(2)?,
            checks: r.int(3)?,
        });
    }
    for r in c.rows(
        "reading notices",
        "SELECT id, portal, subject, body FROM notices WHERE sent_at IS NULL ORDER BY id",
        vals![],
    )? {
        out.push(AlertDue::Notice {
            id: r.int(0)?,
            portal: r.text(1)?,
            subject: r.text(2)?,
            body: r.text(3)?,
        });
    }
    Ok(out)
}

/// Records that an alert was sent, so it is not sent again.
pub fn alert_sent(c: &dyn Sql, due: &AlertDue) -> Result<(), StateError> {
    let now = c.now()?;
    match due {
        AlertDue::Streak { portal, .. } => {
            c.exec(
                "recording an alert",
                "UPDATE portals SET streak_alerted = 1 WHERE name = ?1",
                vals![portal],
            )?;
        }
        AlertDue::Pending { id, .. } => {
            c.exec(
                "recording an alert",
                "UPDATE spool SET alerted_at = ?2 WHERE id = ?1",
                vals![*id, now],
            )?;
        }
        AlertDue::Unsettled { id, .. } => {
            c.exec(
                "recording an alert",
                "UPDATE journal SET alerted_at = ?2 WHERE id = ?1",
                vals![*id, now],
            )?;
        }
        AlertDue::Notice { id, .. } => {
            c.exec(
                "recording an alert",
                "UPDATE notices SET sent_at = ?2 WHERE id = ?1",
                vals![*id, now],
            )?;
        }
    }
    Ok(())
}
