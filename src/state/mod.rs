//! The state store: one SQLite database in the state directory, or (several instances)
//! one PostgreSQL database shared by them (`pg.rs`).
//!
//! It holds per portal the last attempt, result, fingerprint and unused count; the rotation
//! journal; the spool of sealed payloads; a history; and the secret key of the fingerprints.
//! Every SQL statement of the project is in this module and its children, one per concept:
//! `journal`, `spool`, `portals`, `alerts`; this file holds the store itself (opening,
//! migrations, group commit, portal locks). Durability: WAL with
//! `synchronous=FULL`, so a committed transaction has been fsync'd; `secure_delete` so a
//! delivered plain-text payload does not linger in free pages. The file is 0600 in a 0700
//! directory.
//!
//! Processes are serialised per portal by an exclusive `flock` on `locks/PORTAL.lock`: the
//! kernel releases it when the process dies, so a crash never leaves a portal locked.
//!
//! The statements are synchronous functions on [`db::Sql`], written once for both
//! databases; async callers go through [`Store::call`] and [`Store::write`], which run them
//! on the blocking pool inside a transaction of whichever database the config names.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::RngCore;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::crypto::Fingerprinter;

mod alerts;
pub mod db;
pub mod history;
mod journal;
mod lanes;
pub mod migrate;
pub mod pg;
mod portals;
mod spool;

pub use alerts::{AlertDue, add_notice, alert_sent, alerts_due};
pub use journal::{
    Closed, OpenJournal, Phase, Pin, begin_intent, begin_rotation, close_journal, closed_since,
    open_journal, seal, seal_pinned, settle_checked,
};
pub use portals::{
    DRIFT_ACTIONS, DRIFT_WINDOW_MS, DriftVerdict, LastResult, NewPlan, Outlook, PortalRow,
    deliveries_cleared, insert_plans, outlook, portal_row, portal_rows, recent_drifts,
    record_drift, record_failure, record_pause, record_plan, record_plan_and_schedule,
    record_rotated, record_schedule, record_seen, record_settling, still_flapping,
};
pub use spool::{
    PendingRow, SpoolEntry, assume_sinks_hold, delivered, delivery_failed, drop_pending,
    next_delivery_due, pending, pending_by_portal, pending_count_of, pending_rows, sink_sets,
};

const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_initial.sql"),
    include_str!("migrations/0002_alerts.sql"),
    include_str!("migrations/0003_open_journal_index.sql"),
    include_str!("migrations/0004_convergence.sql"),
    include_str!("migrations/0005_agenda.sql"),
    include_str!("migrations/0006_cluster.sql"),
    include_str!("migrations/0007_drift_limits.sql"),
    include_str!("migrations/0008_alert_indexes.sql"),
    include_str!("migrations/0009_audit.sql"),
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
    #[error("portal {portal} is busy: {holder} is working on it")]
    Busy {
        /// The portal.
        portal: String,
        /// Who: "another tfa-rotator process", or the instance named in the database.
        holder: String,
    },
    /// A batched commit failed; every write in it failed with it.
    #[error("state database: {message}")]
    Commit {
        /// What failed, as SQLite said it.
        message: String,
    },
    /// A database other than SQLite refused, or answered what the schema does not expect.
    #[error("state database: {action}: {detail}")]
    Db {
        /// What was being done.
        action: &'static str,
        /// What the database said.
        detail: String,
    },
    /// In a cluster: this instance's claim on the portal lapsed or was taken over, so it
    /// may not send a PUT for it.
    #[error(
        "portal {portal}: fenced: {why}; no PUT was sent (the instance that holds it now carries on)"
    )]
    Fenced {
        /// The portal.
        portal: String,
        /// Why.
        why: String,
    },
    /// The state directory, or a directory above it, fails the trust rule (SPEC §3): a
    /// user who controls an ancestor could rename the state away and so lose pending sets.
    #[error("state directory: {0}")]
    Untrusted(#[from] crate::trust::TrustError),
    /// The directory is unsafe.
    #[error("state directory {path}: {reason}")]
    Unsafe {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

pub(crate) fn sql(action: &'static str) -> impl FnOnce(rusqlite::Error) -> StateError {
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

/// The state store. Cloning shares the connection (SQLite) or the pool (PostgreSQL).
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    dir: PathBuf,
    fingerprinter: Arc<Fingerprinter>,
    read_only: bool,
    /// A read-only open of a state without `-wal`/`-shm` (from an older version) reads it
    /// `immutable`, which is safe only while no writer opens it: this shared lock on the
    /// setup lock, which every writer takes exclusively to open, keeps them out meanwhile.
    _readers_lock: Option<Arc<File>>,
}

#[derive(Clone)]
enum Backend {
    Sqlite {
        // A std mutex: the connection is only used inside `spawn_blocking`, never across an
        // await.
        conn: Arc<Mutex<Connection>>,
        queue: Arc<Mutex<WriteQueue>>,
    },
    Postgres(pg::PgStore),
}

/// A queued write: runs inside its savepoint, says whether it succeeded, and hands back
/// how to answer its caller once the commit's outcome is known.
type WriteJob = Box<dyn FnOnce(&dyn db::Sql) -> (bool, Reply) + Send>;
type Reply = Box<dyn FnOnce(Result<(), String>) + Send>;

#[derive(Default)]
struct WriteQueue {
    /// Each job, and whether the WAL is to be checkpointed once its batch is committed.
    jobs: Vec<(WriteJob, bool)>,
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

/// An exclusive hold on one portal; released on drop (or by the kernel if the process dies;
/// in a cluster, by the lease running out).
pub struct PortalLock {
    _hold: Hold,
}

enum Hold {
    File(#[allow(dead_code)] File),
    Claim(pg::ClaimGuard),
}

impl PortalLock {
    /// A cluster claim's view of the config generations when it was taken: `Some(newest)`,
    /// `newest` being the newest generation recorded then (`None` when there is none yet);
    /// `None` for a lock of a single instance, which has no generations.
    pub fn generation_at_claim(&self) -> Option<Option<&str>> {
        match &self._hold {
            Hold::File(_) => None,
            Hold::Claim(c) => Some(c.newest_generation()),
        }
    }

    /// A cluster claim's time on the state's clock (the server's), when it was taken;
    /// `None` for a lock of a single instance.
    pub fn claimed_at(&self) -> Option<i64> {
        match &self._hold {
            Hold::File(_) => None,
            Hold::Claim(c) => Some(c.claimed_at()),
        }
    }
}

impl Store {
    /// Opens (creating if needed) the store in `dir`.
    ///
    /// The directory must belong to the user running us: one owned by another user is
    /// refused (they could swap our files), and ours is tightened to 0700. The database and
    /// lock files are never opened through a symbolic link, and their modes are set on the
    /// opened file, not by path.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir, "creating"))?;
        }
        // The directory itself may be reached through a link (systemd's DynamicUser makes
        // /var/lib/NAME one to /var/lib/private/NAME); what it leads to must be ours.
        trusted_dir(dir, dir)?;
        crate::trust::Walker::new().walk(dir, crate::trust::Leaf::Dir)?;
        let locks = dir.join("locks");
        match fs::DirBuilder::new().mode(0o700).create(&locks) {
            // Another process starting at the same moment may have made it.
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&locks, "creating")(e)),
        }
        no_link(&locks)?;
        trusted_dir(dir, &locks)?;
        // Setting WAL mode and migrating need the database to themselves; processes that
        // start together take turns here (the kernel drops the lock if one dies).
        let setup_path = dir.join("locks").join(".setup.lock");
        let setup =
            open_no_follow(&setup_path).map_err(io(&setup_path, "opening the setup lock"))?;
        setup
            .lock()
            .map_err(io(&setup_path, "taking the setup lock"))?;
        let db = dir.join(DB_FILE);
        for side in ["", "-wal", "-shm", "-journal"] {
            no_link(&dir.join(format!("{DB_FILE}{side}")))?;
        }
        let file = open_no_follow(&db).map_err(io(&db, "creating the database"))?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io(&db, "setting mode 0600"))?;
        drop(file);
        let mut conn = Connection::open_with_flags(
            &db,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(sql("opening"))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(sql("setting the busy timeout"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("enabling WAL"))?;
        // The WAL and its index outlive every writer, so that a read-only open (`check`,
        // `status`, dry runs) finds them and never has to create a file (SPEC §6).
        let mut persist: std::ffi::c_int = 1;
        conn.file_control(
            Some(rusqlite::MAIN_DB),
            rusqlite::FileControl::PersistWal(&mut persist),
        )
        .map_err(sql("keeping the WAL persistent"))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql("setting synchronous=FULL"))?;
        conn.pragma_update(None, "secure_delete", "ON")
            .map_err(sql("enabling secure_delete"))?;
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(sql("enabling foreign keys"))?;
        history::register_sqlite(&conn).map_err(sql("registering sha256hex"))?;
        migrate(&mut conn)?;
        let key = fingerprint_key(&conn)?;
        drop(setup);
        Ok(Self {
            backend: Backend::Sqlite {
                conn: Arc::new(Mutex::new(conn)),
                queue: Default::default(),
            },
            dir: dir.to_path_buf(),
            fingerprinter: Arc::new(Fingerprinter::new(&key)),
            read_only: false,
            _readers_lock: None,
        })
    }

    /// Opens an existing store without the right to change it (dry runs, `check`, `status`).
    /// `None` when there is no store yet. It creates no file and changes none (SPEC §6):
    /// the `-wal` and `-shm` files writers keep are opened read-only (`readonly_shm`: the WAL
    /// index is then built in memory when no writer is there to keep it); a state without
    /// them (written by an older version) is read `immutable` under a shared lock that
    /// keeps writers from opening it meanwhile.
    pub fn open_read_only(dir: &Path) -> Result<Option<Self>, StateError> {
        let db = dir.join(DB_FILE);
        if !db.exists() {
            return Ok(None);
        }
        crate::trust::Walker::new().walk(dir, crate::trust::Leaf::Dir)?;
        let has_wal = || {
            ["-wal", "-shm"]
                .iter()
                .all(|side| dir.join(format!("{DB_FILE}{side}")).exists())
        };
        let mut readers_lock = None;
        let uri = if has_wal() {
            format!("{}?mode=ro&readonly_shm=1", sqlite_uri(&db))
        } else {
            let lock_path = dir.join("locks").join(".setup.lock");
            match OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&lock_path)
            {
                Ok(f) => {
                    f.lock_shared()
                        .map_err(io(&lock_path, "taking the setup lock shared"))?;
                    readers_lock = Some(Arc::new(f));
                }
                // A state so old it has no setup lock: no writer of today left it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&lock_path, "opening the setup lock")(e)),
            }
            if has_wal() {
                // A writer opened it between the two looks: read it as usual.
                readers_lock = None;
                format!("{}?mode=ro&readonly_shm=1", sqlite_uri(&db))
            } else {
                format!("{}?mode=ro&immutable=1", sqlite_uri(&db))
            }
        };
        let conn = Connection::open_with_flags(
            &uri,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX
                | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        )
        .map_err(sql("opening read-only"))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(sql("setting the busy timeout"))?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("reading the schema version"))?;
        let version = known_version(version, MIGRATIONS.len())?;
        if version == 0 {
            return Ok(None);
        }
        if version < MIGRATIONS.len() {
            // Older than this binary: its statements would not find their columns; the
            // next writer (the daemon, any command that acts) upgrades it.
            return Err(StateError::Db {
                action: "reading the state",
                detail: format!(
                    "its schema version {version} is older than this binary's {}: run a command that writes (the daemon, `deliver`) once to upgrade it",
                    MIGRATIONS.len()
                ),
            });
        }
        let key = fingerprint_key_read(&conn)?;
        Ok(Some(Self {
            backend: Backend::Sqlite {
                conn: Arc::new(Mutex::new(conn)),
                queue: Default::default(),
            },
            dir: dir.to_path_buf(),
            fingerprinter: Arc::new(Fingerprinter::new(&key)),
            read_only: true,
            _readers_lock: readers_lock,
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

    /// Opens the store the config names: SQLite in `daemon.state_dir`, or the PostgreSQL
    /// database of `[storage]` (which is migrated and registers this instance).
    pub fn open_configured(config: &crate::config::Config) -> Result<Self, StateError> {
        match &config.storage {
            None => Self::open(&config.daemon.state_dir),
            Some(st) => {
                let pg = pg::PgStore::open_blocking(st, config)?;
                Ok(Self::with_postgres(pg, &config.daemon.state_dir))
            }
        }
    }

    /// [`Store::open_read_only`] for the store the config names (PostgreSQL is read, not
    /// migrated; `None` when it has no schema yet).
    pub fn open_configured_read_only(
        config: &crate::config::Config,
    ) -> Result<Option<Self>, StateError> {
        match &config.storage {
            None => Self::open_read_only(&config.daemon.state_dir),
            Some(st) => Ok(pg::PgStore::open_read_only_blocking(st, config)?
                .map(|pg| Self::with_postgres(pg, &config.daemon.state_dir))),
        }
    }

    fn with_postgres(pg: pg::PgStore, dir: &Path) -> Self {
        Self {
            fingerprinter: Arc::new(Fingerprinter::new(pg.fingerprint_key())),
            read_only: pg.is_read_only(),
            backend: Backend::Postgres(pg),
            dir: dir.to_path_buf(),
            _readers_lock: None,
        }
    }

    /// The PostgreSQL backend, when this store is one.
    pub fn postgres(&self) -> Option<&pg::PgStore> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite { .. } => None,
        }
    }

    /// Runs the reads `f` makes on the blocking pool, each statement seeing what was
    /// committed when it began: with the connection (SQLite), or on one connection without
    /// a transaction (PostgreSQL, where a write is refused; see [`pg::PgStore::read`]).
    pub async fn call<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn db::Sql) -> Result<T, StateError> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite { conn, .. } => self.read_sqlite(conn.clone(), false, f).await,
            Backend::Postgres(pg) => pg.read(f).await,
        }
    }

    /// Runs the reads `f` makes against one snapshot of the state: SQLite in one read
    /// transaction, PostgreSQL in a REPEATABLE READ one. For reads that must agree with each
    /// other while others write (`history --verify`: records and heads).
    pub async fn snapshot<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn db::Sql) -> Result<T, StateError> + Send + 'static,
    {
        match &self.backend {
            Backend::Sqlite { conn, .. } => self.read_sqlite(conn.clone(), true, f).await,
            Backend::Postgres(pg) => pg.snapshot(f).await,
        }
    }

    /// [`Store::call`] and [`Store::snapshot`] on SQLite: `f` on the blocking pool with the
    /// connection, read-only, inside one read transaction when `snapshot`.
    async fn read_sqlite<T, F>(
        &self,
        conn: Arc<Mutex<Connection>>,
        snapshot: bool,
        f: F,
    ) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn db::Sql) -> Result<T, StateError> + Send + 'static,
    {
        let joined = tokio::task::spawn_blocking(move || {
            let c = conn.lock().unwrap_or_else(|p| p.into_inner());
            if !snapshot {
                return f(&db::ReadOnly(&*c));
            }
            // A deferred transaction on a read-only connection: its first read takes the
            // snapshot every later read of it sees; nothing is written, so it ends either way.
            let tx = c
                .unchecked_transaction()
                .map_err(sql("starting a read transaction"))?;
            f(&db::ReadOnly(&*tx))
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

    /// Runs `f` in a transaction on the blocking pool and returns once what it wrote is
    /// committed and durable, or not at all.
    ///
    /// SQLite, group commit: writes that arrive while a commit is being fsync'd are run
    /// together in the next IMMEDIATE transaction, each inside its own savepoint (so one
    /// that fails leaves no trace and does not undo the others), and committed with one
    /// fsync. No caller hears back before its own commit is durable, so the protocol's
    /// ordering (intent before PUT, seal before delivery) is exactly as with one transaction
    /// per write. PostgreSQL: one transaction per write (`synchronous_commit = on`).
    pub async fn write<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn db::Sql) -> Result<T, StateError> + Send + 'static,
    {
        self.write_with(f, false).await
    }

    /// [`Store::write`], then a checkpoint that truncates the WAL: for a write that drops
    /// plain text (a delivered plain-text payload). `secure_delete` zeroes the database's
    /// pages, but the WAL still holds the frames the text was written in until a
    /// checkpoint copies the latest pages back and truncates it.
    pub async fn write_then_checkpoint<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn db::Sql) -> Result<T, StateError> + Send + 'static,
    {
        self.write_with(f, true).await
    }

    async fn write_with<T, F>(&self, f: F, checkpoint: bool) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn db::Sql) -> Result<T, StateError> + Send + 'static,
    {
        let (conn, queue) = match &self.backend {
            Backend::Sqlite { conn, queue } => (conn.clone(), queue.clone()),
            Backend::Postgres(pg) => return pg.transaction(f).await,
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: WriteJob = Box::new(move |c: &dyn db::Sql| match f(c) {
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
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            q.jobs.push((job, checkpoint));
            !std::mem::replace(&mut q.draining, true)
        };
        if start {
            let guard = DrainGuard {
                queue: queue.clone(),
                armed: true,
            };
            tokio::task::spawn_blocking(move || {
                let mut guard = guard;
                drain(&conn, &queue);
                guard.armed = false;
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(StateError::Commit {
                message: "the write did not complete: it panicked (rolled back), or the process is stopping".into(),
            })
        })
    }

    /// The state's clock (the database server's in a cluster).
    pub async fn now(&self) -> Result<i64, StateError> {
        self.call(|c| c.now()).await
    }

    /// Takes the portal's lock, waiting up to `wait` for another process to let go. In a
    /// cluster the lock is a claim on the portal's row (a lease with a fencing epoch,
    /// renewed while held): another instance's live claim makes it wait the same way.
    pub async fn lock_portal(
        &self,
        portal: &str,
        wait: Duration,
    ) -> Result<PortalLock, StateError> {
        if let Backend::Postgres(pg) = &self.backend {
            return Ok(PortalLock {
                _hold: Hold::Claim(pg.claim(portal, wait).await?),
            });
        }
        let path = self.dir.join("locks").join(format!("{portal}.lock"));
        let deadline = tokio::time::Instant::now() + wait;
        let file = open_no_follow(&path).map_err(io(&path, "opening the portal lock"))?;
        let mut delay = Duration::from_millis(5);
        loop {
            match file.try_lock() {
                Ok(()) => {
                    return Ok(PortalLock {
                        _hold: Hold::File(file),
                    });
                }
                Err(fs::TryLockError::WouldBlock) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(200));
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(StateError::Busy {
                        portal: portal.to_string(),
                        holder: "another tfa-rotator process".into(),
                    });
                }
                Err(fs::TryLockError::Error(e)) => return Err(io(&path, "locking the portal")(e)),
            }
        }
    }
}

/// Runs queued SQLite writes in batches until the queue is empty.
fn drain(conn: &Mutex<Connection>, queue: &Mutex<WriteQueue>) {
    loop {
        let jobs = {
            let mut q = queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.jobs.is_empty() {
                q.draining = false;
                return;
            }
            std::mem::take(&mut q.jobs)
        };
        let c = conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut replies = Vec::with_capacity(jobs.len());
        let checkpoint = jobs.iter().any(|(_, ck)| *ck);
        let committed = (|| -> Result<(), rusqlite::Error> {
            c.execute_batch("BEGIN IMMEDIATE")?;
            for (job, _) in jobs {
                c.execute_batch("SAVEPOINT w")?;
                // A job that panics (a bug) is undone like one that failed, and its caller
                // hears of it (its reply is gone with it); the others in the batch are
                // committed, and the connection is not left inside the transaction.
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&*c)));
                let (ok, reply) = match ran {
                    Ok((ok, reply)) => (ok, Some(reply)),
                    Err(_) => {
                        tracing::error!("a write to the state panicked; it was rolled back");
                        (false, None)
                    }
                };
                if !ok {
                    c.execute_batch("ROLLBACK TO w")?;
                }
                // ROLLBACK TO undoes the job's writes but leaves its savepoint open;
                // RELEASE closes it either way, so the next job's savepoint is not nested
                // inside this one (and a later ROLLBACK TO cannot reach back into it).
                c.execute_batch("RELEASE w")?;
                replies.extend(reply);
            }
            c.execute_batch("COMMIT")
        })();
        let committed = committed.map_err(|e| {
            // Leave the connection usable for the next batch.
            let _ = c.execute_batch("ROLLBACK");
            format!("committing: {e}")
        });
        if checkpoint && committed.is_ok() {
            // Before anyone hears back: a caller that moves on finds no plain text left.
            // A reader in another process can keep frames alive (SQLITE_BUSY); the next
            // checkpoint, or the last connection's close, takes them then.
            match c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
                Ok(0) => {}
                Ok(_) => tracing::debug!("the WAL checkpoint was blocked by a reader"),
                Err(e) => tracing::warn!(error = %e, "checkpointing the WAL"),
            }
        }
        drop(c);
        for reply in replies {
            reply(committed.clone());
        }
    }
}

/// Creates or opens a file of ours (0600) without following a symbolic link at `path`.
fn open_no_follow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// `path` as an SQLite `file:` URI: every byte but the unreserved ones and `/`
/// percent-encoded, so a `?` or `#` in a directory name cannot add parameters.
fn sqlite_uri(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut out = String::from("file:");
    for b in path.as_os_str().as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                out.push(char::from(*b))
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Refuses a symbolic link at `path` (a planted link would redirect our writes).
fn no_link(path: &Path) -> Result<(), StateError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(StateError::Unsafe {
            path: path.to_path_buf(),
            reason:
                "is a symbolic link; the state's files are never opened through one (remove it)"
                    .into(),
        }),
        _ => Ok(()),
    }
}

/// `path` must be a directory owned by the user running us; a wider mode is tightened to
/// 0700 (or the directory refused if that fails).
fn trusted_dir(state: &Path, path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).map_err(io(path, "reading metadata"))?;
    if !meta.is_dir() {
        return Err(StateError::Unsafe {
            path: path.into(),
            reason: "is not a directory".into(),
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StateError::Unsafe {
            path: path.into(),
            reason: format!(
                "belongs to {}, not to the user running tfa-rotator ({}); another user could \
                 replace the state's files, and files this command left would stop the service. \
                 Run the command as the service does: `tfa-rotator-run ARGS…` (as root; it uses \
                 the unit's user and credentials), or `sudo -u {} tfa-rotator ARGS…` when the \
                 config reads no credential. The state directory is {}",
                user_name(meta.uid()),
                user_name(me),
                user_name(meta.uid()),
                state.display()
            ),
        });
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(|_| {
            StateError::Unsafe {
                path: path.into(),
                reason: format!(
                    "has mode {:o}; it must be 0700",
                    meta.permissions().mode() & 0o7777
                ),
            }
        })?;
    }
    Ok(())
}

/// `name (uid N)` from /etc/passwd, or `uid N`.
fn user_name(uid: u32) -> String {
    match history::passwd(|_, u| u == uid) {
        Some((n, _)) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The schema version a database holds, refused when it is newer than the `supported`
/// migrations this binary knows (of either backend).
pub(crate) fn known_version(found: i64, supported: usize) -> Result<usize, StateError> {
    let found = usize::try_from(found).unwrap_or(usize::MAX);
    if found > supported {
        return Err(StateError::TooNew { found, supported });
    }
    Ok(found)
}

/// The migration that made the history a chain (0009_audit.sql).
const AUDIT_MIGRATION: usize = 9;

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
    let version = known_version(version, MIGRATIONS.len())?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(m).map_err(sql("applying a migration"))?;
        if i + 1 == AUDIT_MIGRATION {
            // The rows of older versions become the start of each portal's chain.
            history::migrate_legacy(&*tx)?;
        }
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

/// Runs an `UPDATE portals … WHERE name = ?1`; a portal without a row gets one first. (Most
/// updates find the row: adding it only when missing saves a statement per write, which in
/// PostgreSQL is a round trip.)
pub(crate) fn update_portal(
    c: &dyn db::Sql,
    portal: &str,
    action: &'static str,
    sql: &str,
    params: &[db::Val],
) -> Result<(), StateError> {
    if c.exec(action, sql, params)? == 0 {
        ensure_portal(c, portal)?;
        c.exec(action, sql, params)?;
    }
    Ok(())
}

/// Adds a row for `portal` unless it has one.
pub fn ensure_portal(c: &dyn db::Sql, portal: &str) -> Result<(), StateError> {
    c.exec(
        "adding a portal row",
        "INSERT INTO portals (name) VALUES (?1) ON CONFLICT (name) DO NOTHING",
        db::vals![portal],
    )?;
    Ok(())
}

/// Rows per multi-row INSERT: far below SQLite's 32,766 parameters and PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 200;

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
                        begin_intent(c, &p, "rotate", Some("fp"), 1000)?;
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
        let Backend::Sqlite { conn, .. } = &store.backend else {
            unreachable!("opened as SQLite")
        };
        let c = conn.lock().unwrap();
        let c = &*c;
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        assert_eq!(pending(c, Some("acme"), None).unwrap().len(), 1);
        assert_eq!(
            alerts_due(c, 1, i64::MAX).unwrap().len(),
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

    /// The upgrade starts from a database made by the shipped schema (a frozen fixture, not
    /// today's migration text): nothing pending is lost, and each sink's baseline is the
    /// last set sealed, so the first read after the upgrade finds no drift and resends nothing.
    #[test]
    fn a_state_of_the_shipped_schema_upgrades_without_drift() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            c.execute_batch(include_str!("fixtures/state-v3.sql"))
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let Backend::Sqlite { conn, .. } = &store.backend else {
            unreachable!("opened as SQLite")
        };
        let c = conn.lock().unwrap();
        let c = &*c;
        let v: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        let acme = sink_sets(c, "acme").unwrap();
        assert_eq!(acme.len(), 1);
        assert_eq!(
            acme["*"], "fp-acme-2",
            "the last set sealed, not an older one"
        );
        let beta = sink_sets(c, "beta").unwrap();
        assert_eq!(beta["*"], "fp-beta-2");
        assert_eq!(beta["mail"], "fp-beta-2", "the pending payload's set");
        assert_eq!(pending(c, Some("beta"), None).unwrap().len(), 1);
        assert!(open_journal(c, None).unwrap().is_empty());
        let row = portal_row(c, "acme").unwrap().unwrap();
        assert_eq!(row.entry_fp.as_deref(), Some("entry-acme"));
        assert_eq!((row.drifts, row.account_id), (0, None));
    }

    /// The history rows of an older version become the start of each portal's chain: a
    /// state at schema 8 with rows of two portals verifies after the upgrade, and the next
    /// record follows the migrated ones.
    #[test]
    fn old_history_rows_are_chained_by_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        {
            let c = Connection::open(dir.path().join(DB_FILE)).unwrap();
            for m in &MIGRATIONS[..AUDIT_MIGRATION - 1] {
                c.execute_batch(m).unwrap();
            }
            c.pragma_update(None, "user_version", (AUDIT_MIGRATION - 1) as i64)
                .unwrap();
            c.execute_batch(
                "INSERT INTO portals (name) VALUES ('acme');
                 INSERT INTO history (portal, at, event, detail) VALUES
                   ('acme', 1000, 'rotated', 'ok'), ('beta', 2000, 'failed', 'HTTP 500'),
                   ('acme', 3000, 'delivered', 'sink mail, sealed 2s earlier'),
                   ('beta', 4000, 'settling', 'the answer was lost')",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let Backend::Sqlite { conn, .. } = &store.backend else {
            unreachable!("opened as SQLite")
        };
        let c = conn.lock().unwrap();
        let c = &*c;
        assert_eq!(history::verify(c, &[]).unwrap(), Ok((4, 2)));
        let beta = history::read_page(c, &["beta".to_string()], None, i64::MIN)
            .unwrap()
            .0;
        let first = beta[0].parsed().unwrap();
        assert_eq!(
            (
                first.event.as_str(),
                first.outcome.as_deref(),
                first.by.as_deref()
            ),
            ("rotation_failed", Some("failed"), Some("migrated"))
        );
        assert_eq!(first.reason.as_deref(), Some("failed: HTTP 500"));
        assert_eq!(first.at, "1970-01-01T00:00:02.000Z");
        assert_eq!(beta[1].prev, beta[0].hash);
        let cause = history::Cause {
            trigger: None,
            by: "user:test(0)".into(),
        };
        history::append(
            c,
            history::Record::new(history::Event::Drift, "beta", &cause),
        )
        .unwrap();
        assert_eq!(history::verify(c, &[]).unwrap(), Ok((5, 2)));
        let beta = history::read_page(c, &["beta".to_string()], None, i64::MIN)
            .unwrap()
            .0;
        assert_eq!(beta[2].prev, beta[1].hash);
    }

    /// `history` reads a page at a time: chains that span pages verify, a break on a
    /// later page is found, and the pages list every record once, in order.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_history_is_read_and_verified_across_pages() {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let store = Store::open(dir.path()).unwrap();
        let n = 2 * history::PAGE as usize + 500;
        store
            .write(move |c| {
                let cause = history::Cause {
                    trigger: None,
                    by: "user:test(0)".into(),
                };
                for i in 0..n {
                    let portal = ["acme", "beta", "gamma"][i % 3];
                    history::append(
                        c,
                        history::Record::new(history::Event::Drift, portal, &cause),
                    )?;
                }
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(
            store.snapshot(|c| history::verify(c, &[])).await.unwrap(),
            Ok((n, 3))
        );
        let (mut seen, mut after) = (Vec::new(), i64::MIN);
        loop {
            let (page, next) = store
                .snapshot(move |c| history::read_page(c, &[], None, after))
                .await
                .unwrap();
            seen.extend(page.iter().map(|s| s.id));
            match next {
                Some(x) => after = x,
                None => break,
            }
        }
        assert_eq!(seen.len(), n);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        // A record changed on the last page of its chain is named.
        let target = seen[n - 7];
        {
            let Backend::Sqlite { conn, .. } = &store.backend else {
                unreachable!("opened as SQLite")
            };
            let c = conn.lock().unwrap();
            c.execute(
                "UPDATE history SET record = replace(record, 'drift', 'alert') WHERE id = ?1",
                [target],
            )
            .unwrap();
        }
        let broken = store
            .snapshot(|c| history::verify(c, &[]))
            .await
            .unwrap()
            .unwrap_err();
        let uuid: String = {
            let Backend::Sqlite { conn, .. } = &store.backend else {
                unreachable!("opened as SQLite")
            };
            conn.lock()
                .unwrap()
                .query_row("SELECT uuid FROM history WHERE id = ?1", [target], |r| {
                    r.get(0)
                })
                .unwrap()
        };
        assert_eq!(broken.id, uuid, "{broken}");
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
