//! Steps 2 and 3, intent and PUT (SPEC §4): the intent is committed before the one PUT,
//! which is never retried and is verified by a GET; a refusal closes the intent, any other
//! outcome leaves it open for [`super::settle`].

use super::preflight::{Known, Preflight};
use super::*;

/// A rotation under the portal's lock (taken here unless `held`): what earlier processes
/// left is settled first, then the checks that may hold it back, the preflight, the intent,
/// the PUT and the GET that verifies it.
pub(super) async fn rotate_inner(
    engine: &Engine,
    name: &str,
    force: bool,
    begin: Option<Snapshot>,
    held: Option<state::PortalLock>,
) -> Result<Report, RotationError> {
    let pc = engine.portal_config(name)?;
    if engine.dry_run {
        return dry_rotate(engine, pc, force).await;
    }
    if engine.is_stopping() {
        return Ok(not_started(name));
    }
    let store = engine.store()?.clone();
    let (since, seen) = match begin {
        // Read under the lock the caller holds: still what the state says.
        Some(s) if held.is_some() => (s.now, Some(s)),
        Some(s) => (s.now, None),
        None => (store.now().await?, None),
    };
    let _lock = match held {
        Some(l) => l,
        None => engine.coordinator.lock(name).await?,
    };
    let known = match ready(engine, pc, &store, since, force, seen).await? {
        Ok(known) => known,
        Err(held_back) => return Ok(held_back),
    };
    tracing::info!(portal = name, "preflight");
    let pf = preflight(engine, pc, false, &known, force).await?;
    if engine.is_stopping() {
        return Ok(not_started(name));
    }
    let intent = write_intent(engine, pc, &store, &pf).await?;
    let put = send_put(engine, name, &store, &pf, &intent).await?;
    verify(engine, pc, &pf, &intent, put).await
}

/// Not a failure: nothing was sent, and the next start plans the portal again.
fn not_started(name: &str) -> Report {
    Report::new(
        name,
        Outcome::Skipped(Skip::Stopping),
        "not started: the process is stopping",
    )
}

/// Under the lock: settles what an earlier process left (an intent still open holds the
/// rotation back until it is settled), then reads what the state knows and says whether
/// anything holds the rotation back: a 429's pause, a rotation by another process since
/// `since` (unless `force`), `min_interval`. `Err(report)`: held back, and why.
async fn ready(
    engine: &Engine,
    pc: &PortalConfig,
    store: &Store,
    since: i64,
    force: bool,
    seen: Option<Snapshot>,
) -> Result<Result<Known, Report>, RotationError> {
    let name = pc.name.as_str();
    // One read tells whether an earlier process left work here (only a portal with
    // leftovers pays for recovery, and reads again after it) and what the state knows;
    // the caller may have read it already, under the lock.
    let seen = match seen {
        Some(s) => s,
        None => {
            let p = name.to_string();
            store.call(move |c| Snapshot::read(c, &p, since)).await?.1
        }
    };
    let Snapshot {
        leftovers,
        known: seen,
        ..
    } = seen;
    let known = if leftovers {
        recover_unless_settling(engine, name).await?;
        known(store, name).await?
    } else {
        seen
    };
    let row = known.row.as_ref();
    let at = |ms: i64| {
        crate::schedule::fmt_utc(chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default())
    };
    // A 429's pause outlives the process that was told: nothing is sent before it ends.
    if let Some(until) = row.and_then(|r| r.paused_until).filter(|t| *t > now_ms()) {
        let msg = format!(
            "not contacted: the portal answered 429 Too Many Requests and asked to wait until {}; the daemon resumes then, or run the command again after it",
            at(until)
        );
        tracing::warn!(portal = name, "{msg}");
        return Ok(Err(Report::new(name, Outcome::Failed, msg)));
    }
    if !force && let Some(done) = row.and_then(|r| r.last_success_at).filter(|t| *t >= since) {
        let msg = format!(
            "skipped: rotated meanwhile by another process ({}); use --force to rotate again",
            at(done)
        );
        tracing::info!(portal = name, "rotated meanwhile by another process");
        return Ok(Err(Report::new(name, Outcome::Skipped(Skip::NotDue), msg)));
    }
    if let Some(r) = held_by_min_interval(engine, pc, &known, force) {
        tracing::info!(portal = name, "skipped by min_interval");
        return Ok(Err(r));
    }
    Ok(Ok(known))
}

/// Step 2: what the preflight saw and the intent share one commit (one fsync before the
/// PUT). Returns the intent, `started_at` on the state's clock (the settle window's start).
async fn write_intent(
    engine: &Engine,
    pc: &PortalConfig,
    store: &Store,
    pf: &Preflight,
) -> Result<settle::Intent, RotationError> {
    let window = engine.config.convergence_of(pc).settle_window;
    let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
    let (p, fp, unused, total) = (pc.name.clone(), pf.before_fp.clone(), pf.unused, pf.total);
    let (id, started_at) = store
        .write(move |c| {
            let id = state::begin_rotation(c, &p, fp.as_deref(), (unused, total), window_ms)?;
            Ok((id, c.now()?))
        })
        .await?;
    tracing::info!(portal = %pc.name, journal = id, "intent recorded");
    Ok(settle::Intent {
        id,
        before_fp: pf.before_fp.clone(),
        started_at,
        window_ms,
        checks: 0,
        put_deadline: None,
    })
}

/// Step 3: the one PUT, time-bounded: past its budget after the intent, this process sends
/// none (in a cluster another instance may have waited the deadline out and settled the
/// intent; it stays open and is settled like any PUT of unknown outcome). A refusal by the
/// portal itself closes the intent and is the error; any other answer is returned for the
/// GET to judge.
async fn send_put(
    engine: &Engine,
    name: &str,
    store: &Store,
    pf: &Preflight,
    intent: &settle::Intent,
) -> Result<Result<CodeSet, ApiError>, RotationError> {
    let licensed = std::time::Instant::now();
    fail_point("rotation::after_intent");
    if engine
        .coordinator
        .put_too_late(licensed, engine.config.daemon.http_timeout)
    {
        tracing::error!(
            portal = name,
            journal = intent.id,
            late_ms = licensed.elapsed().as_millis() as u64,
            "the PUT's deadline passed before it was sent (the process stalled); no PUT was sent"
        );
        return Err(RotationError::State(StateError::Fenced {
            portal: name.to_string(),
            why: "the PUT's deadline passed before it was sent".into(),
        }));
    }
    let put = pf.portal.new_codes().await;
    fail_point("rotation::after_put");
    match put {
        Err(e) if e.is_refusal() => {
            // The portal itself said no: nothing changed, the intent ends here.
            let (id, note) = (intent.id, format!("the portal refused the PUT: {e}"));
            store
                .write(move |c| state::close_journal(c, id, state::Closed::Aborted, Some(&note)))
                .await?;
            Err(RotationError::Api(e))
        }
        Err(e) => {
            tracing::warn!(portal = name, error = %e, "the PUT's outcome is unknown; asking the portal which set is valid");
            Ok(Err(e))
        }
        Ok(set) => Ok(Ok(set)),
    }
}

/// The GET is the truth: the set delivered is the one it returns. A new set is sealed and
/// delivered; the old one after the window means the PUT did not take effect; otherwise
/// the intent stays open, settling.
async fn verify(
    engine: &Engine,
    pc: &PortalConfig,
    pf: &Preflight,
    intent: &settle::Intent,
    put: Result<CodeSet, ApiError>,
) -> Result<Report, RotationError> {
    let name = pc.name.as_str();
    match settle::once(engine, &pf.portal, intent).await? {
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
            let mut report = seal_and_deliver_last(engine, pc, intent.id, set, &pf.account).await?;
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
            match &put {
                // The PUT answered with a set, yet the portal holds the old one.
                Ok(_) => {
                    engine
                        .metrics
                        .put_answer(name, crate::outcome::PutAnswer::Differs);
                    tracing::warn!(
                        portal = name,
                        "the PUT answered with a set the portal does not hold; not delivered"
                    );
                }
                Err(e) if matches!(e.kind, crate::docspace::ApiErrorKind::Malformed { .. }) => {
                    engine
                        .metrics
                        .put_answer(name, crate::outcome::PutAnswer::Unusable);
                }
                Err(_) => {}
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
pub(super) fn compare_put_answer(
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
                engine
                    .metrics
                    .put_answer(name, crate::outcome::PutAnswer::Differs);
                tracing::warn!(
                    portal = name,
                    "the PUT answered with another set than the portal holds; the portal's set is delivered"
                );
            }
        }
        Err(e) if matches!(e.kind, crate::docspace::ApiErrorKind::Malformed { .. }) => {
            engine
                .metrics
                .put_answer(name, crate::outcome::PutAnswer::Unusable);
            tracing::warn!(portal = name, error = %e, "the PUT's answer was unusable; the portal's set is delivered");
        }
        Err(_) => {}
    }
}
