//! The planner: when a portal is next due, and why. Pure: it reads a portal's
//! policy, what the state knows of it and the time, and does no I/O, so `check`, `status`
//! and the daemon ask the same function and always agree.
//!
//! The rules, each with its reason:
//! - an open intent (a PUT of unknown outcome) is settled at its next check time, and
//!   nothing else is planned for the portal until it is ([`Reason::Settle`]);
//! - an entry that is new to the state ([`Reason::New`]) or whose fingerprint changed
//!   ([`Reason::Changed`]) rotates now when its schedule has `rotate_on_change`; otherwise
//!   the new fingerprint is adopted silently, so a later restart is not a change;
//! - the next cron fire time after the last one acted on, with the portal's jitter
//!   ([`Reason::Fire`]); one missed while the daemon was down runs once at start with
//!   `catch_up` ([`Reason::CatchUp`]) and is skipped without it (`run --once` counts the
//!   fires since the last run, whatever `catch_up` says); a fire within `min_interval` of
//!   the last success is dropped;
//! - the periodic read every `watch_every` ([`Reason::Watch`]), which finds too few unused
//!   codes and drift; it is a read, so neither backoff nor `min_interval` holds it.
//!
//! A change waits for `min_interval` after the last success, and every rotation waits for
//! the backoff after a failure ([`Hold`]). The earliest candidate wins; at equal times the
//! order above decides.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Convergence, ScheduleConfig};

/// Why a portal is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The next settle GET of an open intent.
    Settle,
    /// The portal is new to the state, and its schedule rotates on change.
    New,
    /// Its entry changed in a way that matters, and its schedule rotates on change.
    Changed,
    /// A cron fire time (jitter included).
    Fire(DateTime<Utc>),
    /// A fire time missed while the daemon was down, run once (`catch_up`).
    CatchUp(DateTime<Utc>),
    /// The periodic read: unused codes and drift.
    Watch,
}

impl Reason {
    /// Whether acting on it rotates (as opposed to reading).
    pub fn rotates(self) -> bool {
        matches!(
            self,
            Reason::New | Reason::Changed | Reason::Fire(_) | Reason::CatchUp(_)
        )
    }

    /// For people, as `status` and the logs print it.
    pub fn describe(self) -> String {
        match self {
            Reason::Settle => "settling a PUT of unknown outcome".into(),
            Reason::New => "new portal".into(),
            Reason::Changed => "its entry changed".into(),
            Reason::Fire(_) => "cron fire".into(),
            Reason::CatchUp(_) => "catch-up of a fire missed while down".into(),
            Reason::Watch => "watch read (unused codes, drift)".into(),
        }
    }

    /// A short machine-readable name (`--json`, metrics, logs).
    pub fn name(self) -> &'static str {
        match self {
            Reason::Settle => "settle",
            Reason::New => "new",
            Reason::Changed => "changed",
            Reason::Fire(_) => "fire",
            Reason::CatchUp(_) => "catch_up",
            Reason::Watch => "watch",
        }
    }

    /// Ties at one instant: the lower rank goes first.
    fn rank(self) -> u8 {
        match self {
            Reason::Settle => 0,
            Reason::New | Reason::Changed => 1,
            Reason::CatchUp(_) | Reason::Fire(_) => 2,
            Reason::Watch => 3,
        }
    }
}

/// What holds a rotation back past its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The backoff after a failed attempt.
    RetryAfterFailure,
    /// `min_interval` after the last success.
    MinInterval,
    /// The portal answered 429: nothing is sent before its `Retry-After` ends.
    RateLimited,
}

impl Hold {
    /// For people.
    pub fn describe(self) -> &'static str {
        match self {
            Hold::RetryAfterFailure => "retry after a failure",
            Hold::MinInterval => "waiting for min_interval",
            Hold::RateLimited => "paused by the portal (429 Retry-After)",
        }
    }
}

/// When a portal is next due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Due {
    /// When.
    pub at: DateTime<Utc>,
    /// Why.
    pub reason: Reason,
    /// What pushed it past its own time, if anything.
    pub held: Option<Hold>,
}

/// What the state knows of a portal, as the planner needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Known {
    /// The entry fingerprint last acted on; `None`: the portal is new to the state.
    pub entry_fp: Option<String>,
    /// The last fire time acted on (a success consumes every fire up to its time).
    pub last_fire_at: Option<DateTime<Utc>>,
    /// The last successful rotation.
    pub last_success_at: Option<DateTime<Utc>>,
    /// After a failure: not before then.
    pub retry_at: Option<DateTime<Utc>>,
    /// When the codes were last read.
    pub seen_at: Option<DateTime<Utc>>,
    /// After a failed read: the next read not before then.
    pub watch_retry_at: Option<DateTime<Utc>>,
    /// An intent is open: its next settle GET.
    pub settle_at: Option<DateTime<Utc>>,
    /// The portal answered 429: no request before then (kept across restarts).
    pub paused_until: Option<DateTime<Utc>>,
}

/// A portal's policy as the planner needs it.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// The portal's name (its jitter derives from it).
    pub name: &'a str,
    /// Its schedule; `None`: manual rotation only.
    pub schedule: Option<&'a ScheduleConfig>,
    /// Watch and settle policy.
    pub convergence: Convergence,
    /// The fingerprint of its entry now.
    pub entry_fp: &'a str,
    /// False in a cluster for an instance that does not run the newest config: it neither
    /// rotates for a changed (or new) entry nor adopts its fingerprint, so a rolling
    /// config change cannot make two instances rotate a portal back and forth.
    pub follows_changes: bool,
}

/// The moment of planning.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// The time.
    pub now: DateTime<Utc>,
    /// When the daemon started: fires before it were missed while down.
    pub started: DateTime<Utc>,
    /// `run --once`: every fire since the last run counts, whatever `catch_up` says.
    pub once: bool,
}

/// The planner's answer, and what the caller should store without running anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// When it is next due; `None`: never by itself.
    pub due: Option<Due>,
    /// Adopt this entry fingerprint without rotating (no `rotate_on_change`).
    pub adopt_fp: Option<String>,
    /// Count the fire times up to here as acted on without running them: missed while
    /// down without `catch_up`, dropped by `min_interval`, or (first sight) none yet.
    pub consume_fires_to: Option<DateTime<Utc>>,
}

/// Caps the fires a plan steps over (a `* * * * * *` cron within a day-long
/// `min_interval`); past it, the plan waits for `min_interval` instead of dropping more.
const MAX_STEPS: usize = 4096;

/// Plans one portal.
pub fn plan(p: &Policy<'_>, k: &Known, t: &Now) -> Plan {
    let now = t.now;
    let mut out = Plan {
        due: None,
        adopt_fp: None,
        consume_fires_to: None,
    };
    if let Some(at) = k.settle_at {
        out.due = Some(Due {
            at,
            reason: Reason::Settle,
            held: None,
        });
        return out;
    }
    let min_until = match (k.last_success_at, p.schedule.and_then(|s| s.min_interval)) {
        (Some(last), Some(min)) => Some(super::add(last, min)),
        _ => None,
    };
    let mut cands: Vec<Due> = Vec::with_capacity(3);

    if k.entry_fp.as_deref() != Some(p.entry_fp) && p.follows_changes {
        match p.schedule {
            Some(s) if s.rotate_on_change => cands.push(Due {
                at: now,
                reason: if k.entry_fp.is_none() {
                    Reason::New
                } else {
                    Reason::Changed
                },
                held: None,
            }),
            _ => out.adopt_fp = Some(p.entry_fp.to_string()),
        }
    }

    if let Some(s) = p.schedule {
        // First sight: only fires from now on count.
        let base = match k.last_fire_at {
            Some(b) => b,
            None => {
                out.consume_fires_to = Some(now);
                now
            }
        };
        let mut fire = s.next_fire(p.name, base);
        // Missed while down, without catch-up: skip to the first fire after now.
        if let Some(f) = fire
            && f <= now
            && f < t.started
            && !s.catch_up
            && !t.once
        {
            out.consume_fires_to = Some(now);
            fire = s.next_fire(p.name, now);
        }
        // A fire within min_interval of the last success is dropped.
        let mut steps = 0;
        while let (Some(f), Some(until)) = (fire, min_until) {
            if f >= until || steps == MAX_STEPS {
                break;
            }
            out.consume_fires_to = Some(f.max(out.consume_fires_to.unwrap_or(f)));
            fire = s.next_fire(p.name, f);
            steps += 1;
        }
        if let Some(f) = fire {
            cands.push(Due {
                at: f,
                reason: if f < t.started && f <= now {
                    Reason::CatchUp(f)
                } else {
                    Reason::Fire(f)
                },
                held: None,
            });
        }
    }

    if let Some(every) = p.convergence.watch_every {
        let at = k.seen_at.map(|s| super::add(s, every)).unwrap_or(now);
        let at = k.watch_retry_at.map_or(at, |r| at.max(r));
        cands.push(Due {
            at,
            reason: Reason::Watch,
            held: None,
        });
    }

    for c in cands.iter_mut().filter(|c| c.reason.rotates()) {
        if let Some(r) = k.retry_at
            && r > c.at
        {
            c.at = r;
            c.held = Some(Hold::RetryAfterFailure);
        }
        if matches!(c.reason, Reason::New | Reason::Changed)
            && let Some(u) = min_until
            && u > c.at
        {
            c.at = u;
            c.held = Some(Hold::MinInterval);
        }
        // Fires were stepped past min_interval above, unless MAX_STEPS cut that short.
        if let (Reason::Fire(_) | Reason::CatchUp(_), Some(u)) = (c.reason, min_until)
            && u > c.at
        {
            c.at = u;
            c.held = Some(Hold::MinInterval);
        }
    }
    // A 429's pause holds every request to the portal: rotations, reads and settle GETs.
    if let Some(p) = k.paused_until {
        for c in cands.iter_mut().filter(|c| p > c.at) {
            c.at = p;
            c.held = Some(Hold::RateLimited);
        }
    }
    out.due = cands.into_iter().min_by_key(|c| (c.at, c.reason.rank()));
    out
}

/// The next `n` rotation times from `after` as the schedule and `min_interval` allow
/// (for `check`): fires only, jitter included.
pub fn upcoming_rotations(
    p: &Policy<'_>,
    k: &Known,
    after: DateTime<Utc>,
    n: usize,
) -> Vec<DateTime<Utc>> {
    let Some(s) = p.schedule else {
        return Vec::new();
    };
    let min_until = match (k.last_success_at, s.min_interval) {
        (Some(last), Some(min)) => Some(super::add(last, min)),
        _ => None,
    };
    let mut out = Vec::with_capacity(n);
    let mut cursor = after;
    let mut steps = 0;
    while out.len() < n && steps < MAX_STEPS {
        let Some(f) = s.next_fire(p.name, cursor) else {
            break;
        };
        if min_until.is_none_or(|u| f >= u) {
            out.push(f);
        }
        cursor = f;
        steps += 1;
    }
    out
}

/// How long until `at` from `now` (zero when past).
pub fn wait(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::{Convergence, OnDrift};
    use crate::schedule::{CronSchedule, parse_timezone};
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .expect("a valid test date")
    }

    fn schedule(cron: &str, tz: &str) -> ScheduleConfig {
        ScheduleConfig {
            cron: CronSchedule::parse(cron, parse_timezone(tz).unwrap()).unwrap(),
            jitter: Duration::ZERO,
            catch_up: true,
            rotate_on_change: true,
            min_interval: None,
            rotate_when_unused_below: None,
            watch_every: None,
            on_drift: OnDrift::Resend,
            settle_window: Duration::from_secs(900),
        }
    }

    const NO_WATCH: Convergence = Convergence {
        watch_every: None,
        on_drift: OnDrift::Resend,
        settle_window: Duration::from_secs(900),
    };

    fn policy<'a>(s: Option<&'a ScheduleConfig>) -> Policy<'a> {
        Policy {
            name: "acme",
            schedule: s,
            convergence: NO_WATCH,
            entry_fp: "fp",
            follows_changes: true,
        }
    }

    fn known(fire: DateTime<Utc>) -> Known {
        Known {
            entry_fp: Some("fp".into()),
            last_fire_at: Some(fire),
            ..Known::default()
        }
    }

    fn at(now: DateTime<Utc>) -> Now {
        Now {
            now,
            started: now,
            once: false,
        }
    }

    /// One row per rule of the planner: (what, plan, expected due, expected reason, held).
    #[test]
    fn every_rule_has_its_reason() {
        let weekly = schedule("0 3 * * Mon", "UTC");
        let mut no_change = schedule("0 3 * * Mon", "UTC");
        no_change.rotate_on_change = false;
        let mut no_catch = schedule("0 3 * * Mon", "UTC");
        no_catch.catch_up = false;
        let mut min1d = schedule("0 * * * *", "UTC");
        min1d.min_interval = Some(Duration::from_secs(86_400));
        let mut watched = schedule("@yearly", "UTC");
        watched.watch_every = Some(Duration::from_secs(6 * 3600));
        // Saturday 2026-11-28 12:00; the next Monday 03:00 is the 30th.
        let now = utc(2026, 11, 28, 12, 0);
        let monday = utc(2026, 11, 30, 3, 0);
        let last_monday = utc(2026, 11, 23, 3, 0);
        struct Row<'a> {
            what: &'a str,
            policy: Policy<'a>,
            known: Known,
            now: Now,
            due: Option<DateTime<Utc>>,
            reason: Option<Reason>,
            held: Option<Hold>,
        }
        let rows = vec![
            Row {
                what: "a cron fire",
                policy: policy(Some(&weekly)),
                known: known(last_monday),
                now: at(now),
                due: Some(monday),
                reason: Some(Reason::Fire(monday)),
                held: None,
            },
            Row {
                what: "a new portal rotates on change",
                policy: policy(Some(&weekly)),
                known: Known::default(),
                now: at(now),
                due: Some(now),
                reason: Some(Reason::New),
                held: None,
            },
            Row {
                what: "a changed entry",
                policy: Policy {
                    entry_fp: "other",
                    ..policy(Some(&weekly))
                },
                known: known(last_monday),
                now: at(now),
                due: Some(now),
                reason: Some(Reason::Changed),
                held: None,
            },
            Row {
                what: "a change without rotate_on_change is adopted, the fire stays",
                policy: Policy {
                    entry_fp: "other",
                    ..policy(Some(&no_change))
                },
                known: known(last_monday),
                now: at(now),
                due: Some(monday),
                reason: Some(Reason::Fire(monday)),
                held: None,
            },
            Row {
                what: "a fire missed while down runs once at start (catch_up)",
                policy: policy(Some(&weekly)),
                known: known(utc(2026, 11, 16, 3, 0)),
                now: at(now),
                due: Some(last_monday),
                reason: Some(Reason::CatchUp(last_monday)),
                held: None,
            },
            Row {
                what: "without catch_up a missed fire is skipped",
                policy: policy(Some(&no_catch)),
                known: known(utc(2026, 11, 16, 3, 0)),
                now: at(now),
                due: Some(monday),
                reason: Some(Reason::Fire(monday)),
                held: None,
            },
            Row {
                what: "run --once counts missed fires whatever catch_up says",
                policy: policy(Some(&no_catch)),
                known: known(utc(2026, 11, 16, 3, 0)),
                now: Now {
                    once: true,
                    ..at(now)
                },
                due: Some(last_monday),
                reason: Some(Reason::CatchUp(last_monday)),
                held: None,
            },
            Row {
                what: "a fire within min_interval of a success is dropped",
                policy: policy(Some(&min1d)),
                known: Known {
                    last_success_at: Some(utc(2026, 11, 28, 11, 30)),
                    ..known(utc(2026, 11, 28, 11, 0))
                },
                now: at(now),
                due: Some(utc(2026, 11, 29, 12, 0)),
                reason: Some(Reason::Fire(utc(2026, 11, 29, 12, 0))),
                held: None,
            },
            Row {
                what: "a change waits for min_interval",
                policy: Policy {
                    entry_fp: "other",
                    ..policy(Some(&min1d))
                },
                known: Known {
                    last_success_at: Some(utc(2026, 11, 28, 11, 30)),
                    ..known(utc(2026, 11, 28, 11, 30))
                },
                now: at(now),
                due: Some(utc(2026, 11, 29, 11, 30)),
                reason: Some(Reason::Changed),
                held: Some(Hold::MinInterval),
            },
            Row {
                what: "a rotation waits for the backoff after a failure",
                policy: policy(Some(&weekly)),
                known: Known {
                    retry_at: Some(utc(2026, 11, 30, 4, 0)),
                    ..known(last_monday)
                },
                now: at(now),
                due: Some(utc(2026, 11, 30, 4, 0)),
                reason: Some(Reason::Fire(monday)),
                held: Some(Hold::RetryAfterFailure),
            },
            Row {
                what: "the watch reads every watch_every, not held by a backoff",
                policy: Policy {
                    convergence: Convergence {
                        watch_every: Some(Duration::from_secs(6 * 3600)),
                        ..NO_WATCH
                    },
                    ..policy(Some(&watched))
                },
                known: Known {
                    seen_at: Some(utc(2026, 11, 28, 10, 0)),
                    retry_at: Some(utc(2026, 12, 1, 0, 0)),
                    ..known(now)
                },
                now: at(now),
                due: Some(utc(2026, 11, 28, 16, 0)),
                reason: Some(Reason::Watch),
                held: None,
            },
            Row {
                what: "an open intent is all that is due",
                policy: Policy {
                    entry_fp: "other",
                    ..policy(Some(&weekly))
                },
                known: Known {
                    settle_at: Some(utc(2026, 11, 28, 12, 5)),
                    ..known(last_monday)
                },
                now: at(now),
                due: Some(utc(2026, 11, 28, 12, 5)),
                reason: Some(Reason::Settle),
                held: None,
            },
            Row {
                what: "a portal without schedule or watch is never due by itself",
                policy: policy(None),
                known: known(now),
                now: at(now),
                due: None,
                reason: None,
                held: None,
            },
        ];
        for r in rows {
            let p = plan(&r.policy, &r.known, &r.now);
            assert_eq!(p.due.map(|d| d.at), r.due, "{}: due", r.what);
            assert_eq!(p.due.map(|d| d.reason), r.reason, "{}: reason", r.what);
            assert_eq!(p.due.and_then(|d| d.held), r.held, "{}: held", r.what);
        }
    }

    #[test]
    fn first_sight_and_silent_changes_are_stored() {
        let mut no_change = schedule("0 3 * * Mon", "UTC");
        no_change.rotate_on_change = false;
        let now = utc(2026, 11, 28, 12, 0);
        let p = plan(&policy(Some(&no_change)), &Known::default(), &at(now));
        assert_eq!(p.adopt_fp.as_deref(), Some("fp"));
        assert_eq!(
            p.consume_fires_to,
            Some(now),
            "only fires from now on count"
        );
        let p = plan(&policy(Some(&no_change)), &known(now), &at(now));
        assert_eq!((p.adopt_fp, p.consume_fires_to), (None, None));
        // Missed while down, no catch-up: the skip is stored, so it happens once.
        let mut no_catch = no_change.clone();
        no_catch.catch_up = false;
        let p = plan(
            &policy(Some(&no_catch)),
            &known(utc(2026, 11, 1, 0, 0)),
            &at(now),
        );
        assert_eq!(p.consume_fires_to, Some(now));
    }

    #[test]
    fn a_success_consumes_the_fires_up_to_its_time() {
        // A manual rotation stores its time as the last fire acted on: the daemon, starting
        // after it, does not rotate for the fire that was due before it.
        let weekly = schedule("0 3 * * Mon", "UTC");
        let manual = utc(2026, 11, 30, 9, 0);
        let p = plan(
            &policy(Some(&weekly)),
            &known(manual),
            &at(utc(2026, 11, 30, 10, 0)),
        );
        assert_eq!(
            p.due.map(|d| d.at),
            Some(utc(2026, 12, 7, 3, 0)),
            "next Monday, not this one"
        );
    }

    #[test]
    fn dst_gaps_and_overlaps_fire_once() {
        let berlin = schedule("30 2 * * *", "Europe/Berlin");
        // Spring forward 2026-03-29: 02:30 local does not exist; it fires at 03:00 CEST.
        let p = plan(
            &policy(Some(&berlin)),
            &known(utc(2026, 3, 28, 12, 0)),
            &at(utc(2026, 3, 28, 12, 0)),
        );
        assert_eq!(p.due.map(|d| d.at), Some(utc(2026, 3, 29, 1, 0)));
        // Fall back 2026-10-25: 02:30 happens twice; the first (00:30 UTC) fires, and after
        // it the next is the 26th, not the repeated hour.
        let p = plan(
            &policy(Some(&berlin)),
            &known(utc(2026, 10, 24, 12, 0)),
            &at(utc(2026, 10, 24, 12, 0)),
        );
        assert_eq!(p.due.map(|d| d.at), Some(utc(2026, 10, 25, 0, 30)));
        let p = plan(
            &policy(Some(&berlin)),
            &known(utc(2026, 10, 25, 0, 30)),
            &at(utc(2026, 10, 25, 0, 31)),
        );
        assert_eq!(p.due.map(|d| d.at), Some(utc(2026, 10, 26, 1, 30)));
    }

    #[test]
    fn check_lists_rotations_min_interval_allows() {
        let mut hourly = schedule("0 * * * *", "UTC");
        hourly.min_interval = Some(Duration::from_secs(3 * 3600));
        let k = Known {
            last_success_at: Some(utc(2026, 11, 28, 12, 0)),
            ..known(utc(2026, 11, 28, 12, 0))
        };
        assert_eq!(
            upcoming_rotations(&policy(Some(&hourly)), &k, utc(2026, 11, 28, 12, 0), 3),
            vec![
                utc(2026, 11, 28, 15, 0),
                utc(2026, 11, 28, 16, 0),
                utc(2026, 11, 28, 17, 0)
            ]
        );
    }

    #[test]
    fn planning_ten_thousand_portals_is_fast() {
        let mut s = schedule("0 3 * * Mon", "Europe/Berlin");
        s.jitter = Duration::from_secs(600);
        s.watch_every = Some(Duration::from_secs(6 * 3600));
        let names: Vec<String> = (0..10_000).map(|i| format!("p{i}")).collect();
        let now = utc(2026, 11, 28, 12, 0);
        let k = known(utc(2026, 11, 23, 3, 0));
        let started = std::time::Instant::now();
        let mut due = 0;
        for n in &names {
            let p = Policy {
                name: n,
                ..policy(Some(&s))
            };
            due += usize::from(plan(&p, &k, &at(now)).due.is_some());
        }
        assert_eq!(due, 10_000);
        // A debug build; the release build is about ten times faster (README).
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
