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
//! One file per part of the protocol: `preflight` (1), `put` (2 and 3), [`settle`] (the
//! unknown outcomes of 3), `seal` (4 to 6), `recovery` (what earlier processes left, and
//! the commands that act on it by hand), [`drift`] (convergence), `failure` (backoff and
//! 429 pauses); `engine`, `report` and `known` (the planner's view of the state) serve them
//! all. Who may work on a portal is the [`crate::coordinator`]'s to say.
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
mod engine;
mod failure;
mod known;
pub mod limits;
mod preflight;
mod put;
mod recovery;
mod report;
mod seal;
pub mod settle;
pub mod webhooks;

pub use engine::{Engine, EngineError, entry_fingerprint_of, open_reader};
use failure::record_failure;
pub use failure::{rate_limited, restore_pauses};
pub use known::{Snapshot, known_and_now, known_from, policy_of, settled_by};
use preflight::{dry_rotate, held_by_min_interval, known, preflight, sink_of};
use put::rotate_inner;
use recovery::recover_unless_settling;
pub use recovery::{
    abandon, forget, portals_with_pending_work, recover, recover_all, resend, stranded_work,
};
pub use report::{Report, StateAfter, backoff};
pub use seal::deliver_due;
use seal::{deliver_portal, seal_and_deliver, seal_and_deliver_last};

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

pub use crate::outcome::{Outcome, Skip};

fn fail_point(name: &str) {
    fail::fail_point!(name, |_| ());
    let _ = name;
}

pub use crate::docspace::MAX_RETRY_AFTER;

/// Rotates one portal now, after settling what earlier processes left. `force` ignores
/// `min_interval` and a changed account. In a dry run, does only the read-only steps.
pub async fn rotate(engine: &Engine, name: &str, force: bool) -> Report {
    rotate_held(engine, name, force, None, None).await
}

/// [`rotate`] for the daemon: skipped (unless `force`) when the portal was rotated at or
/// after `begin.now` (the state's clock; no snapshot: when this call began), by another
/// process while this one waited for the portal or after the daemon planned it; under
/// `held`, a lock the caller already took (`None`: it takes one), and then what `begin`
/// read (under that lock) is not read again.
pub async fn rotate_held(
    engine: &Engine,
    name: &str,
    force: bool,
    begin: Option<Snapshot>,
    held: Option<state::PortalLock>,
) -> Report {
    let started = std::time::Instant::now();
    let report = match rotate_inner(engine, name, force, begin, held).await {
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
            } else if engine.coordinator.role() == crate::coordinator::Role::Command
                && !crate::logging::stderr_is_journal()
            {
                // A command prints its report, this error with its place in the config and
                // a hint (SPEC §2: once, on one line); the log says it only with -v. Under
                // journald (a timer's `rotate`) it stays an error, for `journalctl -p err`.
                tracing::info!(portal = name, error = %e, "rotation failed");
            } else {
                tracing::error!(portal = name, error = %e, "rotation failed");
            }
            let after = record_failure(engine, name, &e).await;
            let mut r = Report::failed(name, &e);
            r.after = after;
            r
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
