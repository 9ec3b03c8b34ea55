//! The seam between the state's statements and the database that runs them.
//!
//! Every statement of the state is written once, in SQL that SQLite and PostgreSQL both
//! accept (`?N` placeholders, `ON CONFLICT`, `RETURNING`, `CAST`), against [`Sql`]: a
//! connection inside a transaction that can run a statement and return its rows as
//! [`Val`]s. SQLite implements it on `rusqlite::Connection`; PostgreSQL on a transaction
//! of `tokio-postgres` (see `pg.rs`). What differs between the two beyond the text (the
//! clock, and the fence that licenses a PUT in a cluster) is a method of the trait too.

use super::StateError;

/// One value in or out of a statement. Times are Unix milliseconds, flags 0 or 1.
#[derive(Clone, Debug, PartialEq)]
pub enum Val {
    /// NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl From<i64> for Val {
    fn from(v: i64) -> Self {
        Val::Int(v)
    }
}
impl From<usize> for Val {
    fn from(v: usize) -> Self {
        Val::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<bool> for Val {
    fn from(v: bool) -> Self {
        Val::Int(i64::from(v))
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Self {
        Val::Text(v.to_string())
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Self {
        Val::Text(v.clone())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Self {
        Val::Text(v)
    }
}
impl From<&[u8]> for Val {
    fn from(v: &[u8]) -> Self {
        Val::Blob(v.to_vec())
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Self {
        v.map_or(Val::Null, Into::into)
    }
}

/// The parameters of a statement: `vals![a, b, c]`.
macro_rules! vals {
    ($($v:expr),* $(,)?) => { &[$($crate::state::db::Val::from($v)),*][..] };
}
pub(crate) use vals;

/// A row of a result.
#[derive(Debug)]
pub struct Row(pub Vec<Val>);

/// A value of a row was not of the type the statement expects (a schema out of step).
fn mismatch(i: usize, want: &str, got: &Val) -> StateError {
    StateError::Db {
        action: "reading a row",
        detail: format!("column {i}: expected {want}, found {got:?}"),
    }
}

impl Row {
    fn at(&self, i: usize) -> &Val {
        self.0.get(i).unwrap_or(&Val::Null)
    }
    /// An integer column.
    pub fn int(&self, i: usize) -> Result<i64, StateError> {
        match self.at(i) {
            Val::Int(v) => Ok(*v),
            v => Err(mismatch(i, "an integer", v)),
        }
    }
    /// An integer column that may be NULL.
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, StateError> {
        match self.at(i) {
            Val::Null => Ok(None),
            _ => self.int(i).map(Some),
        }
    }
    /// A flag (an integer or boolean column).
    pub fn flag(&self, i: usize) -> Result<bool, StateError> {
        self.int(i).map(|v| v != 0)
    }
    /// A text column.
    pub fn text(&self, i: usize) -> Result<String, StateError> {
        match self.at(i) {
            Val::Text(v) => Ok(v.clone()),
            v => Err(mismatch(i, "text", v)),
        }
    }
    /// A text column that may be NULL.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, StateError> {
        match self.at(i) {
            Val::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
    /// A byte column, taken out of the row (a payload is not copied).
    pub fn take_blob(&mut self, i: usize) -> Result<Vec<u8>, StateError> {
        match self.0.get_mut(i).map(|v| std::mem::replace(v, Val::Null)) {
            Some(Val::Blob(v)) => Ok(v),
            Some(v) => Err(mismatch(i, "bytes", &v)),
            None => Err(mismatch(i, "bytes", &Val::Null)),
        }
    }
}

/// A connection inside a transaction. Statements are SQL both databases accept, with `?1`,
/// `?2`, … placeholders.
pub trait Sql {
    /// Runs a statement; returns the rows it changed.
    fn exec(&self, action: &'static str, sql: &str, params: &[Val]) -> Result<u64, StateError>;
    /// Runs a query; returns its rows.
    fn rows(&self, action: &'static str, sql: &str, params: &[Val])
    -> Result<Vec<Row>, StateError>;
    /// The clock the state's times are written with: the database server's in a cluster
    /// (one clock for every instance), this host's for SQLite.
    fn now(&self) -> Result<i64, StateError>;
    /// Checks, inside the transaction that writes an intent for `portal`, that this process
    /// may send a PUT for it, and returns the deadline (Unix ms, the clock of [`Sql::now`])
    /// after which no PUT may be sent for that intent. SQLite: the portal's `flock`
    /// already guarantees it, and no other process can send our PUT late (`None`).
    /// PostgreSQL: the claim's epoch must still be ours and its lease outlive the PUT
    /// budget and a grace; otherwise [`StateError::Fenced`].
    fn license_put(&self, portal: &str) -> Result<Option<i64>, StateError>;

    /// Runs a write whose outcome nothing in this transaction reads afterwards, and whose
    /// rows nothing later in it writes (a history record, a sink's set as a seal's last
    /// write, a claim's release). PostgreSQL sends the deferred writes, in order, with the
    /// COMMIT, all in one round trip; SQLite runs it now. Its failure fails the commit.
    fn defer(&self, action: &'static str, sql: &str, params: &[Val]) -> Result<(), StateError> {
        self.exec(action, sql, params).map(drop)
    }

    /// Ends this process's claim on `portal` when the transaction commits (its last write
    /// under the claim: one statement fewer than a release of its own after it). SQLite:
    /// nothing (the portal's `flock` is released when its lock is dropped).
    fn release_claim(&self, portal: &str) -> Result<(), StateError> {
        let _ = portal;
        Ok(())
    }

    /// The first row of a query, if any.
    fn row(
        &self,
        action: &'static str,
        sql: &str,
        params: &[Val],
    ) -> Result<Option<Row>, StateError> {
        Ok(self.rows(action, sql, params)?.into_iter().next())
    }
}

/// A connection lent to reads ([`super::Store::call`]): a statement that writes, or an
/// intent, is refused (a bug: writes belong in [`super::Store::write`], which commits them
/// together).
pub struct ReadOnly<'a>(pub &'a dyn Sql);

impl Sql for ReadOnly<'_> {
    fn exec(&self, action: &'static str, _: &str, _: &[Val]) -> Result<u64, StateError> {
        Err(StateError::Db {
            action,
            detail: "a write among reads (a bug: it belongs in Store::write)".into(),
        })
    }

    fn rows(
        &self,
        action: &'static str,
        sql: &str,
        params: &[Val],
    ) -> Result<Vec<Row>, StateError> {
        self.0.rows(action, sql, params)
    }

    fn now(&self) -> Result<i64, StateError> {
        self.0.now()
    }

    fn license_put(&self, portal: &str) -> Result<Option<i64>, StateError> {
        Err(StateError::Fenced {
            portal: portal.to_string(),
            why: "an intent among reads (a bug)".into(),
        })
    }

    fn defer(&self, action: &'static str, _: &str, _: &[Val]) -> Result<(), StateError> {
        Err(StateError::Db {
            action,
            detail: "a write among reads (a bug: it belongs in Store::write)".into(),
        })
    }

    fn release_claim(&self, portal: &str) -> Result<(), StateError> {
        Err(StateError::Db {
            action: "releasing a claim",
            detail: format!("{portal}: a release among reads (a bug)"),
        })
    }
}

/// `?N` placeholders to PostgreSQL's `$N`, outside string literals.
pub fn to_dollar(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut in_str = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_str = !in_str;
                out.push(c);
            }
            '?' if !in_str && chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

// ---- SQLite ----

impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Val::Null => ValueRef::Null,
            Val::Int(v) => ValueRef::Integer(*v),
            Val::Text(v) => ValueRef::Text(v.as_bytes()),
            Val::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

fn lite(action: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
    super::sql(action)
}

impl Sql for rusqlite::Connection {
    fn exec(&self, action: &'static str, sql: &str, params: &[Val]) -> Result<u64, StateError> {
        // Through the statement cache: the protocol runs the same few statements for every
        // portal, and parsing them each time was a visible share of a mass rotation's CPU.
        let n = self
            .prepare_cached(sql)
            .and_then(|mut st| st.execute(rusqlite::params_from_iter(params)))
            .map_err(lite(action))?;
        Ok(n as u64)
    }

    fn rows(
        &self,
        action: &'static str,
        sql: &str,
        params: &[Val],
    ) -> Result<Vec<Row>, StateError> {
        let mut st = self.prepare_cached(sql).map_err(lite(action))?;
        let n = st.column_count();
        let mut rows = st
            .query(rusqlite::params_from_iter(params))
            .map_err(lite(action))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(lite(action))? {
            let mut vals = Vec::with_capacity(n);
            for i in 0..n {
                use rusqlite::types::ValueRef;
                vals.push(match r.get_ref(i).map_err(lite(action))? {
                    ValueRef::Null => Val::Null,
                    ValueRef::Integer(v) => Val::Int(v),
                    ValueRef::Real(v) => Val::Int(v as i64),
                    ValueRef::Text(v) => Val::Text(String::from_utf8_lossy(v).into_owned()),
                    ValueRef::Blob(v) => Val::Blob(v.to_vec()),
                });
            }
            out.push(Row(vals));
        }
        Ok(out)
    }

    fn now(&self) -> Result<i64, StateError> {
        Ok(super::now_ms())
    }

    fn license_put(&self, _portal: &str) -> Result<Option<i64>, StateError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_literals() {
        assert_eq!(
            to_dollar("SELECT '?1', x FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b = $12"
        );
    }
}
