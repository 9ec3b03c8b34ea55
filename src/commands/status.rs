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
    let store = match Store::open_read_only(&config.daemon.state_dir) {
        Ok(s) => s,
        Err(e) => {
            crate::err!("error: {e}");
            return Exit::Failed;
        }
    };
    type Loaded = (Vec<PortalRow>, Vec<PendingRow>, Vec<state::OpenJournal>);
    let (rows, pending, open): Loaded = match &store {
        None => (Vec::new(), Vec::new(), Vec::new()),
        Some(s) => match s
            .call(|c| {
                Ok((
                    state::portal_rows(c)?,
                    state::pending_rows(c)?,
                    state::open_journal(c, None)?,
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
                &crate::rotation::policy_of(&config, pc, &fp),
                &crate::rotation::known_from(Some(&row), intent),
                &crate::schedule::plan::Now {
                    now,
                    started: now,
                    once: false,
                },
            )
            .due
        });
        let next = due.map(|d| d.at.timestamp_millis());
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
        }));
    }
    if json {
        crate::out!(
            "{}",
            serde_json::to_string_pretty(&json!({"portals": out})).unwrap_or_default()
        );
    } else {
        for p in &out {
            crate::out!(
                "{}{}",
                p["portal"].as_str().unwrap_or_default(),
                if p["configured"] == json!(false) {
                    " (no longer configured)"
                } else {
                    ""
                }
            );
            crate::out!(
                "  last rotation: {} ({})",
                fmt_ms(p["last_success_at"].as_i64()),
                p["last_result"].as_str().unwrap_or("none yet")
            );
            if let Some(e) = p["last_error"].as_str() {
                crate::out!(
                    "  last error: {e} ({} failure(s) in a row)",
                    p["failures_in_a_row"]
                );
            }
            crate::out!(
                "  next due: {}",
                match p["next_due_at"].as_i64() {
                    Some(t) => format!(
                        "{} ({}{})",
                        fmt_ms(Some(t)),
                        p["next_reason_text"].as_str().unwrap_or_default(),
                        p["next_held_by"]
                            .as_str()
                            .map(|h| format!(", {h}"))
                            .unwrap_or_default()
                    ),
                    None => "manual only".into(),
                }
            );
            match (p["unused"].as_i64(), p["total"].as_i64()) {
                (Some(u), Some(t)) => crate::out!(
                    "  codes: {u}/{t} unused (seen {})",
                    fmt_ms(p["codes_seen_at"].as_i64())
                ),
                _ => crate::out!("  codes: not read yet"),
            }
            if let Some(at) = p["drift_at"].as_i64() {
                crate::out!(
                    "  drift: the portal's codes changed outside tfa-rotator {} time(s), last at {}",
                    p["drifts"],
                    fmt_ms(Some(at))
                );
            }
            if p["settling"].is_object() {
                crate::out!(
                    "  SETTLING: a rotation's outcome is unknown since {}; asked {} time(s), next at {} (`tfa-rotator settle {}`)",
                    fmt_ms(p["settling"]["since"].as_i64()),
                    p["settling"]["checks"],
                    p["settling"]["next_check_at"]
                        .as_i64()
                        .map(|t| fmt_ms(Some(t)))
                        .unwrap_or_else(|| "once asked".into()),
                    p["portal"].as_str().unwrap_or_default()
                );
            }
            for d in p["pending_deliveries"].as_array().into_iter().flatten() {
                crate::out!(
                    "  PENDING delivery to {} since {}, {} attempt(s){}{}",
                    d["sink"].as_str().unwrap_or_default(),
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
