//! Failure notices (`[alerts]`): when a portal's rotation has failed `after_failures`
//! times in a row, a delivery has waited longer than `pending_longer_than`, a rotation's
//! outcome has stayed unsettled for twice its settle window, drift was found, or a key acts
//! as another account, an encrypted notice goes to the `[alerts]` email sinks: which
//! portal, what failed, since when, what to do. Never codes. Each streak and each pending payload is announced once; a notice that
//! cannot be sent is tried again at the next check.

use chrono::{DateTime, Utc};

use super::Engine;
use crate::sinks::Sink;
use crate::sinks::email::Letter;
use crate::state::{self, AlertDue, now_ms};

fn when(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(crate::schedule::fmt_utc)
        .unwrap_or_else(|| "an unknown time".into())
}

fn notice(engine: &Engine, due: &AlertDue) -> (String, String) {
    match due {
        AlertDue::Streak {
            portal,
            failures,
            since,
            error,
        } => {
            let url = engine
                .config
                .portals
                .get(portal)
                .map(|p| p.url.to_string())
                .unwrap_or_default();
            (
                format!("[tfa-rotator] {portal}: rotation failing ({failures} times in a row)"),
                format!(
                    "The backup codes of portal {portal} ({url}) could not be rotated {failures} times in a row,\n\
                     since {}.\n\nLast error:\n  {error}\n\n\
                     The current codes still work; nothing was lost. What to do: run\n  tfa-rotator check\n\
                     to see what fails (the API key, the portal's TFA settings, a sink), fix it, then\n  \
                     tfa-rotator rotate {portal}\n\n-- \ntfa-rotator\n",
                    when(*since)
                ),
            )
        }
        AlertDue::Pending {
            portal,
            sink,
            since,
            attempts,
            error,
            ..
        } => (
            format!("[tfa-rotator] {portal}: delivery to {sink} pending"),
            format!(
                "New backup codes of portal {portal} were sealed at {} and have not reached sink {sink}\n\
                 after {attempts} attempt(s).\n\nLast error:\n  {}\n\n\
                 The codes are kept, encrypted, in the spool until they are delivered; nothing is lost.\n\
                 What to do: fix the sink (see `tfa-rotator status`), then run\n  tfa-rotator deliver\n\n-- \ntfa-rotator\n",
                when(*since),
                error.as_deref().unwrap_or("none recorded yet")
            ),
        ),
        AlertDue::Unsettled {
            portal,
            since,
            checks,
            ..
        } => (
            format!("[tfa-rotator] {portal}: a rotation's outcome is still unknown"),
            format!(
                "A rotation of portal {portal} began at {} and its PUT got no clear answer. tfa-rotator has\n\
                 asked the portal {checks} time(s) which set it holds and could not settle it, so the portal\n\
                 is not rotated meanwhile. Nothing is lost: if the portal applied the PUT, the next\n\
                 answer finds the new set and delivers it.\n\n\
                 What to do: check that the portal answers (`tfa-rotator check`), then run\n  \
                 tfa-rotator settle {portal}\n\
                 If the API key was revoked for good, close the rotation by hand with\n  \
                 tfa-rotator settle {portal} --abandon\n\n-- \ntfa-rotator\n",
                when(*since)
            ),
        ),
        AlertDue::Notice { subject, body, .. } => (subject.clone(), body.clone()),
    }
}

/// Queues one notice per recipient key that expires within 14 days (SPEC §5, "Expiry
/// ahead"): once per key and expiry date, however often this runs.
async fn queue_expiries(engine: &Engine, store: &state::Store) {
    let now = std::time::SystemTime::now();
    let notices: Vec<(String, String, String)> = engine
        .sinks
        .expiries()
        .into_iter()
        .filter(|e| e.within(crate::sinks::Expiry::ALERT, now))
        .map(|e| {
            let kind = format!("expiry {} {} {}", e.sink, e.recipient, e.date());
            let subject = format!(
                "[tfa-rotator] the key of {} expires on {}",
                e.recipient,
                e.date()
            );
            let body = format!(
                "The key tfa-rotator encrypts to for {} (sink {}) expires on {}, in {} day(s).\n\n\
                 From then on every rotation that delivers to this sink stops at its preflight (nothing\n\
                 is lost: the current codes keep working). What to do: have the key extended (or a new\n\
                 one made), put it where the config names it, and check with\n  tfa-rotator check\n\n-- \ntfa-rotator\n",
                e.recipient,
                e.sink,
                e.date(),
                e.days_left(now)
            );
            (kind, subject, body)
        })
        .collect();
    if notices.is_empty() {
        return;
    }
    // One transaction for them all: this runs after every round of jobs.
    let queued = store
        .write(move |c| {
            for (kind, subject, body) in &notices {
                state::add_notice(c, "", kind, subject, body, 0)?;
            }
            Ok(())
        })
        .await;
    if let Err(err) = queued {
        tracing::error!(error = %err, "could not queue the expiry notices");
    }
}

/// Sends the notices that are due. Returns how many were sent.
pub async fn check(engine: &Engine) -> usize {
    let (Some(alerts), Ok(store)) = (engine.config.alerts.as_ref(), engine.store()) else {
        return 0;
    };
    let store = store.clone();
    queue_expiries(engine, &store).await;
    let after = i64::from(alerts.after_failures);
    let before = now_ms() - alerts.pending_longer_than.as_millis() as i64;
    let due = match store
        .call(move |c| state::alerts_due(c, after, before))
        .await
    {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "could not read what alerts are due");
            return 0;
        }
    };
    let mut sent = 0;
    // A webhook among the alert sinks takes its events from the history: the record below
    // is its spool, so the alert is as good as sent to it.
    let webhooks = alerts.sinks.iter().any(|n| {
        matches!(
            engine.sinks.get(n).map(|s| s.as_ref()),
            Some(Sink::Webhook(_))
        )
    });
    for d in due {
        let (subject, body) = notice(engine, &d);
        let mut results = std::collections::BTreeMap::new();
        for name in &alerts.sinks {
            let Some(sink) = engine.sinks.get(name) else {
                continue;
            };
            let Sink::Email(mail) = sink.as_ref() else {
                continue;
            };
            let payload = match mail.seal(&Letter {
                subject: subject.clone(),
                body: &body,
            }) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(sink = %name, error = %e, "could not seal an alert");
                    results.insert(name.clone(), "failed".to_string());
                    continue;
                }
            };
            let result = match mail.deliver(&payload).await {
                Ok(()) => "delivered",
                Err(e) => {
                    tracing::warn!(sink = %name, error = %e, "could not send an alert; it is tried again at the next check");
                    "failed"
                }
            };
            results.insert(name.clone(), result.to_string());
        }
        if webhooks || results.values().any(|r| r == "delivered") {
            tracing::info!(subject = %subject, "alert sent");
            let cause = state::history::Cause::current();
            let d2 = d.clone();
            let written = store
                .write(move |c| {
                    state::alert_sent(c, &d2)?;
                    let mut rec = state::history::Record::new(
                        state::history::Event::Alert,
                        d2.portal_or_config(),
                        &cause,
                    )
                    .reason(subject);
                    rec.sinks = (!results.is_empty()).then_some(results);
                    state::history::append(c, rec).map(drop)
                })
                .await;
            if let Err(e) = written {
                tracing::error!(error = %e, "could not record a sent alert");
            }
            sent += 1;
        }
    }
    sent
}
