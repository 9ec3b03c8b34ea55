//! `migrate-state --to postgres`: copies a SQLite state into an empty PostgreSQL database,
//! in one transaction, keeping every id (spool rows point at journal rows) and the
//! fingerprint key (so the sinks' baselines still match and nothing is resent).

use rusqlite::{Connection, OpenFlags};

use super::StateError;
use super::db::{Sql, Val};

/// The tables copied, in an order that satisfies the references. Their columns are read
/// from the SQLite schema itself, so a column a migration adds is copied without a list to
/// keep in step; a table the schema has and this list lacks is refused, not dropped.
pub const TABLES: &[&str] = &[
    "meta",
    "portals",
    "journal",
    "spool",
    "history",
    "sink_sets",
    "notices",
    "drift_log",
    "webhook_cursors",
];

/// Rows copied per table.
pub type Copied = Vec<(&'static str, usize)>;

/// Every row of every table, as read: the table, its columns, its rows.
pub type Tables = Vec<(&'static str, Vec<String>, Vec<Vec<Val>>)>;

/// The tables of a SQLite state's schema, but SQLite's own.
pub fn sqlite_tables(c: &Connection) -> Result<Vec<String>, StateError> {
    c.rows(
        "reading the SQLite schema",
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        &[],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

/// The columns of a SQLite table, in their order.
pub fn sqlite_columns(c: &Connection, table: &str) -> Result<Vec<String>, StateError> {
    c.rows(
        "reading the SQLite schema",
        "SELECT name FROM pragma_table_info(?1) ORDER BY cid",
        &[Val::Text(table.to_string())],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

/// Reads every row of the SQLite state in `dir` (which must be at the current schema:
/// open it with [`super::Store::open`] first).
pub fn read_sqlite(dir: &std::path::Path) -> Result<Tables, StateError> {
    let c = Connection::open_with_flags(
        dir.join(super::DB_FILE),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(super::sql("opening the SQLite state"))?;
    if let Some(t) = sqlite_tables(&c)?
        .into_iter()
        .find(|t| !TABLES.contains(&t.as_str()))
    {
        return Err(StateError::Db {
            action: "reading the SQLite state",
            detail: format!("table {t} is not one this version copies; nothing was copied"),
        });
    }
    let mut out = Vec::new();
    for table in TABLES {
        let cols = sqlite_columns(&c, table)?;
        let rows = c.rows(
            "reading the SQLite state",
            &format!("SELECT {} FROM {table}", cols.join(", ")),
            &[],
        )?;
        out.push((*table, cols, rows.into_iter().map(|r| r.0).collect()));
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
    for (table, cols, rows) in data {
        let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let sql = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            cols.join(", "),
            marks.join(", ")
        );
        for row in &rows {
            c.exec("copying a row", &sql, row)?;
        }
        if cols.first().is_some_and(|c| c == "id") {
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
