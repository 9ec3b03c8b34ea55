//! The state store: one SQLite database in the state directory (SPEC §4, §6).
//!
//! It holds per portal the last attempt, result, fingerprint and unused count; the rotation
//! journal; the spool of sealed payloads; a history; and the secret key of the fingerprints.
//! Every SQL statement of the project is in this module. Durability: WAL with
//! `synchronous=FULL`, so a committed transaction has been fsync'd; `secure_delete` so a
//! delivered plain-text payload does not linger in free pages. The file is 0600 in a 0700
//! directory.
//!
//! Processes are serialised per portal by an exclusive `flock` on `locks/PORTAL.lock`: the
//! kernel releases it when the process dies, so a crash never leaves a portal locked.
//!
//! The methods are synchronous; async callers go through [`Store::call`], which runs them on
//! the blocking pool.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::crypto::Fingerprinter;

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_initial.sql"),
    include_str!("migrations/0002_alerts.sql"),
    include_str!("migrations/0003_open_journal_index.sql"),
];
const DB_FILE: &str = "state.sqlite";

/// A failure of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// SQLite refused.
    #[error("state database: {action}: {source}")]
    Sqlite {
        /// What was being done.
        action: &'static str,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// A file operation failed.
    #[error("state directory {path}: {action}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The database is newer than this binary.
    #[error(
        "state database has schema version {found}, newer than the {supported} this version knows; upgrade tfa-rotator"
    )]
    TooNew {
        /// Version found.
        found: usize,
        /// Newest version known.
        supported: usize,
    },
    /// Another process holds the portal.
    #[error("portal {portal} is busy: another tfa-rotator process is working on it")]
    Busy {
        /// The portal.
        portal: String,
    },
    /// A batched commit failed; every write in it failed with it.
    #[error("state database: {message}")]
    Commit {
        /// What failed, as SQLite said it.
        message: String,
    },
    /// The directory is unsafe.
    #[error("state directory {path}: {reason}")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn sql(action: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
    move |source| StateError::Sqlite { action, source }
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> StateError + 'a {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The state store. Cloning shares the connection.
#[derive(Clone)]
pub struct Store {
    // A std mutex: the connection is only used inside `spawn_blocking`, never across an await.
    conn: Arc<Mutex<Connection>>,
    dir: PathBuf,
    fingerprinter: Arc<Fingerprinter>,
    read_only: bool,
    queue: Arc<Mutex<WriteQueue>>,
}

/// A queued write: runs inside its savepoint, says whether it succeeded, and hands back
/// how to answer its caller once the commit's outcome is known.
type WriteJob = Box<dyn FnOnce(&Connection) -> (bool, Reply) + Send>;
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

#[derive(Default)]
struct WriteQueue {
    jobs: Vec<WriteJob>,
    /// A blocking task is draining the queue; new writes join its next batch.
    draining: bool,
}

/// Resets the queue if a drain task is dropped without running (the runtime is shutting
/// down): the waiting writes then fail instead of hanging.
struct DrainGuard {
    queue: Arc<Mutex<WriteQueue>>,
    armed: bool,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.jobs.clear();
        q.draining = false;
    }
}

/// An exclusive hold on one portal; released on drop (or by the kernel if the process dies).
pub struct PortalLock {
    _file: File,
}

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

/// What the state knows of a portal.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PortalRow {
    /// Portal.
    pub name: String,
    /// Last rotation attempt.
    pub last_attempt_at: Option<i64>,
    /// Last successful rotation.
    pub last_success_at: Option<i64>,
    /// `ok`, `failed`, `delivery_pending`, …
    pub last_result: Option<String>,
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

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir, "creating"))?;
        }
        let meta = fs::metadata(dir).map_err(io(dir, "reading metadata"))?;
        if !meta.is_dir() {
            return Err(StateError::Unsafe {
                path: dir.into(),
                reason: "is not a directory".into(),
            });
        }
        if meta.permissions().mode() & 0o077 != 0 {
            // Tighten a directory we created or own; refuse if that fails.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|_| {
                StateError::Unsafe {
                    path: dir.into(),
                    reason: format!(
                        "has mode {:o}; it must be 0700",
                        meta.permissions().mode() & 0o7777
                    ),
                }
            })?;
        }
        let locks = dir.join("locks");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&locks)
            .map_err(io(&locks, "creating"))?;
        // Setting WAL mode and migrating need the database to themselves; processes that
        // start together take turns here (the kernel drops the lock if one dies).
        let setup_path = dir.join("locks").join(".setup.lock");
        let setup = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&setup_path)
            .map_err(io(&setup_path, "opening the setup lock"))?;
        setup
            .lock()
            .map_err(io(&setup_path, "taking the setup lock"))?;
        let db = dir.join(DB_FILE);
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&db)
            .map_err(io(&db, "creating the database"))?;
        fs::set_permissions(&db, fs::Permissions::from_mode(0o600))
            .map_err(io(&db, "setting mode 0600"))?;
        let mut conn = Connection::open(&db).map_err(sql("opening"))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(sql("setting the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("enabling WAL"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("setting synchronous=FULL"))?;
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(sql("enabling secure_delete"))?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql("enabling foreign keys"))?;
        migrate(&mut conn)?;
        let key = fingerprint_key(&conn)?;
        drop(setup);
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            dir: dir.to_path_buf(),
            fingerprinter: Arc::new(Fingerprinter::new(&key)),
            read_only: false,
            queue: Default::default(),
        })
    }

    /// Opens an existing store without the right to change it (dry runs, `check`, `status`).
    /// `None` when there is no store yet.
    pub fn open_read_only(dir: &Path) -> Result<Option<Self>, StateError> {
        let db = dir.join(DB_FILE);
        if !db.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("opening read-only"))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(sql("setting the busy timeout"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("reading the schema version"))?;
        let version = usize::try_from(version).unwrap_or(usize::MAX);
        if version > MIGRATIONS.len() {
            return Err(StateError::TooNew {
                found: version,
                supported: MIGRATIONS.len(),
            });
        }
        if version == 0 {
            return Ok(None);
        }
        let key = fingerprint_key_read(&conn)?;
        Ok(Some(Self {
            conn: Arc::new(Mutex::new(conn)),
            dir: dir.to_path_buf(),
            fingerprinter: Arc::new(Fingerprinter::new(&key)),
            read_only: true,
            queue: Default::default(),
        }))
    }

    /// Whether this store refuses changes.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The keyed fingerprinter of this state.
    pub fn fingerprinter(&self) -> &Fingerprinter {
        &self.fingerprinter
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StateError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await;
        match joined {
            Ok(r) => r,
            Err(e) => Err(StateError::Io {
                path: self.dir.clone(),
                action: "running a database task",
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }

    /// Runs `f` in an IMMEDIATE transaction on the blocking pool and returns once what it
    /// wrote is committed and fsync'd, or not at all.
    ///
    /// Group commit: writes that arrive while a commit is being fsync'd are run together in
    /// the next transaction, each inside its own savepoint (so one that fails leaves no
    /// trace and does not undo the others), and committed with one fsync. No caller hears
    /// back before its own commit is durable, so the protocol's ordering (intent before PUT,
    /// seal before delivery) is exactly as with one transaction per write.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StateError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: WriteJob = Box::new(move |c: &Connection| match f(c) {
            Ok(v) => (
                true,
                Box::new(move |committed: Result<(), String>| {
                    let _ = tx.send(
                        committed
                            .map(|()| v)
                            .map_err(|message| StateError::Commit { message }),
                    );
                }) as Reply,
            ),
            Err(e) => (
                false,
                Box::new(move |_: Result<(), String>| {
                    let _ = tx.send(Err(e));
                }) as Reply,
            ),
        });
        let start = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.jobs.push(job);
            !std::mem::replace(&mut q.draining, true)
        };
        if start {
            let this = self.clone();
            let guard = DrainGuard {
                queue: self.queue.clone(),
                armed: true,
            };
            tokio::task::spawn_blocking(move || {
                let mut guard = guard;
                this.drain();
                guard.armed = false;
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(StateError::Commit {
                message: "the write was dropped before it ran (the process is stopping)".into(),
            })
        })
    }

    /// Runs queued writes in batches until the queue is empty.
    fn drain(&self) {
        loop {
            let jobs = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.jobs.is_empty() {
                    q.draining = false;
                    return;
                }
                std::mem::take(&mut q.jobs)
            };
            let c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
            let mut replies = Vec::with_capacity(jobs.len());
            let committed = (|| -> Result<(), rusqlite::Error> {
                exec(&c, "BEGIN IMMEDIATE", [])?;
                for job in jobs {
                    exec(&c, "SAVEPOINT w", [])?;
                    let (ok, reply) = job(&c);
                    if !ok {
                        exec(&c, "ROLLBACK TO w", [])?;
                    }
                    exec(&c, "RELEASE w", [])?;
                    replies.push(reply);
                }
                exec(&c, "COMMIT", []).map(drop)
            })();
            let committed = committed.map_err(|e| {
                // Leave the connection usable for the next batch.
                let _ = c.execute_batch("ROLLBACK");
                format!("committing: {e}")
            });
            drop(c);
            for reply in replies {
                reply(committed.clone());
            }
        }
    }

    /// Takes the portal's lock, waiting up to `wait` for another process to let go.
    pub async fn lock_portal(
        &self,
        portal: &str,
        wait: Duration,
    ) -> Result<PortalLock, StateError> {
        let path = self.dir.join("locks").join(format!("{portal}.lock"));
        let deadline = tokio::time::Instant::now() + wait;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path, "opening the portal lock"))?;
        let mut delay = Duration::from_millis(5);
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(PortalLock { _file: file }),
                Err(fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(StateError::Busy {
                        portal: portal.to_string(),
                    });
                }
                Err(fs::TryLockError::Error(e)) => return Err(io(&path, "locking the portal")(e)),
            }
        }
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StateError> {
    // IMMEDIATE: the version is read under the write lock, so two processes cannot both see
    // an old version and apply the same migration (the setup lock already serialises them;
    // this keeps the migration correct on its own).
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(sql("starting a migration"))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading the schema version"))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StateError::TooNew {
            found: version,
            supported: MIGRATIONS.len(),
        });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(m).map_err(sql("applying a migration"))?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(sql("recording the schema version"))?;
    }
    tx.commit().map_err(sql("committing the migrations"))?;
    Ok(())
}

fn fingerprint_key_read(conn: &Connection) -> Result<Vec<u8>, StateError> {
    conn.query_row(
        "SELECT value FROM meta WHERE key = 'fingerprint_key'",
        [],
        |r| r.get(0),
    )
    .optional()
    .map_err(sql("reading the fingerprint key"))?
    .ok_or_else(|| StateError::Sqlite {
        action: "reading the fingerprint key",
        source: rusqlite::Error::QueryReturnedNoRows,
    })
}

fn fingerprint_key(conn: &Connection) -> Result<Vec<u8>, StateError> {
    let mut key = vec![0u8; 32];
    rand::thread_rng().fill_bytes(&mut key);
    // Only the first process to open the store gets its key in; everyone reads the winner.
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('fingerprint_key', ?1)",
        params![key],
    )
    .map_err(sql("storing the fingerprint key"))?;
    fingerprint_key_read(conn)
}

// ---- The statements, as plain functions on a connection. ----

/// `execute` through the connection's statement cache: the protocol runs the same few
/// statements for every portal, and parsing them each time was a visible share of a mass
/// rotation's CPU.
fn exec(c: &Connection, sql: &str, p: impl rusqlite::Params) -> rusqlite::Result<usize> {
    c.prepare_cached(sql)?.execute(p)
}

/// `query_row` through the statement cache.
fn query_row<T>(
    c: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    c.prepare_cached(sql)?.query_row(p, f)
}

fn ensure_portal(c: &Connection, portal: &str) -> Result<(), StateError> {
    exec(
        c,
        "INSERT OR IGNORE INTO portals (name) VALUES (?1)",
        params![portal],
    )
    .map_err(sql("adding a portal row"))?;
    Ok(())
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

/// A delivery failed; it is tried again at `next_attempt_at`.
pub fn delivery_failed(
    c: &Connection,
    entry_id: i64,
    error: &str,
    next_attempt_at: i64,
    permanent: bool,
) -> Result<(), StateError> {
    exec(
        c,
        "UPDATE spool SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3, permanent = ?4 WHERE id = ?1",
        params![entry_id, error, next_attempt_at, permanent],
    )
    .map_err(sql("recording a failed delivery"))?;
    Ok(())
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

/// A rotation succeeded (its payloads may still be pending).
pub fn record_rotated(c: &Connection, portal: &str, result: &str) -> Result<(), StateError> {
    let now = now_ms();
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET last_success_at = ?2, last_result = ?3, last_error = NULL, failures = 0, retry_at = NULL,
                failing_since = NULL, streak_alerted = 0 WHERE name = ?1",
        params![portal, now, result],
    )
    .map_err(sql("recording the rotation"))?;
    add_history(c, portal, "rotated", result)
}

/// An attempt failed; returns the failures in a row.
pub fn record_failure(
    c: &Connection,
    portal: &str,
    error: &str,
    retry_at: Option<i64>,
) -> Result<i64, StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET last_attempt_at = ?2, last_result = 'failed', last_error = ?3, failures = failures + 1, retry_at = ?4,
                failing_since = COALESCE(failing_since, ?2) WHERE name = ?1",
        params![portal, now_ms(), error, retry_at],
    )
    .map_err(sql("recording the failure"))?;
    add_history(c, portal, "failed", error)?;
    query_row(
        c,
        "SELECT failures FROM portals WHERE name = ?1",
        params![portal],
        |r| r.get(0),
    )
    .map_err(sql("reading the failure count"))
}

/// The codes were read: remember what was seen.
pub fn record_seen(
    c: &Connection,
    portal: &str,
    set_fp: &str,
    unused: usize,
    total: usize,
) -> Result<(), StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET set_fp = ?2, unused = ?3, total = ?4, seen_at = ?5 WHERE name = ?1",
        params![portal, set_fp, unused as i64, total as i64, now_ms()],
    )
    .map_err(sql("recording the codes seen"))?;
    Ok(())
}

/// Stores the fingerprint of a portal's effective config entry and the last fire time acted on.
pub fn record_schedule(
    c: &Connection,
    portal: &str,
    entry_fp: Option<&str>,
    last_fire_at: Option<i64>,
) -> Result<(), StateError> {
    ensure_portal(c, portal)?;
    exec(
        c,
        "UPDATE portals SET entry_fp = COALESCE(?2, entry_fp), last_fire_at = COALESCE(?3, last_fire_at) WHERE name = ?1",
        params![portal, entry_fp, last_fire_at],
    )
    .map_err(sql("recording the schedule state"))?;
    Ok(())
}

/// [`record_schedule`] for many portals.
/// Call it through [`Store::write`] so that all rows share one commit.
pub fn record_schedules(
    c: &Connection,
    rows: &[(String, Option<String>, Option<i64>)],
) -> Result<(), StateError> {
    for (portal, entry_fp, last_fire_at) in rows {
        record_schedule(c, portal, entry_fp.as_deref(), *last_fire_at)?;
    }
    Ok(())
}

/// Appends to a portal's history.
pub fn add_history(
    c: &Connection,
    portal: &str,
    event: &str,
    detail: &str,
) -> Result<(), StateError> {
    exec(
        c,
        "INSERT INTO history (portal, at, event, detail) VALUES (?1, ?2, ?3, ?4)",
        params![portal, now_ms(), event, detail],
    )
    .map_err(sql("writing history"))?;
    Ok(())
}

const PORTAL_COLUMNS: &str =
    "name, last_attempt_at, last_success_at, last_result, last_error, failures, retry_at,
     set_fp, unused, total, seen_at, entry_fp, last_fire_at";

fn portal_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PortalRow> {
    Ok(PortalRow {
        name: r.get(0)?,
        last_attempt_at: r.get(1)?,
        last_success_at: r.get(2)?,
        last_result: r.get(3)?,
        last_error: r.get(4)?,
        failures: r.get(5)?,
        retry_at: r.get(6)?,
        set_fp: r.get(7)?,
        unused: r.get(8)?,
        total: r.get(9)?,
        seen_at: r.get(10)?,
        entry_fp: r.get(11)?,
        last_fire_at: r.get(12)?,
    })
}

/// Every portal the state knows.
pub fn portal_rows(c: &Connection) -> Result<Vec<PortalRow>, StateError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {PORTAL_COLUMNS} FROM portals ORDER BY name"
        ))
        .map_err(sql("reading portals"))?;
    let rows = st
        .query_map([], portal_from_row)
        .map_err(sql("reading portals"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("reading portals"))
}

/// One portal's row, if the state knows it.
pub fn portal_row(c: &Connection, portal: &str) -> Result<Option<PortalRow>, StateError> {
    let mut st = c
        .prepare_cached(&format!(
            "SELECT {PORTAL_COLUMNS} FROM portals WHERE name = ?1"
        ))
        .map_err(sql("reading a portal"))?;
    st.query_row(params![portal], portal_from_row)
        .optional()
        .map_err(sql("reading a portal"))
}

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
             WHERE created_at <= ?1 AND alerted_at IS NULL ORDER BY id",
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
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes that arrive together share commits, yet each one stands alone: a failing
    /// write leaves no trace and does not undo its neighbours, and every caller that heard
    /// `Ok` finds its row after a reopen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn grouped_writes_commit_together_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let writes = (0..64).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .write(move |c| {
                        let p = format!("p{i}");
                        begin_intent(c, &p, "rotate", Some("fp"))?;
                        if i % 8 == 3 {
                            // Fails after writing: its intent must be rolled back.
                            return Err(StateError::Unsafe {
                                path: "x".into(),
                                reason: format!("write {i} refuses"),
                            });
                        }
                        Ok(i)
                    })
                    .await
            })
        });
        let mut ok = Vec::new();
        for (i, w) in writes.enumerate() {
            match w.await.unwrap() {
                Ok(v) => ok.push(v),
                Err(e) => {
                    assert_eq!(i % 8, 3, "only the refusing writes fail: {e}");
                    assert!(e.to_string().contains(&format!("write {i} refuses")), "{e}");
                }
            }
        }
        assert_eq!(ok.len(), 56);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let open = store.call(|c| open_journal(c, None)).await.unwrap();
        let mut portals: Vec<String> = open.into_iter().map(|j| j.portal).collect();
        portals.sort();
        let mut want: Vec<String> = ok.iter().map(|i| format!("p{i}")).collect();
        want.sort();
        assert_eq!(portals, want);
    }

    #[test]
    fn a_version_1_state_upgrades_and_keeps_its_spool() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        {
            // A state written by the first release: schema 1, one pending payload.
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO meta (key, value) VALUES ('fingerprint_key', x'0102')",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO journal (portal, kind, phase, started_at, updated_at) VALUES ('acme', 'rotate', 'sealed', 1, 1)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO spool (journal_id, portal, sink, set_fp, payload, created_at, next_attempt_at)
                 VALUES (1, 'acme', 'f', 'fp', x'00', 1, 1)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let c = store.conn.lock().unwrap();
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        assert_eq!(pending(&c, Some("acme"), None).unwrap().len(), 1);
        assert_eq!(
            alerts_due(&c, 1, i64::MAX).unwrap().len(),
            1,
            "the new columns work on old rows"
        );
        let mode = fs::metadata(dir.path().join(DB_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn a_newer_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(StateError::TooNew { found: 99, .. })
        ));
    }
}
