//! `check [--offline] [--json]`: validate, resolve secrets, preflight read-only, print the plan.
//! Never rotates, never sends, never writes a sink or the state.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use serde_json::{Value, json};

use super::{Exit, config_errors, load_config_with};
use crate::config::{Config, PortalConfig};
use crate::docspace::HttpClient;
use crate::rotation::Engine;
use crate::sinks::Sinks;

/// Runs `check`.
pub async fn run(path: &Path, offline: bool, json: bool) -> Exit {
    // Offline, a file that fails the trust rule is a warning: nothing is run and no secret
    // is read, and a CI checkout is often writable by group or others.
    let trust = if offline {
        crate::config::Trust::Warn
    } else {
        crate::config::Trust::Enforce
    };
    let config = match load_config_with(path, trust) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut issues = Vec::new();
    // Offline, no secret value is read: CI can check a config whose secrets live only on the
    // server. Public key files are still read and checked.
    let secrets = if offline {
        crate::sinks::Secrets::Skip
    } else {
        crate::sinks::Secrets::Read
    };
    let sinks = match crate::sinks::build_with(&config, secrets) {
        Ok(s) => s,
        Err(mut i) => {
            issues.append(&mut i);
            Sinks::default()
        }
    };
    for pc in config.portals.values().filter(|_| !offline) {
        if let Err(e) = pc.api_key.value.resolve() {
            issues.push(config.issue(
                Some(pc.api_key.loc),
                format!("portals.{}.api_key", pc.name),
                e,
            ));
        }
    }
    if !issues.is_empty() {
        return config_errors(&issues);
    }

    // The state, read-only. A PostgreSQL `[storage]` is connected to for real (address,
    // authentication, TLS): a wrong password must fail `check`, not the first rotation.
    let reader = if offline {
        None
    } else if config.storage.is_some() {
        match crate::state::Store::open_configured_read_only(&config) {
            Ok(r) => r,
            Err(e) => {
                crate::err!("error: storage: {e}");
                return Exit::Failed;
            }
        }
    } else {
        crate::rotation::open_reader(&config)
    };
    let http = HttpClient::new(config.daemon.http_timeout);
    let engine = Engine {
        config: config.clone(),
        sinks,
        store: None,
        reader,
        http,
        dry_run: true,
        secrets: crate::sinks::Secrets::Read,
        metrics: Default::default(),
        stopping: Default::default(),
        coordinator: crate::coordinator::Coordinator::new(None, crate::coordinator::Role::Command),
        limits: crate::rotation::limits::Limits::new(
            config.daemon.max_concurrent,
            config.daemon.max_per_host,
        ),
    };
    let limit = config.daemon.max_concurrent;
    let mut plans: Vec<Value> = futures::stream::iter(config.portals.values())
        .map(|pc| {
            let engine = &engine;
            async move { plan(engine, pc, offline).await }
        })
        .buffer_unordered(limit)
        .collect()
        .await;
    plans.sort_by(|a, b| a["portal"].as_str().cmp(&b["portal"].as_str()));
    let failed = plans.iter().filter(|p| p["ok"] == json!(false)).count();

    if json {
        let doc = json!({
            "config": config.path.display().to_string(),
            "valid": true,
            "offline": offline,
            "warnings": config.warnings.iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            "portals": plans,
            "failed": failed,
            "storage": storage_json(&config),
        });
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print_text(&config, &plans, offline);
    }
    if failed > 0 { Exit::Failed } else { Exit::Ok }
}

async fn plan(engine: &Engine, pc: &PortalConfig, offline: bool) -> Value {
    let config: &Arc<Config> = &engine.config;
    let now = Utc::now();
    // The planner's answer, as the daemon would give it, from what the state knows (read
    // only; nothing when offline or there is no state yet).
    let fp = engine.entry_fingerprint(pc);
    let (row, sink_sets) = match engine.reader() {
        Some(store) => {
            let p = pc.name.clone();
            store
                .call(move |c| {
                    Ok((
                        crate::state::portal_row(c, &p)?,
                        crate::state::sink_sets(c, &p)?,
                    ))
                })
                .await
                .unwrap_or_default()
        }
        None => Default::default(),
    };
    let next = crate::schedule::plan::upcoming_rotations(
        &crate::rotation::policy_of(config, pc, &fp, engine.coordinator.follows_changes()),
        &crate::rotation::known_from(row.as_ref(), None, now),
        now,
        3,
    );
    let schedule = config.schedule_of(pc).map(|s| {
        json!({
            "name": pc.schedule,
            "cron": s.cron.expr(),
            "timezone": s.cron.timezone().name(),
            "jitter_s": crate::schedule::jitter_for(&pc.name, s.jitter).as_secs(),
            "next": next.iter().map(|t| crate::schedule::fmt_utc(*t)).collect::<Vec<_>>(),
            "min_interval_s": s.min_interval.map(|d| d.as_secs()),
            "rotate_when_unused_below": s.rotate_when_unused_below,
        })
    });
    let sinks: Vec<Value> = pc
        .sinks
        .iter()
        .map(|s| json!({"name": s, "describe": engine.sinks.get(s).map(|k| k.describe(&pc.name)).unwrap_or_default()}))
        .collect();
    let mut out = json!({
        "portal": pc.name,
        "url": pc.url.as_str(),
        "schedule": schedule,
        "sinks": sinks,
        "ok": true,
    });
    if offline {
        return out;
    }
    let mut problems: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    match engine.portal(pc) {
        Err(e) => problems.push(e.to_string()),
        Ok(portal) => {
            let (version, account, key, methods, codes) = tokio::join!(
                portal.version(),
                portal.account(),
                portal.key_info(),
                portal.tfa_methods(),
                portal.codes()
            );
            if let Ok(v) = version {
                out["docspace_version"] = json!(v.doc_space);
            }
            match account {
                Ok(a) => out["account"] = json!({"display_name": a.display_name, "email": a.email}),
                Err(e) => problems.push(e.to_string()),
            }
            match key {
                Ok(k) => {
                    out["key"] = json!({"name": k.name, "permissions": k.permissions, "expires_at": k.expires_at, "active": k.is_active});
                    if !k.can_write() {
                        notes.push(format!(
                            "the key's scopes ({}) may not allow rotating (needs *:write)",
                            k.permissions.join(", ")
                        ));
                    }
                }
                Err(e) => notes.push(format!("could not read the key's own details: {e}")),
            }
            match methods {
                Ok(m) => {
                    let app = m.iter().find(|m| m.id == "app");
                    out["tfa_app"] = json!({"enabled": app.map(|a| a.enabled), "available": app.map(|a| a.available)});
                }
                Err(e) => notes.push(format!("could not read the portal's TFA settings: {e}")),
            }
            match codes {
                Ok(c) => {
                    out["codes"] = json!({"unused": c.unused(), "total": c.total()});
                    // Every GET compares (SPEC §6): sinks holding a set the portal no longer
                    // accepts are reported here; `deliver` or the daemon converges them.
                    if let Some(store) = engine.reader() {
                        let fp = store.fingerprinter().of_set(&c);
                        let drifted = crate::rotation::drift::drifted_sinks(pc, &sink_sets, &fp);
                        if !drifted.is_empty() {
                            out["drift"] = json!(drifted);
                            problems.push(format!(
                                "drift: sinks {} hold a set the portal no longer accepts; `tfa-rotator deliver` or the daemon converges them",
                                drifted.join(", ")
                            ));
                        }
                    }
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
    }
    for s in &pc.sinks {
        if let Some(sink) = engine.sinks.get(s)
            && let Err(e) = sink.preflight(&pc.name).await
        {
            problems.push(e.to_string());
        }
    }
    out["ok"] = json!(problems.is_empty());
    out["problems"] = json!(problems);
    out["notes"] = json!(notes);
    out
}

/// `[storage]` in `--json`: the backend, and for PostgreSQL the lease and PUT budget.
fn storage_json(config: &Config) -> Value {
    match &config.storage {
        None => {
            json!({"type": "sqlite", "state_dir": config.daemon.state_dir.display().to_string()})
        }
        Some(st) => json!({
            "type": "postgres",
            "url": st.url.value.describe(),
            "lease_s": st.lease.as_secs(),
            "put_budget_s": config.daemon.http_timeout.as_secs(),
            "grace_s": st.grace.as_secs(),
        }),
    }
}

fn print_text(config: &Config, plans: &[Value], offline: bool) {
    crate::out!(
        "config {}: valid ({} portal(s), {} sink(s), {} schedule(s))",
        config.path.display(),
        config.portals.len(),
        config.sinks.len(),
        config.schedules.len()
    );
    if let Some(st) = &config.storage {
        crate::out!(
            "storage: PostgreSQL ({}), lease {}, PUT budget {} (daemon.http_timeout) + grace {}: an intent needs a claim with more than {} left",
            st.url.value.describe(),
            humantime::format_duration(st.lease),
            humantime::format_duration(config.daemon.http_timeout),
            humantime::format_duration(st.grace),
            humantime::format_duration(config.daemon.http_timeout + st.grace)
        );
    }
    for p in plans {
        crate::out!(
            "\nportal {} {}",
            p["portal"].as_str().unwrap_or_default(),
            p["url"].as_str().unwrap_or_default()
        );
        match p["schedule"].as_object() {
            Some(s) => {
                crate::out!(
                    "  schedule {}: {} ({}), jitter {}s",
                    s["name"].as_str().unwrap_or_default(),
                    s["cron"].as_str().unwrap_or_default(),
                    s["timezone"].as_str().unwrap_or_default(),
                    s["jitter_s"]
                );
                let next: Vec<&str> = s["next"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                crate::out!("  next rotations: {}", next.join(", "));
            }
            None => crate::out!("  schedule: none (manual rotation only)"),
        }
        for s in p["sinks"].as_array().into_iter().flatten() {
            crate::out!(
                "  sink {}: {}",
                s["name"].as_str().unwrap_or_default(),
                s["describe"].as_str().unwrap_or_default()
            );
        }
        if offline {
            continue;
        }
        if let Some(a) = p["account"].as_object() {
            crate::out!(
                "  account: {} <{}>",
                a["display_name"].as_str().unwrap_or_default(),
                a["email"].as_str().unwrap_or_default()
            );
        }
        if let Some(c) = p["codes"].as_object() {
            crate::out!("  codes: {}/{} unused", c["unused"], c["total"]);
        }
        if let Some(t) = p["tfa_app"].as_object() {
            crate::out!(
                "  TFA app method: enabled {}, available {}",
                t["enabled"],
                t["available"]
            );
        }
        for n in p["notes"].as_array().into_iter().flatten() {
            crate::out!("  note: {}", n.as_str().unwrap_or_default());
        }
        match p["problems"].as_array() {
            Some(list) if !list.is_empty() => {
                for e in list {
                    crate::out!("  FAILED: {}", e.as_str().unwrap_or_default());
                }
            }
            _ => crate::out!("  preflight: ok"),
        }
    }
}
