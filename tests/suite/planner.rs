//! The planner and the daemon's loop (SPEC §6): one answer for the daemon, `run --once`,
//! `check` and `status`; nothing forgotten on stop; limits per host; metrics from the state.

use std::time::Duration;

use serde_json::Value;
use tfa_rotator::simulator::{Fault, FaultAction, SimConfig};

use crate::support::*;

/// `[daemon]` settings prepended to the harness's config.
fn set_daemon(h: &Harness, lines: &str) {
    edit_config(h, |t| {
        t.replace("[daemon]\n", &format!("[daemon]\n{lines}\n"))
    });
}

fn weekly(h: &mut Harness) {
    h.schedule = Some("weekly".into());
}

const WEEKLY: &str = "[schedules.weekly]\ncron = \"0 3 * * Mon\"\nwatch_every = \"off\"\n";

fn state_db(h: &Harness) -> rusqlite::Connection {
    rusqlite::Connection::open(h.path("state/state.sqlite")).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_portal_rotated_by_hand_is_not_rotated_again_by_the_daemon() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    weekly(&mut h);
    h.write_config(WEEKLY, &["plain"]);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    // The portal is new to the daemon and its schedule rotates on change: but the manual
    // rotation was the rotation for this entry.
    let out = h.run(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 1, "{}", out.all());
    // status and check say the same: the next Monday's fire (today's, on a Monday before
    // 03:00 UTC).
    let next_monday = {
        let now = chrono::Utc::now();
        let mut d = now.date_naive();
        loop {
            let fire = d.and_hms_opt(3, 0, 0).unwrap().and_utc();
            if chrono::Datelike::weekday(&d) == chrono::Weekday::Mon && fire > now {
                break fire;
            }
            d = d.succ_opt().unwrap();
        }
    };
    let status: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(
        json_ms(&status["portals"][0]["next_due_at"]),
        Some(next_monday.timestamp_millis()),
        "{status}"
    );
    assert_eq!(status["portals"][0]["next_reason"], "fire", "{status}");
    let check: Value =
        serde_json::from_str(&h.run(&["check", "--offline", "--json"]).await.stdout).unwrap();
    let next: Vec<String> = check["portals"][0]["schedule"]["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..3)
        .map(|i| {
            (next_monday + chrono::Duration::days(7 * i))
                .format("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        })
        .collect();
    assert_eq!(next, want, "check's next three times, by value");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_once_counts_the_fires_since_the_last_run_whatever_catch_up_says() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("hourly".into());
    h.write_config(
        "[schedules.hourly]\ncron = \"0 * * * *\"\ncatch_up = false\nwatch_every = \"off\"\n",
        &["plain"],
    );
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    // The last run was two hours ago (a timer that did not fire meanwhile).
    let two_hours_ago = chrono::Utc::now().timestamp_millis() - 2 * 3600 * 1000;
    state_db(&h)
        .execute(
            "UPDATE portals SET last_fire_at = ?1, last_success_at = ?1",
            [two_hours_ago],
        )
        .unwrap();
    let out = h.run(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(
        h.sim.count("PUT"),
        2,
        "the missed fire counts: {}",
        out.all()
    );
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
    let out = h.run(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 2, "consumed: {}", out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn rotations_in_flight_stay_within_max_concurrent_and_max_per_host() {
    for (daemon, limit) in [
        ("max_concurrent = 4\nmax_per_host = 8", 4),
        ("max_concurrent = 64\nmax_per_host = 3", 3),
    ] {
        let mut h = Harness::with(SimConfig {
            latency_ms: 40,
            ..SimConfig::default()
        })
        .await;
        for i in 0..30 {
            h.add_portal(&format!("p{i:02}"));
        }
        h.write_config("", &["plain"]);
        set_daemon(&h, daemon);
        let out = h.run(&["rotate", "--all"]).await;
        assert_eq!(out.code, Some(0), "{}", out.all());
        let max = h.sim.max_in_flight("PUT");
        assert!(max <= limit, "{daemon}: {max} PUTs at once");
        assert!(max >= limit - 1, "{daemon}: concurrency used: {max}");
        assert_eq!(h.sim.count("PUT"), 30);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_start_forgets_nothing_and_a_restart_rotates_each_portal_once() {
    let mut h = Harness::with(SimConfig {
        latency_ms: 30,
        ..SimConfig::default()
    })
    .await;
    for i in 0..300 {
        h.add_portal(&format!("p{i:03}"));
    }
    h.schedule = Some("yearly".into());
    h.write_config(
        "[schedules.yearly]\ncron = \"@yearly\"\ncatch_up = false\nwatch_every = \"off\"\n",
        &["plain"],
    );
    set_daemon(&h, "max_per_host = 8\nstop_timeout = \"5s\"");
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(30), || h.sim.rotations() >= 40).await,
        "{}",
        d.log()
    );
    let requests_at_term = h.sim.log().len();
    let (code, took, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        took < Duration::from_secs(6),
        "stop within stop_timeout + 1 s: {took:?}"
    );
    let after = h.sim.log().len() - requests_at_term;
    // Only the (at most 8) rotations in flight may still send their PUT and verifying GET.
    assert!(after <= 16, "{after} requests after SIGTERM");
    let rotated = h.sim.rotations();
    assert!(rotated < 300, "stopped part-way: {rotated}");

    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(60), || h.sim.rotations() >= 300).await,
        "{}",
        d.log()
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    for (portal, key) in &h.keys {
        assert_eq!(h.sim.puts_applied(key), 1, "{portal} rotated exactly once");
        assert_eq!(
            h.plain_sink(&format!("codes/{portal}.txt")).unwrap(),
            h.accepted(portal),
            "{portal}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_pauses_the_host_and_leaves_the_portal_due() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("yearly".into());
    h.write_config(
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\n",
        &["plain"],
    );
    // The portal's limiter says: come back in 2 s. The rotation is refused (a 429 on the PUT
    // is the portal's own refusal): the host is paused, and the portal stays due.
    h.sim.inject(Fault::on_put(FaultAction::RateLimited(2)));
    let d = Daemon::start(&h, &[], &[]);
    assert!(d.wait_log("rate limiting").await, "{}", d.log());
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(h.sim.rotations(), 0);
    let status: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(status["portals"][0]["last_result"], "failed", "{status}");
    assert_eq!(
        status["portals"][0]["next_reason"], "new",
        "still due: {status}"
    );
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn metrics_come_from_the_state_at_start_and_count_pending_deliveries() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let port = crate::support::free_port();
    set_daemon(&h, &format!("metrics = \"127.0.0.1:{port}\""));
    // A delivery that keeps failing: one payload pending.
    let out = h
        .run_env(
            &["resend", "acme"],
            &[("FAILPOINTS", "file_sink::before_rename=return")],
        )
        .await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let d = Daemon::start(
        &h,
        &[],
        &[("FAILPOINTS", "file_sink::before_rename=return")],
    );
    assert!(d.wait_log("ready").await, "{}", d.log());
    let body = crate::support::metrics(port).await;
    assert!(body.contains("tfa_rotator_pending_deliveries 1"), "{body}");
    assert!(
        body.contains("tfa_rotator_last_success_timestamp_seconds{portal=\"acme\"}"),
        "restored from the state before any event: {body}"
    );
    assert!(
        body.contains("tfa_rotator_unused_codes{portal=\"acme\"} 5"),
        "{body}"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    d.term().await;
}
