//! `rotate`, `deliver` and `resend`.

use std::io::IsTerminal;
use std::path::Path;

use futures::StreamExt;

use super::{Exit, engine, exit_of, load_config, print_reports};
use crate::rotation::{self, Report};

/// `rotate [PORTAL…] [--all] [--dry-run] [--force]`.
pub async fn rotate(
    path: &Path,
    portals: Vec<String>,
    all: bool,
    dry_run: bool,
    force: bool,
    json: bool,
) -> Exit {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let names: Vec<String> = if all {
        config.portals.keys().cloned().collect()
    } else if portals.is_empty() {
        crate::err!("error: name the portals to rotate, or use --all");
        return Exit::Usage;
    } else {
        portals
    };
    if let Some(unknown) = names.iter().find(|n| !config.portals.contains_key(*n)) {
        let known: Vec<&str> = config.portals.keys().map(String::as_str).collect();
        crate::err!(
            "error: no portal named `{unknown}` in {}; configured: {}",
            path.display(),
            known.join(", ")
        );
        return Exit::Usage;
    }
    let engine = match engine(config.clone(), dry_run) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let mut reports = Vec::new();
    if !dry_run {
        begin(&engine).await;
        // Finish what an earlier process left before starting anything new.
        reports.extend(rotation::recover_all(&engine).await);
    }
    let bar = (names.len() > 1 && std::io::stderr().is_terminal() && !json).then(|| {
        let b = indicatif::ProgressBar::new(names.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:40}] {pos}/{len} portals {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    // Each rotation is its own task, so that they spread over the runtime's workers; each
    // waits for its slot (its portal host's, then a global one: `max_per_host`,
    // `max_concurrent`), so a slow or rate-limited host never holds up the others.
    let engine = std::sync::Arc::new(engine);
    let mut stream: futures::stream::FuturesUnordered<_> = names
        .iter()
        .cloned()
        .map(|n| {
            let (engine, name) = (engine.clone(), n.clone());
            let task = tokio::spawn(async move {
                let _slot = engine.slot(&n).await;
                rotation::rotate(&engine, &n, force).await
            });
            async move {
                task.await
                    .unwrap_or_else(|e| Report::lost(&name, &e.to_string()))
            }
        })
        .collect();
    let mut done: Vec<Report> = Vec::with_capacity(names.len());
    while let Some(r) = stream.next().await {
        if let Some(b) = &bar {
            b.inc(1);
            if r.is_failure() {
                b.set_message(format!(
                    "({} failed)",
                    done.iter().filter(|r| r.is_failure()).count() + 1
                ));
            }
        }
        done.push(r);
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    done.sort_by(|a, b| a.portal.cmp(&b.portal));
    reports.extend(done);
    rotation::alerts::check(&engine).await;
    if !dry_run {
        send_events(&engine).await;
    }
    print_reports(&engine.config, &reports, json);
    exit_of(&reports)
}

/// The config, loaded and validated, and an engine on it (not a dry run).
fn config_and_engine(path: &Path) -> Result<crate::rotation::Engine, Exit> {
    load_config(path).and_then(|c| engine(c, false))
}

/// `deliver`: settles open intents and retries every pending delivery now.
pub async fn deliver(path: &Path, json: bool) -> Exit {
    let engine = match config_and_engine(path) {
        Ok(e) => e,
        Err(e) => return e,
    };
    begin(&engine).await;
    let mut reports = rotation::recover_all(&engine).await;
    // Every portal just worked on, and every one whose intent was closed lately, is read
    // once more: a PUT applied after all is drift, converged here (SPEC §6).
    let worked: Vec<String> = reports.iter().map(|r| r.portal.clone()).collect();
    reports.extend(rotation::drift::converge_recent(&engine, &worked).await);
    rotation::alerts::check(&engine).await;
    let events = send_events(&engine).await;
    if reports.is_empty() && events.pending == 0 && !json {
        crate::out!("nothing pending");
    }
    print_reports(&engine.config, &reports, json);
    match exit_of(&reports) {
        // An event a webhook did not take is a delivery left pending (SPEC §2).
        Exit::Ok if events.pending > 0 => Exit::Failed,
        e => e,
    }
}

/// `resend PORTAL…`.
pub async fn resend(path: &Path, portals: Vec<String>, json: bool) -> Exit {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if let Some(unknown) = portals.iter().find(|n| !config.portals.contains_key(*n)) {
        crate::err!("error: no portal named `{unknown}` in {}", path.display());
        return Exit::Usage;
    }
    let engine = match engine(config, false) {
        Ok(e) => e,
        Err(e) => return e,
    };
    begin(&engine).await;
    let mut reports: Vec<Report> = rotation::recover_all(&engine).await;
    for p in &portals {
        reports.push(rotation::resend(&engine, p).await);
    }
    send_events(&engine).await;
    print_reports(&engine.config, &reports, json);
    exit_of(&reports)
}

/// `settle PORTAL [--abandon]`: asks the portal now about an open intent, or closes it by
/// hand (recorded with who and why).
pub async fn settle(
    path: &Path,
    portal: String,
    abandon: bool,
    reason: Option<String>,
    json: bool,
) -> Exit {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    if !abandon && !config.portals.contains_key(&portal) {
        crate::err!(
            "error: no portal named `{portal}` in {}; to drop the state of a removed portal, use `tfa-rotator forget {portal}`",
            path.display()
        );
        return Exit::Usage;
    }
    let engine = match engine(config, false) {
        Ok(e) => e,
        Err(e) => return e,
    };
    begin(&engine).await;
    let result = if abandon {
        let why = reason.unwrap_or_else(|| "no reason given".into());
        rotation::abandon(&engine, &portal, &why).await
    } else {
        rotation::recover(&engine, &portal).await
    };
    send_events(&engine).await;
    let report = result.unwrap_or_else(|e| {
        tracing::error!(portal = %portal, error = %e, "settling failed");
        Report::failed(&portal, &e)
    });
    let reports = vec![report];
    print_reports(&engine.config, &reports, json);
    exit_of(&reports)
}

/// `forget PORTAL`: drops, on purpose, the open intents and pending payloads that the
/// config no longer covers (a removed portal, or sinks it no longer lists).
pub async fn forget(path: &Path, portal: String, json: bool) -> Exit {
    let engine = match config_and_engine(path) {
        Ok(e) => e,
        Err(e) => return e,
    };
    begin(&engine).await;
    let report = rotation::forget(&engine, &portal)
        .await
        .unwrap_or_else(|e| Report::failed(&portal, &e));
    send_events(&engine).await;
    let reports = vec![report];
    print_reports(&engine.config, &reports, json);
    exit_of(&reports)
}

/// A command that writes: the webhook cursors follow its config before it acts, so that a
/// webhook just added is sent what this command does.
async fn begin(engine: &rotation::Engine) {
    if let Err(e) = rotation::webhooks::sync(engine).await {
        tracing::error!(error = %e, "could not bring the webhook cursors in line with the config");
    }
}

/// A command's last step: the events it raised go to the webhooks now. One a webhook does
/// not take waits for the daemon or `deliver` (it never fails the command's rotations).
async fn send_events(engine: &rotation::Engine) -> rotation::webhooks::Sent {
    let sent = rotation::webhooks::deliver(engine, None).await;
    if sent.pending > 0 {
        crate::err!(
            "warning: {} webhook(s) did not take their events; they stay pending, sent by the daemon or `tfa-rotator deliver`",
            sent.pending
        );
    }
    sent
}
