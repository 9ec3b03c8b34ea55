//! The rotation of one portal (SPEC §4), and recovery of whatever a crash left behind.
//!
//! The guarantee: **no set of codes the portal issued is ever lost.** The codes a PUT returns
//! are the only copy, so each step keeps the guarantee as follows:
//! 1. *Preflight* (GET the codes and the account, preflight every sink) has no side effects;
//!    a failure means no rotation.
//! 2. *Intent*: a journal row with the fingerprint of the set seen in step 1 is committed
//!    (fsync'd) before the PUT. From here on, any process that finds the row settles it.
//! 3. *Rotate*: one PUT, never retried. If its answer is lost or bad, a GET decides: a set
//!    that differs from the intent's fingerprint is the new one; the same set means the PUT
//!    did not happen. If even the GET fails, the intent stays open for the next process.
//! 4. *Seal*: every sink's payload is built (encrypted) and all are committed to the spool
//!    in one transaction with the journal's `sealed` mark; the plain text is dropped. If
//!    sealing fails, the intent stays open: the portal still holds the set, and the next
//!    process reads it again by GET.
//! 5. *Deliver*: each payload, retried with capped exponential backoff across restarts; a
//!    payload leaves the spool only when delivered, or when a newer set for the same portal
//!    and sink has been delivered.
//! 6. *Done*: the outcome is recorded.
//!
//! Every command first runs [`recover`] for the portals it touches: open intents are settled
//! by a GET, sealed payloads are delivered. The portal's lock is held throughout, so no two
//! processes ever rotate one portal at once.

pub mod alerts;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rand::Rng;
use serde::Serialize;

use crate::config::{Config, ConfigIssue, PortalConfig};
use crate::docspace::{Account, ApiError, HttpClient, Portal};
use crate::secret::CodeSet;
use crate::sinks::{Delivery, SinkError, Sinks};
use crate::state::{self, StateError, Store, now_ms};

/// How long a command waits for another process to release a portal.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// A rotation or delivery step failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The portal answered with an error, or not at all.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A sink failed its preflight or could not seal.
    #[error("portal {portal}: {source}")]
    Sink {
        /// The portal.
        portal: String,
        /// The sink failure.
        source: SinkError,
    },
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The API key could not be read.
    #[error("portal {portal}: api_key: {message}")]
    Secret {
        /// The portal.
        portal: String,
        /// Why.
        message: String,
    },
    /// Something else, described.
    #[error("portal {portal}: {message}")]
    Other {
        /// The portal.
        portal: String,
        /// What happened.
        message: String,
    },
}

impl RotationError {
    /// When the portal asked us to come back, if it did.
    fn retry_after(&self) -> Option<Duration> {
        match self {
            RotationError::Api(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Everything a rotation needs: the config, built sinks, the store, the HTTP pool.
#[derive(Clone)]
pub struct Engine {
    /// The config in force.
    pub config: Arc<Config>,
    /// Its sinks, built.
    pub sinks: Sinks,
    /// The state store; absent in a dry run, which must not touch it.
    pub store: Option<Store>,
    /// The HTTP connection pool.
    pub http: HttpClient,
    /// Only read; never PUT, deliver or write the state.
    pub dry_run: bool,
    /// Counters and gauges, served by the daemon.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set when the process is stopping: a rotation not yet at its intent does not start;
    /// one past it finishes (PUT, seal, one delivery attempt).
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Building an engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Keys or recipients in the config are unusable (exit 78).
    #[error("the configuration is invalid")]
    Config(Vec<ConfigIssue>),
    /// The state could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
}

impl Engine {
    /// Builds sinks, the HTTP client and opens the state (read-only for a dry run).
    pub fn new(config: Arc<Config>, dry_run: bool) -> Result<Self, EngineError> {
        let sinks = crate::sinks::build(&config).map_err(EngineError::Config)?;
        let http = HttpClient::new(config.daemon.http_timeout);
        // A dry run reads nothing from the state, and even a read-only SQLite open of a WAL
        // database creates its -wal and -shm files: so it does not open the state at all.
        let store = if dry_run {
            None
        } else {
            Some(Store::open(&config.daemon.state_dir)?)
        };
        Ok(Self {
            config,
            sinks,
            store,
            http,
            dry_run,
            metrics: Default::default(),
            stopping: Default::default(),
        })
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn store(&self) -> Result<&Store, StateError> {
        self.store.as_ref().ok_or_else(|| StateError::Unsafe {
            path: self.config.daemon.state_dir.clone(),
            reason: "is not opened in a dry run".into(),
        })
    }

    /// A fingerprint of what matters to a portal's delivery and identity: its URL, the API
    /// key reference, and each sink's target, recipients and keys. Not secret (it holds no
    /// secret values), so a plain SHA-256.
    pub fn entry_fingerprint(&self, pc: &PortalConfig) -> String {
        use sha2::Digest;
        let mut text = format!("url {}\nkey {}\n", pc.url, pc.api_key.value.describe());
        for s in &pc.sinks {
            let id = self
                .sinks
                .get(s)
                .map(|k| k.identity(&pc.name))
                .unwrap_or_default();
            text.push_str(&format!("sink {s} {id}\n"));
        }
        hex::encode(&sha2::Sha256::digest(text.as_bytes())[..16])
    }

    /// An engine for a new config that shares this one's store, metrics and stop flag (a
    /// reload); its HTTP pool is new, since the timeout may have changed. Fails only on the
    /// config's keys and recipients.
    pub fn reconfigured(&self, config: Arc<Config>) -> Result<Self, Vec<ConfigIssue>> {
        let sinks = crate::sinks::build(&config)?;
        let http = HttpClient::new(config.daemon.http_timeout);
        Ok(Self {
            config,
            sinks,
            store: self.store.clone(),
            http,
            dry_run: self.dry_run,
            metrics: self.metrics.clone(),
            stopping: self.stopping.clone(),
        })
    }

    /// The portal's client, with its API key resolved.
    pub fn portal(&self, pc: &PortalConfig) -> Result<Portal, RotationError> {
        let key = pc
            .api_key
            .value
            .resolve()
            .map_err(|message| RotationError::Secret {
                portal: pc.name.clone(),
                message,
            })?;
        Portal::new(&self.http, &pc.name, pc.url.clone(), key).map_err(|message| {
            RotationError::Other {
                portal: pc.name.clone(),
                message,
            }
        })
    }

    fn portal_config(&self, name: &str) -> Result<&PortalConfig, RotationError> {
        self.config
            .portals
            .get(name)
            .ok_or_else(|| RotationError::Other {
                portal: name.to_string(),
                message: "is not in the configuration".into(),
            })
    }
}

/// What happened to one portal.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The portal.
    pub portal: String,
    /// `rotated`, `skipped`, `would_rotate`, `resent`, `delivered`, `failed`.
    pub outcome: &'static str,
    /// A sentence for people (no secrets).
    pub message: String,
    /// Unused codes in the set now (or seen in the preflight).
    pub unused: Option<usize>,
    /// Codes in the set.
    pub total: Option<usize>,
    /// Payloads delivered in this run.
    pub delivered: usize,
    /// Payloads still waiting.
    pub pending: usize,
    /// The error kind, for failures (`unauthorized`, `sink`, …).
    pub error_kind: Option<String>,
}

impl Report {
    fn new(portal: &str, outcome: &'static str, message: impl Into<String>) -> Self {
        Self {
            portal: portal.to_string(),
            outcome,
            message: message.into(),
            unused: None,
            total: None,
            delivered: 0,
            pending: 0,
            error_kind: None,
        }
    }

    fn failed(portal: &str, e: &RotationError) -> Self {
        let mut r = Self::new(portal, "failed", e.to_string());
        r.error_kind = Some(
            match e {
                RotationError::Api(a) => a.kind_name(),
                RotationError::Sink { .. } => "sink",
                RotationError::State(_) => "state",
                RotationError::Secret { .. } => "secret",
                RotationError::Other { .. } => "other",
            }
            .to_string(),
        );
        r
    }

    /// A rotation task that ended without a report (it panicked): a failure to look into.
    /// Its portal is settled by the next command's recovery like after a crash.
    pub fn lost(portal: &str, why: &str) -> Self {
        let mut r = Self::new(portal, "failed", format!("a rotation task was lost: {why}"));
        r.error_kind = Some("internal".into());
        r
    }

    /// True when the command should exit 1 for this portal.
    pub fn is_failure(&self) -> bool {
        self.outcome == "failed" || self.pending > 0
    }
}

/// Capped exponential backoff with jitter: 30 s, 1 min, 2 min, … up to 1 h, each between
/// 50 % and 100 % of its step so that many portals do not retry in lockstep.
pub fn backoff(attempt: i64) -> Duration {
    let step = 30u64
        .saturating_mul(1u64 << attempt.clamp(0, 7) as u32)
        .min(3600);
    let ms = step * 1000;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

fn fail_point(name: &str) {
    fail::fail_point!(name, |_| ());
    let _ = name;
}

struct Preflight {
    portal: Portal,
    account: Account,
    before_fp: Option<String>,
    unused: usize,
    total: usize,
    /// The set read, kept only when asked (a resend delivers it); a rotation drops the old
    /// set's plain text at once.
    codes: Option<CodeSet>,
}

async fn preflight(
    engine: &Engine,
    pc: &PortalConfig,
    keep_codes: bool,
) -> Result<Preflight, RotationError> {
    let portal = engine.portal(pc)?;
    let (codes, account) = tokio::join!(portal.codes(), portal.account());
    let codes = codes?;
    let account = account?;
    let before_fp = engine
        .store
        .as_ref()
        .map(|s| s.fingerprinter().of_set(&codes));
    let (unused, total) = (codes.unused(), codes.total());
    let codes = keep_codes.then_some(codes);
    for sink_name in &pc.sinks {
        let sink = sink_of(engine, &pc.name, sink_name)?;
        sink.preflight(&pc.name)
            .await
            .map_err(|source| RotationError::Sink {
                portal: pc.name.clone(),
                source,
            })?;
    }
    Ok(Preflight {
        portal,
        account,
        before_fp,
        unused,
        total,
        codes,
    })
}

fn sink_of<'e>(
    engine: &'e Engine,
    portal: &str,
    sink: &str,
) -> Result<&'e Arc<crate::sinks::Sink>, RotationError> {
    engine.sinks.get(sink).ok_or_else(|| RotationError::Other {
        portal: portal.to_string(),
        message: format!("sink {sink} is not configured"),
    })
}

async fn record_failure(engine: &Engine, portal: &str, e: &RotationError) {
    let Ok(store) = engine.store() else { return };
    let wait = e.retry_after().unwrap_or_default();
    let (p, msg) = (portal.to_string(), e.to_string());
    let r = store
        .write(move |c| {
            let failures = state::portal_row(c, &p)?.map(|r| r.failures).unwrap_or(0);
            let retry_at = now_ms() + backoff(failures).max(wait).as_millis() as i64;
            state::record_failure(c, &p, &msg, Some(retry_at))
        })
        .await;
    if let Err(se) = r {
        tracing::error!(portal, error = %se, "could not record a failure");
    }
}

/// Rotates one portal now, after settling what earlier processes left. `force` ignores
/// `min_interval`. In a dry run, does only the read-only steps.
pub async fn rotate(engine: &Engine, name: &str, force: bool) -> Report {
    let report = match rotate_inner(engine, name, force).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(portal = name, error = %e, "rotation failed");
            record_failure(engine, name, &e).await;
            Report::failed(name, &e)
        }
    };
    engine.metrics.rotation(name, report.outcome);
    if let Some(u) = report.unused {
        engine.metrics.unused(name, u);
    }
    report
}

async fn rotate_inner(engine: &Engine, name: &str, force: bool) -> Result<Report, RotationError> {
    let pc = engine.portal_config(name)?;
    if engine.dry_run {
        let pf = preflight(engine, pc, false).await?;
        let mut r = Report::new(
            name,
            "would_rotate",
            format!(
                "preflight passed: {} of {} codes unused; would rotate and deliver to {}",
                pf.unused,
                pf.total,
                pc.sinks.join(", ")
            ),
        );
        (r.unused, r.total) = (Some(pf.unused), Some(pf.total));
        tracing::info!(portal = name, unused = pf.unused, total = pf.total, sinks = %pc.sinks.join(","), "dry run: would rotate");
        return Ok(r);
    }
    let store = engine.store()?.clone();
    let _lock = store.lock_portal(name, LOCK_WAIT).await?;
    // One read tells whether an earlier process left work here, and what min_interval
    // needs; only a portal with leftovers pays for recovery and a second read.
    let p = name.to_string();
    let (leftovers, mut row) = store
        .call(move |c| {
            let leftovers = !state::open_journal(c, Some(&p))?.is_empty()
                || !state::pending(c, Some(&p), None)?.is_empty();
            Ok((leftovers, state::portal_row(c, &p)?))
        })
        .await?;
    if leftovers {
        recover_locked(engine, name).await?;
        let p = name.to_string();
        row = store.call(move |c| state::portal_row(c, &p)).await?;
    }

    if !force {
        let min = engine.config.schedule_of(pc).and_then(|s| s.min_interval);
        let last = row
            .and_then(|r| r.last_success_at)
            .and_then(chrono::DateTime::from_timestamp_millis);
        if let Some(wait) = crate::schedule::within_min_interval(last, min, Utc::now()) {
            let msg = format!(
                "skipped: rotated recently; min_interval allows the next rotation in {}s (use --force to override)",
                wait.as_secs()
            );
            tracing::info!(
                portal = name,
                wait_s = wait.as_secs(),
                "skipped by min_interval"
            );
            return Ok(Report::new(name, "skipped", msg));
        }
    }

    tracing::info!(portal = name, "preflight");
    let pf = preflight(engine, pc, false).await?;
    if engine.is_stopping() {
        // Not a failure: nothing was attempted, and the next start plans it again.
        return Ok(Report::new(
            name,
            "skipped",
            "not started: the process is stopping",
        ));
    }
    // What the preflight saw and the intent share one commit: one fsync before the PUT.
    let (p, fp, unused, total) = (name.to_string(), pf.before_fp.clone(), pf.unused, pf.total);
    let journal_id = store
        .write(move |c| {
            state::record_seen(c, &p, fp.as_deref().unwrap_or_default(), unused, total)?;
            state::begin_intent(c, &p, "rotate", fp.as_deref())
        })
        .await?;
    tracing::info!(portal = name, journal = journal_id, "intent recorded");
    fail_point("rotation::after_intent");

    let new_set = match pf.portal.new_codes().await {
        Ok(set) => set,
        Err(put_err) => {
            tracing::warn!(portal = name, error = %put_err, "the PUT failed or its answer was lost; asking the portal which set is valid");
            match settle_by_get(engine, &pf.portal, journal_id, pf.before_fp.as_deref()).await? {
                Some(set) => set,
                None => return Err(put_err.into()),
            }
        }
    };
    fail_point("rotation::after_put");
    tracing::info!(
        portal = name,
        total = new_set.total(),
        "the portal issued a new set"
    );
    let mut report = seal_and_deliver(engine, pc, journal_id, new_set, &pf.account, true).await?;
    report.outcome = "rotated";
    Ok(report)
}

/// After a failed PUT, or for an open intent: reads the set valid now. `Some(set)` when it
/// differs from `before_fp` (the rotation happened); `None` after closing the intent as
/// aborted (it did not). A failed GET leaves the intent open and is an error.
async fn settle_by_get(
    engine: &Engine,
    portal: &Portal,
    journal_id: i64,
    before_fp: Option<&str>,
) -> Result<Option<CodeSet>, RotationError> {
    let store = engine.store()?.clone();
    let set = portal.codes().await.map_err(|e| RotationError::Other {
        portal: portal.name().to_string(),
        message: format!("the outcome of the rotation is unknown and the check failed ({e}); the next run settles it"),
    })?;
    let fp = store.fingerprinter().of_set(&set);
    if Some(fp.as_str()) != before_fp {
        tracing::warn!(
            portal = portal.name(),
            "the portal holds a new set: the rotation happened"
        );
        return Ok(Some(set));
    }
    tracing::info!(
        portal = portal.name(),
        "the portal holds the old set: the rotation did not happen"
    );
    store
        .write(move |c| {
            state::close_journal(
                c,
                journal_id,
                "aborted",
                Some("the PUT did not take effect"),
            )
        })
        .await?;
    Ok(None)
}

/// Steps 4–6 for a set in hand.
async fn seal_and_deliver(
    engine: &Engine,
    pc: &PortalConfig,
    journal_id: i64,
    set: CodeSet,
    account: &Account,
    rotated: bool,
) -> Result<Report, RotationError> {
    let store = engine.store()?.clone();
    let name = pc.name.as_str();
    let set_fp = store.fingerprinter().of_set(&set);
    let (unused, total) = (set.unused(), set.total());
    let mut payloads = Vec::with_capacity(pc.sinks.len());
    {
        let delivery = Delivery {
            portal: name,
            url: &pc.url,
            account,
            at: Utc::now(),
            codes: &set,
            rotated,
        };
        for sink_name in &pc.sinks {
            let sink = sink_of(engine, name, sink_name)?;
            let sealed = sink.seal(&delivery).map_err(|source| RotationError::Sink {
                portal: name.to_string(),
                source,
            })?;
            payloads.push((sink_name.clone(), zeroize::Zeroizing::new(sealed)));
        }
    }
    drop(set); // the plain text is gone; only sealed payloads remain
    let (p, fp) = (name.to_string(), set_fp.clone());
    let (ids, payloads) = store
        .write(move |c| {
            state::seal(c, journal_id, &p, &fp, unused, total, &payloads).map(|ids| (ids, payloads))
        })
        .await?;
    tracing::info!(
        portal = name,
        journal = journal_id,
        sinks = pc.sinks.len(),
        "sealed into the spool"
    );
    fail_point("rotation::after_seal");

    // Delivered now even when the process is stopping: each attempt is bounded by the
    // sink's timeout, and an operator who stops the service for good expects the set to
    // have reached its sinks, not to wait in the spool for a start that may never come.
    // The payloads are still in hand, so they are not read back; the outcomes are recorded
    // with the journal's close in one commit. A crash before it delivers them again on the
    // next start (the same set, so the sinks end up the same).
    let mut outcomes = Vec::with_capacity(ids.len());
    for (id, (sink_name, payload)) in ids.into_iter().zip(&payloads) {
        let sink = sink_of(engine, name, sink_name)?;
        let outcome = attempt_delivery(engine, name, sink, payload, 0).await;
        let ok = outcome.is_ok();
        outcomes.push((id, outcome));
        if ok {
            fail_point("rotation::mid_delivery");
        }
    }
    drop(payloads);
    let delivered = outcomes.iter().filter(|(_, o)| o.is_ok()).count();
    let pending = outcomes.len() - delivered;
    fail_point("rotation::before_done");
    let result = if pending == 0 {
        "ok"
    } else {
        "delivery_pending"
    };
    let p = name.to_string();
    store
        .write(move |c| {
            for (id, outcome) in &outcomes {
                outcome.record(c, *id)?;
            }
            state::close_journal(c, journal_id, "done", None)?;
            if rotated {
                state::record_rotated(c, &p, result)
            } else {
                state::add_history(c, &p, "resent", result)
            }
        })
        .await?;
    let msg = match (rotated, pending) {
        (true, 0) => format!(
            "rotated: {total} new codes delivered to {}",
            pc.sinks.join(", ")
        ),
        (true, n) => format!(
            "rotated: {total} new codes sealed; {n} delivery(ies) pending, retried by `deliver` or the daemon"
        ),
        (false, 0) => format!(
            "resent: {unused} current codes delivered to {}",
            pc.sinks.join(", ")
        ),
        (false, n) => format!("resent: {n} delivery(ies) pending"),
    };
    tracing::info!(portal = name, delivered, pending, "{msg}");
    let mut r = Report::new(name, if rotated { "rotated" } else { "resent" }, msg);
    (r.unused, r.total, r.delivered, r.pending) = (Some(unused), Some(total), delivered, pending);
    Ok(r)
}

/// What one delivery attempt did, to be recorded against its spool entry.
enum Outcome {
    Delivered,
    /// The error, when to try again, and whether the server refused for good.
    Failed(String, i64, bool),
}

impl Outcome {
    fn is_ok(&self) -> bool {
        matches!(self, Outcome::Delivered)
    }

    /// Records it in the state: a delivered payload (and older ones of its sink) leave the
    /// spool; a failed one waits for its next attempt.
    fn record(&self, c: &rusqlite::Connection, id: i64) -> Result<(), StateError> {
        match self {
            Outcome::Delivered => state::delivered(c, id),
            Outcome::Failed(msg, next, permanent) => {
                state::delivery_failed(c, id, msg, *next, *permanent)
            }
        }
    }
}

/// One delivery attempt of a sealed payload (`attempts` made before), counted and logged.
async fn attempt_delivery(
    engine: &Engine,
    portal: &str,
    sink: &crate::sinks::Sink,
    payload: &[u8],
    attempts: i64,
) -> Outcome {
    let result = sink.deliver(portal, payload).await;
    engine.metrics.delivery(portal, sink.name(), result.is_ok());
    match result {
        Ok(()) => {
            tracing::info!(portal, sink = %sink.name(), "delivered");
            Outcome::Delivered
        }
        Err(de) => {
            let permanent = !de.temporary;
            tracing::warn!(portal, sink = %sink.name(), error = %de, permanent, "delivery failed; the payload stays in the spool");
            let next = now_ms() + backoff(attempts).as_millis() as i64;
            Outcome::Failed(de.message, next, permanent)
        }
    }
}

/// Delivers the spooled payloads of one portal (lock held by the caller). `due_before`
/// limits to those due by then (the daemon); `None` tries all now. Returns (delivered,
/// still pending).
async fn deliver_portal(
    engine: &Engine,
    portal: &str,
    due_before: Option<i64>,
) -> Result<(usize, usize), RotationError> {
    let store = engine.store()?.clone();
    let p = portal.to_string();
    let entries = store
        .call(move |c| state::pending(c, Some(&p), due_before))
        .await?;
    let (mut delivered, mut pending) = (0, 0);
    for e in entries {
        let Some(sink) = engine.sinks.get(&e.sink) else {
            tracing::warn!(portal, sink = %e.sink, "a sealed payload waits for a sink that is no longer configured; it is kept");
            pending += 1;
            continue;
        };
        let outcome = attempt_delivery(engine, portal, sink, &e.payload, e.attempts).await;
        let ok = outcome.is_ok();
        let id = e.id;
        store.write(move |c| outcome.record(c, id)).await?;
        if ok {
            delivered += 1;
            fail_point("rotation::mid_delivery");
        } else {
            pending += 1;
        }
    }
    Ok((delivered, pending))
}

/// Settles what earlier processes left for this portal, taking its lock.
pub async fn recover(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    let store = engine.store()?.clone();
    let _lock = store.lock_portal(name, LOCK_WAIT).await?;
    recover_locked(engine, name).await
}

async fn recover_locked(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    let store = engine.store()?.clone();
    let p = name.to_string();
    let open = store
        .call(move |c| state::open_journal(c, Some(&p)))
        .await?;
    let mut report = Report::new(name, "delivered", "nothing was pending");
    let mut sealed = Vec::new();
    for j in open {
        match j.phase.as_str() {
            "intent" => {
                tracing::warn!(
                    portal = name,
                    journal = j.id,
                    "found a rotation an earlier process did not finish; settling it by GET"
                );
                let pc = engine.portal_config(name)?;
                let portal = engine.portal(pc)?;
                if let Some(set) =
                    settle_by_get(engine, &portal, j.id, j.before_fp.as_deref()).await?
                {
                    let account = portal.account().await?;
                    report = seal_and_deliver(engine, pc, j.id, set, &account, true).await?;
                    report.outcome = "recovered";
                }
            }
            // Sealed: the payloads are in the spool; delivered below, then closed.
            _ => sealed.push(j.id),
        }
    }
    let (delivered, pending) = deliver_portal(engine, name, None).await?;
    if !sealed.is_empty() {
        let (p, result) = (
            name.to_string(),
            if pending == 0 {
                "ok"
            } else {
                "delivery_pending"
            },
        );
        store
            .write(move |c| {
                for id in sealed {
                    state::close_journal(c, id, "done", Some("finished after a restart"))?;
                }
                state::record_rotated(c, &p, result)
            })
            .await?;
        report.outcome = "recovered";
    }
    report.delivered += delivered;
    report.pending = pending;
    if report.delivered > 0 || report.pending > 0 {
        report.message = format!(
            "{} payload(s) delivered, {} pending",
            report.delivered, report.pending
        );
    }
    Ok(report)
}

/// Reads the current codes and delivers them again, without rotating (`resend`).
pub async fn resend(engine: &Engine, name: &str) -> Report {
    let run = async {
        let pc = engine.portal_config(name)?;
        let store = engine.store()?.clone();
        let _lock = store.lock_portal(name, LOCK_WAIT).await?;
        recover_locked(engine, name).await?;
        // The set the preflight read is the one delivered: one GET, and no window in
        // which it could change between two reads.
        let mut pf = preflight(engine, pc, true).await?;
        let set = match pf.codes.take() {
            Some(set) => set,
            None => pf.portal.codes().await?,
        };
        let p = name.to_string();
        let fp = store.fingerprinter().of_set(&set);
        let id = store
            .write(move |c| state::begin_intent(c, &p, "resend", Some(&fp)))
            .await?;
        seal_and_deliver(engine, pc, id, set, &pf.account, false).await
    };
    match run.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(portal = name, error = %e, "resend failed");
            Report::failed(name, &e)
        }
    }
}

/// Every portal that has unfinished journal entries or pending payloads.
pub async fn portals_with_pending_work(engine: &Engine) -> Result<Vec<String>, RotationError> {
    let store = engine.store()?.clone();
    let names = store
        .call(|c| {
            let mut names: Vec<String> = state::open_journal(c, None)?
                .into_iter()
                .map(|j| j.portal)
                .collect();
            names.extend(state::pending_rows(c)?.into_iter().map(|p| p.portal));
            names.sort();
            names.dedup();
            Ok(names)
        })
        .await?;
    Ok(names)
}

/// Settles and delivers everything pending for every portal (`deliver`, and every command's start).
pub async fn recover_all(engine: &Engine) -> Vec<Report> {
    let names = match portals_with_pending_work(engine).await {
        Ok(n) => n,
        Err(e) => return vec![Report::failed("*", &e)],
    };
    let mut out = Vec::new();
    for name in names {
        let r = match recover(engine, &name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(portal = %name, error = %e, "settling pending work failed");
                Report::failed(&name, &e)
            }
        };
        out.push(r);
    }
    out
}

/// Delivers the payloads of `portal` that are due by `due_before` (the daemon's retries).
pub async fn deliver_due(
    engine: &Engine,
    portal: &str,
    due_before: i64,
) -> Result<(usize, usize), RotationError> {
    let store = engine.store()?.clone();
    let _lock = store.lock_portal(portal, LOCK_WAIT).await?;
    deliver_portal(engine, portal, Some(due_before)).await
}
