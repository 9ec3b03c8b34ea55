//! The daemon: asks the planner when each portal is next due and why, keeps the
//! answers in an agenda (a priority queue), sleeps until the earliest, and runs what is due
//! through the rotation protocol within the limits (`max_concurrent` in all, `max_per_host`
//! per portal host, a host paused after a 429). It reloads its config on a file change or
//! SIGHUP.
//!
//! The rules live in [`crate::schedule::plan`]; this module only feeds them events and runs
//! what they return. An event re-plans only the portal it touches: a finished job hands
//! back the portal's row as its last write left it (read in that write's transaction; a job
//! that does not, a watch or a settle, has the row read again), so a start over 10,000
//! portals costs one plan each, not one per finished job. Right before a rotation starts, the portal's row
//! is read and planned once more, so a `rotate` by hand meanwhile is never repeated. The
//! planner's answers are stored with each portal (`next_due_at`, `next_reason`).
//!
//! Liveness: the watchdog is pinged from this loop, which never sleeps longer than half of
//! `WATCHDOG_USEC`; `/healthz` answers 503 once the loop is more than a few seconds past the
//! wake-up it planned. Idle means asleep until the earliest due time: there is no polling.
//!
//! On SIGTERM/SIGINT the daemon stops planning and cancels the engine's stop token: queued
//! rotations leave without a request; a rotation past its intent gets `stop_timeout` to
//! seal (a PUT still without an answer stays an open intent, settled at the next start).
//! Nothing is recorded as done that did not happen, so a portal that was due stays due.

pub mod agenda;
pub mod alerts;
pub mod notify;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config;
use crate::coordinator::Role;
use crate::errors::Exit;
use crate::rotation::{self, Engine, Outcome, Skip, drift::Watched};
use crate::schedule::plan::{self, Due, Known, Reason};
use crate::state;
use agenda::Agenda;
use alerts::AlertChecks;
use notify::{Note, Notifier};

/// What a background job tells the loop when it ends.
enum Event {
    /// A portal's job (rotation, settle, watch) ended.
    Job(Box<Done>),
    /// A round of delivery retries ended.
    DeliveriesRetried,
}

/// A finished portal job.
struct Done {
    /// The portal.
    portal: String,
    /// Why it ran.
    reason: Reason,
    /// What happened.
    outcome: Outcome,
    /// Unused codes seen.
    unused: Option<usize>,
    /// What the job left in the state, when it says (no read-back then).
    after: Option<rotation::StateAfter>,
}

struct Supervisor {
    path: PathBuf,
    notifier: Notifier,
    engine: Engine,
    /// Per configured portal: what the planner knows (the state's rows; only memory in a
    /// dry run, which writes nothing).
    known: HashMap<String, Known>,
    /// Entry fingerprints of the config in force, computed once per load.
    fps: HashMap<String, String>,
    agenda: Agenda,
    in_flight: HashSet<String>,
    watch_failures: HashMap<String, i64>,
    delivering: bool,
    started: DateTime<Utc>,
    once: bool,
    failed: usize,
    /// Plans to store, batched: every job finished in one turn of the loop shares a commit.
    dirty: Vec<PlanWrite>,
    /// The spool needs counting again (after a round of delivery retries).
    count_pending: bool,
    /// Payloads waiting per portal: counted at start, on reload and after delivery rounds,
    /// and otherwise kept from what each job says it left.
    pending: HashMap<String, i64>,
    /// In a cluster: portals another instance held at their turn, not tried before then.
    held: HashMap<String, DateTime<Utc>>,
    /// In a cluster: the config in force, for the instance's heartbeat.
    running: Arc<std::sync::Mutex<Arc<config::Config>>>,
    tracker: TaskTracker,
    done_tx: mpsc::UnboundedSender<Event>,
    /// Asks the background for a look at due `[alerts]` notices.
    alerts: AlertChecks,
    /// The config watch, moved to the new `include` directories by a reload.
    follow: Option<watch::Follow>,
}

/// What planning decided that the state should remember.
struct PlanWrite {
    portal: String,
    /// No entry was recorded for it yet (a new portal, most likely without a row: one is
    /// added first, rather than after an update that found none).
    fresh: bool,
    adopt_fp: Option<String>,
    consume_fires_to: Option<i64>,
    due: Option<Due>,
    watch_retry_at: Option<i64>,
}

/// Runs the daemon on `engine` (built from the config at `path`) until `shutdown` is
/// cancelled; with `once`, does what is due now and returns (`run --once`).
pub async fn run(engine: Engine, path: &Path, once: bool, shutdown: CancellationToken) -> Exit {
    let started_at = std::time::Instant::now();
    let mut engine = engine;
    engine.coordinator = engine.coordinator.clone().with_role(Role::Daemon);
    crate::state::history::act_as(format!("daemon:{}", instance_name(&engine)));
    // A SIGTERM stops new rotations at once, in every job, not only once the loop notices.
    engine.stopping = shutdown.child_token();
    // The config in force was loaded now: its time, not 0 (1970 to a dashboard).
    engine.metrics.reload(true);
    let mut background = Background::new(shutdown.child_token());
    if let Err(exit) = background.serve_metrics(&engine).await {
        return exit;
    }
    let start_failures = match converge_at_start(&engine, path).await {
        Ok(n) => n,
        Err(exit) => {
            background.stop().await;
            return exit;
        }
    };
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let alerts = background.check_alerts();
    let mut sup = Supervisor::new(path, engine, once, start_failures, done_tx, alerts);
    if let Err(e) = sup.load().await {
        crate::err!("error: {e}");
        background.stop().await;
        return Exit::Failed;
    }
    sup.check_generation().await;
    background.track(
        "cluster heartbeat",
        sup.engine
            .coordinator
            .spawn_heartbeat(sup.running.clone(), background.stop.clone()),
    );
    if let (false, Some(store)) = (sup.engine.dry_run, sup.engine.store.clone()) {
        background.track(
            "audit upkeep",
            Some(tokio::spawn(audit_upkeep(
                store,
                sup.running.clone(),
                once,
                background.stop.clone(),
            ))),
        );
    }
    let planned = std::time::Instant::now();
    sup.replan_all().await;
    tracing::info!(
        portals = sup.known.len(),
        took_ms = planned.elapsed().as_millis() as u64,
        "planned"
    );
    let reload_rx = background.watch_config(&sup.engine.config);
    sup.follow = background.watcher.clone();
    sup.announce_ready(started_at);
    let done_rx = sup.main_loop(&shutdown, done_rx, reload_rx).await;
    let exit = sup.stop(done_rx).await;
    background.stop().await;
    exit
}

/// At start, before anything is planned: refuses a config that would strand work the state
/// holds (exit 78), settles and delivers what earlier processes left, and converges the
/// drift of what was just finished and of intents closed lately (a PUT may have been
/// applied after all, SPEC §6). A dry run does the same reads against the state opened
/// read-only and reports what a real start would converge. Returns how many failed.
async fn converge_at_start(engine: &Engine, path: &Path) -> Result<usize, Exit> {
    if engine.dry_run {
        let pending = rotation::portals_with_pending_work(engine)
            .await
            .unwrap_or_default();
        let mut failures = 0;
        for r in rotation::drift::converge_recent(engine, &pending).await {
            tracing::warn!(portal = %r.portal, outcome = r.outcome.as_str(), "{}", r.message);
            failures += usize::from(r.is_failure());
        }
        return Ok(failures);
    }
    rotation::restore_pauses(engine).await;
    if let Err(e) = rotation::webhooks::sync(engine).await {
        tracing::error!(error = %e, "could not bring the webhook cursors in line with the config");
    }
    match rotation::stranded_work(engine).await {
        Ok(stranded) if !stranded.is_empty() => {
            for s in &stranded {
                crate::err!("error: {}: {s}", path.display());
            }
            crate::err!(
                "error: the configuration would drop work the state holds ({} problem(s)); nothing was started",
                stranded.len()
            );
            return Err(Exit::Config);
        }
        Ok(_) => {}
        Err(e) => {
            crate::err!("error: {e}");
            return Err(Exit::Failed);
        }
    }
    let mut reports = rotation::recover_all(engine).await;
    let worked: Vec<String> = reports.iter().map(|r| r.portal.clone()).collect();
    reports.extend(rotation::drift::converge_recent(engine, &worked).await);
    for r in &reports {
        tracing::info!(portal = %r.portal, outcome = r.outcome.as_str(), "{}", r.message);
    }
    Ok(reports.iter().filter(|r| r.is_failure()).count())
}

/// The daemon's tasks beside its loop (the metrics listener, the cluster heartbeat, the
/// config watcher, SIGHUP): each one tracked, stopped and awaited at stop, so none outlives
/// the daemon nor is cut short in the middle of a write.
struct Background {
    stop: CancellationToken,
    tasks: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
    /// Kept alive while watching; dropped at stop.
    watcher: Option<watch::Follow>,
}

impl Background {
    fn new(stop: CancellationToken) -> Self {
        Self {
            stop,
            tasks: Vec::new(),
            watcher: None,
        }
    }

    fn track(&mut self, name: &'static str, task: Option<tokio::task::JoinHandle<()>>) {
        if let Some(t) = task {
            self.tasks.push((name, t));
        }
    }

    /// Listens on `daemon.metrics`, if set; a port that cannot be bound fails the start.
    async fn serve_metrics(&mut self, engine: &Engine) -> Result<(), Exit> {
        let Some(addr) = engine.config.daemon.metrics else {
            return Ok(());
        };
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                crate::err!("error: daemon.metrics: listening on {addr}: {e}");
                return Err(Exit::Failed);
            }
        };
        let (stop, m) = (self.stop.clone(), engine.metrics.clone());
        self.track(
            "metrics listener",
            Some(tokio::spawn(async move {
                let stopped = async move { stop.cancelled().await };
                if let Err(e) = crate::metrics::serve(listener, m, stopped).await {
                    tracing::error!(error = %e, "the metrics listener stopped");
                }
            })),
        );
        tracing::info!(%addr, "metrics on /metrics, health on /healthz");
        Ok(())
    }

    /// Starts the task that looks for due `[alerts]` notices when asked; it looks a last
    /// time at stop, after the jobs.
    fn check_alerts(&mut self) -> AlertChecks {
        let (checks, task) = AlertChecks::spawn(self.stop.clone());
        self.track("alert checks", Some(task));
        checks
    }

    /// Watches the config file and the directories it includes from, and listens for
    /// SIGHUP; each says "reload" on the channel.
    fn watch_config(&mut self, config: &config::Config) -> mpsc::Receiver<()> {
        let (reload_tx, reload_rx) = mpsc::channel::<()>(4);
        match watch::spawn(
            &config.path,
            &config.include_dirs,
            reload_tx.clone(),
            self.stop.clone(),
        ) {
            Ok((w, task)) => {
                self.watcher = Some(w);
                self.track("config watcher", Some(task));
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP")
            }
        }
        let stop = self.stop.clone();
        self.track(
            "SIGHUP listener",
            Some(tokio::spawn(async move {
                use tokio::signal::unix::{SignalKind, signal};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        got = hup.recv() => match got {
                            Some(()) => { let _ = reload_tx.send(()).await; }
                            None => return,
                        },
                    }
                }
            })),
        );
        reload_rx
    }

    /// Stops every task and waits for each to end.
    async fn stop(mut self) {
        self.stop.cancel();
        drop(self.watcher.take());
        for (name, task) in self.tasks {
            if let Err(e) = task.await
                && e.is_panic()
            {
                tracing::error!(task = name, "a background task panicked");
            }
        }
    }
}

impl Supervisor {
    fn new(
        path: &Path,
        engine: Engine,
        once: bool,
        failed: usize,
        done_tx: mpsc::UnboundedSender<Event>,
        alerts: AlertChecks,
    ) -> Self {
        Self {
            path: path.to_path_buf(),
            notifier: Notifier::start(),
            running: Arc::new(std::sync::Mutex::new(engine.config.clone())),
            engine,
            known: HashMap::new(),
            fps: HashMap::new(),
            agenda: Agenda::default(),
            in_flight: HashSet::new(),
            watch_failures: HashMap::new(),
            delivering: false,
            started: Utc::now(),
            once,
            failed,
            dirty: Vec::new(),
            count_pending: false,
            pending: HashMap::new(),
            held: HashMap::new(),
            tracker: TaskTracker::new(),
            done_tx,
            alerts,
            follow: None,
        }
    }

    /// Tells systemd (READY=1 and a status line) and the log that the daemon is ready.
    fn announce_ready(&self, started_at: std::time::Instant) {
        self.engine.metrics.alive.store(true, Ordering::SeqCst);
        self.engine
            .metrics
            .recipient_expiries(&self.engine.sinks.expiries());
        let dry_run = self.engine.dry_run;
        let status = format!(
            "{} portal(s){}{}{}",
            self.engine.config.portals.len(),
            if dry_run { ", dry run" } else { "" },
            unreadable_secrets(&self.engine),
            self.stale_config_note()
        );
        self.notifier.send(Note::Ready(status));
        tracing::info!(
            portals = self.engine.config.portals.len(),
            dry_run,
            ready_ms = started_at.elapsed().as_millis() as u64,
            "ready"
        );
    }

    /// The loop: starts what is due, sleeps until the next due time, a finished job, a
    /// reload or the stop. Returns the job channel, for the jobs still running at stop.
    async fn main_loop(
        &mut self,
        shutdown: &CancellationToken,
        mut done_rx: mpsc::UnboundedReceiver<Event>,
        mut reload_rx: mpsc::Receiver<()>,
    ) -> mpsc::UnboundedReceiver<Event> {
        let watchdog = sd_notify::watchdog_enabled();
        let mut last_ping = std::time::Instant::now();
        loop {
            self.start_due(Utc::now());
            if self.once && self.in_flight.is_empty() {
                break;
            }
            let next_delivery = if self.once {
                None
            } else {
                self.delivery_due().await
            };
            let next = match (self.agenda.next_at(), next_delivery) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let mut wait = next.map(|t| plan::wait(Utc::now(), t));
            if let Some(wd) = watchdog {
                // Pinged from here, so a stuck loop stops pinging; never asleep past half.
                if last_ping.elapsed() >= wd / 4 {
                    self.notifier.send(Note::Watchdog);
                    last_ping = std::time::Instant::now();
                }
                wait = Some(wait.map_or(wd / 2, |w| w.min(wd / 2)));
            }
            self.engine
                .metrics
                .planned_wake(wait.map(|w| crate::schedule::add(Utc::now(), w)));
            let sleep = async {
                match wait {
                    Some(w) => tokio::time::sleep(w).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(()) = reload_rx.recv() => self.reload().await,
                Some(done) = done_rx.recv() => {
                    self.finish(done).await;
                    // Whatever else finished meanwhile shares this turn (and its commit).
                    while let Ok(more) = done_rx.try_recv() {
                        self.finish(more).await;
                    }
                }
                () = sleep => {}
            }
            self.flush().await;
        }
        done_rx
    }

    /// Stops: no new rotations; those in flight get `stop_timeout`; what the last jobs did
    /// is recorded. Exit 1 for `--once` when a job failed.
    async fn stop(&mut self, mut done_rx: mpsc::UnboundedReceiver<Event>) -> Exit {
        if !self.once {
            tracing::info!(
                in_flight = self.in_flight.len(),
                "stopping: no new rotations; those past their intent get stop_timeout to seal"
            );
            self.notifier.send(Note::Stopping);
        }
        self.engine.stopping.cancel();
        self.tracker.close();
        let stop_timeout = self.engine.config.daemon.stop_timeout;
        if tokio::time::timeout(stop_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                stop_timeout_s = stop_timeout.as_secs(),
                "rotations still in flight at stop_timeout; a PUT without an answer stays an open intent, settled at the next start"
            );
        }
        // Record what the last jobs did (a failed watch, the plan): nothing else is lost,
        // since every rotation wrote its own outcome before it said so.
        while let Ok(done) = done_rx.try_recv() {
            self.finish(done).await;
        }
        self.flush().await;
        self.engine.metrics.alive.store(false, Ordering::SeqCst);
        self.notifier.flush().await;
        tracing::info!("stopped");
        if self.once && self.failed > 0 {
            Exit::Failed
        } else {
            Exit::Ok
        }
    }

    /// Reads what the state knows of every configured portal (one query for all), and fills
    /// the per-portal metrics from it, so they are right from the first scrape.
    async fn load(&mut self) -> Result<(), state::StateError> {
        self.fps = self
            .engine
            .config
            .portals
            .values()
            .map(|pc| (pc.name.clone(), self.engine.entry_fingerprint(pc)))
            .collect();
        // A dry run plans from the state read-only, so it says what a real run would do.
        let (rows, open) = match self.engine.reader() {
            Some(s) => {
                s.call(|c| Ok((state::portal_rows(c)?, state::open_journal(c, None)?)))
                    .await?
            }
            None => (Vec::new(), Vec::new()),
        };
        let rows: HashMap<&str, &state::PortalRow> =
            rows.iter().map(|r| (r.name.as_str(), r)).collect();
        let mut by_portal: HashMap<&str, Vec<&state::OpenJournal>> = HashMap::new();
        for j in &open {
            by_portal.entry(j.portal.as_str()).or_default().push(j);
        }
        let mut known = HashMap::with_capacity(self.engine.config.portals.len());
        for name in self.engine.config.portals.keys() {
            let row = rows.get(name.as_str()).copied();
            // A portal kept across a reload keeps its in-memory view in a dry run.
            let k = match (self.engine.store.is_some(), self.known.remove(name)) {
                (false, Some(k)) => k,
                _ => rotation::known_from(
                    row,
                    by_portal
                        .get(name.as_str())
                        .and_then(|o| rotation::settled_by(o.iter().copied())),
                    Utc::now(),
                ),
            };
            self.engine.metrics.restore(
                name,
                row.and_then(|r| r.last_success_at),
                row.and_then(|r| r.unused),
                row.map_or(0, |r| r.drifts),
            );
            known.insert(name.clone(), k);
        }
        self.known = known;
        let keep: HashSet<String> = self.known.keys().cloned().collect();
        self.agenda.retain(|p| keep.contains(p));
        self.refresh_pending().await;
        Ok(())
    }

    /// Plans every portal (at start and after a reload); one commit for what to store.
    async fn replan_all(&mut self) {
        let names: Vec<String> = self
            .known
            .keys()
            .filter(|n| !self.in_flight.contains(*n))
            .cloned()
            .collect();
        let writes: Vec<PlanWrite> = names.iter().filter_map(|n| self.replan(n)).collect();
        self.persist(writes).await;
    }

    /// Asks the planner about one portal and puts the answer on the agenda; returns what
    /// the state should remember.
    fn replan(&mut self, name: &str) -> Option<PlanWrite> {
        let pc = self.engine.config.portals.get(name)?;
        let fp = self.fps.get(name)?;
        let k = self.known.get_mut(name)?;
        let now = Utc::now();
        let mut p = plan::plan(
            &rotation::policy_of(
                &self.engine.config,
                pc,
                fp,
                self.engine.coordinator.follows_changes(),
            ),
            k,
            &plan::Now {
                now,
                started: self.started,
                once: self.once,
            },
        );
        if let (Some(d), Some(h)) = (p.due.as_mut(), self.held.get(name)) {
            d.at = d.at.max(*h);
        }
        let fresh = k.entry_fp.is_none();
        if let Some(fp) = &p.adopt_fp {
            k.entry_fp = Some(fp.clone());
        }
        if let Some(t) = p.consume_fires_to {
            k.last_fire_at = Some(k.last_fire_at.map_or(t, |l| l.max(t)));
        }
        let metrics = &self.engine.metrics;
        match p.due {
            Some(d) if d.reason.rotates() => {
                metrics.next_rotation(name, Some(d.at.timestamp()));
                metrics.next_check(name, None);
            }
            Some(d) => {
                metrics.next_check(name, Some(d.at.timestamp()));
                let next_rotation = plan::upcoming_rotations(
                    &rotation::policy_of(
                        &self.engine.config,
                        pc,
                        fp,
                        self.engine.coordinator.follows_changes(),
                    ),
                    k,
                    now,
                    1,
                );
                metrics.next_rotation(name, next_rotation.first().map(|t| t.timestamp()));
            }
            None => {
                metrics.next_rotation(name, None);
                metrics.next_check(name, None);
            }
        }
        let write = PlanWrite {
            portal: name.to_string(),
            fresh,
            adopt_fp: p.adopt_fp,
            consume_fires_to: p.consume_fires_to.map(|t| t.timestamp_millis()),
            due: p.due,
            watch_retry_at: k.watch_retry_at.map(|t| t.timestamp_millis()),
        };
        self.agenda.set(name, p.due);
        Some(write)
    }

    /// Stores plans in one commit (nothing in a dry run).
    async fn persist(&self, mut writes: Vec<PlanWrite>) {
        let Some(store) = self.engine.store.clone() else {
            return;
        };
        if writes.is_empty() {
            return;
        }
        // In one order for every instance: two instances writing the same rows in orders of
        // their own would deadlock each other in PostgreSQL.
        writes.sort_by(|a, b| a.portal.cmp(&b.portal));
        let r = store
            .write(move |c| {
                // New portals' rows come with their plans, many per statement.
                let fresh: Vec<state::NewPlan<'_>> = writes
                    .iter()
                    .filter(|w| w.fresh)
                    .map(|w| state::NewPlan {
                        portal: &w.portal,
                        entry_fp: w.adopt_fp.as_deref(),
                        last_fire_at: w.consume_fires_to,
                        next_due_at: w.due.map(|d| d.at.timestamp_millis()),
                        reason: w.due.map(|d| d.reason.name()),
                        watch_retry_at: w.watch_retry_at,
                    })
                    .collect();
                let added = state::insert_plans(c, &fresh)?;
                for w in &writes {
                    if w.fresh && added.contains(&w.portal) {
                        continue;
                    }
                    let (due_at, reason) = (
                        w.due.map(|d| d.at.timestamp_millis()),
                        w.due.map(|d| d.reason.name()),
                    );
                    if w.adopt_fp.is_some() || w.consume_fires_to.is_some() {
                        state::record_plan_and_schedule(
                            c,
                            &w.portal,
                            w.adopt_fp.as_deref(),
                            w.consume_fires_to,
                            due_at,
                            reason,
                            w.watch_retry_at,
                        )?;
                    } else {
                        state::record_plan(c, &w.portal, due_at, reason, w.watch_retry_at)?;
                    }
                }
                Ok(())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "could not record the plan");
        }
    }

    /// In a cluster: whether this instance runs the newest config generation; an older one
    /// does not act on changed entries (a rolling change cannot ping-pong), and says so.
    async fn check_generation(&self) {
        if let Err(e) = self
            .engine
            .coordinator
            .refresh_generation(&self.engine.config)
            .await
        {
            tracing::error!(error = %e, "reading the config generations");
        }
    }

    /// The tail of systemd's status line while the config is not the newest generation.
    fn stale_config_note(&self) -> &'static str {
        if self.engine.coordinator.follows_changes() {
            ""
        } else {
            "; an older config than another instance's: changed entries wait"
        }
    }

    /// Starts every job that is due by `now`.
    fn start_due(&mut self, now: DateTime<Utc>) {
        for (name, due) in self.agenda.take_due(now) {
            // A portal whose job is still running is planned again when it finishes.
            if !self.in_flight.contains(&name) {
                self.start(name, due);
            }
        }
    }

    fn start(&mut self, name: String, due: Due) {
        self.in_flight.insert(name.clone());
        let engine = self.engine.clone();
        let tx = self.done_tx.clone();
        let fp = self.fps.get(&name).cloned().unwrap_or_default();
        let (started, once) = (self.started, self.once);
        let alerts = self.alerts.clone();
        tracing::info!(
            portal = %name,
            reason = due.reason.name(),
            held = due.held.map(|h| h.describe()),
            "due: {}",
            due.reason.describe()
        );
        self.tracker.spawn(async move {
            // Its records say what set it off (a watch says it itself: drift, unused codes).
            let trigger = trigger_of(due.reason);
            let job = run_job(&engine, &name, due, &fp, started, once);
            let done = match trigger {
                Some(t) => crate::state::history::triggered_by(t, job).await,
                None => job.await,
            };
            if done.outcome != Outcome::Skipped(Skip::Stopping) {
                alerts.request(&engine);
            }
            let _ = tx.send(Event::Job(Box::new(done)));
        });
    }

    async fn finish(&mut self, event: Event) {
        let done = match event {
            Event::Job(done) => *done,
            Event::DeliveriesRetried => {
                self.delivering = false;
                self.count_pending = true;
                return;
            }
        };
        let name = done.portal;
        self.in_flight.remove(&name);
        if done.outcome == Outcome::Failed {
            self.failed += 1;
        }
        if done.outcome == Outcome::Skipped(Skip::Held) {
            // Its holder records what it did; look again once it has had the time to.
            let lease = self
                .engine
                .config
                .storage
                .as_ref()
                .map_or(Duration::from_secs(60), |s| s.lease);
            self.held
                .insert(name.clone(), crate::schedule::add(Utc::now(), lease / 3));
        } else if done.reason == Reason::Settle && done.outcome == Outcome::Failed {
            // Not at once again: an intent has its own schedule, a sealed entry does not.
            self.held.insert(
                name.clone(),
                crate::schedule::add(Utc::now(), rotation::backoff(0)),
            );
        } else {
            self.held.remove(&name);
        }
        if !self.known.contains_key(&name) {
            return; // removed by a reload meanwhile
        }
        let now = Utc::now();
        // The job wrote what happened; read it back (this portal only). A dry run writes
        // nothing: remember in memory what a real run would have. A portal another instance
        // held was not touched: it is read again when its turn comes back.
        let mut k = match &self.engine.store {
            _ if done.outcome == Outcome::Skipped(Skip::Held) => {
                self.known.get(&name).cloned().unwrap_or_default()
            }
            // The job said what it wrote: planned from that, no read-back. A job that does
            // not say (a watch, a settle) has it read again, this portal only.
            Some(store) => {
                let after = match done.after {
                    Some(a) => Ok(a),
                    None => {
                        let p = name.clone();
                        store.call(move |c| rotation::StateAfter::read(c, &p)).await
                    }
                };
                match after {
                    Ok(a) => {
                        self.set_pending(&name, a.pending);
                        rotation::known_from(a.row.as_ref(), rotation::settled_by(&a.open), now)
                    }
                    Err(e) => {
                        tracing::error!(portal = %name, error = %e, "reading the portal's state");
                        self.count_pending = true;
                        self.known.get(&name).cloned().unwrap_or_default()
                    }
                }
            }
            None => {
                let mut k = self.known.get(&name).cloned().unwrap_or_default();
                match done.reason {
                    Reason::Watch => k.seen_at = Some(now),
                    _ if done.outcome == Outcome::WouldRotate => {
                        k.entry_fp = self.fps.get(&name).cloned();
                        k.last_fire_at = Some(now);
                        k.last_success_at = Some(now);
                    }
                    _ => k.retry_at = Some(crate::schedule::add(now, rotation::backoff(0))),
                }
                k
            }
        };
        if done.reason == Reason::Watch {
            if done.outcome == Outcome::Failed {
                let n = self.watch_failures.entry(name.clone()).or_insert(0);
                *n += 1;
                k.watch_retry_at = Some(crate::schedule::add(now, rotation::backoff(*n)));
            } else {
                self.watch_failures.remove(&name);
                k.watch_retry_at = None;
            }
        }
        if let Some(u) = done.unused {
            self.engine.metrics.unused(&name, u);
        }
        self.known.insert(name.clone(), k);
        if !self.once
            && let Some(w) = self.replan(&name)
        {
            self.dirty.push(w);
        }
    }

    /// Records what waits in the spool for `portal` and sets the gauge to the sum.
    fn set_pending(&mut self, portal: &str, n: i64) {
        if n > 0 {
            self.pending.insert(portal.to_string(), n);
        } else {
            self.pending.remove(portal);
        }
        self.engine.metrics.pending.set(self.pending.values().sum());
    }

    /// Stores the plans of this turn in one commit, and counts the spool once.
    async fn flush(&mut self) {
        let writes = std::mem::take(&mut self.dirty);
        self.persist(writes).await;
        if std::mem::take(&mut self.count_pending) {
            self.refresh_pending().await;
        }
    }

    /// Counts the spool per portal and sets the pending-deliveries gauge.
    async fn refresh_pending(&mut self) {
        if let Some(store) = &self.engine.store
            && let Ok(counts) = store.call(|c| state::pending_by_portal(c)).await
        {
            self.pending = counts.into_iter().collect();
            self.engine.metrics.pending.set(self.pending.values().sum());
        }
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
        let due_at = DateTime::from_timestamp_millis(due)?;
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
        let alerts = self.alerts.clone();
        self.tracker.spawn(async move {
            for p in portals {
                if engine.is_stopping() {
                    break;
                }
                match rotation::deliver_due(&engine, &p, now).await {
                    Ok((d, left)) => tracing::info!(portal = %p, delivered = d, pending = left, "retried pending deliveries"),
                    Err(e) => tracing::warn!(portal = %p, error = %e, "retrying deliveries failed"),
                }
            }
            alerts.request(&engine);
            let _ = tx.send(Event::DeliveriesRetried);
        });
        None
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
                if let Some(f) = &self.follow {
                    f.dirs(&engine.config.include_dirs);
                }
                self.engine = engine;
                if !self.engine.dry_run
                    && let Err(e) = rotation::webhooks::sync(&self.engine).await
                {
                    tracing::error!(error = %e, "could not bring the webhook cursors in line with the config");
                }
                self.engine
                    .metrics
                    .recipient_expiries(&self.engine.sinks.expiries());
                if let Err(e) = self.engine.coordinator.register(&self.engine.config).await {
                    tracing::error!(error = %e, "registering the new config generation");
                }
                *self.running.lock().unwrap_or_else(|p| p.into_inner()) =
                    self.engine.config.clone();
                self.check_generation().await;
                if let Err(e) = self.load().await {
                    tracing::error!(error = %e, "reading the state after a reload");
                }
                self.replan_all().await;
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
            "{} portal(s){}{}",
            self.engine.config.portals.len(),
            unreadable_secrets(&self.engine),
            self.stale_config_note()
        )));
    }
}

/// Reports every portal that cannot read a secret it needs: an error line each, the
/// `tfa_rotator_secret_unreadable` gauge, and the tail of systemd's status line (empty
/// when every secret reads).
fn unreadable_secrets(engine: &Engine) -> String {
    let bad = engine.unreadable_secrets();
    for pc in engine.config.portals.values() {
        let why = bad.iter().find(|(p, _)| p == &pc.name);
        engine.metrics.secret_unreadable(&pc.name, why.is_some());
        if let Some((_, why)) = why {
            tracing::error!(portal = %pc.name, error = %why, "a secret cannot be read; this portal fails until it can (fix it, then reload)");
        }
    }
    if bad.is_empty() {
        String::new()
    } else {
        let names: Vec<&str> = bad.iter().map(|(p, _)| p.as_str()).collect();
        format!(
            "; {} cannot read their secrets: {}",
            bad.len(),
            names.join(", ")
        )
    }
}

/// Once a day (and at start): prunes the audit records older than `history_keep`, each
/// portal's leaving a checkpoint, and logs every chain's head, so that an auditor who
/// keeps the journal can detect a rewritten history (SPEC §6). `run --once` does it once.
/// `history_keep` is the config's in force (`running`, which a reload replaces).
async fn audit_upkeep(
    store: crate::state::Store,
    running: Arc<std::sync::Mutex<Arc<config::Config>>>,
    once: bool,
    stop: CancellationToken,
) {
    const DAY: Duration = Duration::from_secs(86_400);
    loop {
        let keep = running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .daemon
            .history_keep;
        let before =
            crate::state::now_ms() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX / 2);
        let label = humantime::format_duration(keep).to_string();
        let pruned = store
            .write(move |c| crate::state::history::prune(c, before, &label))
            .await;
        match pruned {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                records = n,
                "pruned audit records older than history_keep (a checkpoint keeps each chain verifiable)"
            ),
            Err(e) => tracing::error!(error = %e, "could not prune the audit records"),
        }
        match store.call(crate::state::history::heads).await {
            Ok(heads) => {
                for (portal, head) in heads {
                    tracing::info!(%portal, %head, "audit chain head");
                }
            }
            Err(e) => tracing::error!(error = %e, "could not read the audit chain heads"),
        }
        if once {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(DAY) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// This instance's name for the audit record: the cluster's name for it, else the host's.
fn instance_name(engine: &Engine) -> String {
    match engine.store.as_ref().and_then(|s| s.postgres()) {
        Some(pg) => pg.me().to_string(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    }
}

/// What a job's records say set it off.
fn trigger_of(reason: Reason) -> Option<crate::state::history::Trigger> {
    use crate::state::history::Trigger;
    match reason {
        Reason::Settle => Some(Trigger::Settle),
        Reason::New => Some(Trigger::New),
        Reason::Changed => Some(Trigger::Change),
        Reason::Fire(_) => Some(Trigger::Cron),
        Reason::CatchUp(_) => Some(Trigger::CatchUp),
        Reason::Watch => None,
    }
}

/// Runs one due job within the limits. Takes the portal's slot (its host's, then a global
/// one) first; a stop while waiting leaves without a request.
async fn run_job(
    engine: &Engine,
    name: &str,
    due: Due,
    fp: &str,
    started: DateTime<Utc>,
    once: bool,
) -> Done {
    let done = |outcome, unused| Done {
        portal: name.to_string(),
        reason: due.reason,
        outcome,
        unused,
        after: None,
    };
    let Some(_slot) = engine.slot(name).await else {
        return done(Outcome::Skipped(Skip::Stopping), None);
    };
    // In a cluster the claim comes first: a portal another instance holds costs one
    // statement and is looked at again later; one we hold is re-planned and rotated under it.
    let mut held = None;
    if due.reason.rotates() {
        match engine.coordinator.claim_now(name).await {
            Ok(l) => held = l,
            Err(e) if engine.coordinator.held_elsewhere(&e) => {
                return done(Outcome::Skipped(Skip::Held), None);
            }
            Err(e) => {
                tracing::warn!(portal = name, error = %e, "claiming the portal");
                return done(Outcome::Failed, None);
            }
        }
    }
    if matches!(due.reason, Reason::New | Reason::Changed) {
        // In a cluster a changed entry is acted on only by an instance on the newest config
        // generation; asked now (the claim read it), not at the last heartbeat, since
        // another instance may have just started with a newer one.
        match engine
            .coordinator
            .generation_at_claim(held.as_ref(), &engine.config)
            .await
        {
            Ok(true) => {}
            Ok(false) => return done(Outcome::Skipped(Skip::NotDue), None),
            Err(e) => {
                tracing::warn!(portal = name, error = %e, "reading the config generations");
                return done(Outcome::Failed, None);
            }
        }
    }
    let mut begin = None;
    if due.reason.rotates()
        && let (Some(store), Some(pc)) = (&engine.store, engine.config.portals.get(name))
    {
        // Right before it starts: still due? A `rotate` by hand, or another process, may
        // have done it meanwhile. One that does it after this read is found by the
        // rotation itself, under the portal's lock (the snapshot's clock is its `since`).
        if let Ok((k, snapshot)) = rotation::known_and_now(store, name, held.as_ref()).await {
            begin = Some(snapshot);
            let now = Utc::now();
            let p = plan::plan(
                &rotation::policy_of(&engine.config, pc, fp, engine.coordinator.follows_changes()),
                &k,
                &plan::Now { now, started, once },
            );
            if !p.due.is_some_and(|d| d.at <= now && d.reason.rotates()) {
                tracing::info!(portal = name, "no longer due: done meanwhile");
                return done(Outcome::Skipped(Skip::NotDue), None);
            }
        }
    }
    match due.reason {
        Reason::Settle => match rotation::recover(engine, name).await {
            Ok(r) => done(r.outcome, r.unused),
            Err(e) => {
                tracing::warn!(portal = name, error = %e, "settling failed");
                done(Outcome::Failed, None)
            }
        },
        Reason::Watch => {
            let (w, unused) = rotation::drift::watch(engine, name).await;
            let outcome = match w {
                Watched::Failed => Outcome::Failed,
                Watched::Settling => Outcome::Settling,
                Watched::Rotated => Outcome::Rotated,
                Watched::Converged => Outcome::Resent,
                Watched::Steady | Watched::Flapping => Outcome::Unchanged,
            };
            done(outcome, unused)
        }
        _ => {
            let r = rotation::rotate_held(engine, name, false, begin, held).await;
            Done {
                after: r.after,
                ..done(r.outcome, r.unused)
            }
        }
    }
}
