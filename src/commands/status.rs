//! `status [--json]`: what the state knows, per portal. Read-only.

use std::path::Path;

use chrono::Utc;
use serde_json::json;

use super::{Exit, fmt_ms, load_config};
use crate::state::{self, PendingRow, PortalRow, Store};

/// Runs `status`.
pub async fn run(path: &Path, json: bool) -> Exit {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    // Read-only: `status` creates no file in the state directory (SPEC §6).
    let store = match Store::open_configured_read_only(&config) {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            crate::err!(
                "error: no state yet in {}: nothing has run here (start the daemon, or `tfa-rotator rotate`)",
                config.daemon.state_dir.display()
            );
            return Exit::Failed;
        }
        Err(e) => {
            crate::err!("error: the state cannot be read: {e}");
            return Exit::Failed;
        }
    };
    type Loaded = (
        Vec<PortalRow>,
        Vec<PendingRow>,
        Vec<state::OpenJournal>,
        Vec<(String, i64)>,
    );
    let (rows, pending, open, recent_drifts): Loaded = match &store {
        None => (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        Some(s) => match s
            .call(|c| {
                let rows = state::portal_rows(c)?;
                // Drift counts only where flapping may still hold (rarely any portal).
                let recent = rows
                    .iter()
                    .filter(|r| r.flapping_since.is_some())
                    .map(|r| Ok((r.name.clone(), state::recent_drifts(c, &r.name)?)))
                    .collect::<Result<Vec<_>, state::StateError>>()?;
                Ok((
                    rows,
                    state::pending_rows(c)?,
                    state::open_journal(c, None)?,
                    recent,
                ))
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                crate::err!("error: {e}");
                return Exit::Failed;
            }
        },
    };
    // In a cluster: who holds which portal, and the instances.
    let coordinator =
        crate::coordinator::Coordinator::new(store.as_ref(), crate::coordinator::Role::Command);
    let (leases, nodes) = match coordinator.cluster_view().await {
        Ok(None) => (Vec::new(), None),
        Ok(Some((l, n))) => (l, Some(n)),
        Err(e) => {
            crate::err!("error: {e}");
            return Exit::Failed;
        }
    };
    let now = Utc::now();
    // Built once for the entry fingerprints (no network: building reads and checks keys);
    // without them every portal would look changed, so status says nothing rather than that.
    let sinks = match crate::sinks::build_with(&config, crate::sinks::Secrets::Skip) {
        Ok(s) => s,
        Err(issues) => return super::config_errors(&issues),
    };
    let mut names: Vec<String> = config.portals.keys().cloned().collect();
    names.extend(
        rows.iter()
            .map(|r| r.name.clone())
            .filter(|n| !config.portals.contains_key(n)),
    );
    let mut out = Vec::new();
    for name in &names {
        let row = rows
            .iter()
            .find(|r| &r.name == name)
            .cloned()
            .unwrap_or_default();
        let pc = config.portals.get(name);
        // The planner's answer, the one the daemon acts on.
        let intent = open
            .iter()
            .find(|j| &j.portal == name && j.phase == state::Phase::Intent);
        let due = pc.and_then(|pc| {
            let fp = crate::rotation::entry_fingerprint_of(&sinks, pc);
            crate::schedule::plan::plan(
                &crate::rotation::policy_of(&config, pc, &fp, coordinator.follows_changes()),
                &crate::rotation::known_from(Some(&row), intent, now),
                &crate::schedule::plan::Now {
                    now,
                    started: now,
                    once: false,
                },
            )
            .due
        });
        let next = due.map(|d| d.at.timestamp_millis());
        let recent = recent_drifts
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, n)| *n);
        let flapping = state::still_flapping(row.flapping_since, recent, now.timestamp_millis());
        let paused_until = row.paused_until.filter(|t| *t > now.timestamp_millis());
        let mine: Vec<&PendingRow> = pending.iter().filter(|p| &p.portal == name).collect();
        let settling = open
            .iter()
            .find(|j| &j.portal == name && j.phase == state::Phase::Intent)
            .map(|j| {
                json!({
                    "since": j.started_at,
                    "checks": j.checks,
                    "next_check_at": j.next_check_at,
                })
            });
        out.push(json!({
            "portal": name,
            "configured": pc.is_some(),
            "last_attempt_at": row.last_attempt_at,
            "last_success_at": row.last_success_at,
            "last_result": row.last_result,
            "last_error": row.last_error,
            "failures_in_a_row": row.failures,
            "next_due_at": next,
            "next_reason": due.map(|d| d.reason.name()),
            "next_reason_text": due.map(|d| d.reason.describe()),
            "next_held_by": due.and_then(|d| d.held).map(|h| h.describe()),
            "unused": row.unused,
            "total": row.total,
            "codes_seen_at": row.seen_at,
            "pending_deliveries": mine,
            "settling": settling,
            "drifts": row.drifts,
            "drift_at": row.drift_at,
            "flapping": flapping,
            "flapping_since": row.flapping_since.filter(|_| flapping),
            "paused_until": paused_until,
            "held_by": leases.iter().find(|l| &l.portal == name).map(|l| json!({
                "instance": l.owner, "epoch": l.epoch, "lease_left_s": l.left_s,
            })),
        }));
    }
    if json {
        let mut doc = json!({"portals": out});
        if let Some(n) = &nodes {
            doc["instances"] = json!(n);
        }
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print_table(&out, now);
        if let Some(nodes) = &nodes {
            crate::out!("");
            crate::out!("INSTANCES (PostgreSQL)");
            for n in nodes {
                crate::out!(
                    "{}  version {}  seen {}s ago{}",
                    crate::docspace::model::escape_controls(&n.name),
                    crate::docspace::model::escape_controls(&n.version),
                    n.seen_s_ago,
                    if n.newest_config {
                        ""
                    } else {
                        "  OLDER CONFIG: does not act on changed entries"
                    }
                );
            }
        }
    }
    if pending.is_empty() && !open.iter().any(|j| j.phase == state::Phase::Intent) {
        Exit::Ok
    } else {
        Exit::Failed
    }
}

/// `status` for people: one row per portal (the last success and the last attempt with its
/// own result, apart), then a line for each thing that needs attention. Times are RFC 3339
/// UTC, with how far away they are.
fn print_table(out: &[serde_json::Value], now: chrono::DateTime<Utc>) {
    let s = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let mut rows: Vec<[String; 6]> = vec![[
        "PORTAL".into(),
        "LAST SUCCESS".into(),
        "LAST ATTEMPT".into(),
        "NEXT".into(),
        "CODES".into(),
        "STATE".into(),
    ]];
    let mut notes: Vec<String> = Vec::new();
    for p in out {
        let name = s(&p["portal"]);
        let attempt = match p["last_attempt_at"].as_i64() {
            Some(t) => format!(
                "{} {}",
                fmt_ms(Some(t)),
                p["last_result"].as_str().unwrap_or("?")
            ),
            None => "never".into(),
        };
        let next = match p["next_due_at"].as_i64() {
            Some(t) => format!(
                "{} {} ({})",
                fmt_ms(Some(t)),
                super::fmt_relative(t, now),
                s(&p["next_reason"])
            ),
            None => "by hand only".into(),
        };
        let codes = match (p["unused"].as_i64(), p["total"].as_i64()) {
            (Some(u), Some(t)) => format!("{u}/{t}"),
            _ => "-".into(),
        };
        let pending = p["pending_deliveries"].as_array().map_or(0, |a| a.len());
        let state = if p["configured"] == json!(false) {
            "NOT CONFIGURED"
        } else if p["settling"].is_object() {
            "SETTLING"
        } else if p["flapping"] == json!(true) {
            "FLAPPING"
        } else if pending > 0 {
            "PENDING"
        } else if p["failures_in_a_row"].as_i64().unwrap_or(0) > 0 {
            "FAILING"
        } else {
            "ok"
        };
        rows.push([
            name.clone(),
            fmt_ms(p["last_success_at"].as_i64()),
            attempt,
            next,
            codes,
            state.into(),
        ]);
        if let Some(e) = p["last_error"].as_str() {
            notes.push(format!(
                "{name}: last error ({} in a row): {e}",
                p["failures_in_a_row"]
            ));
        }
        if let Some(i) = p["held_by"]["instance"].as_str() {
            notes.push(format!(
                "{name}: held by instance {} (epoch {}, lease {}s left)",
                crate::docspace::model::escape_controls(i),
                p["held_by"]["epoch"],
                p["held_by"]["lease_left_s"]
            ));
        }
        if let Some(h) = p["next_held_by"].as_str() {
            notes.push(format!("{name}: next rotation held: {h}"));
        }
        if let Some(at) = p["drift_at"].as_i64() {
            notes.push(format!(
                "{name}: drift: the portal's codes changed outside tfa-rotator {} time(s), last at {}",
                p["drifts"],
                fmt_ms(Some(at))
            ));
        }
        if p["flapping"] == json!(true) {
            notes.push(format!(
                "{name}: FLAPPING since {}: its codes changed more than {} times within an hour; drift is logged, not acted on, until an hour passes with at most one change",
                fmt_ms(p["flapping_since"].as_i64()),
                state::DRIFT_ACTIONS
            ));
        }
        if let Some(t) = p["paused_until"].as_i64() {
            notes.push(format!(
                "{name}: PAUSED by the portal (429 Too Many Requests) until {} ({})",
                fmt_ms(Some(t)),
                super::fmt_relative(t, now)
            ));
        }
        if p["settling"].is_object() {
            notes.push(format!(
                "{name}: SETTLING: a rotation's outcome is unknown since {}; asked {} time(s), next {} (`tfa-rotator settle {name}`)",
                fmt_ms(p["settling"]["since"].as_i64()),
                p["settling"]["checks"],
                p["settling"]["next_check_at"]
                    .as_i64()
                    .map(|t| format!("{} {}", fmt_ms(Some(t)), super::fmt_relative(t, now)))
                    .unwrap_or_else(|| "once asked".into()),
            ));
        }
        for d in p["pending_deliveries"].as_array().into_iter().flatten() {
            notes.push(format!(
                "{name}: PENDING delivery to {} since {}, {} attempt(s){}{}",
                s(&d["sink"]),
                fmt_ms(d["created_at"].as_i64()),
                d["attempts"],
                if d["permanent"] == json!(true) {
                    ", refused by the server (run `deliver` after fixing it)"
                } else {
                    ""
                },
                d["last_error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ));
        }
    }
    let mut widths = [0usize; 6];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        crate::out!("{}", line.join("  ").trim_end());
    }
    if !notes.is_empty() {
        crate::out!("");
        for n in notes {
            crate::out!("{n}");
        }
    }
}
