//! Drift: the portal's set changed without us, and the watch that finds it.
//!
//! The baseline is, per portal and sink, the fingerprint of the newest set sealed for that
//! sink, delivered or still pending (so a pending delivery is not drift). A GET showing
//! another set while no intent is open means a person regenerated the codes, another tool
//! did, or a PUT was applied after its settle window: the sinks hold a dead set. By the
//! portal's `on_drift`, the current set is delivered to every sink as `resend` does, or the
//! portal is rotated; either way the sinks converge on the set the portal accepts. Drift is
//! always logged as a warning, counted, recorded for `status` and announced to `[alerts]`.

use std::collections::HashMap;

use super::{Engine, Outcome, Report, RotationError};
use crate::config::{OnDrift, PortalConfig};
use crate::state;
use crate::state::history::{self, Trigger};

/// The sinks of `pc` whose baseline is not `fp`. A sink without a baseline (new, or never
/// delivered) has nothing to compare and is not drift.
pub fn drifted_sinks(
    pc: &PortalConfig,
    baselines: &HashMap<String, String>,
    fp: &str,
) -> Vec<String> {
    pc.sinks
        .iter()
        .filter(|s| {
            baselines
                .get(s.as_str())
                .or_else(|| baselines.get("*"))
                .is_some_and(|b| b != fp)
        })
        .cloned()
        .collect()
}

/// Records drift found by `by` (a preflight, the watch): log, metric, state, notice; and
/// decides whether it may be acted on (`acts`: the caller would resend or rotate because of
/// it). At most [`state::DRIFT_ACTIONS`] actions a portal in a rolling hour, counted in the
/// state (shared by the instances of a cluster): a portal whose set changes more often is
/// flapping (two backends that disagree), and acting on each change would send a mail per
/// read, or kill the owners' codes with a PUT per read. While it flaps, drift is counted and
/// logged, and one notice goes out when it begins.
pub async fn record(
    engine: &Engine,
    pc: &PortalConfig,
    sinks: &[String],
    by: &str,
    acts: bool,
) -> state::DriftVerdict {
    let name = pc.name.as_str();
    engine.metrics.drift(name);
    let Ok(store) = engine.store() else {
        tracing::warn!(
            portal = name,
            sinks = %sinks.join(","),
            found_by = by,
            "drift: the portal's codes changed outside tfa-rotator; its sinks hold a set it no longer accepts"
        );
        return state::DriftVerdict::Noted;
    };
    let action = match engine.config.convergence_of(pc).on_drift {
        OnDrift::Resend => "the current codes are delivered to every sink again",
        OnDrift::Rotate => "the portal is rotated",
    };
    let action = if acts {
        action
    } else {
        "the rotation under way converges it"
    };
    let detail = format!("found by {by}; sinks {}; {action}", sinks.join(", "));
    let subject = format!("[tfa-rotator] {name}: codes changed outside tfa-rotator");
    let body = format!(
        "The backup codes of portal {name} ({}) are no longer the set tfa-rotator last delivered to\n\
         {}. Someone regenerated them in the web UI, another tool did, or a rotation's PUT was\n\
         applied after tfa-rotator stopped waiting for it. Found by {by}; {action}.\n\n\
         If nobody at your end changed the codes, find out who did: whoever can regenerate\n\
         them holds the account's API key or session.\n\n-- \ntfa-rotator\n",
        pc.url,
        sinks.join(", ")
    );
    let flapping_subject = format!("[tfa-rotator] {name}: codes keep changing (flapping)");
    let flapping_body = format!(
        "The backup codes of portal {name} ({}) changed outside tfa-rotator more than {} times\n\
         within an hour. tfa-rotator stops acting on it (no resend, no rotation) until an hour\n\
         passes with at most one change; it goes on reading and logging.\n\n\
         Two backends behind the portal's address that answer with different sets do this, as\n\
         does someone regenerating the codes again and again. Find out which before you trust\n\
         the codes the sinks hold.\n\n-- \ntfa-rotator\n",
        pc.url,
        state::DRIFT_ACTIONS
    );
    let p = name.to_string();
    let cause = state::history::Cause::current();
    let r = store
        .write(move |c| {
            let verdict = state::record_drift(c, &p, acts, &detail, &cause)?;
            let now = state::now_ms();
            match verdict {
                state::DriftVerdict::Flapping { began: true } => {
                    state::add_notice(c, &p, "flapping", &flapping_subject, &flapping_body, now)?
                }
                state::DriftVerdict::Flapping { began: false } => {}
                _ => state::add_notice(c, &p, "drift", &subject, &body, now)?,
            }
            Ok(verdict)
        })
        .await;
    let verdict = match r {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(portal = name, error = %e, "could not record drift; not acting on it");
            return state::DriftVerdict::Flapping { began: false };
        }
    };
    match verdict {
        state::DriftVerdict::Flapping { began } => tracing::warn!(
            portal = name,
            sinks = %sinks.join(","),
            found_by = by,
            began,
            "drift while the portal is flapping (its set changed more than {} times within an hour): not acted on",
            state::DRIFT_ACTIONS
        ),
        _ => tracing::warn!(
            portal = name,
            sinks = %sinks.join(","),
            found_by = by,
            "drift: the portal's codes changed outside tfa-rotator; its sinks hold a set it no longer accepts"
        ),
    }
    verdict
}

/// What a watch read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watched {
    /// The set is what the sinks hold, and enough codes are unused.
    Steady,
    /// Drift was found and converged (or its delivery is pending).
    Converged,
    /// Too few unused codes: rotated.
    Rotated,
    /// An intent is open; the watch leaves it to settling.
    Settling,
    /// The read or what followed failed.
    Failed,
    /// Drift was found while the portal is flapping: recorded, not acted on.
    Flapping,
}

/// The daemon's periodic read of a portal (`watch_every`): records what it saw, converges
/// drift by `on_drift`, and rotates when fewer than `rotate_when_unused_below` codes remain.
/// Runs under the portal's lock, so it never takes another process's rotation in flight for
/// drift. Returns what it did and the unused count.
pub async fn watch(engine: &Engine, name: &str) -> (Watched, Option<usize>) {
    match watch_inner(engine, name, true).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(portal = name, error = %e, "the watch read failed");
            if matches!(&e, RotationError::Api(a) if matches!(a.kind, crate::docspace::ApiErrorKind::RateLimited { .. }))
            {
                super::rate_limited(engine, name, e.retry_after()).await;
            }
            (Watched::Failed, None)
        }
    }
}

/// One read that converges drift (`unused_rule`: and rotates on too few unused codes, as
/// the watch does).
async fn watch_inner(
    engine: &Engine,
    name: &str,
    unused_rule: bool,
) -> Result<(Watched, Option<usize>), RotationError> {
    let pc = engine.portal_config(name)?;
    let Some(store) = engine.store.clone() else {
        return dry_watch(engine, pc).await;
    };
    let lock = match engine.coordinator.lock(name).await {
        // Another instance holds it: it reads the portal itself.
        Err(e) if engine.coordinator.held_elsewhere(&e) => {
            return Ok((Watched::Steady, None));
        }
        l => l?,
    };
    match super::recover_unless_settling(engine, name).await {
        Err(RotationError::Settling { .. }) => return Ok((Watched::Settling, None)),
        other => drop(other?),
    }
    let portal = engine.portal(pc)?;
    let codes = portal.codes().await?;
    let (unused, total) = (codes.unused(), codes.total());
    let fp = store.fingerprinter().of_set(&codes);
    let (p, seen) = (name.to_string(), fp.clone());
    let (baselines, last_success) = store
        .write(move |c| {
            state::record_seen(c, &p, &seen, unused, total)?;
            let last = state::portal_row(c, &p)?.and_then(|r| r.last_success_at);
            Ok((state::sink_sets(c, &p)?, last))
        })
        .await?;
    engine.metrics.unused(name, unused);
    let drifted = drifted_sinks(pc, &baselines, &fp);
    if !drifted.is_empty() {
        if record(engine, pc, &drifted, "the watch", true).await != state::DriftVerdict::Act {
            return Ok((Watched::Flapping, Some(unused)));
        }
        return match drift_action(engine, pc, last_success) {
            OnDrift::Resend => {
                // The set just read is delivered: no second GET, no window.
                let account = portal.account().await?;
                let p = name.to_string();
                let id = store
                    .write(move |c| state::begin_intent(c, &p, "resend", Some(&fp), 0))
                    .await?;
                super::fail_point("drift::before_resend");
                let r = history::triggered_by(
                    Trigger::Drift,
                    super::seal_and_deliver(engine, pc, id, codes, &account, false),
                )
                .await?;
                Ok((Watched::Converged, r.unused))
            }
            OnDrift::Rotate => {
                drop((codes, lock));
                let r =
                    history::triggered_by(Trigger::Drift, super::rotate(engine, name, true)).await;
                Ok((outcome_of(&r), r.unused.or(Some(unused))))
            }
        };
    }
    drop(codes);
    let below = engine
        .config
        .schedule_of(pc)
        .and_then(|s| s.rotate_when_unused_below);
    match below.filter(|_| unused_rule) {
        Some(below) if unused < below => {
            tracing::info!(
                portal = name,
                unused,
                below,
                "too few unused codes: rotating"
            );
            drop(lock);
            let r =
                history::triggered_by(Trigger::Unused, super::rotate(engine, name, false)).await;
            Ok((outcome_of(&r), r.unused.or(Some(unused))))
        }
        _ => Ok((Watched::Steady, Some(unused))),
    }
}

/// What drift found now triggers: `on_drift`, except that rotating kills the codes the
/// owners hold, so within `min_interval` of the last rotation drift is resent instead (a
/// portal that drifts often is not rotated more often than its policy allows).
fn drift_action(engine: &Engine, pc: &PortalConfig, last_success: Option<i64>) -> OnDrift {
    let on_drift = engine.config.convergence_of(pc).on_drift;
    let min_interval = engine.config.schedule_of(pc).and_then(|s| s.min_interval);
    let last = last_success.and_then(chrono::DateTime::from_timestamp_millis);
    match on_drift {
        OnDrift::Rotate
            if crate::schedule::within_min_interval(last, min_interval, chrono::Utc::now())
                .is_some() =>
        {
            tracing::info!(
                portal = %pc.name,
                "drift within min_interval of the last rotation: resent, not rotated"
            );
            OnDrift::Resend
        }
        o => o,
    }
}

/// A dry run's watch: read, compare with what the state knows (read-only), and say what
/// would be done.
async fn dry_watch(
    engine: &Engine,
    pc: &PortalConfig,
) -> Result<(Watched, Option<usize>), RotationError> {
    let name = pc.name.as_str();
    let codes = engine.portal(pc)?.codes().await?;
    let unused = codes.unused();
    if let Some(reader) = engine.reader() {
        let fp = reader.fingerprinter().of_set(&codes);
        let p = name.to_string();
        let (baselines, open) = reader
            .call(move |c| Ok((state::sink_sets(c, &p)?, state::open_journal(c, Some(&p))?)))
            .await?;
        if !open.is_empty() {
            // An open intent: a new set is being settled, not drift.
            return Ok((Watched::Settling, Some(unused)));
        }
        let drifted = drifted_sinks(pc, &baselines, &fp);
        if !drifted.is_empty() {
            record(engine, pc, &drifted, "a dry run's watch", false).await;
            return Err(RotationError::Other {
                portal: name.to_string(),
                message: format!(
                    "dry run: drift: sinks {} hold a set the portal no longer accepts; a real run would {}",
                    drifted.join(", "),
                    match engine.config.convergence_of(pc).on_drift {
                        OnDrift::Resend => "deliver the current codes to them again",
                        OnDrift::Rotate => "rotate",
                    }
                ),
            });
        }
    }
    tracing::info!(portal = name, unused, "dry run: watch read");
    Ok((Watched::Steady, Some(unused)))
}

/// SPEC §6, drift that is never missed: reads (one GET each) the portals in `also` (those
/// whose pending work a command just finished) and those with an intent closed by hand or
/// as not applied within twice their settle window (a PUT may have been applied after all),
/// and converges any drift by `on_drift`. Used by `deliver` and at the start of `run`.
pub async fn converge_recent(engine: &Engine, also: &[String]) -> Vec<Report> {
    // A dry run reads the state read-only and reports what it finds.
    let Some(store) = engine.reader() else {
        return Vec::new();
    };
    // How far back a closed intent is read for: twice its portal's settle window, in ms.
    let lookback = |pc: &PortalConfig| {
        2 * i64::try_from(engine.config.convergence_of(pc).settle_window.as_millis())
            .unwrap_or(i64::MAX / 4)
    };
    let longest = engine.config.portals.values().map(lookback).max();
    let since = state::now_ms() - longest.unwrap_or_default();
    let closed = match store.call(move |c| state::closed_since(c, since)).await {
        Ok(c) => c,
        Err(e) => return vec![Report::failed("*", &e.into())],
    };
    let now = state::now_ms();
    let mut names: Vec<String> = closed
        .into_iter()
        .filter(|(p, at)| {
            engine
                .config
                .portals
                .get(p)
                .is_some_and(|pc| now - at <= lookback(pc))
        })
        .map(|(p, _)| p)
        .chain(
            also.iter()
                .filter(|p| engine.config.portals.contains_key(*p))
                .cloned(),
        )
        .collect();
    names.sort();
    names.dedup();
    let mut out = Vec::new();
    for name in names {
        let report = match watch_inner(engine, &name, false).await {
            Ok((w @ (Watched::Converged | Watched::Rotated), unused)) => {
                let (outcome, done) = if w == Watched::Converged {
                    (
                        Outcome::Resent,
                        "the current codes were delivered to every sink",
                    )
                } else {
                    (Outcome::Rotated, "rotated (on_drift = \"rotate\")")
                };
                let mut r = Report::new(
                    &name,
                    outcome,
                    format!("drift: the portal's codes are not the set its sinks hold; {done}"),
                );
                r.unused = unused;
                r
            }
            Ok((Watched::Flapping, _)) => Report::new(
                &name,
                Outcome::Failed,
                "drift while the portal is flapping: not acted on; its sinks may hold a set it no longer accepts",
            ),
            Ok((Watched::Failed, _)) => Report::new(
                &name,
                Outcome::Failed,
                "drift was found but not converged (see the log)",
            ),
            Ok((Watched::Steady | Watched::Settling, _)) => continue,
            Err(e) => {
                tracing::warn!(portal = %name, error = %e, "the read for drift failed");
                Report::failed(&name, &e)
            }
        };
        out.push(report);
    }
    out
}

fn outcome_of(r: &Report) -> Watched {
    match r.outcome {
        Outcome::Rotated | Outcome::Recovered => Watched::Rotated,
        Outcome::Settling => Watched::Settling,
        Outcome::Failed => Watched::Failed,
        _ => Watched::Steady,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn portal(sinks: &[&str]) -> PortalConfig {
        PortalConfig {
            name: "acme".into(),
            url: url::Url::parse("https://acme.example/").unwrap(),
            api_key: crate::config::Located {
                value: crate::config::secret::SecretRef::Env("K".into()),
                loc: crate::config::Loc::default(),
            },
            schedule: None,
            sinks: sinks.iter().map(|s| s.to_string()).collect(),
            webhooks: Vec::new(),
            at: crate::config::Loc::default(),
        }
    }

    #[test]
    fn drift_is_a_sink_whose_baseline_differs() {
        let pc = portal(&["a", "b", "c"]);
        let mut base = HashMap::new();
        assert!(
            drifted_sinks(&pc, &base, "x").is_empty(),
            "nothing known, no drift"
        );
        base.insert("*".to_string(), "old".to_string());
        assert_eq!(drifted_sinks(&pc, &base, "old"), Vec::<String>::new());
        assert_eq!(drifted_sinks(&pc, &base, "new"), vec!["a", "b", "c"]);
        base.insert("a".to_string(), "new".to_string());
        assert_eq!(
            drifted_sinks(&pc, &base, "new"),
            vec!["b", "c"],
            "a sink's own row wins over the upgrade's '*'"
        );
    }
}
