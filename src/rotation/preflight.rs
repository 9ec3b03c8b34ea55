//! Step 1, the preflight (SPEC §4): read the codes and the account, compare them with
//! what the state knows (drift, the pinned account, min_interval), and preflight every
//! sink. No side effects on the portal or the sinks. A dry run stops here.

use super::*;

/// What the state knows of a portal that the preflight checks against: the pinned account,
/// and the set each sink holds (the baseline of drift).
#[derive(Default)]
pub(super) struct Known {
    pub(super) row: Option<state::PortalRow>,
    pub(super) sink_sets: std::collections::HashMap<String, String>,
}

pub(super) async fn known(store: &Store, name: &str) -> Result<Known, StateError> {
    let p = name.to_string();
    store
        .call(move |c| {
            Ok(Known {
                row: state::portal_row(c, &p)?,
                sink_sets: state::sink_sets(c, &p)?,
            })
        })
        .await
}

pub(super) struct Preflight {
    pub(super) portal: Portal,
    pub(super) account: Account,
    pub(super) before_fp: Option<String>,
    pub(super) unused: usize,
    pub(super) total: usize,
    /// The set read, kept only when asked (a resend delivers it); a rotation drops the old
    /// set's plain text at once.
    pub(super) codes: Option<CodeSet>,
    /// The sinks that hold a set the portal no longer accepts (drift), as the state says.
    pub(super) drifted: Vec<String>,
}

/// Step 1: reads the codes and the account, compares them with what the state knows
/// (drift, the pinned account), and preflights every sink. No side effects on the portal
/// or the sinks; drift found is recorded.
pub(super) async fn preflight(
    engine: &Engine,
    pc: &PortalConfig,
    keep_codes: bool,
    known: &Known,
    force: bool,
) -> Result<Preflight, RotationError> {
    let portal = engine.portal(pc)?;
    // A rotation also reads the key itself, to refuse one without write permission before
    // its intent (a refused PUT costs nothing, but a clear reason beats a 403).
    let will_put = !keep_codes && !engine.dry_run;
    let key = async {
        if will_put {
            Some(portal.key_info().await)
        } else {
            None
        }
    };
    let (codes, account, key) = tokio::join!(portal.codes(), portal.account(), key);
    let codes = codes?;
    let account = account?;
    match key {
        Some(Ok(k)) if !k.can_write() => {
            return Err(RotationError::Other {
                portal: pc.name.clone(),
                message: format!(
                    "the API key cannot rotate: its scopes are [{}], and rotating needs `*` or `*:write`",
                    k.permissions.join(", ")
                ),
            });
        }
        // Where the portal has no `keys/@self` (older versions, or auth other than a key),
        // the PUT's own answer tells.
        Some(Err(e)) if !matches!(e.kind, crate::docspace::ApiErrorKind::NotFound) => {
            return Err(e.into());
        }
        _ => {}
    }
    let before_fp = engine.reader().map(|s| s.fingerprinter().of_set(&codes));
    if let Some(row) = &known.row {
        check_account(engine, pc, row, &account, force).await?;
    }
    let drifted = before_fp
        .as_ref()
        .map(|fp| drift::drifted_sinks(pc, &known.sink_sets, fp))
        .unwrap_or_default();
    if !drifted.is_empty() {
        drift::record(engine, pc, &drifted, "a preflight", false).await;
    }
    let (unused, total) = (codes.unused(), codes.total());
    // The current set, sealed by each sink as the new one will be: a message over the SMTP
    // server's SIZE is refused now, before the PUT, not after it.
    let probe = crate::sinks::Delivery {
        portal: &pc.name,
        url: &pc.url,
        account: &account,
        at: chrono::Utc::now(),
        codes: &codes,
        rotated: true,
    };
    for sink_name in &pc.sinks {
        let sink = sink_of(engine, &pc.name, sink_name)?;
        sink.preflight(&pc.name, Some(&probe))
            .await
            .map_err(|source| RotationError::Sink {
                portal: pc.name.clone(),
                source,
            })?;
    }
    let codes = keep_codes.then_some(codes);
    Ok(Preflight {
        portal,
        account,
        before_fp,
        unused,
        total,
        codes,
        drifted,
    })
}

/// The account is pinned at the first rotation, under the entry it was made with: a key
/// that acts as another account under the same entry (swapped, or issued by someone else) is
/// refused and announced, until the entry changes or `--force`.
pub(super) async fn check_account(
    engine: &Engine,
    pc: &PortalConfig,
    row: &state::PortalRow,
    account: &Account,
    force: bool,
) -> Result<(), RotationError> {
    let Some(pinned) = row.account_id.as_deref() else {
        return Ok(());
    };
    if pinned == account.id {
        return Ok(());
    }
    let entry_fp = engine.entry_fingerprint(pc);
    if force || row.account_entry_fp.as_deref() != Some(entry_fp.as_str()) {
        tracing::warn!(portal = %pc.name, pinned, now = %account.id, forced = force, "the key acts as another account; accepted because the entry changed or --force was given");
        return Ok(());
    }
    let e = RotationError::AccountChanged {
        portal: pc.name.clone(),
        pinned: pinned.to_string(),
        now: account.id.clone(),
    };
    tracing::error!(portal = %pc.name, error = %e, "refused");
    if let Ok(store) = engine.store() {
        let (p, body) = (
            pc.name.clone(),
            format!(
                "The API key of portal {} ({}) now acts as account {} ({}), not as account {pinned}\n\
                 that its codes were rotated for until now. Its codes were not rotated, and are not\n\
                 until this is resolved: a key of another account would hand that account's codes\n\
                 to this portal's sinks.\n\n\
                 What to do: if the key was swapped by mistake, put the right one back. If the portal\n\
                 really belongs to another account now, change its entry (or run\n  \
                 tfa-rotator rotate {} --force\n\
                 once) to pin the new account.\n\n-- \ntfa-rotator\n",
                pc.name, pc.url, account.id, account.email, pc.name
            ),
        );
        let since = row.last_success_at.unwrap_or(0);
        let subject = format!(
            "[tfa-rotator] {}: the API key acts as another account",
            pc.name
        );
        let _ = store
            .write(move |c| state::add_notice(c, &p, "account", &subject, &body, since))
            .await;
    }
    Err(e)
}

pub(super) fn sink_of<'e>(
    engine: &'e Engine,
    portal: &str,
    sink: &str,
) -> Result<&'e Arc<crate::sinks::Sink>, RotationError> {
    engine.sinks.get(sink).ok_or_else(|| RotationError::Other {
        portal: portal.to_string(),
        message: format!("sink {sink} is not configured"),
    })
}

/// The report of a rotation `min_interval` holds back (unless `force`), or `None`.
pub(super) fn held_by_min_interval(
    engine: &Engine,
    pc: &PortalConfig,
    known: &Known,
    force: bool,
) -> Option<Report> {
    if force {
        return None;
    }
    let min = engine.config.schedule_of(pc).and_then(|s| s.min_interval);
    let last = known
        .row
        .as_ref()
        .and_then(|r| r.last_success_at)
        .and_then(chrono::DateTime::from_timestamp_millis);
    let wait = crate::schedule::within_min_interval(last, min, Utc::now())?;
    let msg = format!(
        "skipped: rotated recently; min_interval allows the next rotation in {}s (use --force to override)",
        wait.as_secs()
    );
    Some(Report::new(
        &pc.name,
        Outcome::Skipped(Skip::MinInterval),
        msg,
    ))
}

/// A dry run of [`rotate`]: what the state says (read-only: min_interval, the pinned
/// account, drift) and every read-only step, nothing written.
pub(super) async fn dry_rotate(
    engine: &Engine,
    pc: &PortalConfig,
    force: bool,
) -> Result<Report, RotationError> {
    let name = pc.name.as_str();
    let known = match engine.reader() {
        Some(store) => known(store, name).await?,
        None => Known::default(),
    };
    if let Some(r) = held_by_min_interval(engine, pc, &known, force) {
        return Ok(Report {
            message: r.message.replacen("skipped:", "dry run: would skip:", 1),
            ..r
        });
    }
    let pf = preflight(engine, pc, false, &known, force).await?;
    let drift = if pf.drifted.is_empty() {
        String::new()
    } else {
        format!(
            "; DRIFT: sinks {} hold a set the portal no longer accepts (`deliver` or the daemon converges them)",
            pf.drifted.join(", ")
        )
    };
    let mut r = Report::new(
        name,
        if drift.is_empty() {
            Outcome::WouldRotate
        } else {
            Outcome::Failed
        },
        format!(
            "preflight passed: {} of {} codes unused; would rotate and deliver to {}{drift}",
            pf.unused,
            pf.total,
            pc.sinks.join(", ")
        ),
    );
    if !drift.is_empty() {
        r.error_kind = Some("drift".into());
    }
    (r.unused, r.total) = (Some(pf.unused), Some(pf.total));
    tracing::info!(portal = name, unused = pf.unused, total = pf.total, sinks = %pc.sinks.join(","), "dry run: would rotate");
    Ok(r)
}
