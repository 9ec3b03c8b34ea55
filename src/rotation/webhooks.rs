//! Webhook events (SPEC §5): each webhook sink follows, per portal, the history; the records
//! after its cursor are its pending events, sent in order. A webhook that is down holds
//! nothing back but its own events: they wait, retried with the deliveries' backoff.
//!
//! A webhook sink listed in a portal's `sinks` is sent that portal's events (its `events`);
//! one listed in `[alerts] sinks` is sent every `alert`, of every portal and of the config
//! (the chain `*`). Records of a webhook's own deliveries raise no event (of any webhook:
//! two webhooks never feed each other). Delivery is at least once: a crash after the POST
//! and before its record sends it again, with the same `X-TFA-Delivery`.

use std::collections::{BTreeMap, BTreeSet};

use futures::StreamExt;

use super::Engine;
use crate::sinks::{Sink, WebhookSink};
use crate::state::history::{self, Cause, Cursor, Event, Record};
use crate::state::{self, StateError, now_ms};

/// Records read per look at one cursor.
const BATCH: i64 = 64;

/// What one webhook follows in one portal's chain.
struct Follow {
    /// Its `events`, when a portal lists it.
    portal_events: bool,
    /// `alert` records, when `[alerts]` lists it.
    alerts: bool,
}

/// Every (webhook, portal) the config follows.
fn follows(engine: &Engine) -> BTreeMap<(String, String), Follow> {
    let mut out: BTreeMap<(String, String), Follow> = BTreeMap::new();
    for pc in engine.config.portals.values() {
        for w in &pc.webhooks {
            out.insert(
                (w.clone(), pc.name.clone()),
                Follow {
                    portal_events: true,
                    alerts: false,
                },
            );
        }
    }
    let alert_hooks = engine
        .config
        .alerts
        .iter()
        .flat_map(|a| a.sinks.iter())
        .filter(|n| webhook(engine, n).is_some());
    for w in alert_hooks {
        let chains = engine
            .config
            .portals
            .keys()
            .map(String::as_str)
            .chain([history::CONFIG_CHAIN]);
        for p in chains {
            out.entry((w.clone(), p.to_string()))
                .or_insert(Follow {
                    portal_events: false,
                    alerts: false,
                })
                .alerts = true;
        }
    }
    out
}

fn webhook<'a>(engine: &'a Engine, name: &str) -> Option<&'a WebhookSink> {
    match engine.sinks.get(name).map(|s| s.as_ref()) {
        Some(Sink::Webhook(w)) => Some(w),
        _ => None,
    }
}

/// Whether the config has any webhook to send events to.
pub fn any(engine: &Engine) -> bool {
    engine
        .config
        .sinks
        .values()
        .any(|s| matches!(s.kind, crate::config::SinkKind::Webhook(_)))
}

/// Brings the cursors in line with the config: a new (webhook, portal) starts at the
/// portal's newest record; one the config no longer follows is dropped with its waiting
/// events (logged, recorded). Run by every process that writes, when it loads a config.
pub async fn sync(engine: &Engine) -> Result<(), StateError> {
    let Some(store) = engine.store.clone() else {
        return Ok(());
    };
    if !any(engine) && !has_cursors(&store).await? {
        return Ok(());
    }
    let wanted: BTreeSet<(String, String)> = follows(engine).into_keys().collect();
    let mut hooks = webhook_names(engine);
    let cause = Cause::current();
    let dropped = store
        .write(move |c| {
            let have: BTreeMap<(String, String), Cursor> = history::cursors(c)?
                .into_iter()
                .map(|k| ((k.sink.clone(), k.portal.clone()), k))
                .collect();
            let new: Vec<(String, String)> = wanted
                .iter()
                .filter(|k| !have.contains_key(*k))
                .cloned()
                .collect();
            history::start_cursors(c, &new)?;
            let mut dropped = Vec::new();
            for ((sink, portal), k) in have.iter().filter(|(k, _)| !wanted.contains(*k)) {
                // What waited: the records after it that would have been events (its own
                // deliveries and any webhook's never are).
                hooks.insert(sink.clone());
                let n = history::after(c, portal, k.after_id, i64::MAX)?
                    .iter()
                    .filter_map(history::Stored::parsed)
                    .filter(|r| !raises_no_event(r, &hooks))
                    .count();
                history::drop_cursor(c, sink, portal)?;
                if n > 0 {
                    let mut rec = Record::new(Event::Forgotten, portal, &cause)
                        .outcome(format!("{n} pending webhook event(s) dropped"))
                        .reason(
                            "the webhook sink is no longer in the configuration for this portal",
                        );
                    rec.sink = Some(sink.clone());
                    history::append(c, rec)?;
                    dropped.push((sink.clone(), portal.clone(), n));
                }
            }
            Ok(dropped)
        })
        .await?;
    for (sink, portal, n) in dropped {
        tracing::warn!(%sink, %portal, events = n, "a webhook no longer configured had pending events; they were dropped (recorded)");
    }
    Ok(())
}

async fn has_cursors(store: &state::Store) -> Result<bool, StateError> {
    store.call(|c| Ok(!history::cursors(c)?.is_empty())).await
}

/// What a round of sends did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Events delivered.
    pub delivered: usize,
    /// (webhook, portal) pairs left with an event pending.
    pub pending: usize,
    /// When the earliest of those may be tried again (Unix ms).
    pub next_at: Option<i64>,
}

/// Webhooks sent to at once (a receiver back after an outage is not sent one request per
/// portal at the same moment).
const AT_ONCE: usize = 8;

/// Sends what is pending: with `due_before`, only to cursors whose backoff has passed (the
/// daemon); without, every one now (`deliver`, a command's last step). One statement finds
/// the cursors with records after them; records that are no event for their webhook are
/// passed over in one transaction for all.
pub async fn deliver(engine: &Engine, due_before: Option<i64>) -> Sent {
    if !any(engine) {
        return Sent::default();
    }
    let Some(store) = engine.store.clone() else {
        return Sent::default();
    };
    let hooks = webhook_names(engine);
    let names: Vec<String> = hooks.iter().cloned().collect();
    let cursors = match store
        .call(move |c| history::pending_cursors(c, &names))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "could not read the webhook cursors");
            return Sent::default();
        }
    };
    let follows = follows(engine);
    let rounds: Vec<(Cursor, &Follow, &WebhookSink)> = cursors
        .into_iter()
        .filter_map(|k| {
            let f = follows.get(&(k.sink.clone(), k.portal.clone()))?;
            let hook = webhook(engine, &k.sink)?;
            Some((k, f, hook))
        })
        .collect();
    // The futures are made first (a stream of a closure's async blocks over borrowed
    // sinks is not `Send` for every lifetime, which the daemon's spawned task needs).
    let rounds: Vec<_> = rounds
        .into_iter()
        .map(|(k, f, hook)| follow_due(engine, store.clone(), hook, f, &hooks, k, due_before))
        .collect();
    let results: Vec<Followed> = futures::stream::iter(rounds)
        .buffer_unordered(AT_ONCE)
        .collect()
        .await;
    let mut sent = Sent::default();
    let mut skips = Vec::new();
    for r in results {
        sent.delivered += r.delivered;
        if let Some(n) = r.pending_at {
            sent.pending += 1;
            sent.next_at = Some(sent.next_at.map_or(n, |m: i64| m.min(n)));
        }
        skips.extend(r.skip);
    }
    if !skips.is_empty() {
        let passed = store
            .write(move |c| {
                for (k, to) in &skips {
                    history::webhook_skipped(c, k, *to)?;
                }
                Ok(())
            })
            .await;
        if let Err(e) = passed {
            tracing::error!(error = %e, "could not move the webhook cursors past records that are no event");
        }
    }
    sent
}

/// What following one cursor did.
#[derive(Default)]
struct Followed {
    delivered: usize,
    /// An event is left pending: when to try it again (Unix ms).
    pending_at: Option<i64>,
    /// The cursor as stored, and the record it may move to: everything up to it was no
    /// event for its webhook.
    skip: Option<(Cursor, i64)>,
}

/// [`follow`], unless the cursor's backoff runs past `due_before`.
async fn follow_due(
    engine: &Engine,
    store: state::Store,
    hook: &WebhookSink,
    f: &Follow,
    hooks: &BTreeSet<String>,
    k: Cursor,
    due_before: Option<i64>,
) -> Followed {
    if due_before.is_some_and(|d| k.next_attempt_at > d) {
        return Followed {
            pending_at: Some(k.next_attempt_at),
            ..Followed::default()
        };
    }
    follow(engine, &store, hook, f, hooks, k).await
}

/// Sends one cursor's pending events in order until one fails.
async fn follow(
    engine: &Engine,
    store: &state::Store,
    hook: &WebhookSink,
    f: &Follow,
    hooks: &BTreeSet<String>,
    mut k: Cursor,
) -> Followed {
    let mut done = Followed::default();
    // Where reading goes on; `k.after_id` stays where the cursor is stored.
    let mut from = k.after_id;
    loop {
        let p = k.portal.clone();
        let batch = match store
            .call(move |c| history::after(c, &p, from, BATCH))
            .await
        {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "could not read webhook events");
                done.pending_at = Some(now_ms());
                return done;
            }
        };
        let full = batch.len() as i64 == BATCH;
        for s in &batch {
            from = s.id;
            let Some(rec) = s.parsed() else { continue };
            if !wanted(hook, f, hooks, &rec) {
                continue;
            }
            match send_one(engine, store, hook, &k, s, &rec).await {
                Ok(true) => {
                    done.delivered += 1;
                    (k.after_id, k.attempts) = (s.id, 0);
                }
                // Another process moved the cursor meanwhile: it carries on from there.
                Ok(false) => {
                    done.delivered += 1;
                    return done;
                }
                Err(next_at) => {
                    done.pending_at = Some(next_at);
                    return done;
                }
            }
        }
        if !full {
            break;
        }
    }
    if from > k.after_id {
        done.skip = Some((k, from));
    }
    done
}

/// Sends one event and records the attempt: `Ok(true)` delivered and the cursor moved,
/// `Ok(false)` delivered but another process had moved the cursor, `Err(when)` pending.
async fn send_one(
    engine: &Engine,
    store: &state::Store,
    hook: &WebhookSink,
    k: &Cursor,
    s: &history::Stored,
    rec: &Record,
) -> Result<bool, i64> {
    let body = crate::sinks::webhook::body(rec, s.hash.as_deref().unwrap_or(""));
    super::fail_point("webhook::before_send");
    let result = hook.send(rec, &body).await;
    engine.metrics.delivery(
        &k.portal,
        &hook.name,
        if result.is_ok() {
            crate::outcome::DeliveryResult::Delivered
        } else {
            crate::outcome::DeliveryResult::Failed
        },
    );
    let cause = Cause::current();
    let which = format!("event {} {}", rec.event, rec.id);
    let mut r = match &result {
        Ok(()) => Record::new(Event::Delivered, &k.portal, &cause)
            .outcome("delivered")
            .reason(which),
        Err(e) => Record::new(Event::DeliveryFailed, &k.portal, &cause)
            .outcome("failed")
            .reason(format!("{} ({which})", e.message)),
    };
    (r.sink, r.attempt) = (Some(hook.name.clone()), Some(k.attempts + 1));
    let (k2, id) = (k.clone(), s.id);
    match result {
        Ok(()) => {
            tracing::info!(sink = %hook.name, portal = %k.portal, event = %rec.event, "webhook event delivered");
            store
                .write(move |c| history::webhook_delivered(c, &k2, id, r))
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "could not record a webhook delivery");
                    now_ms()
                })
        }
        Err(e) => {
            let next_at = now_ms() + super::backoff(k.attempts).as_millis() as i64;
            tracing::warn!(sink = %hook.name, portal = %k.portal, event = %rec.event, error = %e, "webhook event not delivered; it stays pending");
            let msg = e.message.clone();
            if let Err(e) = store
                .write(move |c| history::webhook_failed(c, &k2, &msg, next_at, r))
                .await
            {
                tracing::error!(error = %e, "could not record a failed webhook delivery");
            }
            Err(next_at)
        }
    }
}

/// The webhook sinks of the config, by name.
fn webhook_names(engine: &Engine) -> BTreeSet<String> {
    engine
        .config
        .sinks
        .iter()
        .filter(|(_, s)| matches!(s.kind, crate::config::SinkKind::Webhook(_)))
        .map(|(n, _)| n.clone())
        .collect()
}

/// Records that are no webhook's event: a checkpoint, and the deliveries of a webhook in
/// `hooks` (so that two webhooks never feed each other).
fn raises_no_event(rec: &Record, hooks: &BTreeSet<String>) -> bool {
    match rec.event() {
        None | Some(Event::Checkpoint) => true,
        Some(Event::Delivered | Event::DeliveryFailed) => {
            rec.sink.as_ref().is_some_and(|s| hooks.contains(s))
        }
        Some(_) => false,
    }
}

/// Whether `rec` is an event for `hook` following as `f`.
fn wanted(hook: &WebhookSink, f: &Follow, hooks: &BTreeSet<String>, rec: &Record) -> bool {
    if raises_no_event(rec, hooks) {
        return false;
    }
    let event = rec.event.as_str();
    (f.portal_events && hook.wants(event)) || (f.alerts && event == Event::Alert.as_str())
}
