//! Who may work on a portal now: the one room that knows whether this process runs alone
//! (SQLite: a portal's `flock`) or in a cluster (PostgreSQL: claims with a lease and a
//! fencing epoch, the PUT budget, the instances and their config generations).
//!
//! Rotation, recovery, drift and the daemon ask the [`Coordinator`]; nothing outside it and
//! `state/` looks at which backend the store is.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::state::pg::{Lease, Node, PgStore};
use crate::state::{self, PortalLock, StateError, Store};

/// How long a command waits for another process to release a portal: longer than any
/// rotation takes (a PUT budget, a settle, one delivery attempt per sink).
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// The part of the PUT budget a PUT is not started in: the time to write it to the socket.
/// A PUT started later could reach the portal after the deadline stored with the intent,
/// when another instance may already have waited the deadline out and settled the intent
/// as not applied.
const PUT_MARGIN: Duration = Duration::from_millis(500);

/// What the process is, for the coordinator's choices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A command run by hand or by a timer: it waits for a portal another process holds.
    Command,
    /// The daemon: in a cluster it moves on from a portal another instance holds, as
    /// `SKIP LOCKED` does, and looks at it again later.
    Daemon,
}

/// Solo or cluster; cloning shares the state (the "runs the newest config" flag).
#[derive(Clone)]
pub struct Coordinator {
    store: Option<Store>,
    cluster: Option<PgStore>,
    role: Role,
    /// In a cluster: whether this process runs the newest config generation. Always true
    /// alone.
    newest: Arc<AtomicBool>,
}

impl Coordinator {
    /// The coordinator of `store` (`None`: a dry run, which locks nothing).
    pub fn new(store: Option<&Store>, role: Role) -> Self {
        Self {
            cluster: store.and_then(|s| s.postgres()).cloned(),
            store: store.cloned(),
            role,
            newest: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Whether this is the daemon or a command.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The same coordinator acting as `role`.
    pub fn with_role(mut self, role: Role) -> Self {
        self.role = role;
        self
    }

    /// Whether several instances share the state.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    fn store(&self) -> Result<&Store, StateError> {
        self.store.as_ref().ok_or_else(|| StateError::Db {
            action: "locking a portal",
            detail: "a dry run locks nothing".into(),
        })
    }

    /// Takes the portal for a rotation, a watch or a delivery. A command waits for another
    /// process to let go; the daemon of a cluster does not (the holder is doing the work).
    pub async fn lock(&self, portal: &str) -> Result<PortalLock, StateError> {
        let wait = if self.role == Role::Daemon && self.is_cluster() {
            Duration::ZERO
        } else {
            LOCK_WAIT
        };
        self.store()?.lock_portal(portal, wait).await
    }

    /// Takes the portal to settle what an earlier process left: in a cluster, a portal
    /// another instance holds is that instance's to settle now, so nobody waits.
    pub async fn lock_to_recover(&self, portal: &str) -> Result<PortalLock, StateError> {
        let wait = if self.is_cluster() {
            Duration::ZERO
        } else {
            LOCK_WAIT
        };
        self.store()?.lock_portal(portal, wait).await
    }

    /// Takes the portal at once or not at all (the daemon of a cluster claims before it
    /// re-plans); `None` when it is not a cluster, where the rotation takes its lock itself.
    pub async fn claim_now(&self, portal: &str) -> Result<Option<PortalLock>, StateError> {
        if !self.is_cluster() {
            return Ok(None);
        }
        self.store()?
            .lock_portal(portal, Duration::ZERO)
            .await
            .map(Some)
    }

    /// Whether `e` means another instance has the portal: not a failure of the portal, and
    /// not this process's to report as one. Alone, a busy lock is a failure (a command
    /// waited two minutes).
    pub fn held_elsewhere(&self, e: &StateError) -> bool {
        self.is_cluster() && matches!(e, StateError::Busy { .. } | StateError::Fenced { .. })
    }

    /// Whether a PUT licensed at `licensed` must not be sent any more: in a cluster, past
    /// its budget (`http_timeout`) less [`PUT_MARGIN`]. Alone, no deadline binds it (no
    /// other process settles the intent while this one holds the lock).
    pub fn put_too_late(&self, licensed: Instant, budget: Duration) -> bool {
        self.is_cluster() && licensed.elapsed() + PUT_MARGIN >= budget
    }

    /// Whether this process acts on changed entries (the planner's `follows_changes`): in
    /// a cluster only while it runs the newest config generation, so that a rolling change
    /// cannot rotate a portal back and forth.
    pub fn follows_changes(&self) -> bool {
        self.newest.load(Ordering::SeqCst)
    }

    /// Asks the database whether `config` is the newest generation and records it (an
    /// error, and a notice for `[alerts]`, when this instance stops being so). Alone: yes.
    pub async fn refresh_generation(&self, config: &Config) -> Result<bool, StateError> {
        let Some(pg) = &self.cluster else {
            return Ok(true);
        };
        let newest = pg.runs_newest_config(config).await?;
        self.set_newest(pg, newest).await;
        Ok(newest)
    }

    /// [`Self::refresh_generation`] from what a claim read when it was taken (the same
    /// statement, so no second one): a claim that has no view of the generations (alone)
    /// asks the database.
    pub async fn generation_at_claim(
        &self,
        lock: Option<&state::PortalLock>,
        config: &Config,
    ) -> Result<bool, StateError> {
        let (Some(pg), Some(Some(newest))) = (
            &self.cluster,
            lock.map(state::PortalLock::generation_at_claim),
        ) else {
            return self.refresh_generation(config).await;
        };
        let newest = crate::state::pg::is_newest(newest, config);
        self.set_newest(pg, newest).await;
        Ok(newest)
    }

    async fn set_newest(&self, pg: &PgStore, newest: bool) {
        let was = self.newest.swap(newest, Ordering::SeqCst);
        if newest {
            if !was {
                tracing::info!("this instance runs the newest configuration again");
            }
            return;
        }
        if !was {
            return;
        }
        tracing::error!(
            "another instance runs a newer configuration: this one does not act on changed portal entries until it runs the same (deploy it, then reload)"
        );
        let me = pg.me().to_string();
        let r = pg
            .transaction(move |c| {
                let since = c.now()? - 86_400_000;
                state::add_notice(
                    c,
                    "*",
                    "config",
                    &format!("tfa-rotator: instance {me} runs an older configuration"),
                    &format!(
                        "The instance {me} started with, or still runs, a configuration file that differs from the newest one another instance of the cluster started with. Until it runs the same file it does not rotate portals whose entries changed (so that two instances cannot rotate a portal back and forth). Deploy the same configuration to every instance, then reload them. `tfa-rotator status` lists the instances and which run an older configuration."
                    ),
                    since,
                )
            })
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "queueing the notice of an older configuration");
        }
    }

    /// Says which config this instance runs (a new generation when no instance ran it
    /// before); nothing alone.
    pub async fn register(&self, config: &Config) -> Result<(), StateError> {
        match &self.cluster {
            Some(pg) => pg.register(config).await,
            None => Ok(()),
        }
    }

    /// The cluster's heartbeat: every lease/3 marks this instance alive and checks the
    /// config generation (another instance may have started with a newer one). `None`
    /// alone. `running` is the config in force (a reload replaces it).
    pub fn spawn_heartbeat(
        &self,
        running: Arc<std::sync::Mutex<Arc<Config>>>,
        stop: CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let pg = self.cluster.clone()?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            loop {
                let config = running.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let every = config
                    .storage
                    .as_ref()
                    .map_or(Duration::from_secs(20), |s| s.lease / 3);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                if let Err(e) = pg.heartbeat().await {
                    tracing::warn!(error = %e, "marking this instance alive");
                }
                if let Err(e) = me.refresh_generation(&config).await {
                    tracing::warn!(error = %e, "reading the config generations");
                }
            }
        }))
    }

    /// In a cluster: who holds which portal, and the instances (newest first).
    pub async fn cluster_view(&self) -> Result<Option<(Vec<Lease>, Vec<Node>)>, StateError> {
        match &self.cluster {
            None => Ok(None),
            Some(pg) => Ok(Some((pg.leases().await?, pg.nodes().await?))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alone_no_put_deadline_and_busy_is_a_failure() {
        let c = Coordinator::new(None, Role::Daemon);
        assert!(!c.is_cluster());
        assert!(!c.put_too_late(Instant::now() - Duration::from_secs(3600), Duration::ZERO));
        let busy = StateError::Busy {
            portal: "p".into(),
            holder: "another tfa-rotator process".into(),
        };
        assert!(!c.held_elsewhere(&busy));
        assert!(c.follows_changes());
    }

    #[tokio::test]
    async fn a_dry_run_locks_nothing() {
        let c = Coordinator::new(None, Role::Command);
        assert!(c.lock("p").await.is_err());
        assert!(c.claim_now("p").await.unwrap().is_none());
        assert!(c.cluster_view().await.unwrap().is_none());
        // Alone, every config is the newest generation.
        let config = crate::config::parse(
            "[sinks.f]\ntype = \"file\"\npath = \"/var/lib/t/{portal}.txt\"\n\n\
             [portals.p]\nurl = \"https://docspace.rotator.test\"\napi_key = { env = \"K\" }\nsinks = [\"f\"]\n",
            std::path::Path::new("t.toml"),
            false,
        )
        .unwrap();
        assert!(c.refresh_generation(&config).await.unwrap());
        assert!(c.follows_changes());
    }
}
