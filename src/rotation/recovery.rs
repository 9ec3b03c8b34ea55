//! Recovery (SPEC §4): what earlier processes left (open intents, sealed payloads) is
//! settled and delivered before anything else; `resend`, `abandon` and `forget` act on
//! it by hand; a config that would strand it is refused.

use super::*;
use crate::state::history::{self, Cause, Event, Record, Trigger};

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
pub(super) async fn recover_locked(engine: &Engine, name: &str) -> Result<Report, RotationError> {
    recover_locked_why(engine, name).await.map(|(r, _)| r)
}

/// [`recover_locked`], and why an intent stays open, if one does.
pub(super) async fn recover_locked_why(
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
                let intent = intent_of(engine, pc, &j);
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
                        report = history::triggered_by(
                            Trigger::Settle,
                            seal_and_deliver(engine, pc, j.id, set, &account, true),
                        )
                        .await?;
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
    if !sealed.is_empty() {
        record_resumed(&store, name).await?;
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
                state::record_rotated(c, &p, result, None).map(drop)
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

/// What a settle asks about an open intent (its window: the one it was written with, or
/// for an intent of an older version, the portal's).
fn intent_of(engine: &Engine, pc: &PortalConfig, j: &state::OpenJournal) -> settle::Intent {
    let window_ms = j.window_ms.unwrap_or_else(|| {
        let w = engine.config.convergence_of(pc).settle_window;
        i64::try_from(w.as_millis()).unwrap_or(i64::MAX)
    });
    settle::Intent {
        id: j.id,
        before_fp: j.before_fp.clone(),
        started_at: j.started_at,
        window_ms,
        checks: j.checks,
        put_deadline: j.put_deadline,
    }
}

/// A set an earlier process sealed is recorded as rotated before its deliveries are.
async fn record_resumed(store: &state::Store, name: &str) -> Result<(), StateError> {
    let (p, cause) = (name.to_string(), Cause::current());
    store
        .write(move |c| {
            let rec = Record::new(Event::Rotated, &p, &cause)
                .outcome("sealed")
                .reason("sealed by an earlier process; delivered after a restart");
            history::append(c, rec).map(drop)
        })
        .await
}

/// [`recover_locked`], with an intent that stays open turned into
/// [`RotationError::Settling`]: what must not act on a portal whose outcome is unknown.
pub(super) async fn recover_unless_settling(
    engine: &Engine,
    name: &str,
) -> Result<Report, RotationError> {
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

pub(super) async fn resend_locked(engine: &Engine, name: &str) -> Result<Report, RotationError> {
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

/// `settle --abandon`: closes a portal's open intent by hand, recorded with who and why.
/// For a key revoked mid-rotation, whose intent no GET can ever settle.
pub async fn abandon(engine: &Engine, name: &str, why: &str) -> Result<Report, RotationError> {
    let store = engine.store()?.clone();
    let _lock = engine.coordinator.lock(name).await?;
    let cause = Cause::current();
    let note = format!("abandoned by {}: {}", cause.by, why);
    let (p, why) = (name.to_string(), why.to_string());
    let closed = store
        .write(move |c| {
            let mut n = 0;
            for j in state::open_journal(c, Some(&p))? {
                if j.phase == state::Phase::Intent {
                    state::close_journal(c, j.id, state::Closed::Aborted, Some(&note))?;
                    let rec = Record::new(Event::Abandoned, &p, &cause).reason(why.as_str());
                    history::append(c, rec)?;
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
    let cause = Cause::current();
    let note = format!("forgotten by {}", cause.by);
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
                let rec = Record::new(Event::Forgotten, &p, &cause).outcome(format!(
                    "{intents} open intent(s), {payloads} pending payload(s) dropped"
                ));
                history::append(c, rec)?;
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
