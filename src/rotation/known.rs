//! The planner's view of a portal from the state: the one conversion `status`, `check`
//! and the daemon share.

use super::*;

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

/// What the daemon read of a portal right before rotating it (one transaction): the
/// state's clock then, which is the rotation's `since`, and what the rotation reads first.
/// Read under the portal's claim, it is still true when the rotation starts, which then
/// does not read it again.
pub struct Snapshot {
    /// The state's clock when it was read.
    pub now: i64,
    pub(super) leftovers: bool,
    pub(super) known: preflight::Known,
}

impl Snapshot {
    /// Reads what a rotation of `portal` reads first, `now` being the clock taken before
    /// the reads; and the portal's open journal entries (oldest first).
    pub(super) fn read(
        c: &dyn state::db::Sql,
        portal: &str,
        now: i64,
    ) -> Result<(Vec<state::OpenJournal>, Self), StateError> {
        let state::Outlook {
            row,
            pending,
            open,
            sink_sets,
        } = state::outlook(c, portal, true)?;
        let snapshot = Snapshot {
            now,
            leftovers: !open.is_empty() || pending > 0,
            known: preflight::Known { row, sink_sets },
        };
        Ok((open, snapshot))
    }
}

/// The planner's view of `name`, and the [`Snapshot`] it was made from. `held`: the lock
/// the caller holds, whose claim's time (in a cluster) serves as the snapshot's clock.
pub async fn known_and_now(
    store: &Store,
    name: &str,
    held: Option<&state::PortalLock>,
) -> Result<(crate::schedule::plan::Known, Snapshot), StateError> {
    let p = name.to_string();
    let claimed_at = held.and_then(state::PortalLock::claimed_at);
    let (open, snapshot) = store
        .call(move |c| {
            // The clock first: whatever the reads miss was committed after it. Under a
            // claim, the claim's time is such a clock (nothing of the portal's changes
            // while we hold it).
            let now = match claimed_at {
                Some(t) => t,
                None => c.now()?,
            };
            Snapshot::read(c, &p, now)
        })
        .await?;
    let at = chrono::DateTime::from_timestamp_millis(snapshot.now).unwrap_or_else(Utc::now);
    Ok((
        known_from_open(snapshot.known.row.as_ref(), &open, at),
        snapshot,
    ))
}

/// [`known_from`] with the portal's open journal entries (oldest first).
pub(super) fn known_from_open(
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
