//! Steps 4 to 6, seal and deliver (SPEC §4): every sink's payload is built and committed
//! to the spool with the journal's `sealed` mark in one transaction, the plain text is
//! dropped, each payload is delivered on its own, and the outcomes close the journal entry.

use super::*;
use crate::state::history::{self, Cause, Event, Record, Trigger};

/// Steps 4–6 for a set in hand. `rotated`: a new set from our PUT (pins the account);
/// otherwise a resend of the set the portal holds.
pub(super) async fn seal_and_deliver(
    engine: &Engine,
    pc: &PortalConfig,
    journal_id: i64,
    set: CodeSet,
    account: &Account,
    rotated: bool,
) -> Result<Report, RotationError> {
    let sealed = seal_set(engine, pc, journal_id, set, account, rotated).await?;
    deliver_sealed(engine, pc, journal_id, sealed, rotated, false).await
}

/// [`seal_and_deliver`] as a rotation's last step: its last write also ends the portal's
/// claim in a cluster (nothing follows under it).
pub(super) async fn seal_and_deliver_last(
    engine: &Engine,
    pc: &PortalConfig,
    journal_id: i64,
    set: CodeSet,
    account: &Account,
) -> Result<Report, RotationError> {
    let sealed = seal_set(engine, pc, journal_id, set, account, true).await?;
    deliver_sealed(engine, pc, journal_id, sealed, true, true).await
}

/// A set sealed into the spool: its payloads, still in hand, and their spool ids.
struct Sealed {
    ids: Vec<i64>,
    /// The set's keyed fingerprint and the account, for the record.
    set_fp: String,
    account: String,
    payloads: Vec<(String, zeroize::Zeroizing<Vec<u8>>)>,
    unused: usize,
    total: usize,
}

/// Step 4: every sink's payload is built, and all are committed to the spool with the
/// journal's `sealed` mark (and for a rotation, the account pin and the schedule's fire)
/// in one transaction; the plain text is dropped.
async fn seal_set(
    engine: &Engine,
    pc: &PortalConfig,
    journal_id: i64,
    set: CodeSet,
    account: &Account,
    rotated: bool,
) -> Result<Sealed, RotationError> {
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
    let p = name.to_string();
    let pin = rotated.then(|| (account.id.clone(), engine.entry_fingerprint(pc)));
    let fp = set_fp.clone();
    let (ids, payloads) = store
        .write(move |c| {
            // A rotation, by hand or by the daemon, pins the account and counts for the
            // schedule: it is the rotation for this entry, and it consumes every fire up
            // to now.
            let pin = pin.as_ref().map(|(account, entry)| state::Pin {
                account_id: account,
                entry_fp: entry,
                fires_to: now_ms(),
            });
            let ids = state::seal_pinned(
                c,
                journal_id,
                &p,
                &fp,
                unused,
                total,
                &payloads,
                pin.as_ref(),
            )?;
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
    Ok(Sealed {
        ids,
        set_fp,
        account: account.id.clone(),
        payloads,
        unused,
        total,
    })
}

/// Steps 5 and 6: delivered now even when the process is stopping: each attempt is bounded
/// by the sink's timeout, and an operator who stops the service for good expects the set to
/// have reached its sinks, not to wait in the spool for a start that may never come. The
/// payloads are still in hand, so they are not read back; the outcomes are recorded with
/// the journal's close in one commit. A crash before it delivers them again on the next
/// start (the same set, so the sinks end up the same). The sinks are delivered at once,
/// each on its own: a mail server that hangs (for up to three times its timeout) does not
/// hold back the file sinks.
async fn deliver_sealed(
    engine: &Engine,
    pc: &PortalConfig,
    journal_id: i64,
    sealed: Sealed,
    rotated: bool,
    release: bool,
) -> Result<Report, RotationError> {
    let store = engine.store()?.clone();
    let name = pc.name.as_str();
    let Sealed {
        ids,
        set_fp,
        account,
        payloads,
        unused,
        total,
    } = sealed;
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
    let cause = Cause::current();
    let results = pc
        .sinks
        .iter()
        .zip(&outcomes)
        .map(|(s, (_, o))| {
            (
                s.clone(),
                if o.is_ok() { "delivered" } else { "pending" }.into(),
            )
        })
        .collect();
    let write = move |c: &dyn state::db::Sql| {
        if rotated {
            record_rotation(c, &p, &cause, result, &set_fp, &account, &results)?;
        }
        for (id, outcome) in &outcomes {
            outcome.record(c, *id, &cause)?;
        }
        state::close_journal(c, journal_id, state::Closed::Done, None)?;
        // A rotation's update returns the row after it; a resend reads it (its deliveries
        // are its records).
        let outlook = if rotated {
            Some(state::record_rotated(c, &p, result, None)?)
        } else {
            None
        };
        if release {
            c.release_claim(&p)?;
        }
        match outlook {
            Some(o) => Ok(StateAfter::from(o)),
            None => StateAfter::read(c, &p),
        }
    };
    // A plain payload delivered leaves its text in the WAL's frames until a checkpoint.
    let after = if plain_delivered {
        store.write_then_checkpoint(write).await?
    } else {
        store.write(write).await?
    };
    let msg = delivered_message(pc, rotated, pending, unused, total);
    tracing::info!(portal = name, delivered, pending, "{msg}");
    let outcome = [Outcome::Resent, Outcome::Rotated][usize::from(rotated)];
    let mut r = Report::new(name, outcome, msg);
    (r.unused, r.total, r.delivered, r.pending) = (Some(unused), Some(total), delivered, pending);
    r.after = Some(after);
    Ok(r)
}

/// A new set's records, in the order things happened: the settle that found it (when a
/// lost answer is what it completes), then the rotation with each sink's first result.
fn record_rotation(
    c: &dyn state::db::Sql,
    portal: &str,
    cause: &Cause,
    result: state::LastResult,
    set_fp: &str,
    account: &str,
    results: &std::collections::BTreeMap<String, String>,
) -> Result<(), StateError> {
    if cause.trigger == Some(Trigger::Settle) {
        let mut settled = Record::new(Event::Settled, portal, cause).outcome("applied");
        settled.fingerprint = Some(set_fp.to_string());
        history::append(c, settled)?;
    }
    let mut rec = Record::new(Event::Rotated, portal, cause).outcome(result.as_str());
    (rec.account, rec.fingerprint, rec.sinks) = (
        Some(account.to_string()),
        Some(set_fp.to_string()),
        Some(results.clone()),
    );
    history::append(c, rec).map(drop)
}

/// The report's sentence for a sealed set and its first delivery.
fn delivered_message(
    pc: &PortalConfig,
    rotated: bool,
    pending: usize,
    unused: usize,
    total: usize,
) -> String {
    match (rotated, pending) {
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
    }
}

/// What one delivery attempt did, to be recorded against its spool entry.
pub(super) enum Attempt {
    Delivered,
    /// The sink's error (whether the server refused for good, what is left to deliver
    /// after a partial delivery), and when to try again (Unix ms).
    Failed {
        error: crate::sinks::DeliveryError,
        next_at: i64,
    },
}

impl Attempt {
    pub(super) fn is_ok(&self) -> bool {
        matches!(self, Attempt::Delivered)
    }

    /// Records it in the state: a delivered payload (and older ones of its sink) leave the
    /// spool; a failed one waits for its next attempt.
    pub(super) fn record(
        &self,
        c: &dyn state::db::Sql,
        id: i64,
        cause: &Cause,
    ) -> Result<(), StateError> {
        match self {
            Attempt::Delivered => state::delivered(c, id, cause),
            Attempt::Failed { error, next_at } => state::delivery_failed(
                c,
                id,
                &error.message,
                *next_at,
                !error.temporary,
                error.rest.as_deref().map(|v| v.as_slice()),
                cause,
            ),
        }
    }
}

/// One delivery attempt of a sealed payload (`attempts` made before), counted and logged.
pub(super) async fn attempt_delivery(
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
pub(super) async fn deliver_portal(
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
        let cause = Cause::current();
        if ok && !encrypted {
            store
                .write_then_checkpoint(move |c| outcome.record(c, id, &cause))
                .await?;
        } else {
            store.write(move |c| outcome.record(c, id, &cause)).await?;
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

/// Delivers the payloads of `portal` that are due by `due_before` (the daemon's retries).
pub async fn deliver_due(
    engine: &Engine,
    portal: &str,
    due_before: i64,
) -> Result<(usize, usize), RotationError> {
    let _lock = engine.coordinator.lock(portal).await?;
    deliver_portal(engine, portal, Some(due_before)).await
}
