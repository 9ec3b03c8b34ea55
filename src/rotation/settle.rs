//! Settling a PUT of unknown outcome.
//!
//! A PUT that was not refused by the portal itself (no answer, a timeout, a reset, a 5xx, a
//! gateway's 502/503/504, an unusable body) may still be applied: a proxy can pass it on
//! seconds or minutes later. So its intent is never closed on one look. GETs ask again at
//! once, then at about 1/30, 2/15, 1/3 and 2/3 of the settle window and at its end. The
//! first GET showing a set other than the one seen before the PUT has found the new set,
//! which is then sealed and delivered. Only a successful GET after the window has closed,
//! still showing the old set, closes the intent as not applied. A PUT applied even later
//! than that changes the set without an open intent: drift, which resends it.
//!
//! While an intent is open the portal is not rotated again. The schedule lives in the
//! journal row (`checks`, `next_check_at`), so any process settles it where another left off.

use super::{Engine, RotationError};
use crate::docspace::Portal;
use crate::secret::CodeSet;
use crate::state;

/// The settle GETs' offsets as fractions of the window: (numerator, denominator).
const CHECKS: [(i64, i64); 6] = [(0, 1), (1, 30), (2, 15), (1, 3), (2, 3), (1, 1)];

/// The first scheduled settle GET strictly after `now` for an intent committed at
/// `started_at` with a window of `window_ms`; `None` once the window has closed.
pub fn next_check(started_at: i64, window_ms: i64, now: i64) -> Option<i64> {
    CHECKS
        .iter()
        .map(|(n, d)| started_at.saturating_add(window_ms.saturating_mul(*n) / d))
        .find(|t| *t > now)
}

/// An intent as settling needs it.
#[derive(Debug, Clone)]
pub struct Intent {
    /// Journal row.
    pub id: i64,
    /// The set seen before the PUT.
    pub before_fp: Option<String>,
    /// When the intent was committed.
    pub started_at: i64,
    /// Its settle window.
    pub window_ms: i64,
    /// GETs made so far.
    pub checks: i64,
    /// In a cluster: the time after which its writer sends no PUT (the database's clock).
    pub put_deadline: Option<i64>,
}

/// What one settle GET found.
pub enum Settle {
    /// A set other than the one seen before the PUT: the new set.
    Found(CodeSet),
    /// The old set after the window closed: the PUT did not take effect; the intent is closed.
    NotApplied,
    /// Not settled yet; the next GET is due at `next_check_at` (Unix ms).
    Open {
        /// When to ask again.
        next_check_at: i64,
        /// Why it is still open, for people.
        why: String,
    },
}

/// Asks the portal once and records what it said. A failed GET is not an error here: the
/// intent stays open and is asked again later (after a 429, not before the host's pause).
pub async fn once(
    engine: &Engine,
    portal: &Portal,
    intent: &Intent,
) -> Result<Settle, RotationError> {
    let store = engine.store()?.clone();
    let name = portal.name().to_string();
    let got = portal.codes().await;
    // A new set settles it whatever the time (the usual answer right after a PUT): the
    // state's clock is read only when the answer is the old set or none.
    if let Ok(set) = &got
        && Some(store.fingerprinter().of_set(set).as_str()) != intent.before_fp.as_deref()
    {
        // The caller says what it means: a verified PUT, or a late one found.
        tracing::debug!(
            portal = %name,
            journal = intent.id,
            checks = intent.checks + 1,
            "the portal holds a new set"
        );
        return got.map(Settle::Found).map_err(RotationError::Api);
    }
    // The state's clock: in a cluster the database server's, which wrote the deadline.
    let now = store.now().await?;
    // Not closed as not applied before the window has closed, nor (in a cluster) before the
    // writer's PUT deadline and its grace have passed: its PUT can no longer be sent then.
    let grace = engine
        .config
        .storage
        .as_ref()
        .map_or(0, |s| s.grace.as_millis() as i64);
    let end = intent.started_at.saturating_add(intent.window_ms).max(
        intent
            .put_deadline
            .map_or(i64::MIN, |d| d.saturating_add(grace)),
    );
    let (next_check_at, why) = match got {
        // The old set (a new one returned above).
        Ok(_) => {
            if now >= end {
                let note = format!(
                    "the PUT did not take effect: the portal still held the old set when the settle window had closed ({} check(s))",
                    intent.checks + 1
                );
                tracing::info!(portal = %name, journal = intent.id, "{note}");
                let id = intent.id;
                let (p, before) = (name.clone(), intent.before_fp.clone());
                let cause = state::history::Cause::current();
                store
                    .write(move |c| {
                        state::close_journal(c, id, state::Closed::Aborted, Some(&note))?;
                        let rec =
                            state::history::Record::new(state::history::Event::Settled, &p, &cause)
                                .outcome("not_applied")
                                .reason(note.as_str());
                        state::history::append(c, rec)?;
                        // Sinks that never received a set are taken to hold the one seen
                        // before the PUT: should the PUT still be applied, the new set is
                        // then drift, found and delivered, rather than a set nobody has.
                        match before {
                            Some(fp) => state::assume_sinks_hold(c, &p, &fp),
                            None => Ok(()),
                        }
                    })
                    .await?;
                return Ok(Settle::NotApplied);
            }
            (
                next_check(intent.started_at, intent.window_ms, now).unwrap_or(end),
                "the portal still holds the old set; a late PUT may still arrive".to_string(),
            )
        }
        Err(e) => {
            // Clamped to an hour by `retry_after`.
            let pause = e.retry_after().unwrap_or_default();
            let scheduled = next_check(intent.started_at, intent.window_ms, now)
                .unwrap_or_else(|| now + super::backoff(intent.checks).as_millis() as i64);
            (
                scheduled.max(now + pause.as_millis() as i64),
                format!("reading the codes failed ({e})"),
            )
        }
    };
    let id = intent.id;
    store
        .write(move |c| state::settle_checked(c, id, next_check_at))
        .await?;
    tracing::info!(
        portal = %name,
        journal = id,
        next_check_in_s = (next_check_at - now).max(0) / 1000,
        "the rotation's outcome is not settled yet: {why}"
    );
    Ok(Settle::Open { next_check_at, why })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_come_at_the_fractions_of_the_window_then_stop() {
        let w = 900_000; // 15 min
        let s = 1_000;
        let mut t = s;
        let mut seen = Vec::new();
        while let Some(n) = next_check(s, w, t) {
            seen.push(n - s);
            t = n;
        }
        // The first check is the one made at once (at `s` itself), so the schedule after it
        // is 30 s, 2 min, 5 min, 10 min and the window's end.
        assert_eq!(seen, vec![30_000, 120_000, 300_000, 600_000, 900_000]);
        assert_eq!(
            next_check(s, w, s - 1),
            Some(s),
            "before the start: at once"
        );
        assert_eq!(next_check(s, w, s + w), None, "closed at the window's end");
        // A three-second window, as tests use.
        assert_eq!(next_check(0, 3_000, 0), Some(100));
        assert_eq!(next_check(0, 3_000, 1_500), Some(2_000));
        assert_eq!(next_check(0, 3_000, 2_999), Some(3_000));
        // No overflow at the edges: the sums saturate.
        assert_eq!(
            next_check(i64::MAX - 5, i64::MAX, i64::MAX - 5),
            Some(i64::MAX)
        );
    }
}
