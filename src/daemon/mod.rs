//! The daemon (SPEC §6): plans each portal's next due time, sleeps until the earliest, runs
//! what is due through the rotation protocol with at most `max_concurrent` in flight, and
//! reloads its config on a file change or SIGHUP.
//!
//! A portal is due for one of these reasons, whichever comes first:
//! - its entry changed in a way that matters (or it is new) and its schedule has
//!   `rotate_on_change`: a fingerprint of the entry is kept in the state, so a restart is not
//!   a change, and it is stored only once a rotation succeeded;
//! - a cron fire time (with the portal's jitter) arrived; the last fire time acted on is kept
//!   in the state, so a fire missed while the daemon was down runs once at start (`catch_up`);
//! - the watch reads every portal every `watch_every` (default 6h, also for portals without
//!   a schedule): drift is converged by `on_drift`, and too few unused codes
//!   (`rotate_when_unused_below`) rotate it;
//! - an open intent (a PUT of unknown outcome) is settled at the times of its settle
//!   schedule, kept in the journal; while it is open, nothing else is planned for the portal.
//!
//! A rotation is never planned before `min_interval` after the last success, nor before the
//! backoff after a failure. Pending deliveries are retried when their backoff expires. Idle
//! means asleep until the earliest of these times: there is no polling loop.
//!
//! On SIGTERM/SIGINT the daemon stops planning, marks the engine as stopping (a rotation not
//! yet at its intent does not start; one past it completes its PUT, seal and one delivery
//! attempt, so its set is sealed and normally delivered), waits for the tasks in flight, says
//! `STOPPING=1` and exits 0.

pub mod notify;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::commands::{Exit, load_config};
use crate::config;
use crate::rotation::{self, Engine};
use crate::state::{self, PortalRow};
use notify::{Note, Notifier};

fn ms_to_time(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

/// What the daemon knows of one portal between wakes.
#[derive(Debug, Default, Clone)]
struct Plan {
    last_fire_at: Option<DateTime<Utc>>,
    entry_fp: Option<String>,
    last_success: Option<DateTime<Utc>>,
    retry_at: Option<DateTime<Utc>>,
    seen_at: Option<DateTime<Utc>>,
    watch_retry_at: Option<DateTime<Utc>>,
    watch_failures: i64,
    /// An intent is open: its next settle GET is due then.
    settle_at: Option<DateTime<Utc>>,
}

impl Plan {
    fn from_row(r: &PortalRow) -> Self {
        Self {
            last_fire_at: ms_to_time(r.last_fire_at),
            entry_fp: r.entry_fp.clone(),
            last_success: ms_to_time(r.last_success_at),
            retry_at: if r.last_result.as_deref() == Some("failed") {
                ms_to_time(r.retry_at)
            } else {
                None
            },
            seen_at: ms_to_time(r.seen_at),
            ..Self::default()
        }
    }
}

/// Why a job runs.
#[derive(Debug, Clone)]
enum Job {
    /// The entry changed (new fingerprint).
    Change(String),
    /// A cron fire time.
    Fire(DateTime<Utc>),
    /// The periodic read (drift, unused codes).
    Watch,
    /// A settle GET of an open intent.
    Settle,
}

/// What planning decided for one portal.
struct Next {
    /// The next job and when it is due.
    job: Option<(DateTime<Utc>, Job)>,
    /// A new entry fingerprint to store without rotating (no `rotate_on_change`).
    silent_fp: Option<String>,
    /// Fire times missed while down are skipped (no `catch_up`).
    skip_fires: bool,
}

/// A finished job.
struct Done {
    portal: String,
    job: Job,
    ok: bool,
    unused: Option<usize>,
}

struct Supervisor {
    path: PathBuf,
    notifier: Notifier,
    engine: Engine,
    plans: HashMap<String, Plan>,
    in_flight: HashSet<String>,
    delivering: bool,
    started: DateTime<Utc>,
    tracker: TaskTracker,
    permits: Arc<Semaphore>,
    done_tx: mpsc::UnboundedSender<Done>,
}

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(path: &Path, dry_run: bool, shutdown: CancellationToken) -> Exit {
    let started_at = std::time::Instant::now();
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let engine = match crate::commands::engine(config.clone(), dry_run) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let metrics = engine.metrics.clone();
    if let Some(addr) = config.daemon.metrics {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                let stop = shutdown.clone();
                let m = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        crate::metrics::serve(l, m, async move { stop.cancelled().await }).await
                    {
                        tracing::error!(error = %e, "the metrics listener stopped");
                    }
                });
                tracing::info!(%addr, "metrics on /metrics, health on /healthz");
            }
            Err(e) => {
                eprintln!("error: daemon.metrics: listening on {addr}: {e}");
                return Exit::Failed;
            }
        }
    }
    if !dry_run {
        match rotation::stranded_work(&engine).await {
            Ok(stranded) if !stranded.is_empty() => {
                for s in &stranded {
                    eprintln!("error: {}: {s}", path.display());
                }
                eprintln!(
                    "error: the configuration would drop work the state holds ({} problem(s)); nothing was started",
                    stranded.len()
                );
                return Exit::Config;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::Failed;
            }
        }
        for r in rotation::recover_all(&engine).await {
            tracing::info!(portal = %r.portal, outcome = r.outcome.as_str(), "{}", r.message);
        }
    }
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(config.daemon.max_concurrent));
    let notifier = Notifier::start();
    let mut sup = Supervisor {
        path: path.to_path_buf(),
        notifier: notifier.clone(),
        engine,
        plans: HashMap::new(),
        in_flight: HashSet::new(),
        delivering: false,
        started: Utc::now(),
        tracker: TaskTracker::new(),
        permits,
        done_tx,
    };
    if let Err(e) = sup.load_plans().await {
        eprintln!("error: {e}");
        return Exit::Failed;
    }

    let (reload_tx, mut reload_rx) = mpsc::channel::<()>(4);
    let _watcher = match watch::spawn(path, reload_tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    let hup_tx = reload_tx.clone();
    tokio::spawn(async move {
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            while hup.recv().await.is_some() {
                let _ = hup_tx.send(()).await;
            }
        }
    });
    if let Some(every) = sd_notify::watchdog_enabled() {
        let stop = shutdown.clone();
        let notifier = notifier.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every / 2);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => notifier.send(Note::Watchdog),
                }
            }
        });
    }

    metrics.alive.store(true, Ordering::SeqCst);
    let status = format!(
        "{} portal(s){}",
        sup.engine.config.portals.len(),
        if dry_run { ", dry run" } else { "" }
    );
    notifier.send(Note::Ready(status));
    tracing::info!(
        portals = sup.engine.config.portals.len(),
        dry_run,
        ready_ms = started_at.elapsed().as_millis() as u64,
        "ready"
    );

    loop {
        let next = sup.plan_and_start().await;
        let sleep = async {
            match next {
                Some(t) => {
                    let wait = (t - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::time::sleep(wait).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = reload_rx.recv() => sup.reload().await,
            Some(done) = done_rx.recv() => sup.finish(done).await,
            _ = sleep => {}
        }
        metrics
            .last_tick
            .store(Utc::now().timestamp() as u64, Ordering::Relaxed);
    }

    tracing::info!("stopping: no new rotations; waiting for those in flight to reach a safe point");
    notifier.send(Note::Stopping);
    sup.engine.stopping.store(true, Ordering::SeqCst);
    sup.tracker.close();
    sup.tracker.wait().await;
    // Record what the last jobs did (a stored entry fingerprint, a fire time acted on):
    // otherwise the next start would take a finished rotation for a pending change.
    while let Ok(done) = done_rx.try_recv() {
        sup.finish(done).await;
    }
    metrics.alive.store(false, Ordering::SeqCst);
    notifier.flush().await;
    tracing::info!("stopped");
    Exit::Ok
}

impl Supervisor {
    async fn rows(&self) -> Result<Vec<PortalRow>, state::StateError> {
        match &self.engine.store {
            Some(s) => s.call(|c| state::portal_rows(c)).await,
            None => Ok(Vec::new()),
        }
    }

    /// Reads what the state knows; a portal seen for the first time gets "now" as its last
    /// fire time, so only fires after this start (or after a later downtime) count.
    async fn load_plans(&mut self) -> Result<(), state::StateError> {
        let rows: HashMap<String, PortalRow> = self
            .rows()
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let now = Utc::now();
        let mut settle = self.settle_times().await;
        let mut first_seen = Vec::new();
        for name in self.engine.config.portals.keys() {
            if let Some(plan) = self.plans.get_mut(name) {
                plan.settle_at = settle.remove(name);
                continue;
            }
            let mut plan = rows.get(name).map(Plan::from_row).unwrap_or_default();
            plan.settle_at = settle.remove(name);
            if plan.last_fire_at.is_none() {
                plan.last_fire_at = Some(now);
                first_seen.push((name.clone(), None, Some(now)));
            }
            self.plans.insert(name.clone(), plan);
        }
        self.plans
            .retain(|n, _| self.engine.config.portals.contains_key(n));
        self.persist_many(first_seen).await;
        Ok(())
    }

    /// When each portal with an open intent is next asked (at once when never yet).
    async fn settle_times(&self) -> HashMap<String, DateTime<Utc>> {
        let Some(store) = &self.engine.store else {
            return HashMap::new();
        };
        match store.call(|c| state::open_intents(c)).await {
            Ok(v) => v
                .into_iter()
                .map(|(p, at)| (p, ms_to_time(at).unwrap_or_else(Utc::now)))
                .collect(),
            Err(e) => {
                tracing::error!(error = %e, "reading open intents");
                HashMap::new()
            }
        }
    }

    /// Stores schedule state for many portals in one transaction.
    async fn persist_many(&self, rows: Vec<(String, Option<String>, Option<DateTime<Utc>>)>) {
        let Some(store) = self.engine.store.clone() else {
            return;
        };
        if rows.is_empty() {
            return;
        }
        let rows: Vec<(String, Option<String>, Option<i64>)> = rows
            .into_iter()
            .map(|(p, fp, t)| (p, fp, t.map(|t| t.timestamp_millis())))
            .collect();
        if let Err(e) = store
            .write(move |c| state::record_schedules(c, &rows))
            .await
        {
            tracing::error!(error = %e, "could not record the schedule state");
        }
    }

    async fn persist(
        &self,
        portal: &str,
        entry_fp: Option<String>,
        last_fire: Option<DateTime<Utc>>,
    ) {
        let Some(store) = self.engine.store.clone() else {
            return;
        };
        let p = portal.to_string();
        let fire = last_fire.map(|t| t.timestamp_millis());
        if let Err(e) = store
            .write(move |c| state::record_schedule(c, &p, entry_fp.as_deref(), fire))
            .await
        {
            tracing::error!(portal, error = %e, "could not record the schedule state");
        }
    }

    /// The next job of a portal and when it is due.
    fn next_job(&self, name: &str, plan: &Plan, now: DateTime<Utc>) -> Next {
        let Some(pc) = self.engine.config.portals.get(name) else {
            return Next {
                job: None,
                silent_fp: None,
                skip_fires: false,
            };
        };
        if let Some(at) = plan.settle_at {
            // An open intent: the portal is not rotated, watched or re-planned until it is
            // settled; its next GET is all that is due.
            return Next {
                job: Some((at, Job::Settle)),
                silent_fp: None,
                skip_fires: false,
            };
        }
        let schedule = self.engine.config.schedule_of(pc);
        let fp = self.engine.entry_fingerprint(pc);
        let mut silent_fp = None;
        let mut skip_fires = false;
        let mut cands: Vec<(DateTime<Utc>, Job)> = Vec::new();
        if plan.entry_fp.as_deref() != Some(fp.as_str()) {
            if schedule.is_some_and(|s| s.rotate_on_change) {
                cands.push((now, Job::Change(fp)));
            } else {
                silent_fp = Some(fp);
            }
        }
        if let Some(s) = schedule {
            let base = plan.last_fire_at.unwrap_or(now);
            match s.next_fire(name, base) {
                // Missed while the daemon was down, and no catch-up: skip to the next one.
                // The caller records `now` as the last fire, so the skip happens once.
                Some(t) if t <= now && t < self.started && !s.catch_up => {
                    skip_fires = true;
                    if let Some(next) = s.next_fire(name, now) {
                        cands.push((next, Job::Fire(next)));
                    }
                }
                Some(t) => cands.push((t, Job::Fire(t))),
                None => {}
            }
        }
        if let Some(every) = self.engine.config.convergence_of(pc).watch_every {
            let due = plan
                .seen_at
                .map(|t| crate::schedule::add(t, every))
                .unwrap_or(now);
            let due = plan.watch_retry_at.map_or(due, |r| due.max(r));
            cands.push((due, Job::Watch));
        }
        let earliest_rotation = {
            let mut t = plan.retry_at.unwrap_or(now);
            if let (Some(last), Some(min)) =
                (plan.last_success, schedule.and_then(|s| s.min_interval))
            {
                t = t.max(crate::schedule::add(last, min));
            }
            t
        };
        let job = cands
            .into_iter()
            .map(|(t, j)| match j {
                Job::Watch | Job::Settle => (t, j),
                _ => (t.max(earliest_rotation), j),
            })
            .min_by_key(|(t, _)| *t);
        Next {
            job,
            silent_fp,
            skip_fires,
        }
    }

    /// Starts every job that is due; returns when the next one is.
    async fn plan_and_start(&mut self) -> Option<DateTime<Utc>> {
        let now = Utc::now();
        let mut next: Option<DateTime<Utc>> = None;
        let mut to_start = Vec::new();
        let mut silent = Vec::new();
        let mut skipped = Vec::new();
        let mut names: Vec<String> = self.plans.keys().cloned().collect();
        names.sort();
        for name in names {
            if self.in_flight.contains(&name) {
                continue;
            }
            let Next {
                job,
                silent_fp,
                skip_fires,
            } = self.next_job(&name, &self.plans[&name], now);
            if let Some(fp) = silent_fp {
                silent.push((name.clone(), fp));
            }
            if skip_fires {
                skipped.push(name.clone());
            }
            match job {
                Some((t, job)) if t <= now => to_start.push((name, job)),
                Some((t, _)) => {
                    self.engine
                        .metrics
                        .next_rotation(&name, Some(t.timestamp()));
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
                None => self.engine.metrics.next_rotation(&name, None),
            }
        }
        let mut writes = Vec::new();
        for (name, fp) in silent {
            if let Some(p) = self.plans.get_mut(&name) {
                p.entry_fp = Some(fp.clone());
            }
            writes.push((name, Some(fp), None));
        }
        for name in skipped {
            tracing::info!(portal = %name, "fire times missed while down are skipped (catch_up = false)");
            if let Some(p) = self.plans.get_mut(&name) {
                p.last_fire_at = Some(now);
            }
            writes.push((name, None, Some(now)));
        }
        self.persist_many(writes).await;
        for (name, job) in to_start {
            self.start(name, job);
        }
        if let Some(t) = self.delivery_due().await {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        next
    }

    /// Retries pending deliveries whose backoff has expired; returns when the next one is due.
    async fn delivery_due(&mut self) -> Option<DateTime<Utc>> {
        let store = self.engine.store.clone()?;
        if self.delivering {
            return None;
        }
        let due = store
            .call(|c| state::next_delivery_due(c))
            .await
            .ok()
            .flatten()?;
        let due_at = ms_to_time(Some(due))?;
        if due_at > Utc::now() {
            return Some(due_at);
        }
        let now = Utc::now().timestamp_millis();
        let portals: Vec<String> = store
            .call(move |c| {
                Ok(state::pending(c, None, Some(now))?
                    .into_iter()
                    .map(|e| e.portal)
                    .collect::<Vec<_>>())
            })
            .await
            .unwrap_or_default();
        let portals: Vec<String> = portals
            .into_iter()
            .filter(|p| !self.in_flight.contains(p))
            .collect();
        if portals.is_empty() {
            return Some(crate::schedule::add(Utc::now(), Duration::from_secs(1)));
        }
        self.delivering = true;
        let engine = self.engine.clone();
        let tx = self.done_tx.clone();
        self.tracker.spawn(async move {
            for p in portals {
                match rotation::deliver_due(&engine, &p, now).await {
                    Ok((d, left)) => tracing::info!(portal = %p, delivered = d, pending = left, "retried pending deliveries"),
                    Err(e) => tracing::warn!(portal = %p, error = %e, "retrying deliveries failed"),
                }
            }
            rotation::alerts::check(&engine).await;
            let _ = tx.send(Done { portal: String::new(), job: Job::Watch, ok: true, unused: None });
        });
        None
    }

    fn start(&mut self, name: String, job: Job) {
        self.in_flight.insert(name.clone());
        let engine = self.engine.clone();
        let permits = self.permits.clone();
        let tx = self.done_tx.clone();
        tracing::info!(portal = %name, reason = ?job, "due");
        self.tracker.spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await;
            let (ok, unused) = match &job {
                Job::Watch => {
                    let (w, unused) = rotation::drift::watch(&engine, &name).await;
                    (w != rotation::drift::Watched::Failed, unused)
                }
                Job::Settle => {
                    // Only a found set counts as a rotation done (it consumes the change
                    // and fire times a rotation would); "still open" and "not applied"
                    // leave the portal's plans as they were.
                    match rotation::recover(&engine, &name).await {
                        Ok(r) => (r.outcome.issued_a_set(), r.unused),
                        Err(e) => {
                            tracing::warn!(portal = %name, error = %e, "settling failed");
                            (false, None)
                        }
                    }
                }
                _ => {
                    let r = rotation::rotate(&engine, &name, false).await;
                    // Only a set issued counts as done: a skip (stopping, min_interval) or a
                    // failure leaves the portal due.
                    (r.outcome.issued_a_set(), r.unused)
                }
            };
            rotation::alerts::check(&engine).await;
            let _ = tx.send(Done {
                portal: name,
                job,
                ok,
                unused,
            });
        });
    }

    async fn finish(&mut self, done: Done) {
        if done.portal.is_empty() {
            self.delivering = false;
            return;
        }
        self.in_flight.remove(&done.portal);
        let now = Utc::now();
        let rows = self.rows().await.unwrap_or_default();
        let settle_at = self.settle_times().await.remove(&done.portal);
        let dry = self.engine.dry_run;
        let Some(plan) = self.plans.get_mut(&done.portal) else {
            return;
        };
        plan.settle_at = settle_at;
        if let Some(row) = rows.iter().find(|r| r.name == done.portal) {
            let fresh = Plan::from_row(row);
            plan.last_success = fresh.last_success;
            plan.retry_at = fresh.retry_at;
            plan.seen_at = fresh.seen_at;
        }
        if dry {
            // Nothing is stored in a dry run: remember in memory what a real run would have.
            plan.seen_at = Some(now);
            plan.retry_at = (!done.ok).then(|| crate::schedule::add(now, rotation::backoff(0)));
        }
        let mut fp_to_store = None;
        let mut fire_to_store = None;
        let job = match (&done.job, done.ok) {
            // A settle that found the new set finished a rotation: it consumes the change
            // and the fire times as that rotation would have.
            (Job::Settle, true) => Job::Change(
                self.engine
                    .config
                    .portals
                    .get(&done.portal)
                    .map(|pc| self.engine.entry_fingerprint(pc))
                    .unwrap_or_default(),
            ),
            (j, _) => j.clone(),
        };
        let Some(plan) = self.plans.get_mut(&done.portal) else {
            return;
        };
        match (&job, done.ok) {
            (Job::Change(fp), true) => {
                plan.entry_fp = Some(fp.clone());
                fp_to_store = Some(fp.clone());
                // A rotation also satisfies a fire time that came due meanwhile.
                plan.last_fire_at = Some(now);
                fire_to_store = Some(now);
            }
            (Job::Fire(t), true) => {
                tracing::debug!(portal = %done.portal, fire = %t, "fire time handled");
                // Every fire time up to now is consumed: a catch-up runs once.
                plan.last_fire_at = Some(now);
                fire_to_store = Some(now);
            }
            (Job::Watch, ok) => {
                if ok {
                    plan.watch_failures = 0;
                    plan.watch_retry_at = None;
                    if dry {
                        plan.seen_at = Some(now);
                    }
                } else {
                    plan.watch_failures += 1;
                    plan.watch_retry_at = Some(crate::schedule::add(
                        now,
                        rotation::backoff(plan.watch_failures),
                    ));
                }
            }
            _ => {}
        }
        if let Some(u) = done.unused {
            self.engine.metrics.unused(&done.portal, u);
        }
        if fp_to_store.is_some() || fire_to_store.is_some() {
            self.persist(&done.portal, fp_to_store, fire_to_store).await;
        }
    }

    async fn reload(&mut self) {
        self.notifier.send(Note::Reloading);
        let started = std::time::Instant::now();
        let result = config::load(&self.path)
            .map_err(|e| e.errors)
            .and_then(|c| self.engine.reconfigured(Arc::new(c)));
        // A config that would strand an open intent or pending codes is refused like an
        // invalid one: the old config, which still names them, stays in force.
        let result = match result {
            Ok(engine) if !self.engine.dry_run => match rotation::stranded_work(&engine).await {
                Ok(stranded) if !stranded.is_empty() => Err(stranded
                    .into_iter()
                    .map(|s| engine.config.issue(None, "portals", s))
                    .collect()),
                _ => Ok(engine),
            },
            other => other,
        };
        match result {
            Ok(engine) => {
                let n = engine.config.portals.len();
                self.engine = engine;
                if let Err(e) = self.load_plans().await {
                    tracing::error!(error = %e, "reading the state after a reload");
                }
                self.engine.metrics.reload(true);
                tracing::info!(
                    portals = n,
                    took_ms = started.elapsed().as_millis() as u64,
                    "configuration reloaded"
                );
            }
            Err(issues) => {
                self.engine.metrics.reload(false);
                for i in &issues {
                    tracing::error!(error = %i, "invalid configuration");
                }
                tracing::error!(
                    errors = issues.len(),
                    "the new configuration is invalid; the old one stays in force"
                );
            }
        }
        self.notifier.send(Note::Ready(format!(
            "{} portal(s)",
            self.engine.config.portals.len()
        )));
    }
}
