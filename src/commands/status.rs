//! `status [--json]`: what the state knows, per portal. Read-only.
//!
//! Built as a typed report ([`StatusReport`]) first; `--json` serializes it, the table for
//! people reads its fields.

use std::collections::HashMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Exit, fmt_ms, load_config};
use crate::config::Config;
use crate::coordinator::{Coordinator, Role};
use crate::docspace::model::escape_controls;
use crate::state::pg::{Lease, Node};
use crate::state::{self, LastResult, OpenJournal, PendingRow, PortalRow, Store};

/// What `status` reports.
#[derive(Debug, Serialize)]
struct StatusReport {
    portals: Vec<PortalStatus>,
    /// In a cluster: the instances, newest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    instances: Option<Vec<Node>>,
    /// The portals listed, counted by state.
    summary: Summary,
}

/// The STATE column: what needs attention first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    NotConfigured,
    Settling,
    Flapping,
    Pending,
    Failing,
    Ok,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::NotConfigured => "NOT CONFIGURED",
            State::Settling => "SETTLING",
            State::Flapping => "FLAPPING",
            State::Pending => "PENDING",
            State::Failing => "FAILING",
            State::Ok => "ok",
        }
    }

    /// Its colour on a terminal.
    fn tone(self) -> super::Tone {
        match self {
            State::Ok => super::Tone::Good,
            State::Failing | State::Flapping => super::Tone::Bad,
            State::NotConfigured | State::Settling | State::Pending => super::Tone::Warn,
        }
    }
}

/// How many of the listed portals are in each state (the table's STATE column).
#[derive(Debug, Default, Serialize)]
struct Summary {
    portals: usize,
    ok: usize,
    failing: usize,
    pending: usize,
    settling: usize,
    flapping: usize,
    not_configured: usize,
}

impl Summary {
    fn of(portals: &[PortalStatus]) -> Self {
        let mut s = Summary {
            portals: portals.len(),
            ..Summary::default()
        };
        for p in portals {
            *match p.state() {
                State::Settling => &mut s.settling,
                State::Flapping => &mut s.flapping,
                State::Pending => &mut s.pending,
                State::Failing => &mut s.failing,
                State::NotConfigured => &mut s.not_configured,
                State::Ok => &mut s.ok,
            } += 1;
        }
        s
    }

    /// "12 portals: 9 ok, 1 failing, 1 pending, 1 settling".
    fn line(&self) -> String {
        let mut parts = vec![format!("{} ok", self.ok)];
        for (n, what) in [
            (self.failing, "failing"),
            (self.pending, "pending"),
            (self.settling, "settling"),
            (self.flapping, "flapping"),
            (self.not_configured, "not configured"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        format!(
            "{} portal{}: {}",
            self.portals,
            if self.portals == 1 { "" } else { "s" },
            parts.join(", ")
        )
    }
}

/// One portal, as the state knows it and as the planner would act on it.
#[derive(Debug, Serialize)]
struct PortalStatus {
    portal: String,
    configured: bool,
    #[serde(serialize_with = "crate::json::opt_time")]
    last_attempt_at: Option<i64>,
    #[serde(serialize_with = "crate::json::opt_time")]
    last_success_at: Option<i64>,
    last_result: Option<LastResult>,
    last_error: Option<String>,
    failures_in_a_row: i64,
    #[serde(serialize_with = "crate::json::opt_time")]
    next_due_at: Option<i64>,
    next_reason: Option<&'static str>,
    next_reason_text: Option<String>,
    /// The next time in the schedule's own time zone, when that is not UTC ("03:00
    /// Europe/Berlin"); the table only (`--json` has every time in UTC).
    #[serde(skip)]
    next_due_local: Option<String>,
    next_held_by: Option<&'static str>,
    unused: Option<i64>,
    total: Option<i64>,
    #[serde(serialize_with = "crate::json::opt_time")]
    codes_seen_at: Option<i64>,
    pending_deliveries: Vec<PendingRow>,
    settling: Option<Settling>,
    drifts: i64,
    #[serde(serialize_with = "crate::json::opt_time")]
    drift_at: Option<i64>,
    flapping: bool,
    #[serde(serialize_with = "crate::json::opt_time")]
    flapping_since: Option<i64>,
    #[serde(serialize_with = "crate::json::opt_time")]
    paused_until: Option<i64>,
    held_by: Option<HeldBy>,
}

/// An open intent: a rotation's outcome being settled.
#[derive(Debug, Serialize)]
struct Settling {
    #[serde(serialize_with = "crate::json::time")]
    since: i64,
    checks: i64,
    #[serde(serialize_with = "crate::json::opt_time")]
    next_check_at: Option<i64>,
}

/// In a cluster: the instance that holds the portal now.
#[derive(Debug, Serialize)]
struct HeldBy {
    instance: String,
    epoch: i64,
    lease_left_s: i64,
}

/// What `status` reads from the state, in one transaction.
#[derive(Default)]
struct Loaded {
    rows: Vec<PortalRow>,
    pending: Vec<PendingRow>,
    open: Vec<OpenJournal>,
    /// Drift counts of the last hour, only where flapping may still hold.
    recent_drifts: Vec<(String, i64)>,
}

/// Runs `status`.
pub async fn run(path: &Path, only: &[String], failing: bool, json: bool) -> Exit {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let (store, loaded) = match read_state(&config).await {
        Ok(r) => r,
        Err(exit) => return exit,
    };
    // In a cluster: who holds which portal, and the instances.
    let coordinator = Coordinator::new(Some(&store), Role::Command);
    let (leases, instances) = match coordinator.cluster_view().await {
        Ok(None) => (Vec::new(), None),
        Ok(Some((l, n))) => (l, Some(n)),
        Err(e) => {
            crate::err!("error: {e}");
            return Exit::Failed;
        }
    };
    // Built once for the entry fingerprints (no network: building reads and checks keys);
    // without them every portal would look changed, so status says nothing rather than that.
    let sinks = match crate::sinks::build_with(&config, crate::sinks::Secrets::Skip) {
        Ok(s) => s,
        Err(issues) => return super::config_errors(&issues),
    };
    let now = Utc::now();
    let view = View {
        config: &config,
        sinks: &sinks,
        rows: loaded.rows.iter().map(|r| (r.name.as_str(), r)).collect(),
        loaded: &loaded,
        leases: &leases,
        follows_changes: coordinator.follows_changes(),
        now,
    };
    let mut portals = view.portals();
    if let Some(unknown) = only
        .iter()
        .find(|n| !portals.iter().any(|p| &&p.portal == n))
    {
        crate::err!(
            "error: no portal named `{unknown}` in {} or the state",
            path.display()
        );
        return Exit::Usage;
    }
    if !only.is_empty() {
        portals.retain(|p| only.contains(&p.portal));
    }
    let pending_limit = config
        .alerts
        .as_ref()
        .map_or(crate::config::DEFAULT_PENDING_LONGER_THAN, |a| {
            a.pending_longer_than
        });
    if failing {
        portals.retain(|p| p.needs_attention(now, pending_limit));
    }
    let summary = Summary::of(&portals);
    let report = StatusReport {
        portals,
        instances,
        summary,
    };
    if json {
        crate::out!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        // `-q`: only the portals that are not ok, and the summary.
        let shown: Vec<&PortalStatus> = report
            .portals
            .iter()
            .filter(|p| !super::quiet() || p.state() != State::Ok)
            .collect();
        if !shown.is_empty() {
            print_table(&shown, now);
        }
        if let Some(nodes) = report.instances.as_ref().filter(|_| !super::quiet()) {
            print_instances(nodes);
        }
        crate::out!("{}", report.summary.line());
    }
    if failing {
        return if report.portals.is_empty() {
            Exit::Ok
        } else {
            Exit::Failed
        };
    }
    let settling = loaded.open.iter().any(|j| j.phase == state::Phase::Intent);
    if loaded.pending.is_empty() && !settling {
        Exit::Ok
    } else {
        Exit::Failed
    }
}

/// Opens the state read-only (`status` creates no file in the state directory, SPEC §6)
/// and reads it; no state yet, or one that cannot be read, is an error (exit 1).
async fn read_state(config: &Config) -> Result<(Store, Loaded), Exit> {
    let store = match Store::open_configured_read_only(config) {
        Ok(Some(s)) => s,
        Ok(None) => {
            crate::err!(
                "error: no state yet in {}: nothing has run here (start the daemon, or `tfa-rotator rotate`)",
                config.daemon.state_dir.display()
            );
            return Err(Exit::Failed);
        }
        Err(e) => {
            crate::err!("error: the state cannot be read: {e}");
            return Err(Exit::Failed);
        }
    };
    let loaded = store
        .call(|c| {
            let rows = state::portal_rows(c)?;
            let recent_drifts = rows
                .iter()
                .filter(|r| r.flapping_since.is_some())
                .map(|r| Ok((r.name.clone(), state::recent_drifts(c, &r.name)?)))
                .collect::<Result<Vec<_>, state::StateError>>()?;
            Ok(Loaded {
                rows,
                pending: state::pending_rows(c)?,
                open: state::open_journal(c, None)?,
                recent_drifts,
            })
        })
        .await;
    match loaded {
        Ok(l) => Ok((store, l)),
        Err(e) => {
            crate::err!("error: {e}");
            Err(Exit::Failed)
        }
    }
}

/// What one `status` sees: the config, the state, the cluster, the time.
struct View<'a> {
    config: &'a Config,
    sinks: &'a crate::sinks::Sinks,
    loaded: &'a Loaded,
    /// `loaded.rows` by portal: one lookup per portal, not a scan (10,000 portals).
    rows: HashMap<&'a str, &'a PortalRow>,
    leases: &'a [Lease],
    follows_changes: bool,
    now: DateTime<Utc>,
}

impl View<'_> {
    /// Every configured portal, then those only the state still knows.
    fn portals(&self) -> Vec<PortalStatus> {
        let mut names: Vec<&String> = self.config.portals.keys().collect();
        names.extend(
            self.loaded
                .rows
                .iter()
                .map(|r| &r.name)
                .filter(|n| !self.config.portals.contains_key(*n)),
        );
        names.sort_by(|a, b| natural_cmp(a, b));
        names.into_iter().map(|n| self.portal(n)).collect()
    }

    /// `at` in the time zone of `name`'s schedule, unless that is UTC.
    fn local_time(&self, name: &str, at: DateTime<Utc>) -> Option<String> {
        let pc = self.config.portals.get(name)?;
        let tz = self.config.schedule_of(pc)?.cron.timezone();
        (tz != chrono_tz::UTC).then(|| format!("{} {tz}", at.with_timezone(&tz).format("%H:%M")))
    }

    fn portal(&self, name: &str) -> PortalStatus {
        let loaded = self.loaded;
        let row = self
            .rows
            .get(name)
            .map_or_else(Default::default, |r| (*r).clone());
        let now_ms = self.now.timestamp_millis();
        let intent = loaded
            .open
            .iter()
            .find(|j| j.portal == name && j.phase == state::Phase::Intent);
        let due = self.due(name, &row, intent);
        let recent = loaded
            .recent_drifts
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, n)| *n);
        let flapping = state::still_flapping(row.flapping_since, recent, now_ms);
        PortalStatus {
            portal: name.to_string(),
            configured: self.config.portals.contains_key(name),
            last_attempt_at: row.last_attempt_at,
            last_success_at: row.last_success_at,
            last_result: row.last_result,
            last_error: row.last_error,
            failures_in_a_row: row.failures,
            next_due_at: due.map(|d| d.at.timestamp_millis()),
            next_reason: due.map(|d| d.reason.name()),
            next_reason_text: due.map(|d| d.reason.describe()),
            next_due_local: due.and_then(|d| self.local_time(name, d.at)),
            next_held_by: due.and_then(|d| d.held).map(|h| h.describe()),
            unused: row.unused,
            total: row.total,
            codes_seen_at: row.seen_at,
            pending_deliveries: loaded
                .pending
                .iter()
                .filter(|p| p.portal == name)
                .cloned()
                .collect(),
            settling: intent.map(|j| Settling {
                since: j.started_at,
                checks: j.checks,
                next_check_at: j.next_check_at,
            }),
            drifts: row.drifts,
            drift_at: row.drift_at,
            flapping,
            flapping_since: row.flapping_since.filter(|_| flapping),
            paused_until: row.paused_until.filter(|t| *t > now_ms),
            held_by: self
                .leases
                .iter()
                .find(|l| l.portal == name)
                .map(|l| HeldBy {
                    instance: l.owner.clone(),
                    epoch: l.epoch,
                    lease_left_s: l.left_s,
                }),
        }
    }

    /// The planner's answer, the one the daemon acts on.
    fn due(
        &self,
        name: &str,
        row: &PortalRow,
        intent: Option<&OpenJournal>,
    ) -> Option<crate::schedule::plan::Due> {
        let pc = self.config.portals.get(name)?;
        let fp = crate::rotation::entry_fingerprint_of(self.sinks, pc);
        crate::schedule::plan::plan(
            &crate::rotation::policy_of(self.config, pc, &fp, self.follows_changes),
            &crate::rotation::known_from(Some(row), intent, self.now),
            &crate::schedule::plan::Now {
                now: self.now,
                started: self.now,
                once: false,
            },
        )
        .due
    }
}

/// Names in the order people count: `p2` before `p10` (runs of digits compare as numbers).
pub(super) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a, b);
    loop {
        let digits = |s: &str| s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        match (a.chars().next(), b.chars().next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let (da, db) = (digits(a), digits(b));
                let (na, nb) = (
                    a[..da].trim_start_matches('0'),
                    b[..db].trim_start_matches('0'),
                );
                let by_number = na.len().cmp(&nb.len()).then_with(|| na.cmp(nb));
                if by_number.is_ne() {
                    return by_number;
                }
                // The same number: fewer leading zeros first, then the rest.
                if da != db {
                    return da.cmp(&db);
                }
                (a, b) = (&a[da..], &b[db..]);
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(&y);
                }
                (a, b) = (&a[x.len_utf8()..], &b[y.len_utf8()..]);
            }
        }
    }
}

impl PortalStatus {
    /// What `--failing` lists (SPEC §2): a failed last attempt, an open intent, a delivery
    /// pending longer than `pending_limit`, FLAPPING, a 429 pause.
    fn needs_attention(&self, now: DateTime<Utc>, pending_limit: std::time::Duration) -> bool {
        let limit_ms = i64::try_from(pending_limit.as_millis()).unwrap_or(i64::MAX);
        let old_pending = self
            .pending_deliveries
            .iter()
            .any(|d| now.timestamp_millis().saturating_sub(d.created_at) > limit_ms);
        self.last_result == Some(LastResult::Failed)
            || self.failures_in_a_row > 0
            || self.settling.is_some()
            || old_pending
            || self.flapping
            || self.paused_until.is_some()
    }

    /// The STATE column: what needs attention first.
    fn state(&self) -> State {
        if !self.configured {
            State::NotConfigured
        } else if self.settling.is_some() {
            State::Settling
        } else if self.flapping {
            State::Flapping
        } else if !self.pending_deliveries.is_empty() {
            State::Pending
        } else if self.failures_in_a_row > 0 {
            State::Failing
        } else {
            State::Ok
        }
    }

    /// The table's cells.
    fn cells(&self, now: DateTime<Utc>) -> [String; 6] {
        let attempt = match self.last_attempt_at {
            Some(t) => format!(
                "{} {}",
                fmt_ms(Some(t)),
                self.last_result.map_or("?", LastResult::as_str)
            ),
            None => "never".into(),
        };
        let next = match self.next_due_at {
            Some(t) => format!(
                "{}{} {} ({})",
                fmt_ms(Some(t)),
                self.next_due_local
                    .as_ref()
                    .map(|l| format!(" ({l})"))
                    .unwrap_or_default(),
                super::fmt_relative(t, now),
                self.next_reason_text.as_deref().unwrap_or_default()
            ),
            None => "by hand only".into(),
        };
        let codes = match (self.unused, self.total) {
            (Some(u), Some(t)) => format!("{u}/{t}"),
            _ => "-".into(),
        };
        [
            self.portal.clone(),
            fmt_ms(self.last_success_at),
            attempt,
            next,
            codes,
            self.state().as_str().into(),
        ]
    }

    /// A line for each thing that needs attention.
    fn notes(&self, now: DateTime<Utc>) -> Vec<String> {
        let name = &self.portal;
        let mut notes = Vec::new();
        if let Some(e) = &self.last_error {
            let n = self.failures_in_a_row;
            notes.push(format!("{name}: last error ({n} in a row): {e}"));
        }
        if let Some(h) = &self.held_by {
            notes.push(format!(
                "{name}: held by instance {} (epoch {}, lease {}s left)",
                escape_controls(&h.instance),
                h.epoch,
                h.lease_left_s
            ));
        }
        if let Some(h) = self.next_held_by {
            notes.push(format!("{name}: next rotation held: {h}"));
        }
        if let Some(at) = self.drift_at {
            notes.push(format!(
                "{name}: drift: the portal's codes changed outside tfa-rotator {} time(s), last at {}",
                self.drifts,
                fmt_ms(Some(at))
            ));
        }
        if self.flapping {
            notes.push(format!(
                "{name}: FLAPPING since {}: its codes changed more than {} times within an hour; drift is logged, not acted on, until an hour passes with at most one change",
                fmt_ms(self.flapping_since),
                state::DRIFT_ACTIONS
            ));
        }
        if let Some(t) = self.paused_until {
            notes.push(format!(
                "{name}: PAUSED by the portal (429 Too Many Requests) until {} ({})",
                fmt_ms(Some(t)),
                super::fmt_relative(t, now)
            ));
        }
        if let Some(s) = &self.settling {
            let next = s
                .next_check_at
                .map(|t| format!("{} {}", fmt_ms(Some(t)), super::fmt_relative(t, now)))
                .unwrap_or_else(|| "once asked".into());
            notes.push(format!(
                "{name}: SETTLING: a rotation's outcome is unknown since {}; asked {} time(s), next {next} (`tfa-rotator settle {name}`)",
                fmt_ms(Some(s.since)),
                s.checks,
            ));
        }
        for d in &self.pending_deliveries {
            notes.push(format!(
                "{name}: PENDING delivery to {} since {}, {} attempt(s){}{}",
                d.sink,
                fmt_ms(Some(d.created_at)),
                d.attempts,
                if d.permanent {
                    ", refused by the server (run `deliver` after fixing it)"
                } else {
                    ""
                },
                d.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
        notes
    }
}

/// `status` for people: one row per portal (the last success and the last attempt with its
/// own result, apart), then a line for each thing that needs attention. Times are RFC 3339
/// UTC, with how far away they are.
fn print_table(portals: &[&PortalStatus], now: DateTime<Utc>) {
    let header = [
        "PORTAL",
        "LAST SUCCESS",
        "LAST ATTEMPT",
        "NEXT",
        "CODES",
        "STATE",
    ];
    let mut rows: Vec<[String; 6]> = vec![header.map(String::from)];
    rows.extend(portals.iter().map(|p| p.cells(now)));
    let tones: Vec<super::Tone> = portals.iter().map(|p| p.state().tone()).collect();
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for (i, r) in rows.iter().enumerate() {
        let mut line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        // The last column, coloured on a terminal (padding is not needed after it).
        if let Some(tone) = i.checked_sub(1).and_then(|p| tones.get(p)) {
            line[5] = super::paint(&r[5], *tone);
        }
        crate::out!("{}", line.join("  ").trim_end());
    }
    let notes: Vec<String> = portals.iter().flat_map(|p| p.notes(now)).collect();
    if !notes.is_empty() {
        crate::out!("");
        for n in notes {
            crate::out!("{n}");
        }
    }
}

/// In a cluster: the instances, and which run an older config.
fn print_instances(nodes: &[Node]) {
    crate::out!("");
    crate::out!("INSTANCES (PostgreSQL)");
    for n in nodes {
        crate::out!(
            "{}  version {}  seen {}s ago{}",
            escape_controls(&n.name),
            escape_controls(&n.version),
            n.seen_s_ago,
            if n.newest_config {
                ""
            } else {
                "  OLDER CONFIG: does not act on changed entries"
            }
        );
    }
}

#[cfg(test)]
mod natural_tests {
    use super::natural_cmp;

    #[test]
    fn digits_count_as_numbers() {
        let mut names = vec!["p10", "p2", "p1", "acme", "p100", "p02", "b"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["acme", "b", "p1", "p2", "p02", "p10", "p100"]);
    }
}
