//! Failures and pauses: a failed attempt's backoff and streak, and a 429's pause kept in
//! the state so that `status` shows it and a restarted process honours it.

use super::*;

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

/// Records a failed (or settling) attempt; returns what it left in the state.
pub(super) async fn record_failure(
    engine: &Engine,
    portal: &str,
    e: &RotationError,
) -> Option<StateAfter> {
    let Ok(store) = engine.store() else {
        return None;
    };
    let (p, msg) = (portal.to_string(), e.to_string());
    let cause = crate::state::history::Cause::current();
    let r = if matches!(e, RotationError::Settling { .. }) {
        // Not a failure of the portal: no backoff, no streak. The intent's own schedule
        // says when it is asked again.
        store
            .write(move |c| {
                state::record_settling(c, &p, &msg, &cause)?;
                StateAfter::read(c, &p)
            })
            .await
    } else {
        let wait = e.retry_after().unwrap_or_default();
        store
            .write(move |c| {
                let failures = state::portal_row(c, &p)?.map(|r| r.failures).unwrap_or(0);
                let retry_at =
                    now_ms().saturating_add(backoff(failures).max(wait).as_millis() as i64);
                state::record_failure(c, &p, &msg, Some(retry_at), &cause)?;
                StateAfter::read(c, &p)
            })
            .await
    };
    r.map_err(|se| tracing::error!(portal, error = %se, "could not record a failure"))
        .ok()
}
