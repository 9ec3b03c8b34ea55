//! When a portal is due: cron expressions in a time zone, jitter, and the policy decisions
//! built on them (catch-up, `min_interval`).
//!
//! Cron has standard (Vixie/POSIX) meaning through `croner`: `0 3 * * 1` is Monday, `0` and
//! `7` are Sunday, names work, day-of-month and day-of-week are OR-ed, and six fields put
//! seconds first. DST is defined: a local time that does not exist (spring forward) fires at
//! the first valid instant after the gap; a local time that occurs twice (fall back) fires
//! once, at its first occurrence. Jitter is derived from the portal's name, so it is stable
//! across restarts and differs between portals.

pub mod plan;

/// The one time format of every output (CLI, notices, file headers): RFC 3339, UTC, to the
/// second.
pub fn fmt_utc(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use sha2::{Digest, Sha256};

/// A parsed cron expression bound to a time zone.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    expr: String,
    cron: Cron,
    tz: Tz,
}

impl CronSchedule {
    /// Parses a 5-field, 6-field (seconds first) or `@nickname` expression.
    pub fn parse(expr: &str, tz: Tz) -> Result<Self, String> {
        let trimmed = expr.trim();
        let accepted = "accepted: 5 fields (minute hour day-of-month month day-of-week), \
                        6 with seconds first, or @hourly @daily @weekly @monthly @yearly";
        if let Some(e) = unknown_names(trimmed) {
            return Err(format!("`{expr}`: {e}"));
        }
        if !trimmed.starts_with('@') {
            let fields = trimmed.split_whitespace().count();
            if fields != 5 && fields != 6 {
                return Err(format!("`{expr}` has {fields} fields; {accepted}"));
            }
            // An empty element of a list (`,`, `1,`, `,5`) gives croner an empty set: the
            // expression never fires, and looking for its next time ran away (found by
            // fuzzing: ", 2 06  * 7").
            if let Some(f) = trimmed
                .split_whitespace()
                .find(|f| f.split(',').any(str::is_empty))
            {
                return Err(format!(
                    "`{expr}`: the field `{f}` has an empty element in its list; {accepted}"
                ));
            }
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .dom_and_dow(false)
            .build();
        let cron = parser
            .parse(trimmed)
            .map_err(|e| format!("`{expr}` is not a valid cron expression ({e}); {accepted}"))?;
        let schedule = Self {
            expr: expr.to_string(),
            cron,
            tz,
        };
        // A valid expression can still name a day that never comes (30 February, 31 April):
        // it would parse and never fire. Eight years cover every 29 February.
        let now = Utc::now();
        let horizon = add(now, Duration::from_secs(8 * 366 * 86_400));
        match schedule.next_after(now) {
            Some(t) if t <= horizon => Ok(schedule),
            _ => Err(format!(
                "`{expr}` never fires (no fire time within eight years): check its day of \
                 month against its months, like 30 February or 31 April"
            )),
        }
    }

    /// The expression as written.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The time zone the expression is read in.
    pub fn timezone(&self) -> Tz {
        self.tz
    }

    /// The first fire time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The last fire time at or before `at`.
    pub fn previous_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The next `n` fire times after `after`, with the portal's jitter added.
    pub fn upcoming(&self, after: DateTime<Utc>, jitter: Duration, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut cursor = after;
        while out.len() < n {
            let Some(t) = self.next_after(cursor) else {
                break;
            };
            out.push(add(t, jitter));
            cursor = t;
        }
        out
    }
}

const NICKNAMES: [&str; 5] = ["@hourly", "@daily", "@weekly", "@monthly", "@yearly"];
const MONTHS: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const DAYS: [&str; 7] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"];

/// A nickname, month or day name the cron syntax does not know, in our words (croner's
/// would be "illegal character 'F' in part '1-FRY'"); `None` when every name is known.
fn unknown_names(expr: &str) -> Option<String> {
    let near = |word: &str, known: &[&'static str]| {
        crate::errors::did_you_mean(&word.to_ascii_uppercase(), known.iter().copied())
            .map(|n| format!("did you mean `{n}`? "))
            .unwrap_or_default()
    };
    if expr.starts_with('@') {
        // croner also takes @annually (as @yearly).
        if NICKNAMES.contains(&expr) || expr == "@annually" {
            return None;
        }
        let hint = crate::errors::did_you_mean(expr, NICKNAMES)
            .map(|n| format!("did you mean `{n}`? "))
            .unwrap_or_default();
        return Some(format!(
            "unknown nickname `{expr}`; {hint}accepted: {}",
            NICKNAMES.join(" ")
        ));
    }
    let fields: Vec<&str> = expr.split_whitespace().collect();
    // The last two fields are month and day of week, with or without seconds first.
    let (month, dow) = match fields.len() {
        5 | 6 => (fields[fields.len() - 2], fields[fields.len() - 1]),
        _ => return None,
    };
    let words = |field: &'static str, f: &str, known: &[&'static str], what: &str| {
        f.split([',', '-', '/'])
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphabetic()))
            .filter(|t| !(field == "dow" && *t == "L")) // the last such weekday, like `5L`
            .find(|t| !known.contains(&t.to_ascii_uppercase().as_str()))
            .map(|t| {
                format!(
                    "unknown {what} name `{t}`; {}accepted: {} or numbers",
                    near(t, known),
                    known.join(" ")
                )
            })
    };
    words("month", month, &MONTHS, "month").or_else(|| words("dow", dow, &DAYS, "day"))
}

/// Parses an IANA time zone name.
pub fn parse_timezone(name: &str) -> Result<Tz, String> {
    Tz::from_str(name).map_err(|_| {
        let near = crate::errors::did_you_mean(
            name,
            chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()),
        );
        format!(
            "`{name}` is not an IANA time zone{}; accepted: names like \"UTC\" or \"Europe/Berlin\"",
            near.map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_default()
        )
    })
}

/// The portal's fixed delay in `[0, jitter)`: a hash of its name, so it survives restarts.
pub fn jitter_for(portal: &str, jitter: Duration) -> Duration {
    let millis = jitter.as_millis();
    if millis == 0 {
        return Duration::ZERO;
    }
    let digest = Sha256::digest(portal.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let h = u64::from_be_bytes(first) as u128;
    // h % millis < millis <= u64::MAX as jitter came from a Duration of u64 milliseconds at most.
    Duration::from_millis((h % millis) as u64)
}

/// `t + d`, saturating instead of overflowing.
pub fn add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| t.checked_add_signed(d))
        .unwrap_or(t)
}

/// True when a rotation now would break `min_interval` after the last success.
pub fn within_min_interval(
    last_success: Option<DateTime<Utc>>,
    min_interval: Option<Duration>,
    now: DateTime<Utc>,
) -> Option<Duration> {
    let (last, min) = (last_success?, min_interval?);
    let next_allowed = add(last, min);
    (now < next_allowed).then(|| (next_allowed - now).to_std().unwrap_or_default())
}

/// `[schedules.NAME]`.
#[derive(Debug, Clone)]
pub struct ScheduleConfig {
    /// The cron expression in its time zone.
    pub cron: CronSchedule,
    /// Maximum random delay.
    pub jitter: Duration,
    /// Run a missed fire time once at start.
    pub catch_up: bool,
    /// Rotate when the portal's entry changes.
    pub rotate_on_change: bool,
    /// Minimum time between two rotations of one portal.
    pub min_interval: Option<Duration>,
    /// Rotate when fewer unused codes remain.
    pub rotate_when_unused_below: Option<usize>,
    /// How often to read the portal (unused count, drift); `None` when `"off"`.
    pub watch_every: Option<Duration>,
    /// What to do when the portal's set changed outside us.
    pub on_drift: OnDrift,
    /// How long a PUT of unknown outcome is re-checked by GET.
    pub settle_window: Duration,
}

/// What to do when a portal's set changed outside us (drift).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDrift {
    /// Deliver the current set to every sink, as `resend` does.
    Resend,
    /// Rotate the portal.
    Rotate,
}

/// The convergence policy of one portal: its schedule's, or the defaults for a portal
/// without a schedule (which the daemon still watches for drift).
#[derive(Debug, Clone, Copy)]
pub struct Convergence {
    /// How often to read the portal; `None`: never.
    pub watch_every: Option<Duration>,
    /// What drift triggers.
    pub on_drift: OnDrift,
    /// How long an unknown PUT is re-checked.
    pub settle_window: Duration,
}

/// `watch_every` when not configured.
pub const DEFAULT_WATCH_EVERY: Duration = Duration::from_secs(6 * 3600);
/// `settle_window` when not configured.
pub const DEFAULT_SETTLE_WINDOW: Duration = Duration::from_secs(15 * 60);

impl Default for Convergence {
    fn default() -> Self {
        Self {
            watch_every: Some(DEFAULT_WATCH_EVERY),
            on_drift: OnDrift::Resend,
            settle_window: DEFAULT_SETTLE_WINDOW,
        }
    }
}

impl ScheduleConfig {
    /// The first jittered fire time for `portal` strictly after `after`.
    pub fn next_fire(
        &self,
        portal: &str,
        after: chrono::DateTime<chrono::Utc>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let j = jitter_for(portal, self.jitter);
        let shifted = after - chrono::Duration::from_std(j).unwrap_or_default();
        self.cron.next_after(shifted).map(|t| add(t, j))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn unknown_names_are_said_in_our_words() {
        let err = |e: &str| CronSchedule::parse(e, Tz::UTC).err().unwrap_or_default();
        let fry = err("0 3 * * Mon-Fry");
        assert!(
            fry.contains("unknown day name `Fry`; did you mean `FRI`?"),
            "{fry}"
        );
        let hourl = err("@hourl");
        assert!(
            hourl.contains(
                "unknown nickname `@hourl`; did you mean `@hourly`? accepted: @hourly @daily"
            ),
            "{hourl}"
        );
        let month = err("0 3 1 Jna *");
        assert!(month.contains("unknown month name `Jna`"), "{month}");
        for ok in [
            "0 3 * * MON-FRI",
            "0 3 1 jan,jul sun",
            "@weekly",
            "@annually",
            "0 0 3 * * 5L",
        ] {
            assert!(
                CronSchedule::parse(ok, Tz::UTC).is_ok(),
                "{ok}: {}",
                err(ok)
            );
        }
        let tz = parse_timezone("Europe/Berln").unwrap_err();
        assert!(tz.contains("did you mean `Europe/Berlin`?"), "{tz}");
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
            .single()
            .expect("valid test date")
    }

    #[test]
    fn weekday_one_is_monday_and_zero_and_seven_are_sunday() {
        // 2026-11-28 is a Saturday.
        let from = utc(2026, 11, 28, 12, 0, 0);
        let mon = CronSchedule::parse("0 3 * * 1", Tz::UTC).unwrap();
        assert_eq!(mon.next_after(from).unwrap(), utc(2026, 11, 30, 3, 0, 0));
        for sun in ["0 3 * * 0", "0 3 * * 7", "0 3 * * Sun", "0 3 * * SUN"] {
            let s = CronSchedule::parse(sun, Tz::UTC).unwrap();
            assert_eq!(
                s.next_after(from).unwrap(),
                utc(2026, 11, 29, 3, 0, 0),
                "{sun}"
            );
        }
        let named = CronSchedule::parse("0 3 * * Mon", Tz::UTC).unwrap();
        assert_eq!(named.next_after(from).unwrap(), utc(2026, 11, 30, 3, 0, 0));
    }

    #[test]
    fn six_fields_put_seconds_first() {
        let s = CronSchedule::parse("*/10 * * * * *", Tz::UTC).unwrap();
        let from = utc(2026, 1, 1, 0, 0, 3);
        assert_eq!(s.next_after(from).unwrap(), utc(2026, 1, 1, 0, 0, 10));
    }

    #[test]
    fn nicknames_and_bad_field_counts() {
        let from = utc(2026, 11, 28, 12, 30, 0);
        let h = CronSchedule::parse("@hourly", Tz::UTC).unwrap();
        assert_eq!(h.next_after(from).unwrap(), utc(2026, 11, 28, 13, 0, 0));
        let w = CronSchedule::parse("@weekly", Tz::UTC).unwrap();
        assert_eq!(w.next_after(from).unwrap(), utc(2026, 11, 29, 0, 0, 0));
        let y = CronSchedule::parse("@yearly", Tz::UTC).unwrap();
        assert_eq!(y.next_after(from).unwrap(), utc(2027, 1, 1, 0, 0, 0));
        assert!(CronSchedule::parse("0 3 * *", Tz::UTC).is_err());
        assert!(CronSchedule::parse("0 0 3 * * 1 2026", Tz::UTC).is_err());
        assert!(CronSchedule::parse("61 * * * *", Tz::UTC).is_err());
    }

    #[test]
    fn an_expression_that_never_fires_is_refused() {
        for never in [
            "0 0 30 2 *",
            "0 0 31 4 *",
            "0 0 31 2,4,6 *",
            // Found by fuzzing: an empty minute list, whose next time was searched forever.
            ", 2 06  * 7 ",
            "1, 2 * * *",
            "0 ,3 * * *",
        ] {
            let started = std::time::Instant::now();
            let e = CronSchedule::parse(never, Tz::UTC).unwrap_err();
            assert!(
                e.contains("never fires") || e.contains("empty element"),
                "{never}: {e}"
            );
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{never}"
            );
        }
        for rare in ["0 0 29 2 *", "0 0 31 * *", "@yearly"] {
            assert!(CronSchedule::parse(rare, Tz::UTC).is_ok(), "{rare}");
        }
    }

    #[test]
    fn spring_forward_fires_at_first_instant_after_the_gap() {
        // Europe/Berlin skips 02:00-03:00 local on 2026-03-29 (01:00 UTC).
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        let s = CronSchedule::parse("30 2 * * *", berlin).unwrap();
        let next = s.next_after(utc(2026, 3, 28, 12, 0, 0)).unwrap();
        // 2026-03-28 02:30 CET has passed; the 29th's 02:30 does not exist: 03:00 CEST = 01:00 UTC.
        assert_eq!(next, utc(2026, 3, 29, 1, 0, 0));
    }

    #[test]
    fn fall_back_fires_once_at_first_occurrence() {
        // Europe/Berlin repeats 02:00-03:00 local on 2026-10-25.
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        let s = CronSchedule::parse("30 2 * * *", berlin).unwrap();
        let first = s.next_after(utc(2026, 10, 24, 12, 0, 0)).unwrap();
        assert_eq!(first, utc(2026, 10, 25, 0, 30, 0)); // 02:30 CEST
        let second = s.next_after(first).unwrap();
        assert_eq!(second, utc(2026, 10, 26, 1, 30, 0)); // the next day, 02:30 CET
    }

    #[test]
    fn jitter_is_stable_bounded_and_differs_by_portal() {
        let j = Duration::from_secs(600);
        let a = jitter_for("acme", j);
        assert_eq!(a, jitter_for("acme", j));
        assert!(a < j);
        let distinct: std::collections::BTreeSet<_> =
            (0..50).map(|i| jitter_for(&format!("p{i}"), j)).collect();
        assert!(distinct.len() > 40);
        assert!(distinct.iter().all(|d| *d < j));
        assert_eq!(jitter_for("acme", Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn min_interval_blocks_until_it_has_passed() {
        let now = utc(2026, 1, 1, 12, 0, 0);
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(
            within_min_interval(Some(utc(2026, 1, 1, 11, 30, 0)), hour, now),
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            within_min_interval(Some(utc(2026, 1, 1, 10, 0, 0)), hour, now),
            None
        );
        assert_eq!(within_min_interval(None, hour, now), None);
        assert_eq!(within_min_interval(Some(now), None, now), None);
    }

    #[test]
    fn upcoming_lists_three_times_with_jitter() {
        let s = CronSchedule::parse("0 3 * * *", Tz::UTC).unwrap();
        let t = s.upcoming(utc(2026, 1, 1, 0, 0, 0), Duration::from_secs(60), 3);
        assert_eq!(
            t,
            vec![
                utc(2026, 1, 1, 3, 1, 0),
                utc(2026, 1, 2, 3, 1, 0),
                utc(2026, 1, 3, 3, 1, 0)
            ]
        );
    }
}
