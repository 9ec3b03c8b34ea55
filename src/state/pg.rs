//! The state in PostgreSQL, for several instances (design note `scale-out.md`).
//!
//! The statements are the same as SQLite's (`db.rs`): this module runs them inside a
//! transaction of `tokio-postgres` (a `deadpool-postgres` pool), and adds what a cluster
//! needs, every time on the server's `clock_timestamp()` (one clock for all instances):
//! - **claims**: [`PgStore::claim`] takes a portal whose lease is free or expired, bumping
//!   its epoch (the fencing token); a task renews it every lease/3 while it is held, and it
//!   is released when dropped. A claim another instance holds makes the caller wait or
//!   say `busy`, naming that instance: commands by hand take the same claims as daemons.
//! - **fenced intent**: `license_put` runs in the intent's transaction and locks the
//!   portal's row: the intent is written only while the claim is ours (same epoch) and its
//!   lease outlives the PUT budget plus a grace; it stores `put_deadline`, after which the
//!   writer sends no PUT and before which (plus the grace) nobody settles it as not applied.
//! - **seals** are always kept (`seal` has no fence): the set is the portal's truth.
//! - **nodes** and **config generations**: each instance says who it is, when it was last
//!   alive and which config it runs; an instance whose config is not the newest one does
//!   not act on "changed" (a rolling change cannot ping-pong).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

use super::StateError;
use super::db::{Row, Sql, Val, to_dollar};
use crate::config::{Config, StorageConfig};

/// The schema, one file per version; `schema_version` holds the last applied.
const MIGRATIONS: &[&str] = &[
    include_str!("pg_migrations/0001_initial.sql"),
    include_str!("pg_migrations/0002_drift_limits.sql"),
    include_str!("pg_migrations/0003_alert_indexes.sql"),
    include_str!("pg_migrations/0004_audit.sql"),
];

/// The server's clock in Unix milliseconds, as SQL (every time the state stores in a
/// cluster is the server's).
macro_rules! server_ms {
    () => {
        "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT"
    };
}

pub(super) fn pg(action: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StateError {
    move |e| StateError::Db {
        action,
        // tokio-postgres says only "db error" for an error the server sent: its code and
        // message are what matter.
        detail: match e.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => crate::errors::chain(&e),
        },
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Runs a future to its end from synchronous code on a runtime thread (opening the store
/// happens while the engine is built, which is not async).
fn block<F: std::future::Future>(f: F) -> F::Output {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(f))
}

// ---- values ----

impl ToSql for Val {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes_buf::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Val::Null => Ok(IsNull::Yes),
            Val::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Val::Text(v) => v.as_str().to_sql(ty, out),
            Val::Blob(v) => v.as_slice().to_sql(ty, out),
        }
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

struct Out(Val);

impl<'a> FromSql<'a> for Out {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Out(match *ty {
            Type::INT8 => Val::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Val::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Val::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Val::Int(bool::from_sql(ty, raw)?.into()),
            Type::BYTEA => Val::Blob(<Vec<u8>>::from_sql(ty, raw)?),
            Type::NUMERIC => {
                return Err("a NUMERIC column; cast it to BIGINT".into());
            }
            _ => Val::Text(String::from_sql(ty, raw)?),
        }))
    }
    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Out(Val::Null))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

fn params(v: &[Val]) -> Vec<&(dyn ToSql + Sync)> {
    v.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

fn to_row(r: &tokio_postgres::Row) -> Result<Row, tokio_postgres::Error> {
    (0..r.len())
        .map(|i| r.try_get::<_, Out>(i).map(|o| o.0))
        .collect::<Result<Vec<_>, _>>()
        .map(Row)
}

// ---- the store ----

struct Shared {
    pool: Pool,
    me: String,
    lease: Duration,
    /// `[storage] grace`: past a PUT's deadline, before anyone settles its intent.
    grace: Duration,
    /// Each statement's text with `$N` placeholders, computed once per statement.
    dollars: Mutex<HashMap<String, Arc<str>>>,
    /// What one PUT may take (`daemon.http_timeout`).
    put_budget: Duration,
    /// Portals this process holds, with the epoch of its claim.
    claims: Mutex<HashMap<String, i64>>,
    key: Vec<u8>,
    read_only: bool,
    /// Where transactions run.
    lanes: super::lanes::Lanes,
}

/// Ends a claim (the portal, this instance, the claim's epoch).
const RELEASE: &str = "UPDATE portals SET lease_owner = NULL, lease_until = NULL
                        WHERE name = ?1 AND lease_owner = ?2 AND lease_epoch = ?3";

/// Transactions one process runs at once (each lane is a thread and a connection, made at
/// the lane's first transaction).
const LANES: usize = 8;

/// The PostgreSQL backend of [`super::Store`]. Cloning shares the pool.
#[derive(Clone)]
pub struct PgStore {
    shared: Arc<Shared>,
}

/// Who holds a portal, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Lease {
    /// Portal.
    pub portal: String,
    /// The instance.
    pub owner: String,
    /// Its fencing epoch.
    pub epoch: i64,
    /// Seconds the lease has left.
    pub left_s: i64,
}

/// An instance of the cluster, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Node {
    /// Its name.
    pub name: String,
    /// Version of tfa-rotator.
    pub version: String,
    /// Seconds since it was last alive.
    pub seen_s_ago: i64,
    /// Whether it runs the newest config generation.
    pub newest_config: bool,
}

/// The default instance name: HOSTNAME:PID.
pub fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

impl Shared {
    /// The epoch of this process's claim on `portal`, if it holds one.
    fn epoch_of(&self, portal: &str) -> Option<i64> {
        self.claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(portal)
            .copied()
    }

    /// Takes `portal`'s claim of `epoch` out of the map; whether it was there.
    fn forget_claim(&self, portal: &str, epoch: i64) -> bool {
        let mut claims = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        let held = claims.get(portal) == Some(&epoch);
        if held {
            claims.remove(portal);
        }
        held
    }

    /// `sql` with `$N` placeholders (the state's statements are written with `?N`),
    /// computed once per statement text.
    fn dollar(&self, sql: &str) -> Arc<str> {
        let mut cache = self.dollars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = cache.get(sql) {
            return d.clone();
        }
        let d: Arc<str> = to_dollar(sql).into();
        cache.insert(sql.to_string(), d.clone());
        d
    }
}

impl PgStore {
    /// Connects, migrates and registers this instance, from synchronous code.
    pub fn open_blocking(st: &StorageConfig, config: &Config) -> Result<Self, StateError> {
        block(Self::open(st, config, false))?.ok_or_else(|| StateError::Db {
            action: "opening PostgreSQL",
            detail: "the database has no schema after the migration".into(),
        })
    }

    /// Connects without migrating or registering; `None` when the database has no schema.
    pub fn open_read_only_blocking(
        st: &StorageConfig,
        config: &Config,
    ) -> Result<Option<Self>, StateError> {
        block(Self::open(st, config, true))
    }

    /// Connects to `[storage] url`; unless `read_only`, migrates the schema (one instance
    /// at a time) and stores the cluster's fingerprint key if it has none.
    pub async fn open(
        st: &StorageConfig,
        config: &Config,
        read_only: bool,
    ) -> Result<Option<Self>, StateError> {
        let url = st.url.value.resolve().map_err(|e| StateError::Db {
            action: "reading storage.url",
            detail: e,
        })?;
        let me = st.instance.clone().unwrap_or_else(default_instance);
        let (pool, connect) = Self::pool(secrecy::ExposeSecret::expose_secret(&url), st)?;
        let mut client = get(&pool).await?;
        if !read_only {
            migrate(&mut client).await?;
        } else if client
            .query_opt("SELECT to_regclass('schema_version')::TEXT", &[])
            .await
            .map_err(pg("reading the schema version"))?
            .and_then(|r| r.get::<_, Option<String>>(0))
            .is_none()
        {
            return Ok(None);
        }
        let key: Option<Vec<u8>> = client
            .query_opt("SELECT value FROM meta WHERE key = 'fingerprint_key'", &[])
            .await
            .map_err(pg("reading the fingerprint key"))?
            .map(|r| r.get(0));
        let key = match key {
            Some(k) => k,
            None if read_only => return Ok(None),
            None => {
                return Err(StateError::Db {
                    action: "reading the fingerprint key",
                    detail: "missing after the migration".into(),
                });
            }
        };
        drop(client);
        let store = Self {
            shared: Arc::new(Shared {
                pool,
                me,
                lease: st.lease,
                grace: st.grace,
                dollars: Mutex::new(HashMap::new()),
                put_budget: config.daemon.http_timeout,
                claims: Mutex::new(HashMap::new()),
                key,
                read_only,
                lanes: super::lanes::Lanes::start(LANES, connect)?,
            }),
        };
        if !read_only {
            store.register(config).await?;
        }
        Ok(Some(store))
    }

    /// The pool for statements outside transactions (claims, renewals, the heartbeat),
    /// and how a lane connects.
    fn pool(url: &str, st: &StorageConfig) -> Result<(Pool, super::lanes::Connect), StateError> {
        let config: tokio_postgres::Config = url.parse().map_err(|_| StateError::Db {
            action: "parsing storage.url",
            // Not the parser's message: it may quote the string, password included.
            detail: "not a libpq connection string (host=… user=… dbname=…) or postgresql:// URL"
                .into(),
        })?;
        let mc = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // A Unix socket has no TLS (and no name to verify: the rustls connector refuses a
        // path as a host name before connecting), so a config of sockets only gets none.
        let unix_only = config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
        let tls = if unix_only { None } else { Some(tls(st)?) };
        let connect = super::lanes::Connect {
            config: config.clone(),
            tls: tls.clone(),
        };
        let manager = match tls {
            None => Manager::from_config(config, tokio_postgres::NoTls, mc()),
            Some(tls) => Manager::from_config(config, tls, mc()),
        };
        let pool = Pool::builder(manager)
            .max_size(8)
            .wait_timeout(Some(Duration::from_secs(30)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StateError::Db {
                action: "building the connection pool",
                detail: e.to_string(),
            })?;
        Ok((pool, connect))
    }

    /// The cluster's fingerprint key.
    pub fn fingerprint_key(&self) -> &[u8] {
        &self.shared.key
    }

    /// Whether this store refuses changes.
    pub fn is_read_only(&self) -> bool {
        self.shared.read_only
    }

    /// This instance's name.
    pub fn me(&self) -> &str {
        &self.shared.me
    }

    /// Runs the reads `f` makes on a lane (see [`super::lanes`]), without a transaction:
    /// under READ COMMITTED each statement of a transaction took a snapshot of its own
    /// anyway, so BEGIN and COMMIT bought nothing but two statements. A statement that
    /// writes is refused. A read-only store reads in READ ONLY transactions, which the
    /// database itself keeps from writing.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Sql) -> Result<T, StateError> + Send + 'static,
    {
        if self.shared.read_only {
            return self.transaction(f).await;
        }
        let shared = self.shared.clone();
        self.on_lane(move |lane| {
            let tx = PgTx {
                lane: std::cell::RefCell::new(lane),
                shared: &shared,
                now: std::cell::Cell::new(None),
                released: Default::default(),
                deferred: Default::default(),
            };
            f(&super::db::ReadOnly(&tx))
        })
        .await
    }

    /// Runs `f` inside one transaction on a lane, committed before it returns.
    pub async fn transaction<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Sql) -> Result<T, StateError> + Send + 'static,
    {
        self.transaction_as(f, false).await
    }

    /// Runs the reads `f` makes in one READ ONLY, REPEATABLE READ transaction: every
    /// statement sees the same snapshot (`history --verify` reads records and heads that
    /// belong together while others append).
    pub async fn snapshot<T, F>(&self, f: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Sql) -> Result<T, StateError> + Send + 'static,
    {
        self.transaction_as(move |c| f(&super::db::ReadOnly(c)), true)
            .await
    }

    async fn transaction_as<T, F>(&self, f: F, snapshot: bool) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Sql) -> Result<T, StateError> + Send + 'static,
    {
        let shared = self.shared.clone();
        self.on_lane(move |lane| {
            // The transaction begins and reads the server's clock in one round trip (a
            // simple query of two statements; the BEGIN keeps the block open after it).
            // A read-only store (`check`, `status`, dry runs) reads in READ ONLY
            // transactions: the database itself refuses any change.
            let begin = match (snapshot, shared.read_only) {
                (true, _) => concat!(
                    "START TRANSACTION READ ONLY ISOLATION LEVEL REPEATABLE READ; SELECT ",
                    server_ms!()
                ),
                (false, true) => concat!("START TRANSACTION READ ONLY; SELECT ", server_ms!()),
                (false, false) => concat!("START TRANSACTION READ WRITE; SELECT ", server_ms!()),
            };
            let started = match lane.simple("starting a transaction", begin) {
                Ok(m) => m,
                Err(e) => {
                    // Half begun (the BEGIN went through, its clock read did not) or broken:
                    // the next transaction must not start inside what is left.
                    lane.drop_connection();
                    return Err(e);
                }
            };
            let now = started.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    r.get(0).and_then(|t| t.parse::<i64>().ok())
                }
                _ => None,
            });
            let tx = PgTx {
                lane: std::cell::RefCell::new(&mut *lane),
                shared: &shared,
                now: std::cell::Cell::new(now),
                released: Default::default(),
                deferred: Default::default(),
            };
            // A closure that panics (a bug) is reported like one that failed; the
            // connection it left inside the transaction is closed below.
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&tx)))
                .unwrap_or_else(|_| {
                    Err(StateError::Db {
                        action: "running a database task",
                        detail: "it panicked; the transaction was rolled back".into(),
                    })
                });
            let released = tx.released.take();
            let deferred = tx.deferred.take();
            drop(tx);
            let ended = if out.is_ok() {
                let writes: Vec<super::lanes::Deferred<'_>> = deferred
                    .iter()
                    .map(|(action, sql, p)| super::lanes::Deferred {
                        action,
                        sql,
                        params: params(p),
                    })
                    .collect();
                lane.commit_with(&writes)
            } else {
                lane.simple("rolling back", "ROLLBACK").map(drop)
            };
            if ended.is_err() {
                // Whatever the transaction left open dies with the connection.
                lane.drop_connection();
            }
            match (out, ended) {
                (Ok(v), Ok(_)) => {
                    for (portal, epoch) in released {
                        shared.forget_claim(&portal, epoch);
                    }
                    Ok(v)
                }
                (Ok(_), Err(e)) => Err(e),
                // The closure's error is the one to report, whether or not the rollback
                // went through.
                (Err(e), _) => Err(e),
            }
        })
        .await
    }

    /// Runs `job` on a lane and waits for its answer.
    async fn on_lane<T, J>(&self, job: J) -> Result<T, StateError>
    where
        T: Send + 'static,
        J: FnOnce(&mut super::lanes::Lane) -> Result<T, StateError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.shared.lanes.send(Box::new(move |lane| {
            let _ = tx.send(job(lane));
        }))?;
        rx.await.unwrap_or_else(|_| {
            Err(StateError::Db {
                action: "running a database task",
                detail: "the database task ended without an answer (it panicked)".into(),
            })
        })
    }

    /// Claims `portal` for this process, waiting up to `wait` while another instance (or
    /// another task of this one) holds it.
    pub async fn claim(&self, portal: &str, wait: Duration) -> Result<ClaimGuard, StateError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut delay = Duration::from_millis(20);
        loop {
            let client = get(&self.shared.pool).await?;
            // One statement: the claim if the lease is free or expired (a portal without a
            // row yet gets one, claimed), and otherwise who holds it (the CTE's write is not
            // visible to the outer SELECT: it reads the row as it was).
            // The newest config generation comes with it: the daemon asks before acting on
            // a changed entry, and a claim is what it takes first.
            let st = client
                .prepare_cached(concat!(
                    "WITH claimed AS (
                        INSERT INTO portals (name, lease_owner, lease_epoch, lease_until)
                        VALUES ($1, $2, 1, clock_timestamp() + $3::BIGINT * interval '1 millisecond')
                        ON CONFLICT (name) DO UPDATE
                           SET lease_owner = excluded.lease_owner,
                               lease_epoch = portals.lease_epoch + 1,
                               lease_until = excluded.lease_until
                         WHERE portals.lease_owner IS NULL OR portals.lease_until < clock_timestamp()
                        RETURNING lease_epoch)
                     SELECT (SELECT lease_epoch FROM claimed),
                            (SELECT lease_owner FROM portals WHERE name = $1),
                            (SELECT config_fp FROM config_generations
                              ORDER BY first_seen_at DESC, config_fp LIMIT 1),
                            ",
                    server_ms!()
                ))
                .await
                .map_err(pg("claiming a portal"))?;
            let row = client
                .query_one(&st, &[&portal, &self.shared.me, &ms(self.shared.lease)])
                .await
                .map_err(pg("claiming a portal"))?;
            if let Some(epoch) = row.get::<_, Option<i64>>(0) {
                let mut guard = self.hold(portal, epoch);
                guard.newest_generation = row.get(2);
                guard.claimed_at = row.get(3);
                return Ok(guard);
            }
            if tokio::time::Instant::now() >= deadline {
                let holder: Option<String> = row.get(1);
                return Err(StateError::Busy {
                    portal: portal.to_string(),
                    holder: match holder {
                        Some(h) if h == self.shared.me => "this instance".into(),
                        Some(h) => format!("instance {h}"),
                        None => "another instance".into(),
                    },
                });
            }
            drop(client);
            tokio::time::sleep(delay.min(deadline - tokio::time::Instant::now())).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    fn hold(&self, portal: &str, epoch: i64) -> ClaimGuard {
        self.shared
            .claims
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(portal.to_string(), epoch);
        let (store, p) = (self.clone(), portal.to_string());
        let heartbeat = tokio::spawn(async move {
            let every = store.shared.lease / 3;
            loop {
                tokio::time::sleep(every).await;
                match store.renew(&p, epoch).await {
                    Ok(true) => {}
                    // Out of the map, `license_put` refuses every intent under it. Not in
                    // it any more: the job released it with its last write meanwhile.
                    Ok(false) => {
                        if store.forget_claim(&p, epoch) {
                            tracing::error!(portal = %p, epoch, "the claim was lost: another instance took the portal over; no PUT will be sent under it");
                        }
                        return;
                    }
                    // The lease outlives a few failed renewals; the fence stops a PUT if
                    // it runs out.
                    Err(e) => tracing::warn!(portal = %p, error = %e, "renewing a claim"),
                }
            }
        });
        ClaimGuard {
            store: self.clone(),
            portal: portal.to_string(),
            epoch,
            heartbeat,
            newest_generation: None,
            claimed_at: 0,
        }
    }

    /// Takes the claim out of the map; whether it was there (not yet released, not lost).
    fn forget_claim(&self, portal: &str, epoch: i64) -> bool {
        self.shared.forget_claim(portal, epoch)
    }

    async fn renew(&self, portal: &str, epoch: i64) -> Result<bool, StateError> {
        let n = execute_cached(
            &self.shared.pool,
            "renewing a claim",
            "UPDATE portals SET lease_until = clock_timestamp() + $4::BIGINT * interval '1 millisecond'
              WHERE name = $1 AND lease_owner = $2 AND lease_epoch = $3",
            &[&portal, &self.shared.me, &epoch, &ms(self.shared.lease)],
        )
        .await?;
        Ok(n == 1)
    }

    async fn release(&self, portal: &str, epoch: i64) -> Result<(), StateError> {
        execute_cached(
            &self.shared.pool,
            "releasing a claim",
            &self.shared.dollar(RELEASE),
            &[&portal, &self.shared.me, &epoch],
        )
        .await?;
        Ok(())
    }

    /// Says this instance is alive and which config it runs (a new generation when no
    /// instance ran it before).
    pub async fn register(&self, config: &Config) -> Result<(), StateError> {
        let fp = &config.text_fp;
        let client = get(&self.shared.pool).await?;
        client
            .execute(
                concat!(
                    "INSERT INTO config_generations (config_fp, first_seen_at) VALUES ($1, ",
                    server_ms!(),
                    ") ON CONFLICT (config_fp) DO NOTHING"
                ),
                &[&fp],
            )
            .await
            .map_err(pg("recording the config generation"))?;
        client
            .execute(
                "INSERT INTO nodes (name, version, config_fp, started_at, seen_at)
                 VALUES ($1, $2, $3, clock_timestamp(), clock_timestamp())
                 ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version,
                        config_fp = EXCLUDED.config_fp, seen_at = EXCLUDED.seen_at",
                &[&self.shared.me, &env!("CARGO_PKG_VERSION"), &fp],
            )
            .await
            .map_err(pg("registering the instance"))?;
        Ok(())
    }

    /// Marks this instance alive (the daemon, every lease/3).
    pub async fn heartbeat(&self) -> Result<(), StateError> {
        execute_cached(
            &self.shared.pool,
            "marking the instance alive",
            "UPDATE nodes SET seen_at = clock_timestamp() WHERE name = $1",
            &[&self.shared.me],
        )
        .await?;
        Ok(())
    }

    /// Whether `config` is the newest config generation any instance started with; an
    /// instance that runs an older one does not act on "changed".
    pub async fn runs_newest_config(&self, config: &Config) -> Result<bool, StateError> {
        let client = get(&self.shared.pool).await?;
        let st = client
            .prepare_cached(
                "SELECT config_fp FROM config_generations ORDER BY first_seen_at DESC, config_fp LIMIT 1",
            )
            .await
            .map_err(pg("reading the config generations"))?;
        let newest: Option<String> = client
            .query_opt(&st, &[])
            .await
            .map_err(pg("reading the config generations"))?
            .map(|r| r.get(0));
        Ok(is_newest(newest.as_deref(), config))
    }

    /// Who holds which portal now.
    pub async fn leases(&self) -> Result<Vec<Lease>, StateError> {
        let rows = get(&self.shared.pool)
            .await?
            .query(
                "SELECT name, lease_owner, lease_epoch,
                        (extract(epoch FROM lease_until - clock_timestamp()))::BIGINT
                   FROM portals WHERE lease_owner IS NOT NULL AND lease_until > clock_timestamp()
                  ORDER BY name",
                &[],
            )
            .await
            .map_err(pg("reading the claims"))?;
        Ok(rows
            .iter()
            .map(|r| Lease {
                portal: r.get(0),
                owner: r.get(1),
                epoch: r.get(2),
                left_s: r.get(3),
            })
            .collect())
    }

    /// The instances, newest first.
    pub async fn nodes(&self) -> Result<Vec<Node>, StateError> {
        let rows = get(&self.shared.pool)
            .await?
            .query(
                "SELECT n.name, n.version, (extract(epoch FROM clock_timestamp() - n.seen_at))::BIGINT,
                        n.config_fp = (SELECT config_fp FROM config_generations
                                        ORDER BY first_seen_at DESC, config_fp LIMIT 1)
                   FROM nodes n ORDER BY n.seen_at DESC",
                &[],
            )
            .await
            .map_err(pg("reading the instances"))?;
        Ok(rows
            .iter()
            .map(|r| Node {
                name: r.get(0),
                version: r.get(1),
                seen_s_ago: r.get(2),
                newest_config: r.get::<_, Option<bool>>(3).unwrap_or(true),
            })
            .collect())
    }

    /// A client of the pool, for the tests.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StateError> {
        get(&self.shared.pool).await
    }
}

/// TLS for TCP connections (the url's `sslmode`: `disable`, `prefer`, the default, which
/// uses TLS when the server offers it, or `require`): rustls, verifying the server's
/// certificate and name against the system's CAs and `[storage] ca_file`.
fn tls(st: &StorageConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StateError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let err = |detail: String| StateError::Db {
        action: "setting up TLS for PostgreSQL",
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(ca) = st.ca_file.as_ref().map(|c| &c.value) {
        let certs = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| err(format!("storage.ca_file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(err(format!(
                "storage.ca_file {}: no PEM certificate in it",
                ca.display()
            )));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| err(format!("storage.ca_file {}: {e}", ca.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Whether `config` is the newest generation, `newest` being the newest one recorded
/// (none yet: it is).
pub fn is_newest(newest: Option<&str>, config: &Config) -> bool {
    newest.is_none_or(|n| n == config.text_fp)
}

/// One statement outside a transaction, prepared once per connection (the claims, their
/// renewals and releases, the heartbeat: each runs thousands of times).
async fn execute_cached(
    pool: &Pool,
    action: &'static str,
    sql: &str,
    p: &[&(dyn ToSql + Sync)],
) -> Result<u64, StateError> {
    let client = get(pool).await?;
    let st = client.prepare_cached(sql).await.map_err(pg(action))?;
    client.execute(&st, p).await.map_err(pg(action))
}

async fn get(pool: &Pool) -> Result<deadpool_postgres::Object, StateError> {
    pool.get().await.map_err(|e| StateError::Db {
        action: "connecting to PostgreSQL",
        detail: crate::errors::chain(&e),
    })
}

/// Applies the migrations the database lacks, one instance at a time (a transaction-scoped
/// advisory lock), and stores a fingerprint key if there is none.
/// The migration that made the history a chain (0004_audit.sql).
const AUDIT_MIGRATION: usize = 4;

/// The history rows of an older version become the start of each portal's chain (as
/// SQLite's migration does, with the same statements).
async fn migrate_legacy_history(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StateError> {
    use super::history::{LEGACY_HEAD, LEGACY_ROW, LEGACY_ROWS, Legacy, chain_legacy};
    let action = "chaining old history";
    let rows = tx
        .query(LEGACY_ROWS, &[])
        .await
        .map_err(pg(action))?
        .iter()
        .map(|r| {
            Ok(Legacy {
                id: r.try_get(0)?,
                portal: r.try_get(1)?,
                at: r.try_get(2)?,
                event: r.try_get(3)?,
                detail: r.try_get(4)?,
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()
        .map_err(pg(action))?;
    let (records, heads) = chain_legacy(rows);
    let (row_sql, head_sql) = (to_dollar(LEGACY_ROW), to_dollar(LEGACY_HEAD));
    for (id, uuid, json, prev, hash, event) in &records {
        tx.execute(&row_sql, &[id, uuid, json, prev, hash, event])
            .await
            .map_err(pg(action))?;
    }
    for (portal, (head, prev)) in &heads {
        tx.execute(&head_sql, &[portal, head, prev])
            .await
            .map_err(pg(action))?;
    }
    Ok(())
}

async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), StateError> {
    let tx = client
        .transaction()
        .await
        .map_err(pg("starting a migration"))?;
    tx.execute("SELECT pg_advisory_xact_lock(7305811)", &[])
        .await
        .map_err(pg("taking the migration lock"))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .await
        .map_err(pg("creating schema_version"))?;
    let version: i64 = tx
        .query_opt("SELECT version FROM schema_version", &[])
        .await
        .map_err(pg("reading the schema version"))?
        .map_or(0, |r| r.get(0));
    let version = super::known_version(version, MIGRATIONS.len())?;
    for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.batch_execute(m)
            .await
            .map_err(pg("applying a migration"))?;
        if i + 1 == AUDIT_MIGRATION {
            migrate_legacy_history(&tx).await?;
        }
        tx.execute("DELETE FROM schema_version", &[])
            .await
            .map_err(pg("recording the schema version"))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&((i + 1) as i64)],
        )
        .await
        .map_err(pg("recording the schema version"))?;
    }
    let mut key = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut key);
    // One key per cluster: the first instance's; everyone reads the winner.
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('fingerprint_key', $1) ON CONFLICT (key) DO NOTHING",
        &[&key],
    )
    .await
    .map_err(pg("storing the fingerprint key"))?;
    tx.commit().await.map_err(pg("committing the migrations"))
}

/// A claim on a portal, renewed while held; released when dropped (the lease runs out if
/// the process dies).
pub struct ClaimGuard {
    store: PgStore,
    portal: String,
    epoch: i64,
    heartbeat: tokio::task::JoinHandle<()>,
    /// The newest config generation recorded when the claim was taken.
    newest_generation: Option<String>,
    /// The server's clock when the claim was taken (Unix ms).
    claimed_at: i64,
}

impl ClaimGuard {
    /// The newest config generation recorded when the claim was taken (`None`: none yet).
    pub fn newest_generation(&self) -> Option<&str> {
        self.newest_generation.as_deref()
    }

    /// The server's clock when the claim was taken (Unix ms).
    pub fn claimed_at(&self) -> i64 {
        self.claimed_at
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        self.heartbeat.abort();
        // Released already (with the job's last write), or lost: nothing to release.
        if !self.store.forget_claim(&self.portal, self.epoch) {
            return;
        }
        let (store, portal, epoch) = (self.store.clone(), self.portal.clone(), self.epoch);
        let release = async move {
            if let Err(e) = store.release(&portal, epoch).await {
                tracing::warn!(portal = %portal, error = %e, "releasing a claim (its lease runs out instead)");
            }
        };
        // Released before the caller moves on, so a command that exits right after does
        // not leave its portal held for a lease; a runtime that cannot block spawns it.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| {
                    h.block_on(async {
                        let _ = tokio::time::timeout(Duration::from_secs(5), release).await;
                    })
                });
            }
            Ok(h) => {
                h.spawn(release);
            }
            Err(_) => {}
        }
    }
}

/// A transaction (or reads without one), as the state's statements see it.
struct PgTx<'a> {
    lane: std::cell::RefCell<&'a mut super::lanes::Lane>,
    shared: &'a Shared,
    /// The server's clock, read once per transaction (its statements share one time).
    now: std::cell::Cell<Option<i64>>,
    /// Claims this transaction releases: out of the map once it committed.
    released: std::cell::RefCell<Vec<(String, i64)>>,
    /// Writes sent with the COMMIT ([`Sql::defer`]).
    deferred: std::cell::RefCell<Vec<Write>>,
}

/// A deferred write: what it does, its statement, its parameters.
type Write = (&'static str, Arc<str>, Vec<Val>);

impl Sql for PgTx<'_> {
    fn exec(&self, action: &'static str, sql: &str, p: &[Val]) -> Result<u64, StateError> {
        let sql = self.shared.dollar(sql);
        self.lane.borrow_mut().execute(action, &sql, &params(p))
    }

    fn rows(&self, action: &'static str, sql: &str, p: &[Val]) -> Result<Vec<Row>, StateError> {
        let sql = self.shared.dollar(sql);
        let rows = self.lane.borrow_mut().query(action, &sql, &params(p))?;
        rows.iter().map(|r| to_row(r).map_err(pg(action))).collect()
    }

    fn defer(&self, action: &'static str, sql: &str, p: &[Val]) -> Result<(), StateError> {
        let sql = self.shared.dollar(sql);
        self.deferred.borrow_mut().push((action, sql, p.to_vec()));
        Ok(())
    }

    fn now(&self) -> Result<i64, StateError> {
        if let Some(t) = self.now.get() {
            return Ok(t);
        }
        let sql = self.shared.dollar(concat!("SELECT ", server_ms!()));
        let rows = self
            .lane
            .borrow_mut()
            .query("reading the server's clock", &sql, &[])?;
        let t: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(pg("reading the server's clock"))?
            .ok_or(StateError::Db {
                action: "reading the server's clock",
                detail: "no row".into(),
            })?;
        self.now.set(Some(t));
        Ok(t)
    }

    fn release_claim(&self, portal: &str) -> Result<(), StateError> {
        let Some(epoch) = self.shared.epoch_of(portal) else {
            return Ok(());
        };
        self.defer(
            "releasing a claim",
            RELEASE,
            &[portal.into(), self.shared.me.as_str().into(), epoch.into()],
        )?;
        self.released.borrow_mut().push((portal.to_string(), epoch));
        Ok(())
    }

    fn license_put(&self, portal: &str) -> Result<Option<i64>, StateError> {
        let fenced = |why: String| StateError::Fenced {
            portal: portal.to_string(),
            why,
        };
        let epoch = self
            .shared
            .epoch_of(portal)
            .ok_or_else(|| fenced("this process holds no claim on it".into()))?;
        let (budget, grace) = (ms(self.shared.put_budget), ms(self.shared.grace));
        // FOR UPDATE: a takeover waits for this transaction, and then finds the lease ours.
        // The server's clock comes with it: a transaction that has not read it yet (the
        // intent's, which licenses first) needs no statement of its own for it.
        let sql = self.shared.dollar(concat!(
            "SELECT ",
            server_ms!(),
            " FROM portals
              WHERE name = $1 AND lease_owner = $2 AND lease_epoch = $3
                AND lease_until > clock_timestamp() + ($4::BIGINT + $5::BIGINT) * interval '1 millisecond'
              FOR UPDATE",
        ));
        let rows = self.lane.borrow_mut().query(
            "checking the claim",
            &sql,
            &[&portal, &self.shared.me, &epoch, &budget, &grace],
        )?;
        let row = rows.first();
        match row {
            Some(r) => {
                let now: i64 = r.try_get(0).map_err(pg("checking the claim"))?;
                if self.now.get().is_none() {
                    self.now.set(Some(now));
                }
                Ok(Some(now + budget))
            }
            None => Err(fenced(format!(
                "the claim (epoch {epoch}) lapsed or was taken over, or has less than the PUT budget and its grace ({}s) left",
                (budget + grace) / 1000
            ))),
        }
    }
}

/// Where `bytes` comes from for `ToSql` (re-exported by postgres-types).
mod bytes_buf {
    pub use tokio_postgres::types::private::BytesMut;
}
