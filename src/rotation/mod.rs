//! The rotation of one portal, and recovery of whatever a crash left behind.
//!
//! The guarantee: **no set of codes the portal issued is ever lost.** The codes a PUT returns
//! are the only copy, so each step keeps the guarantee as follows:
//! 1. *Preflight* (GET the codes and the account, preflight every sink) has no side effects;
//!    a failure means no rotation.
//! 2. *Intent*: a journal row with the fingerprint of the set seen in step 1 is committed
//!    (fsync'd) before the PUT. From here on, any process that finds the row settles it.
//! 3. *Rotate*: one PUT, never retried, then a GET that verifies it: the set delivered is
//!    the set the GET returns, never the PUT's answer (one that differs is logged and
//!    counted). A refusal by the portal itself (its 4xx) closes the intent. Any other outcome
//!    is unknown, and the intent stays open until [`settle`] proves which set the portal
//!    holds: a set that differs from the intent's fingerprint is the new one; the old one
//!    is only believed once the settle window has closed. Meanwhile the portal is not
//!    rotated again.
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
//!
//! Convergence: a rotation is not the only way a set changes (a person in the web UI, a PUT
//! applied after its window). The state keeps per portal and sink the fingerprint of the
//! newest set sealed for it, and every GET of a portal compares (`drift`): a different set
//! while no intent is open is delivered again (`on_drift = "resend"`) or rotated away.

pub mod alerts;
pub mod drift;
pub mod limits;
pub mod settle;

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
    /// A PUT's outcome is unknown and its intent stays open until a GET settles it.
    #[error(
        "portal {portal}: the outcome of a rotation is being settled: {why}; `deliver` or the daemon asks the portal again"
    )]
    Settling {
        /// The portal.
        portal: String,
        /// Why it is not settled yet.
        why: String,
    },
    /// The API key acts as another account than the one pinned at the first rotation.
    #[error(
        "portal {portal}: the API key acts as account {now}, not {pinned} as at the first rotation; \
         refused until the portal's entry changes, or `rotate --force`"
    )]
    AccountChanged {
        /// The portal.
        portal: String,
        /// The pinned account id.
        pinned: String,
        /// The account the key acts as now.
        now: String,
    },
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
    /// The state store; absent in a dry run, which must not change it.
    pub store: Option<Store>,
    /// In a dry run, the state opened read-only (it creates no file), so that a dry run sees
    /// what the state knows (min_interval, drift, what is due) without changing it; `None`
    /// when there is no state yet or it cannot be read.
    pub reader: Option<Store>,
    /// The HTTP connection pool.
    pub http: HttpClient,
    /// Only read; never PUT, deliver or write the state.
    pub dry_run: bool,
    /// How the sinks' secrets were read (kept for a reload).
    pub secrets: crate::sinks::Secrets,
    /// Counters and gauges, served by the daemon.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cancelled when the process is stopping: a rotation not yet at its intent does not
    /// start (nor preflight); one past it finishes (PUT, seal, one delivery attempt).
    pub stopping: tokio_util::sync::CancellationToken,
    /// Rotations in flight: in all, and per portal host.
    pub limits: Arc<limits::Limits>,
    /// Who may work on a portal now: this process alone, or a cluster's claims.
    pub coordinator: crate::coordinator::Coordinator,
}

/// [`Engine::entry_fingerprint`] from built sinks.
pub fn entry_fingerprint_of(sinks: &Sinks, pc: &PortalConfig) -> String {
    use sha2::Digest;
    let mut text = format!("url {}\nkey {}\n", pc.url, pc.api_key.value.describe());
    for s in &pc.sinks {
        let id = sinks
            .get(s)
            .map(|k| k.identity(&pc.name))
            .unwrap_or_default();
        text.push_str(&format!("sink {s} {id}\n"));
    }
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..16])
}

/// The state opened read-only for a dry run or `check` (SPEC §6): no state, or one this
/// user cannot read, is said once, and then nothing is compared with it.
pub fn open_reader(config: &Config) -> Option<Store> {
    match Store::open_configured_read_only(config) {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            tracing::warn!(
                "no state yet: every portal is planned as new and no drift can be found"
            );
            None
        }
        Err(e) => {
            crate::err!(
                "warning: the state cannot be read ({e}): every portal is planned as new and no drift can be found"
            );
            None
        }
    }
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
        Self::with_secrets(config, dry_run, crate::sinks::Secrets::Read)
    }

    /// [`Engine::new`], reading the sinks' secrets as `secrets` says (the daemon defers:
    /// an unreadable one fails only the portals that need it).
    pub fn with_secrets(
        config: Arc<Config>,
        dry_run: bool,
        secrets: crate::sinks::Secrets,
    ) -> Result<Self, EngineError> {
        let sinks = crate::sinks::build_with(&config, secrets).map_err(EngineError::Config)?;
        let http = HttpClient::new(config.daemon.http_timeout);
        let (store, reader) = if dry_run {
            (None, open_reader(&config))
        } else {
            (Some(Store::open_configured(&config)?), None)
        };
        Ok(Self {
            sinks,
            reader,
            http,
            dry_run,
            secrets,
            metrics: Default::default(),
            stopping: Default::default(),
            limits: limits::Limits::new(config.daemon.max_concurrent, config.daemon.max_per_host),
            coordinator: crate::coordinator::Coordinator::new(
                store.as_ref(),
                crate::coordinator::Role::Command,
            ),
            store,
            config,
        })
    }

    /// Every portal that cannot read a secret it needs (its API key, the SMTP password of
    /// an email sink, an exec sink's `env` secret), with what and why; each read value is
    /// dropped at once.
    pub fn unreadable_secrets(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for pc in self.config.portals.values() {
            let mut why: Vec<String> = Vec::new();
            if let Err(e) = pc.api_key.value.resolve() {
                why.push(format!("api_key: {e}"));
            }
            for s in pc.sinks.iter().filter_map(|s| self.sinks.get(s)) {
                if let Some(e) = s.unreadable_secret()
                    && !why.contains(&e)
                {
                    why.push(e);
                }
            }
            if !why.is_empty() {
                out.push((pc.name.clone(), why.join("; ")));
            }
        }
        out
    }

    /// Whether the process is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Waits for a slot to rotate `portal` (its host's, then a global one); `None` when the
    /// process starts stopping first.
    pub async fn slot(&self, portal: &str) -> Option<limits::Slot> {
        let host = self
            .config
            .portals
            .get(portal)
            .map(|pc| limits::host_of(&pc.url))
            .unwrap_or_default();
        tokio::select! {
            slot = self.limits.acquire(&host) => (!self.is_stopping()).then_some(slot),
            () = self.stopping.cancelled() => None,
        }
    }

    /// The state to read from: the store, or in a dry run the read-only one.
    pub fn reader(&self) -> Option<&Store> {
        self.store.as_ref().or(self.reader.as_ref())
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
        entry_fingerprint_of(&self.sinks, pc)
    }

    /// An engine for a new config that shares this one's store, metrics and stop flag (a
    /// reload); its HTTP pool is new, since the timeout may have changed. Fails only on the
    /// config's keys and recipients.
    pub fn reconfigured(&self, config: Arc<Config>) -> Result<Self, Vec<ConfigIssue>> {
        let sinks = crate::sinks::build_with(&config, self.secrets)?;
        let http = HttpClient::new(config.daemon.http_timeout);
        Ok(Self {
            coordinator: self.coordinator.clone(),
            sinks,
            store: self.store.clone(),
            reader: self.reader.clone(),
            http,
            dry_run: self.dry_run,
            secrets: self.secrets,
            metrics: self.metrics.clone(),
            stopping: self.stopping.clone(),
            limits: if config.daemon.max_concurrent == self.config.daemon.max_concurrent
                && config.daemon.max_per_host == self.config.daemon.max_per_host
            {
                self.limits.clone()
            } else {
                limits::Limits::new(config.daemon.max_concurrent, config.daemon.max_per_host)
            },
            config,
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

pub use crate::outcome::{Outcome, Skip};

/// What happened to one portal.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The portal.
    pub portal: String,
    /// What happened.
    pub outcome: Outcome,
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
    fn new(portal: &str, outcome: Outcome, message: impl Into<String>) -> Self {
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

    /// A report of a failure (or of a rotation being settled).
    pub fn failed(portal: &str, e: &RotationError) -> Self {
        let outcome = match e {
            RotationError::Settling { .. } => Outcome::Settling,
            _ => Outcome::Failed,
        };
        let mut r = Self::new(portal, outcome, e.to_string());
        r.error_kind = Some(
            match e {
                RotationError::Api(a) => a.kind_name(),
                RotationError::Sink { .. } => "sink",
                RotationError::State(_) => "state",
                RotationError::Settling { .. } => "settling",
                RotationError::AccountChanged { .. } => "account_changed",
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
        let mut r = Self::new(
            portal,
            Outcome::Failed,
            format!("a rotation task was lost: {why}"),
        );
        r.error_kind = Some("internal".into());
        r
    }

    /// True when the command should exit 1 for this portal.
    pub fn is_failure(&self) -> bool {
        matches!(self.outcome, Outcome::Failed | Outcome::Settling) || self.pending > 0
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

/// What the state knows of a portal that the preflight checks against: the pinned account,
/// and the set each sink holds (the baseline of drift).
#[derive(Default)]
struct Known {
    row: Option<state::PortalRow>,
    sink_sets: std::collections::HashMap<String, String>,
}

async fn known(store: &Store, name: &str) -> Result<Known, StateError> {
    let p = name.to_string();
    store
        .call(move |c| {
            Ok(Known {
                row: state::portal_row(c, &p)?,
                sink_sets: state::sink_sets(c, &p)?,
            })
        })
        .await
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
    /// The sinks that hold a set the portal no longer accepts (drift), as the state says.
    drifted: Vec<String>,
}

/// Step 1: reads the codes and the account, compares them with what the state knows
/// (drift, the pinned account), and preflights every sink. No side effects on the portal
/// or the sinks; drift found is recorded.
async fn preflight(
    engine: &Engine,
    pc: &PortalConfig,
    keep_codes: bool,
    known: &Known,
    force: bool,
) -> Result<Preflight, RotationError> {
    let portal = engine.portal(pc)?;
    // A rotation also reads the key itself, to refuse one without write permission before
    // its intent (a refused PUT costs nothing, but a clear reason beats a 403).
    let will_put = !keep_codes && !engine.dry_run;
    let key = async {
        if will_put {
            Some(portal.key_info().await)
        } else {
            None
        }
    };
    let (codes, account, key) = tokio::join!(portal.codes(), portal.account(), key);
    let codes = codes?;
    let account = account?;
    match key {
        Some(Ok(k)) if !k.can_write() => {
            return Err(RotationError::Other {
                portal: pc.name.clone(),
                message: format!(
                    "the API key cannot rotate: its scopes are [{}], and rotating needs `*` or `*:write`",
                    k.permissions.join(", ")
                ),
            });
        }
        // Where the portal has no `keys/@self` (older versions, or auth other than a key),
        // the PUT's own answer tells.
        Some(Err(e)) if !matches!(e.kind, crate::docspace::ApiErrorKind::NotFound) => {
            return Err(e.into());
        }
        _ => {}
    }
    let before_fp = engine.reader().map(|s| s.fingerprinter().of_set(&codes));
    if let Some(row) = &known.row {
        check_account(engine, pc, row, &account, force).await?;
    }
    let drifted = before_fp
        .as_ref()
        .map(|fp| drift::drifted_sinks(pc, &known.sink_sets, fp))
        .unwrap_or_default();
    if !drifted.is_empty() {
        drift::record(engine, pc, &drifted, "a preflight", false).await;
    }
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
        drifted,
    })
}

/// The account is pinned at the first rotation, under the entry it was made with: a key
/// that acts as another account under the same entry (swapped, or issued by someone else) is
/// refused and announced, until the entry changes or `--force`.
async fn check_account(
    engine: &Engine,
    pc: &PortalConfig,
    row: &state::PortalRow,
    account: &Account,
    force: bool,
) -> Result<(), RotationError> {
    let Some(pinned) = row.account_id.as_deref() else {
        return Ok(());
    };
    if pinned == account.id {
        return Ok(());
    }
    let entry_fp = engine.entry_fingerprint(pc);
    if force || row.account_entry_fp.as_deref() != Some(entry_fp.as_str()) {
        tracing::warn!(portal = %pc.name, pinned, now = %account.id, forced = force, "the key acts as another account; accepted because the entry changed or --force was given");
        return Ok(());
    }
    let e = RotationError::AccountChanged {
        portal: pc.name.clone(),
        pinned: pinned.to_string(),
        now: account.id.clone(),
    };
    tracing::error!(portal = %pc.name, error = %e, "refused");
    if let Ok(store) = engine.store() {
        let (p, body) = (
            pc.name.clone(),
            format!(
                "The API key of portal {} ({}) now acts as account {} ({}), not as account {pinned}\n\
                 that its codes were rotated for until now. Its codes were not rotated, and are not\n\
                 until this is resolved: a key of another account would hand that account's codes\n\
                 to this portal's sinks.\n\n\
                 What to do: if the key was swapped by mistake, put the right one back. If the portal\n\
                 really belongs to another account now, change its entry (or run\n  \
                 tfa-rotator rotate {} --force\n\
                 once) to pin the new account.\n\n-- \ntfa-rotator\n",
                pc.name, pc.url, account.id, account.email, pc.name
            ),
        );
        let since = row.last_success_at.unwrap_or(0);
        let subject = format!(
            "[tfa-rotator] {}: the API key acts as another account",
            pc.name
        );
        let _ = store
            .write(move |c| state::add_notice(c, &p, "account", &subject, &body, since))
            .await;
    }
    Err(e)
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

/// The portal answered 429: its host is paused in memory (for this process's requests) and
/// the pause is kept with the portal in the state, so `status` shows it and a restarted
/// process honours it.
pub async fn rate_limited(engine: &Engine, name: &str, retry_after: Option<Duration>) {
    let Some(pc) = engine.config.portals.get(name) else {
        return;
    };
    engine
        .limits
        .rate_limited(&limits::host_of(&pc.url), retry_after);
    let Ok(store) = engine.store() else { return };
    let pause = retry_after
        .unwrap_or(Duration::from_secs(1))
        .min(MAX_RETRY_AFTER);
    let until = now_ms().saturating_add(i64::try_from(pause.as_millis()).unwrap_or(i64::MAX));
    let p = name.to_string();
    if let Err(e) = store
        .write(move |c| state::record_pause(c, &p, until))
        .await
    {
        tracing::error!(portal = name, error = %e, "could not record the portal's 429 pause");
    }
}

/// Pauses, in this process, the hosts of portals whose 429 pause the state still holds (a
/// pause a process before this one was told).
pub async fn restore_pauses(engine: &Engine) {
    let Ok(store) = engine.store() else { return };
    let Ok(rows) = store.call(state::portal_rows).await else {
        return;
    };
    let now = now_ms();
    for r in rows {
        let (Some(until), Some(pc)) = (r.paused_until, engine.config.portals.get(&r.name)) else {
            continue;
        };
        if until > now {
            let left = Duration::from_millis(u64::try_from(until - now).unwrap_or(0));
            engine
                .limits
                .rate_limited(&limits::host_of(&pc.url), Some(left));
        }
    }
}

async fn record_failure(engine: &Engine, portal: &str, e: &RotationError) {
    let Ok(store) = engine.store() else { return };
    let (p, msg) = (portal.to_string(), e.to_string());
    let r = if matches!(e, RotationError::Settling { .. }) {
        // Not a failure of the portal: no backoff, no streak. The intent's own schedule
        // says when it is asked again.
        store
            .write(move |c| state::record_settling(c, &p, &msg))
            .await
    } else {
        let wait = e.retry_after().unwrap_or_default();
        store
            .write(move |c| {
                let failures = state::portal_row(c, &p)?.map(|r| r.failures).unwrap_or(0);
                let retry_at =
                    now_ms().saturating_add(backoff(failures).max(wait).as_millis() as i64);
                state::record_failure(c, &p, &msg, Some(retry_at)).map(drop)
            })
            .await
    };
    if let Err(se) = r {
        tracing::error!(portal, error = %se, "could not record a failure");
    }
}

pub use crate::docspace::MAX_RETRY_AFTER;

/// Rotates one portal now, after settling what earlier processes left. `force` ignores
/// `min_interval` and a changed account. In a dry run, does only the read-only steps.
pub async fn rotate(engine: &Engine, name: &str, force: bool) -> Report {
    rotate_held(engine, name, force, None, None).await
}

/// [`rotate`] for the daemon: skipped (unless `force`) when the portal was rotated at or
/// after `since` (the state's clock; `None`: when this call began), by another process
/// while this one waited for the portal or after the daemon planned it; under `held`, a
/// lock the caller already took (`None`: it takes one).
pub async fn rotate_held(
    engine: &Engine,
    name: &str,
    force: bool,
    since: Option<i64>,
    held: Option<state::PortalLock>,
) -> Report {
    let started = std::time::Instant::now();
    let report = match rotate_inner(engine, name, force, since, held).await {
        Ok(r) => r,
        Err(RotationError::State(e)) if engine.coordinator.held_elsewhere(&e) => {
            // Not a failure of the portal: another instance has it.
            tracing::info!(portal = name, "{e}");
            Report::new(name, Outcome::Skipped(Skip::Held), e.to_string())
        }
        Err(e) => {
            if matches!(&e, RotationError::Api(a) if matches!(a.kind, crate::docspace::ApiErrorKind::RateLimited { .. }))
            {
                rate_limited(engine, name, e.retry_after()).await;
            }
            if matches!(e, RotationError::Settling { .. }) {
                tracing::warn!(portal = name, error = %e, "rotation not settled");
            } else {
                tracing::error!(portal = name, error = %e, "rotation failed");
            }
            record_failure(engine, name, &e).await;
            Report::failed(name, &e)
        }
    };
    engine.metrics.rotation(name, report.outcome);
    if !matches!(report.outcome, Outcome::Skipped(_)) {
        engine.metrics.rotation_took(started.elapsed());
    }
    if let Some(u) = report.unused {
        engine.metrics.unused(name, u);
    }
    if report.outcome.issued_a_set()
        && let Some(pc) = engine.config.portals.get(name)
    {
        engine.limits.succeeded(&limits::host_of(&pc.url));
    }
    report
}

/// The report of a rotation `min_interval` holds back (unless `force`), or `None`.
fn held_by_min_interval(
    engine: &Engine,
    pc: &PortalConfig,
    known: &Known,
    force: bool,
) -> Option<Report> {
    if force {
        return None;
    }
    let min = engine.config.schedule_of(pc).and_then(|s| s.min_interval);
    let last = known
        .row
        .as_ref()
        .and_then(|r| r.last_success_at)
        .and_then(chrono::DateTime::from_timestamp_millis);
    let wait = crate::schedule::within_min_interval(last, min, Utc::now())?;
    let msg = format!(
        "skipped: rotated recently; min_interval allows the next rotation in {}s (use --force to override)",
        wait.as_secs()
    );
    Some(Report::new(
        &pc.name,
        Outcome::Skipped(Skip::MinInterval),
        msg,
    ))
}

/// A dry run of [`rotate`]: what the state says (read-only: min_interval, the pinned
/// account, drift) and every read-only step, nothing written.
async fn dry_rotate(
    engine: &Engine,
    pc: &PortalConfig,
    force: bool,
) -> Result<Report, RotationError> {
    let name = pc.name.as_str();
    let known = match engine.reader() {
        Some(store) => known(store, name).await?,
        None => Known::default(),
    };
    if let Some(r) = held_by_min_interval(engine, pc, &known, force) {
        return Ok(Report {
            message: r.message.replacen("skipped:", "dry run: would skip:", 1),
            ..r
        });
    }
    let pf = preflight(engine, pc, false, &known, force).await?;
    let drift = if pf.drifted.is_empty() {
        String::new()
    } else {
        format!(
            "; DRIFT: sinks {} hold a set the portal no longer accepts (`deliver` or the daemon converges them)",
            pf.drifted.join(", ")
        )
    };
    let mut r = Report::new(
        name,
        if drift.is_empty() {
            Outcome::WouldRotate
        } else {
            Outcome::Failed
        },
        format!(
            "preflight passed: {} of {} codes unused; would rotate and deliver to {}{drift}",
            pf.unused,
            pf.total,
            pc.sinks.join(", ")
        ),
    );
    if !drift.is_empty() {
        r.error_kind = Some("drift".into());
    }
    (r.unused, r.total) = (Some(pf.unused), Some(pf.total));
    tracing::info!(portal = name, unused = pf.unused, total = pf.total, sinks = %pc.sinks.join(","), "dry run: would rotate");
    Ok(r)
}

async fn rotate_inner(
    engine: &Engine,
    name: &str,
    force: bool,
    since: Option<i64>,
    held: Option<state::PortalLock>,
) -> Result<Report, RotationError> {
    let pc = engine.portal_config(name)?;
    if engine.dry_run {
        return dry_rotate(engine, pc, force).await;
    }
    if engine.is_stopping() {
        // Not a failure: nothing was sent, and the next start plans it again.
        return Ok(Report::new(
            name,
            Outcome::Skipped(Skip::Stopping),
            "not started: the process is stopping",
        ));
    }
    let store = engine.store()?.clone();
    let since = match since {
        Some(t) => t,
        None => store.now().await?,
    };
    let _lock = match held {
        Some(l) => l,
        None => engine.coordinator.lock(name).await?,
    };
    // One read tells whether an earlier process left work here; only a portal with
    // leftovers pays for recovery.
    let p = name.to_string();
    let leftovers = store
        .call(move |c| {
            Ok(!state::open_journal(c, Some(&p))?.is_empty()
                || !state::pending(c, Some(&p), None)?.is_empty())
        })
        .await?;
    if leftovers {
        // An intent still open: the portal is not rotated again until it is settled.
        recover_unless_settling(engine, name).await?;
    }
    let known = known(&store, name).await?;

    // A 429's pause outlives the process that was told: nothing is sent before it ends.
    if let Some(until) = known
        .row
        .as_ref()
        .and_then(|r| r.paused_until)
        .filter(|t| *t > now_ms())
    {
        let msg = format!(
            "not contacted: the portal answered 429 Too Many Requests and asked to wait until {}; the daemon resumes then, or run the command again after it",
            crate::schedule::fmt_utc(
                chrono::DateTime::from_timestamp_millis(until).unwrap_or_default()
            )
        );
        tracing::warn!(portal = name, "{msg}");
        return Ok(Report::new(name, Outcome::Failed, msg));
    }

    if !force
        && let Some(at) = known
            .row
            .as_ref()
            .and_then(|r| r.last_success_at)
            .filter(|at| *at >= since)
    {
        let msg = format!(
            "skipped: rotated meanwhile by another process ({}); use --force to rotate again",
            crate::schedule::fmt_utc(
                chrono::DateTime::from_timestamp_millis(at).unwrap_or_default()
            )
        );
        tracing::info!(portal = name, "rotated meanwhile by another process");
        return Ok(Report::new(name, Outcome::Skipped(Skip::NotDue), msg));
    }
    if let Some(r) = held_by_min_interval(engine, pc, &known, force) {
        tracing::info!(portal = name, "skipped by min_interval");
        return Ok(r);
    }

    tracing::info!(portal = name, "preflight");
    let pf = preflight(engine, pc, false, &known, force).await?;
    if engine.is_stopping() {
        // Not a failure: nothing was attempted, and the next start plans it again.
        return Ok(Report::new(
            name,
            Outcome::Skipped(Skip::Stopping),
            "not started: the process is stopping",
        ));
    }
    // What the preflight saw and the intent share one commit: one fsync before the PUT.
    let window = engine.config.convergence_of(pc).settle_window;
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let (p, fp, unused, total) = (name.to_string(), pf.before_fp.clone(), pf.unused, pf.total);
    // `started_at`: the intent's own time, on the state's clock (the settle window's start).
    let (journal_id, started_at) = store
        .write(move |c| {
            state::record_seen(c, &p, fp.as_deref().unwrap_or_default(), unused, total)?;
            let id = state::begin_intent(c, &p, "rotate", fp.as_deref(), window_ms)?;
            Ok((id, c.now()?))
        })
        .await?;
    let licensed = std::time::Instant::now();
    tracing::info!(portal = name, journal = journal_id, "intent recorded");
    fail_point("rotation::after_intent");

    // A time-bounded PUT: past its budget after the intent, this process sends none (in a
    // cluster another instance may have waited the deadline out and settled the intent).
    // The intent stays open and is settled like any PUT of unknown outcome.
    let budget = engine.config.daemon.http_timeout;
    if engine.coordinator.put_too_late(licensed, budget) {
        tracing::error!(
            portal = name,
            journal = journal_id,
            late_ms = licensed.elapsed().as_millis() as u64,
            "the PUT's deadline passed before it was sent (the process stalled); no PUT was sent"
        );
        // The intent stays open; whoever holds the portal settles it.
        return Err(RotationError::State(StateError::Fenced {
            portal: name.to_string(),
            why: "the PUT's deadline passed before it was sent".into(),
        }));
    }
    let put = pf.portal.new_codes().await;
    fail_point("rotation::after_put");
    if let Err(e) = &put
        && e.is_refusal()
    {
        // The portal itself said no: nothing changed, the intent ends here.
        let note = format!("the portal refused the PUT: {e}");
        store
            .write(move |c| {
                state::close_journal(c, journal_id, state::Closed::Aborted, Some(&note))
            })
            .await?;
        return Err(put
            .err()
            .map(RotationError::Api)
            .unwrap_or_else(|| RotationError::Other {
                portal: name.to_string(),
                message: "the PUT was refused".into(),
            }));
    }
    if let Err(e) = &put {
        tracing::warn!(portal = name, error = %e, "the PUT's outcome is unknown; asking the portal which set is valid");
    }
    // The GET is the truth: the set delivered is the one it returns.
    let intent = settle::Intent {
        id: journal_id,
        before_fp: pf.before_fp.clone(),
        started_at,
        window_ms,
        checks: 0,
        put_deadline: None,
    };
    match settle::once(engine, &pf.portal, &intent).await? {
        settle::Settle::Found(set) => {
            if put.is_err() {
                tracing::warn!(
                    portal = name,
                    "the PUT took effect after all: the portal holds a new set"
                );
            }
            compare_put_answer(engine, name, &put, &set);
            drop(put);
            tracing::info!(
                portal = name,
                total = set.total(),
                "the portal issued a new set"
            );
            let mut report =
                seal_and_deliver(engine, pc, journal_id, set, &pf.account, true).await?;
            report.outcome = Outcome::Rotated;
            Ok(report)
        }
        settle::Settle::NotApplied => Err(match put {
            Err(e) => RotationError::Api(e),
            Ok(_) => RotationError::Other {
                portal: name.to_string(),
                message: "the PUT did not take effect".into(),
            },
        }),
        settle::Settle::Open { why, .. } => {
            if put.is_ok() {
                // The PUT answered with a set, yet the portal holds the old one.
                engine.metrics.put_answer(name, "differs");
                tracing::warn!(
                    portal = name,
                    "the PUT answered with a set the portal does not hold; not delivered"
                );
            } else if let Err(e) = &put
                && matches!(e.kind, crate::docspace::ApiErrorKind::Malformed { .. })
            {
                engine.metrics.put_answer(name, "unusable");
            }
            Err(RotationError::Settling {
                portal: name.to_string(),
                why,
            })
        }
    }
}

/// A PUT's answer is only a hint; the GET's set is delivered. Says (and counts) when the
/// answer was not that set.
fn compare_put_answer(
    engine: &Engine,
    name: &str,
    put: &Result<CodeSet, crate::docspace::ApiError>,
    got: &CodeSet,
) {
    let Ok(store) = engine.store() else { return };
    match put {
        Ok(answer) => {
            let f = store.fingerprinter();
            if f.of_set(answer) != f.of_set(got) {
                engine.metrics.put_answer(name, "differs");
                tracing::warn!(
                    portal = name,
                    "the PUT answered with another set than the portal holds; the portal's set is delivered"
                );
            }
        }
        Err(e) if matches!(e.kind, crate::docspace::ApiErrorKind::Malformed { .. }) => {
            engine.metrics.put_answer(name, "unusable");
            tracing::warn!(portal = name, error = %e, "the PUT's answer was unusable; the portal's set is delivered");
        }
        Err(_) => {}
    }
}

/// Steps 4–6 for a set in hand. `rotated`: a new set from our PUT (pins the account);
/// otherwise a resend of the set the portal holds.
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
    let pin = rotated.then(|| (account.id.clone(), engine.entry_fingerprint(pc)));
    let (ids, payloads) = store
        .write(move |c| {
            let ids = state::seal(c, journal_id, &p, &fp, unused, total, &payloads)?;
            if let Some((account, entry)) = &pin {
                state::pin_account(c, &p, account, entry)?;
                // A rotation, by hand or by the daemon, counts for the schedule: it is the
                // rotation for this entry, and it consumes every fire up to now.
                state::record_schedule(c, &p, Some(entry), Some(now_ms()))?;
            }
            Ok((ids, payloads))
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
    // The sinks are delivered at once, each on its own: a mail server that hangs (for up to
    // three times its timeout) does not hold back the file sinks.
    let sinks = pc
        .sinks
        .iter()
        .map(|n| sink_of(engine, name, n))
        .collect::<Result<Vec<_>, _>>()?;
    let attempts = futures::future::join_all(
        sinks
            .iter()
            .zip(&payloads)
            .map(|(sink, (_, payload))| attempt_delivery(engine, name, sink, payload, 0)),
    )
    .await;
    let mut outcomes = Vec::with_capacity(ids.len());
    let mut plain_delivered = false;
    for ((id, sink), outcome) in ids.into_iter().zip(&sinks).zip(attempts) {
        let ok = outcome.is_ok();
        plain_delivered |= ok && !sink.encrypted();
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
        state::LastResult::Ok
    } else {
        state::LastResult::DeliveryPending
    };
    let p = name.to_string();
    let write = move |c: &dyn state::db::Sql| {
        for (id, outcome) in &outcomes {
            outcome.record(c, *id)?;
        }
        state::close_journal(c, journal_id, state::Closed::Done, None)?;
        if rotated {
            state::record_rotated(c, &p, result)
        } else {
            state::add_history(c, &p, "resent", result.as_str())
        }
    };
    if plain_delivered {
        store.write_then_checkpoint(write).await?;
    } else {
        store.write(write).await?;
    }
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
    let mut r = Report::new(
        name,
        if rotated {
            Outcome::Rotated
        } else {
            Outcome::Resent
        },
        msg,
    );
    (r.unused, r.total, r.delivered, r.pending) = (Some(unused), Some(total), delivered, pending);
    Ok(r)
}

/// What one delivery attempt did, to be recorded against its spool entry.
enum Attempt {
    Delivered,
    /// The sink's error (whether the server refused for good, what is left to deliver
    /// after a partial delivery), and when to try again (Unix ms).
    Failed {
        error: crate::sinks::DeliveryError,
        next_at: i64,
    },
}

impl Attempt {
    fn is_ok(&self) -> bool {
        matches!(self, Attempt::Delivered)
    }

    /// Records it in the state: a delivered payload (and older ones of its sink) leave the
    /// spool; a failed one waits for its next attempt.
    fn record(&self, c: &dyn state::db::Sql, id: i64) -> Result<(), StateError> {
        match self {
            Attempt::Delivered => state::delivered(c, id),
            Attempt::Failed { error, next_at } => state::delivery_failed(
                c,
                id,
                &error.message,
                *next_at,
                !error.temporary,
                error.rest.as_deref().map(|v| v.as_slice()),
            ),
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
) -> Attempt {
    let result = sink.deliver(portal, payload).await;
    engine.metrics.delivery(
        portal,
        sink.name(),
        match result {
            Ok(()) => crate::outcome::DeliveryResult::Delivered,
            Err(_) => crate::outcome::DeliveryResult::Failed,
        },
    );
    match result {
        Ok(()) => {
            tracing::info!(portal, sink = %sink.name(), "delivered");
            Attempt::Delivered
        }
        Err(de) => {
            let permanent = !de.temporary;
            tracing::warn!(portal, sink = %sink.name(), error = %de, permanent, "delivery failed; the payload stays in the spool");
            Attempt::Failed {
                error: de,
                next_at: now_ms() + backoff(attempts).as_millis() as i64,
            }
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
    // Every sink at once, each on its own (see `seal_and_deliver`); recorded one by one after.
    let attempts = futures::future::join_all(entries.iter().map(|e| async move {
        let sink = engine.sinks.get(&e.sink)?;
        Some((
            sink.encrypted(),
            attempt_delivery(engine, portal, sink, &e.payload, e.attempts).await,
        ))
    }))
    .await;
    for (e, attempt) in entries.iter().zip(attempts) {
        let Some((encrypted, outcome)) = attempt else {
            tracing::warn!(portal, sink = %e.sink, "a sealed payload waits for a sink that is no longer configured; it is kept");
            pending += 1;
            continue;
        };
        let ok = outcome.is_ok();
        let id = e.id;
        if ok && !encrypted {
            store
                .write_then_checkpoint(move |c| outcome.record(c, id))
                .await?;
        } else {
            store.write(move |c| outcome.record(c, id)).await?;
        }
        if ok {
            delivered += 1;
            fail_point("rotation::mid_delivery");
        } else {
            pending += 1;
        }
    }
    if delivered > 0 && pending == 0 {
        // What `status` shows as the last result was "delivery pending": no longer.
        let p = portal.to_string();
        store
            .write(move |c| state::deliveries_cleared(c, &p))
            .await?;
    }
    Ok((delivered, pending))
}

/// Settles what earlier processes left for this portal, taking its lock.
pub async fn recover(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    let _lock = match engine.coordinator.lock_to_recover(name).await {
        Err(e) if engine.coordinator.held_elsewhere(&e) => {
            return Ok(Report::new(
                name,
                Outcome::Skipped(Skip::Held),
                e.to_string(),
            ));
        }
        l => l?,
    };
    recover_locked(engine, name).await
}

/// Settles open intents by one GET each (whatever their schedule) and delivers what is
/// sealed. An intent that stays open makes the report's outcome `settling`.
async fn recover_locked(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    recover_locked_why(engine, name).await.map(|(r, _)| r)
}

/// [`recover_locked`], and why an intent stays open, if one does.
async fn recover_locked_why(
    engine: &Engine,
    name: &str,
) -> Result<(Report, Option<String>), RotationError> {
    let store = engine.store()?.clone();
    let p = name.to_string();
    let open = store
        .call(move |c| state::open_journal(c, Some(&p)))
        .await?;
    let mut report = Report::new(name, Outcome::Delivered, "nothing was pending");
    let mut sealed = Vec::new();
    let mut still_open = None;
    for j in open {
        match j.phase {
            state::Phase::Intent => {
                tracing::warn!(
                    portal = name,
                    journal = j.id,
                    checks = j.checks,
                    "a rotation's outcome is not settled; asking the portal"
                );
                let pc = engine.portal_config(name)?;
                let portal = engine.portal(pc)?;
                let window_ms = j.window_ms.unwrap_or_else(|| {
                    let w = engine.config.convergence_of(pc).settle_window;
                    i64::try_from(w.as_millis()).unwrap_or(i64::MAX)
                });
                let intent = settle::Intent {
                    id: j.id,
                    before_fp: j.before_fp.clone(),
                    started_at: j.started_at,
                    window_ms,
                    checks: j.checks,
                    put_deadline: j.put_deadline,
                };
                fail_point("settle::before_get");
                match settle::once(engine, &portal, &intent).await? {
                    settle::Settle::Found(set) => {
                        tracing::warn!(
                            portal = name,
                            journal = j.id,
                            "settled: the portal holds a new set, so the rotation happened"
                        );
                        fail_point("settle::after_get");
                        let account = portal.account().await?;
                        report = seal_and_deliver(engine, pc, j.id, set, &account, true).await?;
                        report.outcome = Outcome::Recovered;
                    }
                    settle::Settle::NotApplied => {}
                    settle::Settle::Open { why, .. } => still_open = Some(why),
                }
            }
            // Sealed: the payloads are in the spool; delivered below, then closed.
            state::Phase::Sealed => sealed.push(j.id),
        }
    }
    let (delivered, pending) = deliver_portal(engine, name, None).await?;
    if !sealed.is_empty() {
        let (p, result) = (
            name.to_string(),
            if pending == 0 {
                state::LastResult::Ok
            } else {
                state::LastResult::DeliveryPending
            },
        );
        store
            .write(move |c| {
                for id in sealed {
                    state::close_journal(
                        c,
                        id,
                        state::Closed::Done,
                        Some("finished after a restart"),
                    )?;
                }
                state::record_rotated(c, &p, result)
            })
            .await?;
        report.outcome = Outcome::Recovered;
    }
    report.delivered += delivered;
    report.pending = pending;
    if report.delivered > 0 || report.pending > 0 {
        report.message = format!(
            "{} payload(s) delivered, {} pending",
            report.delivered, report.pending
        );
    }
    if let Some(why) = &still_open {
        report.outcome = Outcome::Settling;
        report.message = format!(
            "the outcome of a rotation is being settled: {why}; `deliver` or the daemon asks again"
        );
    }
    Ok((report, still_open))
}

/// [`recover_locked`], with an intent that stays open turned into
/// [`RotationError::Settling`]: what must not act on a portal whose outcome is unknown.
async fn recover_unless_settling(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    match recover_locked_why(engine, name).await? {
        (_, Some(why)) => Err(RotationError::Settling {
            portal: name.to_string(),
            why,
        }),
        (r, None) => Ok(r),
    }
}

/// Reads the current codes and delivers them again, without rotating (`resend`, and drift).
pub async fn resend(engine: &Engine, name: &str) -> Report {
    let run = async {
        let _lock = engine.coordinator.lock(name).await?;
        resend_locked(engine, name).await
    };
    match run.await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(portal = name, error = %e, "resend failed");
            Report::failed(name, &e)
        }
    }
}

async fn resend_locked(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    let pc = engine.portal_config(name)?;
    let store = engine.store()?.clone();
    recover_unless_settling(engine, name).await?;
    let known = known(&store, name).await?;
    // The set the preflight read is the one delivered: one GET, and no window in
    // which it could change between two reads.
    let mut pf = preflight(engine, pc, true, &known, false).await?;
    let set = match pf.codes.take() {
        Some(set) => set,
        None => pf.portal.codes().await?,
    };
    let p = name.to_string();
    let fp = store.fingerprinter().of_set(&set);
    let id = store
        .write(move |c| state::begin_intent(c, &p, "resend", Some(&fp), 0))
        .await?;
    seal_and_deliver(engine, pc, id, set, &pf.account, false).await
}

/// Every portal that has unfinished journal entries or pending payloads.
pub async fn portals_with_pending_work(engine: &Engine) -> Result<Vec<String>, RotationError> {
    let store = match engine.reader() {
        Some(s) => s.clone(),
        None => engine.store()?.clone(),
    };
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
    let _lock = engine.coordinator.lock(portal).await?;
    deliver_portal(engine, portal, Some(due_before)).await
}

/// Who runs this command, for the record of a decision taken by hand.
fn operator() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{} (uid {})",
        crate::docspace::model::escape_controls(&user),
        rustix::process::getuid().as_raw()
    )
}

/// `settle --abandon`: closes a portal's open intent by hand, recorded with who and why.
/// For a key revoked mid-rotation, whose intent no GET can ever settle.
pub async fn abandon(engine: &Engine, name: &str, why: &str) -> Result<Report, RotationError> {
    let store = engine.store()?.clone();
    let _lock = engine.coordinator.lock(name).await?;
    let note = format!("abandoned by {}: {}", operator(), why);
    let p = name.to_string();
    let closed = store
        .write(move |c| {
            let mut n = 0;
            for j in state::open_journal(c, Some(&p))? {
                if j.phase == state::Phase::Intent {
                    state::close_journal(c, j.id, state::Closed::Aborted, Some(&note))?;
                    state::add_history(c, &p, "abandoned", &note)?;
                    n += 1;
                }
            }
            Ok(n)
        })
        .await?;
    let msg = if closed == 0 {
        "no open intent to abandon".to_string()
    } else {
        tracing::warn!(portal = name, "an open intent was abandoned by hand");
        "the open intent was abandoned by hand (recorded); if the portal applied that PUT after all, the next read finds it as drift".to_string()
    };
    Ok(Report::new(name, Outcome::Abandoned, msg))
}

/// `forget`: drops what the state holds for a portal (or its sinks) that the config no
/// longer names: open intents and pending payloads. Recorded.
pub async fn forget(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    let store = engine.store()?.clone();
    let _lock = engine.coordinator.lock(name).await?;
    let keep: Vec<String> = engine
        .config
        .portals
        .get(name)
        .map(|pc| pc.sinks.clone())
        .unwrap_or_default();
    let configured = engine.config.portals.contains_key(name);
    let note = format!("forgotten by {}", operator());
    let p = name.to_string();
    let (known, intents, payloads) = store
        .write(move |c| {
            let known = configured || state::portal_row(c, &p)?.is_some();
            let mut intents = 0;
            if !configured {
                for j in state::open_journal(c, Some(&p))? {
                    state::close_journal(c, j.id, state::Closed::Aborted, Some(&note))?;
                    intents += 1;
                }
            }
            let payloads = state::drop_pending(c, &p, &keep)?;
            if intents + payloads > 0 {
                state::add_history(
                    c,
                    &p,
                    "forgotten",
                    &format!("{note}: {intents} open intent(s), {payloads} pending payload(s)"),
                )?;
            }
            Ok((known, intents, payloads))
        })
        .await?;
    if !known && intents + payloads == 0 {
        return Err(RotationError::Other {
            portal: name.to_string(),
            message: "no such portal in the config or the state: nothing to forget".into(),
        });
    }
    if intents + payloads == 0 {
        return Ok(Report::new(
            name,
            Outcome::Forgotten,
            "nothing to forget: no open intent or pending payload the config does not cover",
        ));
    }
    tracing::warn!(
        portal = name,
        intents,
        payloads,
        "dropped on purpose by `forget`"
    );
    Ok(Report::new(
        name,
        Outcome::Forgotten,
        format!("dropped {intents} open intent(s) and {payloads} pending payload(s)"),
    ))
}

/// Work the state holds that `engine`'s config would strand: open intents and pending
/// payloads of portals it no longer names, and payloads for sinks a portal no longer lists.
/// One sentence each, naming the portal (and sink) and the way out. Empty when none.
pub async fn stranded_work(engine: &Engine) -> Result<Vec<String>, RotationError> {
    let store = engine.store()?.clone();
    let (open, pending) = store
        .call(|c| Ok((state::open_journal(c, None)?, state::pending_rows(c)?)))
        .await?;
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for j in &open {
        if !engine.config.portals.contains_key(&j.portal) && seen.insert((j.portal.clone(), None)) {
            out.push(format!(
                "portal {} is no longer in the configuration, but a rotation of it is not finished \
                 (its codes may exist only in the state); restore its entry and run `tfa-rotator deliver`, \
                 or drop it on purpose with `tfa-rotator forget {}`",
                j.portal, j.portal
            ));
        }
    }
    for p in &pending {
        let key = match engine.config.portals.get(&p.portal) {
            None => (p.portal.clone(), None),
            Some(pc) if !pc.sinks.contains(&p.sink) => (p.portal.clone(), Some(p.sink.clone())),
            Some(_) => continue,
        };
        if !seen.insert(key.clone()) {
            continue;
        }
        out.push(match key.1 {
            None => format!(
                "portal {} is no longer in the configuration, but codes for it wait in the spool \
                 for sink {}; restore its entry and run `tfa-rotator deliver`, or drop them on purpose \
                 with `tfa-rotator forget {}`",
                p.portal, p.sink, p.portal
            ),
            Some(sink) => format!(
                "portal {} no longer lists sink {sink}, but codes for that sink wait in the spool; \
                 restore the sink and run `tfa-rotator deliver`, or drop them on purpose with \
                 `tfa-rotator forget {}`",
                p.portal, p.portal
            ),
        });
    }
    Ok(out)
}

/// The planner's view of a portal from its state row and its open intent (if any): the
/// one conversion `status`, `check` and the daemon share.
pub fn known_from(
    row: Option<&state::PortalRow>,
    open_intent: Option<&state::OpenJournal>,
    now: chrono::DateTime<Utc>,
) -> crate::schedule::plan::Known {
    let t = |ms: Option<i64>| ms.and_then(chrono::DateTime::from_timestamp_millis);
    // An intent is settled on its schedule; a sealed entry nobody finished (its process
    // died after the seal: in a cluster, another instance's) is finished now.
    let settle_at = open_intent.map(|j| match j.phase {
        state::Phase::Intent => t(j.next_check_at).unwrap_or(now),
        state::Phase::Sealed => now,
    });
    let Some(r) = row else {
        return crate::schedule::plan::Known {
            settle_at,
            ..Default::default()
        };
    };
    crate::schedule::plan::Known {
        entry_fp: r.entry_fp.clone(),
        last_fire_at: t(r.last_fire_at),
        last_success_at: t(r.last_success_at),
        retry_at: if r.last_result == Some(state::LastResult::Failed) {
            t(r.retry_at)
        } else {
            None
        },
        seen_at: t(r.seen_at),
        watch_retry_at: t(r.watch_retry_at),
        settle_at,
        paused_until: t(r.paused_until),
    }
}

/// [`known_of`], and the state's clock when it was read (one transaction).
pub async fn known_and_now(
    store: &Store,
    name: &str,
) -> Result<(crate::schedule::plan::Known, i64), StateError> {
    let p = name.to_string();
    let (row, open, now) = store
        .call(move |c| {
            // The clock first: whatever the reads miss was committed after it.
            let now = c.now()?;
            Ok((
                state::portal_row(c, &p)?,
                state::open_journal(c, Some(&p))?,
                now,
            ))
        })
        .await?;
    let at = chrono::DateTime::from_timestamp_millis(now).unwrap_or_else(Utc::now);
    Ok((known_from_open(row.as_ref(), &open, at), now))
}

/// [`known_from`] with the portal's open journal entries (oldest first).
fn known_from_open(
    row: Option<&state::PortalRow>,
    open: &[state::OpenJournal],
    now: chrono::DateTime<Utc>,
) -> crate::schedule::plan::Known {
    known_from(row, settled_by(open.iter()), now)
}

/// Of a portal's open journal entries (oldest first), the one its plan settles: its intent,
/// else its oldest sealed entry nobody finished.
pub fn settled_by<'a>(
    open: impl IntoIterator<Item = &'a state::OpenJournal>,
) -> Option<&'a state::OpenJournal> {
    let mut pick = None;
    for j in open {
        if j.phase == state::Phase::Intent {
            return Some(j);
        }
        pick = pick.or(Some(j));
    }
    pick
}

/// [`known_from`] for one portal, read from the store.
pub async fn known_of(
    store: &Store,
    name: &str,
) -> Result<crate::schedule::plan::Known, StateError> {
    let p = name.to_string();
    let (row, open) = store
        .call(move |c| Ok((state::portal_row(c, &p)?, state::open_journal(c, Some(&p))?)))
        .await?;
    Ok(known_from_open(row.as_ref(), &open, Utc::now()))
}

/// A portal's policy for the planner; `entry_fp` is [`Engine::entry_fingerprint`];
/// `follows_changes` is the coordinator's ([`crate::coordinator::Coordinator::follows_changes`]).
pub fn policy_of<'a>(
    config: &'a Config,
    pc: &'a PortalConfig,
    entry_fp: &'a str,
    follows_changes: bool,
) -> crate::schedule::plan::Policy<'a> {
    crate::schedule::plan::Policy {
        name: &pc.name,
        schedule: config.schedule_of(pc),
        convergence: config.convergence_of(pc),
        entry_fp,
        follows_changes,
    }
}
