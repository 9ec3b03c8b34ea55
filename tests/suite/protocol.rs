//! The rotation protocol under faults, end to end: the binary as a subprocess, the portal
//! simulated in this process.

use std::time::Duration;

use serde_json::Value;
use tfa_rotator::simulator::{Fault, FaultAction, SimConfig};

use crate::support::*;

async fn one_portal() -> Harness {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn rotate_delivers_the_set_the_portal_accepts_and_old_codes_die() {
    let h = one_portal().await;
    let old = h.accepted("acme");
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let delivered = h.plain_sink("codes/acme.txt").expect("sink file written");
    assert_eq!(delivered, h.accepted("acme"));
    assert_eq!(delivered.len(), 5);
    assert!(old.iter().all(|c| !delivered.contains(c)));
    assert!(
        !h.sim.login(&Harness::email("acme"), &old[0]),
        "an old code no longer works"
    );
    assert!(
        h.sim.login(&Harness::email("acme"), &delivered[0]),
        "a delivered code works"
    );
    assert_eq!(h.sim.rotations(), 1);
    assert!(out.stdout.contains("acme: rotated"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn any_count_and_length_reach_plain_and_encrypted_sinks() {
    let mut h = Harness::with(SimConfig {
        codes: 7,
        code_length: 8,
        ..SimConfig::default()
    })
    .await;
    h.add_portal("acme");
    let id = age::x25519::Identity::generate();
    let extra = age_sink("vault", ".age", &id);
    h.write_config(&extra, &["plain", "vault"]);
    let out = h.run(&["rotate", "--all"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let accepted = h.accepted("acme");
    assert_eq!(accepted.len(), 7);
    assert!(accepted.iter().all(|c| c.len() == 8));
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), accepted);
    let sealed = std::fs::read(h.path("codes/acme.age")).unwrap();
    assert_eq!(
        codes_in(&crate::suite::file_sink::age_decrypt(&sealed, &id)),
        accepted
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn lost_put_answer_is_resolved_by_get() {
    for fault in [
        FaultAction::ResetAfterApply,
        FaultAction::BadGatewayAfterApply,
        FaultAction::MalformedAfterApply,
    ] {
        let h = one_portal().await;
        h.sim.inject(Fault::on_put(fault.clone()));
        let out = h.run(&["rotate", "acme"]).await;
        assert_eq!(out.code, Some(0), "{fault:?}: {}", out.all());
        assert_eq!(h.sim.count("PUT"), 1, "the PUT is never retried");
        assert_eq!(
            h.plain_sink("codes/acme.txt").unwrap(),
            h.accepted("acme"),
            "{fault:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn put_timing_out_after_the_change_is_resolved_by_get() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let path = h.write_config("", &["plain"]);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("http_timeout = \"3s\"", "http_timeout = \"1s\"");
    write_private(&path, &text);
    h.sim.inject(Fault::on_put(FaultAction::HangAfterApply));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 1);
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_put_rotates_nothing_and_is_recorded() {
    let h = one_portal().await;
    let before = h.accepted("acme");
    // The portal's own 4xx (its JSON error envelope): refused, nothing changed.
    h.sim.inject(Fault::on_put(FaultAction::Status(403)));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().contains("HTTP 403"), "{}", out.all());
    assert_eq!(h.accepted("acme"), before);
    assert!(
        h.plain_sink("codes/acme.txt").is_none(),
        "nothing to deliver"
    );
    let status = h.run(&["status", "--json"]).await;
    let doc: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(doc["portals"][0]["last_result"], "failed");
    assert_eq!(doc["portals"][0]["failures_in_a_row"], 1);
    // The next run succeeds and clears the streak.
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
    let doc: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(doc["portals"][0]["last_result"], "ok");
    assert_eq!(doc["portals"][0]["failures_in_a_row"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_error_leaves_the_outcome_open_until_the_window_closes() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("conv".into());
    h.write_config(&quiet_schedule("conv", "2s", "off"), &["plain"]);
    let before = h.accepted("acme");
    // A 5xx says nothing of whether the PUT was applied: its outcome is unknown.
    h.sim.inject(Fault::on_put(FaultAction::Status(500)));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stdout.contains("being settled"), "{}", out.stdout);
    assert_eq!(h.accepted("acme"), before);
    let doc: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(doc["portals"][0]["last_result"], "settling");
    assert_eq!(doc["portals"][0]["failures_in_a_row"], 0, "not a failure");
    // While it is open, the portal is not rotated again.
    let out = h.run(&["rotate", "acme", "--force"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert_eq!(
        h.sim.count("PUT"),
        1,
        "no second PUT while the outcome is open"
    );
    // After the window, a GET that still shows the old set closes it as not applied.
    assert!(
        wait_for_exit(&h, &["deliver"], 0, Duration::from_secs(15)).await,
        "deliver settles it once the window has closed"
    );
    assert!(
        h.plain_sink("codes/acme.txt").is_none(),
        "nothing was issued"
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_then_success() {
    let h = one_portal().await;
    h.sim
        .inject(Fault::on_get_codes(FaultAction::RateLimited(1)));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(h.sim.log().iter().any(|r| r.status == 429));
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
    // A 429 on the PUT itself: nothing changed, reported, not retried.
    h.sim.inject(Fault::on_put(FaultAction::RateLimited(120)));
    let before = h.accepted("acme");
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.all().contains("rate limited"), "{}", out.all());
    assert_eq!(h.accepted("acme"), before);
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_failure_sends_no_put() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    // The key file names a key the portal does not know.
    h.write_config("", &["plain"]);
    write_private(
        &h.path("keys/acme"),
        &format!("{}\n", tfa_rotator::simulator::new_api_key()),
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.all().contains("unauthorized"), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn min_interval_skips_unless_forced() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let path = h.write_config(
        "[schedules.daily]\ncron = \"@daily\"\nmin_interval = \"1h\"\n",
        &["plain"],
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "sinks = [\"plain\"]",
        "schedule = \"daily\"\nsinks = [\"plain\"]",
    );
    write_private(&path, &text);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0));
    assert!(out.stdout.contains("skipped"), "{}", out.stdout);
    assert_eq!(h.sim.count("PUT"), 1);
    let out = h.run(&["rotate", "acme", "--force"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 2);
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_exit_2() {
    let h = one_portal().await;
    assert_eq!(h.run(&["rotate"]).await.code, Some(2));
    let out = h.run(&["rotate", "nope"]).await;
    assert_eq!(out.code, Some(2));
    assert!(
        out.stderr.contains("nope") && out.stderr.contains("acme"),
        "{}",
        out.stderr
    );
    assert_eq!(h.run(&["frobnicate"]).await.code, Some(2));
    assert_eq!(h.sim.count("PUT"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_never_rotate_one_portal_at_once() {
    let h = one_portal().await;
    // Slow PUTs widen the window in which the two would overlap.
    h.sim
        .inject(Fault::on_put(FaultAction::DelayMs(400)).times(2));
    let a = h.spawn(&["rotate", "acme", "--force"], &[]);
    let b = h.spawn(&["rotate", "acme", "--force"], &[]);
    let (a, b) = tokio::join!(a.wait_with_output(), b.wait_with_output());
    for o in [a.unwrap(), b.unwrap()] {
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Both rotated, one after the other: the intents never overlapped, and the sink holds the last set.
    assert_eq!(h.sim.count("PUT"), 2);
    let log = h.sim.log();
    let puts: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, r)| r.method == "PUT")
        .map(|(i, _)| i)
        .collect();
    let gets_between = log[puts[0]..puts[1]]
        .iter()
        .filter(|r| r.path.ends_with("tfaappcodes"))
        .count();
    assert!(
        gets_between >= 1,
        "the second preflight ran after the first PUT finished"
    );
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn resend_delivers_the_current_set_without_rotating() {
    let h = one_portal().await;
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    std::fs::remove_file(h.path("codes/acme.txt")).unwrap();
    let used = h.accepted("acme")[0].clone();
    assert!(h.sim.login(&Harness::email("acme"), &used));
    let out = h.run(&["resend", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 1);
    let resent = h.plain_sink("codes/acme.txt").unwrap();
    assert_eq!(resent, h.accepted("acme"));
    assert_eq!(resent.len(), 4, "the used code is not listed");
}

#[tokio::test(flavor = "multi_thread")]
async fn many_portals_rotate_concurrently_within_the_limit() {
    let mut h = Harness::new().await;
    for i in 0..40 {
        h.add_portal(&format!("p{i:02}"));
    }
    h.write_config("", &["plain"]);
    let path = h.config();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("[daemon]\n", "[daemon]\nmax_concurrent = 4\n");
    write_private(&path, &text);
    // Every PUT takes 100 ms: 40 sequential rotations would take 4 s.
    h.sim.inject(Fault {
        method: Some("PUT".into()),
        path_suffix: None,
        action: FaultAction::DelayMs(100),
        times: 40,
    });
    let started = std::time::Instant::now();
    let out = h.run(&["rotate", "--all", "--json"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "{}", out.all());
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(doc["portals"].as_array().unwrap().len(), 40);
    for i in 0..40 {
        let p = format!("p{i:02}");
        assert_eq!(
            h.plain_sink(&format!("codes/{p}.txt")).unwrap(),
            h.accepted(&p),
            "{p}"
        );
    }
    assert!(
        took < Duration::from_millis(3500),
        "concurrent: took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_last_rotation_unused_codes_and_next_time() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let path = h.write_config(
        "[schedules.weekly]\ncron = \"0 3 * * Mon\"\ntimezone = \"Europe/Berlin\"\n",
        &["plain"],
    );
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "sinks = [\"plain\"]",
        "schedule = \"weekly\"\nsinks = [\"plain\"]",
    );
    write_private(&path, &text);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let out = h.run(&["status", "--json"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let doc: Value = serde_json::from_str(&out.stdout).unwrap();
    let p = &doc["portals"][0];
    assert_eq!(p["portal"], "acme");
    assert_eq!(p["last_result"], "ok");
    assert_eq!(p["unused"], 5);
    assert!(json_ms(&p["next_due_at"]).unwrap() > chrono::Utc::now().timestamp_millis());
    assert!(p["pending_deliveries"].as_array().unwrap().is_empty());
    let text = h.run(&["status"]).await.stdout;
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    for col in [
        "PORTAL",
        "LAST SUCCESS",
        "LAST ATTEMPT",
        "NEXT",
        "CODES",
        "STATE",
    ] {
        assert!(header.contains(col), "{text}");
    }
    let row = lines.next().unwrap();
    let success = json_ms(&p["last_success_at"]).unwrap();
    let at = chrono::DateTime::from_timestamp_millis(success)
        .unwrap()
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    assert!(row.starts_with("acme") && row.contains("5/5"), "{text}");
    assert!(row.contains(&format!("{at}  {at} ok")), "{text}");
    assert!(row.contains(" in "), "a relative time: {text}");
    assert!(
        row.contains("(watch read (unused codes, drift))"),
        "the reason as the README says it: {text}"
    );
    // The schedule's own time zone beside UTC.
    let next = chrono::DateTime::from_timestamp_millis(json_ms(&p["next_due_at"]).unwrap())
        .unwrap()
        .with_timezone(&chrono_tz::Europe::Berlin)
        .format("%H:%M")
        .to_string();
    assert!(
        row.contains(&format!("({next} Europe/Berlin) in ")),
        "{text}"
    );

    // A failure after the success: the success keeps its time, the attempt shows its own
    // result (not "<time of the success> (failed)").
    let bogus = tfa_rotator::simulator::new_api_key();
    write_private(&h.path("keys/acme"), &format!("{bogus}\n"));
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(1));
    let text = h.run(&["status"]).await.stdout;
    let row = text.lines().nth(1).unwrap();
    assert!(row.contains(&format!("acme    {at}")), "{text}");
    assert!(
        row.contains(" failed ") && row.contains("FAILING"),
        "{text}"
    );
    assert!(text.contains("acme: last error (1 in a row)"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_key_is_refused_before_any_put() {
    let mut h = Harness::new().await;
    let mut u = tfa_rotator::simulator::UserSpec::new("acme@rotator.test");
    u.scopes = vec!["*:read".into()];
    let key = h.sim.add_user(u);
    std::fs::create_dir_all(h.path("keys")).unwrap();
    write_private(&h.path("keys/acme"), &format!("{key}\n"));
    h.keys.insert("acme".into(), key);
    h.write_config("", &["plain"]);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().contains("cannot rotate"), "{}", out.all());
    assert!(out.all().contains("*:write"), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 0, "refused before any PUT");
    // A dry run needs only the read scope.
    let out = h.run(&["rotate", "acme", "--dry-run"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
}

/// SPEC §6: a 429's `Retry-After` (clamped to an hour) is kept with the portal: `status`
/// shows it, and a later process sends nothing before it ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_429_pause_is_kept_across_processes() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    h.sim
        .inject(Fault::on_get_codes(FaultAction::RateLimited(7200)));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let status: serde_json::Value =
        serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    let p = &status["portals"][0];
    let until = json_ms(&p["paused_until"]).expect("the pause is shown");
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        (now + 3_500_000..=now + 3_600_000).contains(&until),
        "clamped to an hour: {p}"
    );
    assert!(json_ms(&p["next_due_at"]).unwrap() >= until, "{p}");
    assert_eq!(
        p["next_held_by"], "paused by the portal (429 Retry-After)",
        "{p}"
    );
    let text = h.run(&["status"]).await.stdout;
    assert!(text.contains("PAUSED by the portal (429"), "{text}");
    // A new process: nothing is sent to the portal.
    let before = h.sim.log().len();
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stdout.contains("not contacted"), "{}", out.all());
    assert_eq!(h.sim.log().len(), before, "no request during the pause");
    assert_eq!(h.sim.rotations(), 0);
}

/// `status PORTAL…` and `--failing` (SPEC §2): a portal whose last attempt failed is listed
/// (exit 1), the others not; names come in the order people count; every listing ends with
/// its summary line; an unknown name is a usage error.
#[tokio::test(flavor = "multi_thread")]
async fn status_filters_by_name_and_failing_and_ends_with_a_summary() {
    let mut h = Harness::new().await;
    for p in ["p10", "p2", "p1"] {
        h.add_portal(p);
    }
    h.write_config("", &["plain"]);
    assert_eq!(h.run(&["rotate", "--all"]).await.code, Some(0));
    h.sim.inject(Fault::on_put(FaultAction::Status(403)));
    assert_eq!(h.run(&["rotate", "p2"]).await.code, Some(1));

    let all = h.run(&["status"]).await;
    let names: Vec<&str> = all
        .stdout
        .lines()
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with('p'))
        .collect();
    assert_eq!(names, ["p1", "p2", "p10"], "{}", all.stdout);
    assert_eq!(
        all.stdout.lines().last(),
        Some("3 portals: 2 ok, 1 failing"),
        "{}",
        all.stdout
    );

    // -q: only the problems and the summary.
    let quiet = h.run(&["-q", "status"]).await;
    assert!(
        quiet.stdout.contains("p2 ")
            && !quiet.stdout.contains("p10")
            && !quiet.stdout.contains("p1 "),
        "{}",
        quiet.stdout
    );
    assert_eq!(
        quiet.stdout.lines().last(),
        Some("3 portals: 2 ok, 1 failing")
    );
    let quiet = h.run(&["-q", "check"]).await;
    assert_eq!(
        quiet.stdout.trim(),
        "check: 3 portals, 3 ok, 0 failed",
        "{}",
        quiet.all()
    );

    let failing = h.run(&["status", "--failing"]).await;
    assert_eq!(failing.code, Some(1), "{}", failing.all());
    assert!(failing.stdout.contains("p2 "), "{}", failing.stdout);
    assert!(!failing.stdout.contains("p10"), "{}", failing.stdout);
    assert_eq!(
        failing.stdout.lines().last(),
        Some("1 portal: 0 ok, 1 failing")
    );

    // Every time in --json is RFC 3339 (SPEC §2).
    let doc: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert!(
        json_ms(&doc["portals"][1]["last_attempt_at"]).is_some(),
        "{doc}"
    );
    assert_rfc3339_times(&doc);
    let text = h.run(&["check"]).await.stdout;
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("check: 3 portals, 3 ok, 0 failed")),
        "{text}"
    );
    let order: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("portal "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(order, ["p1", "p2", "p10"], "{text}");
    let check: Value = serde_json::from_str(&h.run(&["check", "--json"]).await.stdout).unwrap();
    assert_eq!(check["portals"][2]["portal"], "p10", "{check}");
    assert_rfc3339_times(&check);

    let one = h.run(&["status", "p10", "--json"]).await;
    assert_eq!(one.code, Some(0), "{}", one.all());
    let doc: Value = serde_json::from_str(&one.stdout).unwrap();
    assert_eq!(doc["portals"].as_array().unwrap().len(), 1);
    assert_eq!(doc["portals"][0]["portal"], "p10");
    assert_eq!(doc["summary"]["portals"], 1);
    assert_eq!(doc["summary"]["ok"], 1);
    let none_failing = h.run(&["status", "p1", "p10", "--failing"]).await;
    assert_eq!(none_failing.code, Some(0), "{}", none_failing.all());
    assert_eq!(none_failing.stdout.trim(), "0 portals: 0 ok");

    let unknown = h.run(&["status", "nope"]).await;
    assert_eq!(unknown.code, Some(2), "{}", unknown.all());
    assert!(
        unknown.stderr.contains("no portal named `nope`"),
        "{}",
        unknown.stderr
    );
}

/// A key the portal refuses (401) is said once in `check`: one line naming the config's
/// file and the portal's table line, with a hint at the fix, not once per call.
#[tokio::test(flavor = "multi_thread")]
async fn check_says_a_refused_key_once_with_its_place_and_a_hint() {
    let h = one_portal().await;
    let bogus = tfa_rotator::simulator::new_api_key();
    write_private(&h.path("keys/acme"), &format!("{bogus}\n"));
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let text = std::fs::read_to_string(h.config()).unwrap();
    let line = text
        .lines()
        .position(|l| l.trim() == "[portals.acme]")
        .unwrap()
        + 1;
    let all = out.all();
    let mentions: Vec<&str> = all
        .lines()
        .filter(|l| l.contains("portal acme") || l.contains("portals.acme"))
        .collect();
    assert!(mentions.len() <= 2, "{all}");
    let failed: Vec<&str> = all.lines().filter(|l| l.contains("HTTP 401")).collect();
    assert_eq!(failed.len(), 1, "{all}");
    assert!(
        failed[0].contains(&format!("config.toml:{line}: portals.acme: "))
            && failed[0].contains("hint: check its api_key"),
        "{all}"
    );
    // -q: the failing portal's lines and the summary, nothing else on stdout.
    let quiet = h.run(&["-q", "check"]).await;
    assert_eq!(quiet.code, Some(1));
    assert!(!quiet.stdout.contains("config "), "{}", quiet.stdout);
    assert!(quiet.stdout.contains("FAILED: "), "{}", quiet.stdout);
    assert!(
        quiet.stdout.starts_with("portal acme "),
        "no blank line first: {}",
        quiet.stdout
    );
    assert_eq!(
        quiet.stdout.lines().last(),
        Some("check: 1 portal, 0 ok, 1 failed"),
        "{}",
        quiet.stdout
    );
    // `rotate` says it once too, on one line, the same way: stdout and stderr together.
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let all = out.all();
    let said = only_line(&all);
    assert!(
        said.contains(&format!("config.toml:{line}: portals.acme: GET "))
            && said.contains("HTTP 401")
            && said.contains("; hint: check its api_key"),
        "{all}"
    );
    assert_eq!(h.sim.rotations(), 0);
}

/// The one line of `all` that is not blank.
fn only_line(all: &str) -> &str {
    let lines: Vec<&str> = all.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{all}");
    lines[0]
}

/// A portal nobody answers for is said once by `rotate`: the place, the short cause (no
/// HTTP stack's wrappers) and a hint at `url`.
#[tokio::test(flavor = "multi_thread")]
async fn rotate_says_a_refused_connection_once_with_its_place_and_a_hint() {
    let h = one_portal().await;
    let port = crate::support::free_port();
    crate::support::edit_config(&h, |t| {
        let url = h.sim.url();
        t.replace(&url, &format!("http://127.0.0.1:{port}"))
    });
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let all = out.all();
    assert!(
        only_line(&all).ends_with(
            "connection failed: tcp connect error: Connection refused (os error 111); \
             hint: check its url (host, port, TLS) and the network"
        ),
        "{all}"
    );
    assert!(!all.contains("error sending request"), "{all}");
}
