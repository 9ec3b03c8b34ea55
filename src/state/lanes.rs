//! PostgreSQL connections that each run whole transactions on the thread that owns them.
//!
//! The state's statements are synchronous (`&dyn Sql`, one code for SQLite and
//! PostgreSQL). Run on tokio's blocking pool against a pooled connection, every statement
//! crossed threads twice: to the connection's task on a runtime worker, which wrote the
//! socket, and back when the answer came (a profile of the cluster bench put about half of
//! the daemon's CPU per rotation there). A lane is a thread with its own single-threaded
//! runtime and its own connection, whose I/O it drives inside each statement's `block_on`:
//! a transaction is handed to a lane once and runs there to its end, each statement a
//! write and a read on that thread's socket.
//!
//! Lanes end when the store is dropped (their queue closes); a lane whose connection broke
//! (or was closed by the server while the lane waited) connects again at its next
//! transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, mpsc};

use tokio_postgres::Statement;

use super::StateError;
use super::pg::pg;

/// A transaction's work, run on a lane with its connection.
pub type Job = Box<dyn FnOnce(&mut Lane) + Send>;

/// How a lane connects.
#[derive(Clone)]
pub struct Connect {
    pub config: tokio_postgres::Config,
    /// TLS; `None` for a configuration of Unix sockets only.
    pub tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

/// The lanes' queue: a transaction goes to the first lane free.
pub struct Lanes {
    queue: Mutex<mpsc::Sender<Job>>,
}

impl Lanes {
    /// Starts `n` lanes (threads); each connects at its first transaction.
    pub fn start(n: usize, connect: Connect) -> Result<Self, StateError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n {
            let (rx, connect) = (rx.clone(), connect.clone());
            std::thread::Builder::new()
                .name(format!("pg-lane-{i}"))
                .spawn(move || run(rx, connect))
                .map_err(|e| StateError::Db {
                    action: "starting a database thread",
                    detail: e.to_string(),
                })?;
        }
        Ok(Self {
            queue: Mutex::new(tx),
        })
    }

    /// Runs `job` on a lane; its answer comes back through the channel the job owns.
    pub fn send(&self, job: Job) -> Result<(), StateError> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| StateError::Db {
                action: "running a database task",
                detail: "the database threads have stopped".into(),
            })
    }
}

fn run(rx: Arc<Mutex<mpsc::Receiver<Job>>>, connect: Connect) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "starting a database thread's runtime");
            return;
        }
    };
    let mut lane = Lane {
        rt,
        conn: Conn {
            connect,
            client: None,
            statements: HashMap::new(),
        },
    };
    loop {
        // One lane waits for the next job at a time; the others wait for the lock.
        let job = match rx.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(_) => return, // the store is gone
        };
        lane.catch_up();
        // A job that panics (a bug) loses its answer (its caller hears of it) and its
        // connection, not the lane.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&mut lane))).is_err() {
            tracing::error!("a database task panicked; its connection is closed");
            lane.drop_connection();
        }
    }
}

/// A write sent with the COMMIT ([`Lane::commit_with`]).
pub struct Deferred<'a> {
    pub action: &'static str,
    pub sql: &'a Arc<str>,
    pub params: Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>,
}

/// One lane: its runtime, and its connection.
pub struct Lane {
    rt: tokio::runtime::Runtime,
    conn: Conn,
}

/// A lane's connection (if connected) and its prepared statements.
struct Conn {
    connect: Connect,
    client: Option<tokio_postgres::Client>,
    statements: HashMap<Arc<str>, Statement>,
}

impl Conn {
    /// Connects now unless connected (a connection that broke is replaced).
    fn connected(
        &mut self,
        rt: &tokio::runtime::Runtime,
    ) -> Result<&tokio_postgres::Client, StateError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = None;
            self.statements.clear();
            let (config, tls) = (self.connect.config.clone(), self.connect.tls.clone());
            let client = rt
                .block_on(async move {
                    let client = match tls {
                        Some(tls) => {
                            let (client, conn) = config.connect(tls).await?;
                            tokio::spawn(conn);
                            client
                        }
                        None => {
                            let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                            tokio::spawn(conn);
                            client
                        }
                    };
                    Ok::<_, tokio_postgres::Error>(client)
                })
                .map_err(pg("connecting to PostgreSQL"))?;
            self.client = Some(client);
        }
        self.client.as_ref().ok_or(StateError::Db {
            action: "connecting to PostgreSQL",
            detail: "no connection".into(),
        })
    }

    /// The connection, and `sql` prepared on it (once).
    fn prepared(
        &mut self,
        rt: &tokio::runtime::Runtime,
        action: &'static str,
        sql: &Arc<str>,
    ) -> Result<(&tokio_postgres::Client, Statement), StateError> {
        self.connected(rt)?;
        let Self {
            client, statements, ..
        } = self;
        let client = client.as_ref().ok_or(StateError::Db {
            action,
            detail: "no connection".into(),
        })?;
        let st = match statements.get(sql) {
            Some(st) => st.clone(),
            None => {
                let st = rt.block_on(client.prepare(sql)).map_err(pg(action))?;
                statements.insert(sql.clone(), st.clone());
                st
            }
        };
        Ok((client, st))
    }
}

impl Lane {
    /// Lets the connection's task handle what arrived while the lane waited (it runs only
    /// inside this thread's `block_on`): a connection the server closed meanwhile (a
    /// restart, an idle timeout) is then seen closed, and the job connects again instead of
    /// failing on it. A few scheduler turns, each polling the socket without waiting.
    fn catch_up(&mut self) {
        if self.conn.client.is_some() {
            self.rt.block_on(async {
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
            });
        }
    }

    /// Closes the connection (a transaction that did not end cleanly): the server rolls
    /// back whatever it left open, and the next transaction connects again.
    pub fn drop_connection(&mut self) {
        self.conn.client = None;
        self.conn.statements.clear();
    }

    /// Runs a simple query (no parameters; several statements allowed).
    pub fn simple(
        &mut self,
        action: &'static str,
        sql: &str,
    ) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, StateError> {
        let client = self.conn.connected(&self.rt)?;
        self.rt
            .block_on(client.simple_query(sql))
            .map_err(pg(action))
    }

    /// Runs `writes` (each prepared on this connection once), then `COMMIT`, pipelined:
    /// sent together, answered together, one round trip for all (tokio-postgres sends
    /// requests in the order they are first polled). A write that fails aborts the
    /// transaction, whose COMMIT then only ends it: that write's error is returned.
    pub fn commit_with(&mut self, writes: &[Deferred<'_>]) -> Result<(), StateError> {
        let mut prepared = Vec::with_capacity(writes.len());
        for w in writes {
            prepared.push(self.conn.prepared(&self.rt, w.action, w.sql)?.1);
        }
        let client = self.conn.connected(&self.rt)?;
        self.rt.block_on(async {
            let writes =
                futures::future::join_all(writes.iter().zip(&prepared).map(|(w, st)| async move {
                    client.execute(st, &w.params).await.map_err(pg(w.action))
                }));
            let (written, committed) =
                futures::future::join(writes, client.simple_query("COMMIT")).await;
            for w in written {
                w?;
            }
            committed.map_err(pg("committing")).map(drop)
        })
    }

    /// Runs `sql` (prepared on this connection once) with `params`; returns its rows.
    pub fn query(
        &mut self,
        action: &'static str,
        sql: &Arc<str>,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StateError> {
        let (client, st) = self.conn.prepared(&self.rt, action, sql)?;
        self.rt
            .block_on(client.query(&st, params))
            .map_err(pg(action))
    }

    /// Runs `sql` (prepared on this connection once) with `params`; returns the rows it
    /// changed.
    pub fn execute(
        &mut self,
        action: &'static str,
        sql: &Arc<str>,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StateError> {
        let (client, st) = self.conn.prepared(&self.rt, action, sql)?;
        self.rt
            .block_on(client.execute(&st, params))
            .map_err(pg(action))
    }
}
