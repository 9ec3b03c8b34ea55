//! `check [--offline] [--json]`: validate, resolve secrets, preflight read-only, print the plan.
//! Never rotates, never sends, never writes a sink or the state.

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;
use serde::Serialize;

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
    let sinks = match sinks_and_secrets(&config, offline) {
        Ok(s) => s,
        Err(exit) => return exit,
    };
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
    // A recipient's key expiring within 30 days is a warning (SPEC §5, "Expiry ahead").
    let now = std::time::SystemTime::now();
    let expiring: Vec<String> = engine
        .sinks
        .expiries()
        .iter()
        .filter(|e| e.within(crate::sinks::Expiry::WARN, now))
        .map(|e| e.warning(now))
        .collect();
    for w in &expiring {
        crate::err!("warning: {}: {w}", config.path.display());
    }
    let limit = config.daemon.max_concurrent;
    let mut plans: Vec<PortalCheck> = futures::stream::iter(config.portals.values())
        .map(|pc| {
            let engine = &engine;
            async move { plan(engine, pc, offline).await }
        })
        .buffer_unordered(limit)
        .collect()
        .await;
    plans.sort_by(|a, b| super::status::natural_cmp(&a.portal, &b.portal));
    let failed = plans.iter().filter(|p| !p.ok).count();
    let report = CheckReport {
        config: config.path.display().to_string(),
        valid: true,
        offline,
        warnings: config
            .warnings
            .iter()
            .map(|w| w.to_string())
            .chain(expiring)
            .collect(),
        portals: plans,
        failed,
        storage: StorageReport::of(&config),
    };
    if json {
        crate::out!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print_text(&config, &report);
    }
    if failed > 0 { Exit::Failed } else { Exit::Ok }
}

/// Builds the sinks (keys read and checked) and, online, reads every secret once: what
/// fails is a config error (exit 78), every one at once.
fn sinks_and_secrets(config: &Config, offline: bool) -> Result<Sinks, Exit> {
    let mut issues = Vec::new();
    // Offline, no secret value is read: CI can check a config whose secrets live only on the
    // server. Public key files are still read and checked.
    let secrets = if offline {
        crate::sinks::Secrets::Skip
    } else {
        crate::sinks::Secrets::Read
    };
    let sinks = match crate::sinks::build_with(config, secrets) {
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
        return Err(config_errors(&issues));
    }
    Ok(sinks)
}

/// What `check` reports: the config is valid (an invalid one is reported as errors, exit
/// 78), and each portal's plan and preflight.
#[derive(Debug, Serialize)]
struct CheckReport {
    config: String,
    valid: bool,
    offline: bool,
    warnings: Vec<String>,
    portals: Vec<PortalCheck>,
    failed: usize,
    storage: StorageReport,
}

/// One portal: its schedule and sinks, and (online) what the portal and the sinks said.
#[derive(Debug, Default, Serialize)]
struct PortalCheck {
    portal: String,
    url: String,
    schedule: Option<ScheduleReport>,
    sinks: Vec<SinkReport>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    docspace_version: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<AccountReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<KeyReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tfa_app: Option<TfaAppReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    codes: Option<CodesReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drift: Option<Vec<String>>,
    /// Online only: what fails the portal (exit 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<Vec<String>>,
    /// Online only: what may need a look.
    #[serde(skip_serializing_if = "Option::is_none")]
    notes: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
struct ScheduleReport {
    name: Option<String>,
    cron: String,
    timezone: String,
    jitter_s: u64,
    next: Vec<String>,
    min_interval_s: Option<u64>,
    rotate_when_unused_below: Option<usize>,
}

#[derive(Debug, Serialize)]
struct SinkReport {
    name: String,
    describe: String,
}

#[derive(Debug, Serialize)]
struct AccountReport {
    display_name: String,
    email: String,
}

#[derive(Debug, Serialize)]
struct KeyReport {
    name: String,
    permissions: Vec<String>,
    expires_at: Option<String>,
    active: bool,
}

#[derive(Debug, Serialize)]
struct TfaAppReport {
    enabled: Option<bool>,
    available: Option<bool>,
}

#[derive(Debug, Serialize)]
struct CodesReport {
    unused: usize,
    total: usize,
}

/// `[storage]`: the backend, and for PostgreSQL the lease and PUT budget.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StorageReport {
    Sqlite {
        state_dir: String,
    },
    Postgres {
        url: String,
        lease_s: u64,
        put_budget_s: u64,
        grace_s: u64,
    },
}

impl StorageReport {
    fn of(config: &Config) -> Self {
        match &config.storage {
            None => StorageReport::Sqlite {
                state_dir: config.daemon.state_dir.display().to_string(),
            },
            Some(st) => StorageReport::Postgres {
                url: st.url.value.describe(),
                lease_s: st.lease.as_secs(),
                put_budget_s: config.daemon.http_timeout.as_secs(),
                grace_s: st.grace.as_secs(),
            },
        }
    }
}

/// A portal's plan (offline) and, online, its read-only preflight.
async fn plan(engine: &Engine, pc: &PortalConfig, offline: bool) -> PortalCheck {
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
    let mut out = PortalCheck {
        portal: pc.name.clone(),
        url: pc.url.as_str().to_string(),
        schedule: schedule_report(engine, pc, row.as_ref()),
        sinks: pc
            .sinks
            .iter()
            .map(|s| SinkReport {
                name: s.clone(),
                describe: engine
                    .sinks
                    .get(s)
                    .map(|k| k.describe(&pc.name))
                    .unwrap_or_default(),
            })
            .collect(),
        ok: true,
        ..Default::default()
    };
    if !offline {
        preflight(engine, pc, &sink_sets, &mut out).await;
    }
    out
}

/// The schedule, with the planner's next three rotations as the daemon would plan them
/// from what the state knows (read only; nothing when offline or there is no state yet).
fn schedule_report(
    engine: &Engine,
    pc: &PortalConfig,
    row: Option<&crate::state::PortalRow>,
) -> Option<ScheduleReport> {
    let config: &Arc<Config> = &engine.config;
    let s = config.schedule_of(pc)?;
    let now = Utc::now();
    let fp = engine.entry_fingerprint(pc);
    let next = crate::schedule::plan::upcoming_rotations(
        &crate::rotation::policy_of(config, pc, &fp, engine.coordinator.follows_changes()),
        &crate::rotation::known_from(row, None, now),
        now,
        3,
    );
    Some(ScheduleReport {
        name: pc.schedule.clone(),
        cron: s.cron.expr().to_string(),
        timezone: s.cron.timezone().name().to_string(),
        jitter_s: crate::schedule::jitter_for(&pc.name, s.jitter).as_secs(),
        next: next.iter().map(|t| crate::schedule::fmt_utc(*t)).collect(),
        min_interval_s: s.min_interval.map(|d| d.as_secs()),
        rotate_when_unused_below: s.rotate_when_unused_below,
    })
}

/// Online: reads the portal (version, account, key, TFA methods, codes; drift against
/// what the state knows) and preflights every sink, read-only.
async fn preflight(
    engine: &Engine,
    pc: &PortalConfig,
    sink_sets: &std::collections::HashMap<String, String>,
    out: &mut PortalCheck,
) {
    let mut problems: Vec<String> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    // The account and the current set, when read: the sinks' preflight seals them to see
    // whether a message would fit (an SMTP server's SIZE).
    let mut probe = None;
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
                out.docspace_version = Some(v.doc_space);
            }
            // A failure every call shares (the key, the network, the URL) is said once.
            let wide = [
                account.as_ref().err(),
                key.as_ref().err(),
                methods.as_ref().err(),
                codes.as_ref().err(),
            ]
            .into_iter()
            .flatten()
            .find_map(|e| {
                super::placed(&engine.config, pc, &e.to_string(), &e.kind)
                    .map(|line| (e.kind_name(), line))
            });
            let shared = |e: &crate::docspace::ApiError| {
                wide.as_ref()
                    .is_some_and(|(kind, _)| *kind == e.kind_name())
            };
            if let Some((_, line)) = &wide {
                problems.push(line.clone());
            }
            let (account, key, methods, codes) = (
                account.map_err(|e| (shared(&e), e)),
                key.map_err(|e| (shared(&e), e)),
                methods.map_err(|e| (shared(&e), e)),
                codes.map_err(|e| (shared(&e), e)),
            );
            match &account {
                Ok(a) => {
                    out.account = Some(AccountReport {
                        display_name: a.display_name.clone(),
                        email: a.email.clone(),
                    })
                }
                Err((true, _)) => {}
                Err((false, e)) => problems.push(e.to_string()),
            }
            match key {
                Ok(k) => out.key = Some(key_report(k, &mut notes)),
                Err((true, _)) => {}
                Err((false, e)) => notes.push(format!("could not read the key's own details: {e}")),
            }
            match methods {
                Ok(m) => {
                    let app = m.iter().find(|m| m.id == "app");
                    out.tfa_app = Some(TfaAppReport {
                        enabled: app.map(|a| a.enabled),
                        available: app.map(|a| a.available),
                    });
                }
                Err((true, _)) => {}
                Err((false, e)) => {
                    notes.push(format!("could not read the portal's TFA settings: {e}"))
                }
            }
            match &codes {
                Ok(c) => drift_of(engine, pc, sink_sets, c, out, &mut problems),
                Err((true, _)) => {}
                Err((false, e)) => problems.push(e.to_string()),
            }
            if let (Ok(a), Ok(c)) = (account, codes) {
                probe = Some((a, c));
            }
        }
    }
    sinks_preflight(engine, pc, probe.as_ref(), &mut problems).await;
    out.ok = problems.is_empty();
    out.problems = Some(problems);
    out.notes = Some(notes);
}

/// Each sink's preflight; with the account and the current set when they were read, which
/// an email sink seals to see whether the server takes a message that size.
async fn sinks_preflight(
    engine: &Engine,
    pc: &PortalConfig,
    probe: Option<&(crate::docspace::Account, crate::secret::CodeSet)>,
    problems: &mut Vec<String>,
) {
    let delivery = probe.map(|(account, codes)| crate::sinks::Delivery {
        portal: &pc.name,
        url: &pc.url,
        account,
        at: Utc::now(),
        codes,
        rotated: true,
    });
    for s in &pc.sinks {
        if let Some(sink) = engine.sinks.get(s)
            && let Err(e) = sink.preflight(&pc.name, delivery.as_ref()).await
        {
            problems.push(e.to_string());
        }
    }
}

/// The codes read: their counts, and the sinks holding a set the portal no longer accepts.
fn drift_of(
    engine: &Engine,
    pc: &PortalConfig,
    sink_sets: &std::collections::HashMap<String, String>,
    c: &crate::secret::CodeSet,
    out: &mut PortalCheck,
    problems: &mut Vec<String>,
) {
    out.codes = Some(CodesReport {
        unused: c.unused(),
        total: c.total(),
    });
    // Every GET compares (SPEC §6): sinks holding a set the portal no longer accepts are
    // reported here; `deliver` or the daemon converges them.
    if let Some(store) = engine.reader() {
        let fp = store.fingerprinter().of_set(c);
        let drifted = crate::rotation::drift::drifted_sinks(pc, sink_sets, &fp);
        if !drifted.is_empty() {
            problems.push(format!(
                "drift: sinks {} hold a set the portal no longer accepts; `tfa-rotator deliver` or the daemon converges them",
                drifted.join(", ")
            ));
            out.drift = Some(drifted);
        }
    }
}

/// What `check` says of the portal's API key (its scopes noted when they may not rotate).
fn key_report(k: crate::docspace::ApiKeyInfo, notes: &mut Vec<String>) -> KeyReport {
    if !k.can_write() {
        notes.push(format!(
            "the key's scopes ({}) may not allow rotating (needs *:write)",
            k.permissions.join(", ")
        ));
    }
    KeyReport {
        name: k.name,
        permissions: k.permissions,
        // The portal's own text: in RFC 3339 UTC when it is a time (SPEC §2), else dropped
        // rather than passed on unchecked.
        expires_at: k.expires_at.as_deref().and_then(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .ok()
                .and_then(|t| crate::json::rfc3339(t.timestamp_millis()))
        }),
        active: k.is_active,
    }
}

fn print_text(config: &Config, report: &CheckReport) {
    if super::quiet() {
        // Only the problems, and the summary; blocks apart, none before the first.
        for (i, p) in report.portals.iter().filter(|p| !p.ok).enumerate() {
            if i > 0 {
                crate::out!("");
            }
            print_portal(p, report.offline);
        }
        crate::out!(
            "{}{}",
            if report.failed > 0 { "\n" } else { "" },
            summary_line(report)
        );
        return;
    }
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
    for p in &report.portals {
        crate::out!("");
        print_portal(p, report.offline);
    }
    crate::out!("\n{}", summary_line(report));
}

/// The last line: "check: 300 portals, 299 ok, 1 failed; 2 warnings" (offline: "checked
/// offline").
fn summary_line(report: &CheckReport) -> String {
    let n = report.portals.len();
    let mut line = format!(
        "check{}: {n} portal{}, {} ok, {} failed",
        if report.offline { " (offline)" } else { "" },
        if n == 1 { "" } else { "s" },
        n - report.failed,
        report.failed
    );
    if !report.warnings.is_empty() {
        line.push_str(&format!("; {} warning(s)", report.warnings.len()));
    }
    line
}

fn print_portal(p: &PortalCheck, offline: bool) {
    crate::out!("portal {} {}", p.portal, p.url);
    match &p.schedule {
        Some(s) => {
            crate::out!(
                "  schedule {}: {} ({}), jitter {}s",
                s.name.as_deref().unwrap_or_default(),
                s.cron,
                s.timezone,
                s.jitter_s
            );
            crate::out!("  next rotations: {}", s.next.join(", "));
        }
        None => crate::out!("  schedule: none (manual rotation only)"),
    }
    for s in &p.sinks {
        crate::out!("  sink {}: {}", s.name, s.describe);
    }
    if offline {
        return;
    }
    if let Some(a) = &p.account {
        crate::out!("  account: {} <{}>", a.display_name, a.email);
    }
    if let Some(c) = &p.codes {
        crate::out!("  codes: {}/{} unused", c.unused, c.total);
    }
    if let Some(t) = &p.tfa_app {
        let b = |v: Option<bool>| v.map_or("null".to_string(), |v| v.to_string());
        crate::out!(
            "  TFA app method: enabled {}, available {}",
            b(t.enabled),
            b(t.available)
        );
    }
    for n in p.notes.iter().flatten() {
        crate::out!("  note: {n}");
    }
    match &p.problems {
        Some(list) if !list.is_empty() => {
            for e in list {
                crate::out!("  {}: {e}", super::paint("FAILED", super::Tone::Bad));
            }
        }
        _ => crate::out!("  preflight: {}", super::paint("ok", super::Tone::Good)),
    }
}
