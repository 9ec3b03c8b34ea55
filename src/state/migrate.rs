//! `migrate-state --to postgres`: copies a SQLite state into an empty PostgreSQL database,
//! in one transaction, keeping every id (spool rows point at journal rows) and the
//! fingerprint key (so the sinks' baselines still match and nothing is resent).

use rusqlite::{Connection, OpenFlags};

use super::StateError;
use super::db::{Sql, Val};

/// The tables copied, in an order that satisfies the references, with their columns.
const TABLES: &[(&str, &str)] = &[
    ("meta", "key, value"),
    (
        "portals",
        "name, last_attempt_at, last_success_at, last_result, last_error, failures, retry_at, set_fp, unused, total, seen_at, entry_fp, last_fire_at, failing_since, streak_alerted, account_id, account_entry_fp, drift_at, drifts, next_due_at, next_reason, watch_retry_at, flapping_since, paused_until",
    ),
    (
        "journal",
        "id, portal, kind, phase, before_fp, after_fp, started_at, updated_at, note, window_ms, checks, next_check_at, alerted_at, put_deadline",
    ),
    (
        "spool",
        "id, journal_id, portal, sink, set_fp, payload, created_at, attempts, next_attempt_at, last_error, permanent, alerted_at",
    ),
    ("history", "id, portal, at, event, detail"),
    ("sink_sets", "portal, sink, set_fp, sealed_at"),
    (
        "notices",
        "id, portal, kind, subject, body, created_at, sent_at",
    ),
    ("drift_log", "portal, at, acted"),
];

/// Rows copied per table.
pub type Copied = Vec<(&'static str, usize)>;

/// Every row of every table, as read.
pub type Tables = Vec<(&'static str, Vec<Vec<Val>>)>;

/// Reads every row of the SQLite state in `dir` (which must be at the current schema:
/// open it with [`super::Store::open`] first).
pub fn read_sqlite(dir: &std::path::Path) -> Result<Tables, StateError> {
    let c = Connection::open_with_flags(
        dir.join(super::DB_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(super::sql("opening the SQLite state"))?;
    let mut out = Vec::new();
    for (table, cols) in TABLES {
        let rows = c.rows(
            "reading the SQLite state",
            &format!("SELECT {cols} FROM {table}"),
            &[],
        )?;
        out.push((*table, rows.into_iter().map(|r| r.0).collect()));
    }
    Ok(out)
}

/// Writes what [`read_sqlite`] read into `c` (a PostgreSQL transaction), which must hold no
/// portal, journal entry or payload yet; moves the id sequences past the copied ids.
pub fn write(c: &dyn Sql, data: Tables) -> Result<Copied, StateError> {
    for table in ["portals", "journal", "spool"] {
        let n = c
            .row(
                "checking the target",
                &format!("SELECT COUNT(*) FROM {table}"),
                &[],
            )?
            .map_or(Ok(0), |r| r.int(0))?;
        if n > 0 {
            return Err(StateError::Db {
                action: "checking the target",
                detail: format!(
                    "table {table} already holds {n} row(s); migrate-state copies into an empty database only"
                ),
            });
        }
    }
    // The key a fresh migration made gives way to the state's: it made the baselines.
    c.exec("replacing the fingerprint key", "DELETE FROM meta", &[])?;
    let mut copied = Vec::new();
    for (table, rows) in data {
        let cols = TABLES
            .iter()
            .find(|(t, _)| *t == table)
            .map(|(_, c)| *c)
            .unwrap_or_default();
        let n = cols.split(',').count();
        let marks: Vec<String> = (1..=n).map(|i| format!("?{i}")).collect();
        let sql = format!("INSERT INTO {table} ({cols}) VALUES ({})", marks.join(", "));
        for row in &rows {
            c.exec("copying a row", &sql, row)?;
        }
        if cols.starts_with("id,") {
            c.exec(
                "moving the id sequence",
                &format!(
                    "SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                ),
                &[],
            )?;
        }
        copied.push((table, rows.len()));
    }
    Ok(copied)
}
