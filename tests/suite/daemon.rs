//! The daemon as a subprocess against the in-process simulator: schedules, config changes,
//! invalid edits, the unused-code watch, catch-up, dry run, SIGTERM, sd_notify and metrics.

use std::time::Duration;

use tfa_rotator::simulator::{Fault, FaultAction};

use crate::support::*;

/// A yearly schedule for every portal and the metrics listener on a free port (returned).
fn yearly_with_metrics(h: &Harness) -> u16 {
    let port = crate::support::free_port();
    with_schedule(h, "[schedules.yearly]\ncron = \"@yearly\"\n", "yearly");
    edit_config(h, |t| {
        t.replace(
            "[daemon]\n",
            &format!("[daemon]\nmetrics = \"127.0.0.1:{port}\"\n"),
        )
    });
    port
}

fn with_schedule(h: &Harness, schedule: &str, portals_schedule: &str) {
    edit_config(h, |t| {
        format!(
            "{schedule}\n{}",
            t.replace(
                "sinks = [",
                &format!("schedule = \"{portals_schedule}\"\nsinks = [")
            )
        )
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_second_cron_rotates_repeatedly_and_sigterm_exits_0() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    with_schedule(&h, "[schedules.fast]\ncron = \"* * * * * *\"\n", "fast");
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() >= 3).await,
        "{}",
        d.log()
    );
    let (code, took, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    assert_eq!(
        h.plain_sink("codes/acme.txt").unwrap(),
        h.accepted("acme"),
        "{log}"
    );
    let out = h.run(&["deliver"]).await;
    assert!(out.stdout.contains("nothing pending"), "{}", out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_rotation_waits_for_a_safe_point_and_loses_nothing() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    with_schedule(&h, "[schedules.yearly]\ncron = \"@yearly\"\n", "yearly");
    h.sim
        .inject(Fault::on_put(FaultAction::DelayAfterApplyMs(800)));
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 1).await,
        "{}",
        d.log()
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    // The set was sealed before the exit; whatever was not delivered yet, deliver finishes.
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    assert_eq!(
        h.plain_sink("codes/acme.txt").unwrap(),
        h.accepted("acme"),
        "{log}"
    );
    // The rotation that finished during the stop was recorded: a restart is not a change.
    let d = Daemon::start(&h, &[], &[]);
    assert!(d.wait_log("ready").await);
    assert!(
        wait_quiet(&h, "acme", Duration::from_secs(3500)).await,
        "nothing planned within the hour: {:?} {}",
        planned(&h, "acme"),
        d.log()
    );
    assert_eq!(h.sim.rotations(), 1, "{}", d.log());
    d.term().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_one_portals_recipients_rotates_that_portal_only_and_invalid_edits_are_survived() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    let (a1, a2, b) = (
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
        age::x25519::Identity::generate(),
    );
    let extra = format!(
        "[schedules.yearly]\ncron = \"@yearly\"\n\n[sinks.va]\ntype = \"file\"\npath = \"codes/{{portal}}.age\"\nencrypt = {{ age = [\"{}\"] }}\n\n[sinks.vb]\ntype = \"file\"\npath = \"codes/{{portal}}.b.age\"\nencrypt = {{ age = [\"{}\"] }}\n",
        a1.to_public(),
        b.to_public()
    );
    h.write_config(&extra, &["plain"]);
    edit_config(&h, |t| {
        t.replace(
            &format!("[portals.acme]\nurl = \"{}\"\napi_key = {{ file = \"keys/acme\" }}\nsinks = [\"plain\"]", h.sim.url()),
            &format!("[portals.acme]\nurl = \"{}\"\napi_key = {{ file = \"keys/acme\" }}\nschedule = \"yearly\"\nsinks = [\"va\"]", h.sim.url()),
        )
        .replace(
            &format!("[portals.beta]\nurl = \"{}\"\napi_key = {{ file = \"keys/beta\" }}\nsinks = [\"plain\"]", h.sim.url()),
            &format!("[portals.beta]\nurl = \"{}\"\napi_key = {{ file = \"keys/beta\" }}\nschedule = \"yearly\"\nsinks = [\"vb\"]", h.sim.url()),
        )
    });
    let d = Daemon::start(&h, &[], &[]);
    // Both are new: both rotate once.
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 2).await,
        "{}",
        d.log()
    );
    assert!(d.wait_log("rotated: 5 new codes delivered to vb").await);
    let beta_codes = h.accepted("beta");

    // An invalid edit is reported and the old config stays in force.
    edit_config(&h, |t| {
        t.replace("cron = \"@yearly\"", "cron = \"every tuesday\"")
    });
    assert!(
        d.wait_log("the new configuration is invalid").await,
        "{}",
        d.log()
    );
    assert!(d.log().contains("schedules.yearly.cron"), "{}", d.log());

    // A valid edit of acme's recipients rotates acme, and only acme.
    edit_config(&h, |t| {
        t.replace("cron = \"every tuesday\"", "cron = \"@yearly\"")
            .replace(&a1.to_public().to_string(), &a2.to_public().to_string())
    });
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 3).await,
        "{}",
        d.log()
    );
    let decrypts_with_a2 = || {
        let Ok(sealed) = std::fs::read(h.path("codes/acme.age")) else {
            return false;
        };
        let Ok(d) = age::Decryptor::new(&sealed[..]) else {
            return false;
        };
        let Ok(mut r) = d.decrypt(std::iter::once(&a2 as &dyn age::Identity)) else {
            return false;
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut r, &mut text).is_ok()
            && codes_in(&text) == h.accepted("acme")
    };
    assert!(
        wait_for(Duration::from_secs(5), decrypts_with_a2).await,
        "the new recipient reads the new set"
    );
    assert_eq!(h.accepted("beta"), beta_codes, "beta did not rotate");

    // A new portal rotates.
    h.add_portal("gamma");
    edit_config(&h, |t| {
        format!(
            "{t}\n[portals.gamma]\nurl = \"{}\"\napi_key = {{ file = \"keys/gamma\" }}\nschedule = \"yearly\"\nsinks = [\"plain\"]\n",
            h.sim.url()
        )
    });
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 4).await,
        "{}",
        d.log()
    );
    assert!(
        wait_for(Duration::from_secs(5), || h
            .plain_sink("codes/gamma.txt")
            .is_some_and(|c| c == h.accepted("gamma")))
        .await
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");

    // A restart is not a change: every portal's next rotation is its schedule's fire.
    let d = Daemon::start(&h, &[], &[]);
    assert!(d.wait_log("ready").await);
    for p in h.keys.keys() {
        assert!(
            wait_quiet(&h, p, Duration::from_secs(3500)).await,
            "{p}: {:?}",
            planned(&h, p)
        );
    }
    assert_eq!(h.sim.rotations(), 4, "{}", d.log());
    d.term().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_unused_code_watch_rotates_after_a_code_is_used() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    with_schedule(
        &h,
        "[schedules.watch]\ncron = \"@yearly\"\nrotate_on_change = false\nrotate_when_unused_below = 5\nwatch_every = \"1s\"\n",
        "watch",
    );
    let d = Daemon::start(&h, &[], &[]);
    assert!(d.wait_log("ready").await);
    // The first watch read has been made and planned the next one: it did not rotate.
    assert!(
        wait_for(Duration::from_secs(10), || h.sim.count("GET") >= 1
            && planned(&h, "acme").1.as_deref() == Some("watch")
            && planned(&h, "acme")
                .0
                .is_some_and(|t| t > chrono::Utc::now().timestamp_millis()))
        .await,
        "{}",
        d.log()
    );
    assert_eq!(
        h.sim.rotations(),
        0,
        "all 5 unused: no rotation: {}",
        d.log()
    );
    let code = h.sim.codes(&h.keys["acme"])[0].0.clone();
    assert!(h.sim.login(&Harness::email("acme"), &code));
    assert!(
        wait_for(Duration::from_secs(10), || h.sim.rotations() == 1).await,
        "{}",
        d.log()
    );
    assert!(d.wait_log("too few unused codes").await);
    assert!(
        wait_for(Duration::from_secs(5), || h
            .plain_sink("codes/acme.txt")
            .is_some_and(|c| c == h.accepted("acme")))
        .await
    );
    d.term().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fire_missed_while_down_runs_once_at_start_only_with_catch_up() {
    for catch_up in [true, false] {
        let mut h = Harness::new().await;
        h.add_portal("acme");
        h.write_config("", &["plain"]);
        with_schedule(
            &h,
            &format!("[schedules.daily]\ncron = \"0 3 * * *\"\ncatch_up = {catch_up}\n"),
            "daily",
        );
        let d = Daemon::start(&h, &[], &[]);
        assert!(
            wait_for(Duration::from_secs(20), || h.sim.rotations() == 1).await,
            "the new portal rotates"
        );
        assert!(d.wait_log("rotated: 5").await);
        d.term().await;
        // The daemon was "down" for three days.
        let db = rusqlite::Connection::open(h.path("state/state.sqlite")).unwrap();
        let three_days_ago = chrono::Utc::now().timestamp_millis() - 3 * 86_400_000;
        db.execute("UPDATE portals SET last_fire_at = ?1", [three_days_ago])
            .unwrap();
        drop(db);
        let d = Daemon::start(&h, &[], &[]);
        assert!(d.wait_log("ready").await);
        if catch_up {
            assert!(
                wait_for(Duration::from_secs(10), || h.sim.rotations() == 2).await,
                "{}",
                d.log()
            );
        }
        // Next: tomorrow's (or today's) 03:00, not another missed fire.
        assert!(
            wait_quiet(&h, "acme", Duration::from_secs(60)).await,
            "{:?} {}",
            planned(&h, "acme"),
            d.log()
        );
        assert_eq!(
            h.sim.rotations(),
            if catch_up { 2 } else { 1 },
            "three missed fires run once with catch_up, never without: {}",
            d.log()
        );
        d.term().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_catch_up_the_schedule_goes_on_after_a_gap() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    with_schedule(
        &h,
        "[schedules.fast]\ncron = \"* * * * * *\"\ncatch_up = false\n",
        "fast",
    );
    let d = Daemon::start(&h, &[], &[]);
    assert!(wait_for(Duration::from_secs(20), || h.sim.rotations() >= 1).await);
    d.term().await;
    let db = rusqlite::Connection::open(h.path("state/state.sqlite")).unwrap();
    db.execute(
        "UPDATE portals SET last_fire_at = ?1",
        [chrono::Utc::now().timestamp_millis() - 86_400_000],
    )
    .unwrap();
    drop(db);
    let before = h.sim.rotations();
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(10), || h.sim.rotations() >= before + 2).await,
        "fires go on: {}",
        d.log()
    );
    d.term().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_daemon_sends_no_put_and_writes_nothing() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    with_schedule(&h, "[schedules.fast]\ncron = \"* * * * * *\"\n", "fast");
    let d = Daemon::start(&h, &["--dry-run"], &[]);
    assert!(
        wait_for(Duration::from_secs(10), || h.sim.count("GET") >= 6).await,
        "{}",
        d.log()
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0));
    assert!(log.contains("dry run: would rotate"), "{log}");
    assert_eq!(h.sim.count("PUT"), 0);
    assert!(!h.path("state").exists());
    assert!(h.plain_sink("codes/acme.txt").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn min_interval_holds_scheduled_rotations_back() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    with_schedule(
        &h,
        "[schedules.fast]\ncron = \"* * * * * *\"\nmin_interval = \"1h\"\n",
        "fast",
    );
    let d = Daemon::start(&h, &[], &[]);
    assert!(wait_for(Duration::from_secs(10), || h.sim.rotations() == 1).await);
    // The fires of the next hour are dropped: the next one planned is an hour away.
    assert!(
        wait_quiet(&h, "acme", Duration::from_secs(3500)).await,
        "{:?} {}",
        planned(&h, "acme"),
        d.log()
    );
    assert_eq!(h.sim.rotations(), 1, "{}", d.log());
    d.term().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_talks_sd_notify_and_serves_metrics() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    let port = yearly_with_metrics(&h);
    let sock_path = h.path("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let sock_str = sock_path.display().to_string();
    let d = Daemon::start(
        &h,
        &[],
        &[("NOTIFY_SOCKET", &sock_str), ("WATCHDOG_USEC", "200000")],
    );
    let mut got: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let mut recv_until = async |want: &str, got: &mut Vec<String>| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !got.iter().any(|m| m.contains(want)) {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .expect("notification in time")
                .unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    recv_until("READY=1", &mut got).await;
    recv_until("WATCHDOG=1", &mut got).await;
    assert!(wait_for(Duration::from_secs(10), || h.sim.rotations() == 1).await);
    assert!(d.wait_log("rotated").await);

    let body = crate::support::metrics(port).await;
    assert!(
        body.contains("tfa_rotator_rotations_total{portal=\"acme\",result=\"rotated\"} 1"),
        "{body}"
    );
    assert!(
        body.contains(
            "tfa_rotator_deliveries_total{portal=\"acme\",sink=\"plain\",result=\"delivered\"} 1"
        ),
        "{body}"
    );
    assert!(
        body.contains("tfa_rotator_unused_codes{portal=\"acme\"} 5"),
        "{body}"
    );
    assert!(
        body.contains("tfa_rotator_next_rotation_timestamp_seconds{portal=\"acme\"}"),
        "{body}"
    );
    assert!(
        body.contains("tfa_rotator_config_reload_success 1"),
        "{body}"
    );
    // From the first scrape: no timestamp at 0 (1970 to a dashboard), every portal's
    // counters present at 0.
    for line in body.lines().filter(|l| l.contains("_timestamp_seconds")) {
        assert!(!line.ends_with(" 0"), "{line}");
    }
    assert!(
        body.lines()
            .any(|l| l.starts_with("tfa_rotator_config_reload_timestamp_seconds ")),
        "{body}"
    );
    assert!(
        body.contains("tfa_rotator_drift_total{portal=\"acme\"} 0"),
        "{body}"
    );
    // The process collector, under Prometheus' standard names.
    let value = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}: {body}"))
    };
    assert!(value("process_resident_memory_bytes") > 1_000_000.0);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_cpu_seconds_total") >= 0.0);
    let started = value("process_start_time_seconds");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - 120.0..=now + 2.0).contains(&started),
        "{started} vs {now}"
    );
    assert!(
        body.contains(
            "tfa_rotator_put_answers_untrusted_total{portal=\"acme\",answer=\"differs\"} 0"
        ),
        "{body}"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    got.clear();
    let written = std::time::Instant::now();
    edit_config(&h, |t| format!("# edited\n{t}"));
    recv_until("RELOADING=1", &mut got).await;
    assert!(got.iter().any(|m| m.contains("MONOTONIC_USEC=")), "{got:?}");
    recv_until("READY=1", &mut got).await;
    let reload_ms = written.elapsed().as_millis();
    assert!(reload_ms < 2000, "reload took {reload_ms} ms");
    eprintln!("config write to new plan in force: {reload_ms} ms");

    let pid = d.child.id().unwrap().to_string();
    got.clear();
    crate::support::tool("kill", "procps")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    recv_until("RELOADING=1", &mut got).await;
    recv_until("READY=1", &mut got).await;

    got.clear();
    crate::support::tool("kill", "procps")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    recv_until("STOPPING=1", &mut got).await;
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        h.sim.rotations(),
        1,
        "a reload that changes nothing that matters rotates nothing"
    );
}

/// Context switches of the threads alive at both samples, over `window`.
async fn wakeups(pid: u32, window: Duration) -> u64 {
    let snap = || -> std::collections::HashMap<String, u64> {
        let mut out = std::collections::HashMap::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let n: u64 = status
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum();
            out.insert(t.file_name().to_string_lossy().into_owned(), n);
        }
        out
    };
    let a = snap();
    tokio::time::sleep(window).await;
    let b = snap();
    b.iter()
        .filter_map(|(t, n)| a.get(t).map(|m| n.saturating_sub(*m)))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_daemon_sleeps() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    with_schedule(
        &h,
        "[schedules.yearly]\ncron = \"0 3 1 1 *\"\nrotate_on_change = false\n",
        "yearly",
    );
    let d = Daemon::start(&h, &[], &[]);
    assert!(d.wait_log("ready").await);
    // Let start-up work settle, then count wakeups over two seconds of nothing to do.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = wakeups(d.child.id().unwrap(), Duration::from_secs(2)).await;
    assert!(n <= 5, "{n} context switches in 2 s of idling");
    d.term().await;
}

/// A credential the service cannot read is reported within moments of the start (an
/// error line, STATUS=, the gauge), not at its portal's first rotation, and the other
/// portals keep working; the build and rotation durations are in the metrics.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_secret_is_reported_at_start_and_the_other_portals_keep_working() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    h.write_config("", &["plain"]);
    std::fs::remove_file(h.path("keys/beta")).unwrap();
    let port = yearly_with_metrics(&h);
    let sock_path = h.path("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let sock_str = sock_path.display().to_string();
    let started = std::time::Instant::now();
    let d = Daemon::start(&h, &[], &[("NOTIFY_SOCKET", &sock_str)]);
    let mut buf = vec![0u8; 4096];
    let ready = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
            .await
            .expect("READY in time")
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.contains("READY=1") {
            break msg;
        }
    };
    assert!(
        ready.contains("STATUS=2 portal(s); 1 cannot read their secrets: beta"),
        "{ready}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(d.wait_log("a secret cannot be read").await);
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("a secret cannot be read"))
        .unwrap();
    assert!(
        line.contains("ERROR") && line.contains("beta") && line.contains("keys/beta"),
        "{line}"
    );

    // acme, new to the daemon, rotates; beta fails on its own.
    assert!(
        wait_for(Duration::from_secs(10), || h
            .plain_sink("codes/acme.txt")
            .is_some())
        .await
    );
    assert_eq!(h.plain_sink("codes/acme.txt"), Some(h.accepted("acme")));
    let body = crate::support::metrics(port).await;
    for needle in [
        "tfa_rotator_secret_unreadable{portal=\"beta\"} 1",
        "tfa_rotator_secret_unreadable{portal=\"acme\"} 0",
        "tfa_rotator_build_info{version=\"",
        "tfa_rotator_rotation_duration_seconds_count",
    ] {
        assert!(body.contains(needle), "{needle}: {body}");
    }

    // Fixed and reloaded: the gauge clears.
    let key = h.keys["beta"].clone();
    write_private(&h.path("keys/beta"), &format!("{key}\n"));
    let pid = d.child.id().unwrap().to_string();
    crate::support::tool("kill", "procps")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = crate::support::metrics(port).await;
        if body.contains("tfa_rotator_secret_unreadable{portal=\"beta\"} 0") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
}

/// SPEC §6: other local users holding 1,100 idle connections to the metrics listener (and
/// reconnecting whenever one is closed) under a soft limit of 1,024 open files starve
/// nothing: rotations go on and a `/healthz` probe answers 200 within a second.
#[tokio::test(flavor = "multi_thread")]
async fn idle_metrics_connections_cannot_starve_rotations_or_healthz() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // This test process holds the attacker's 1,100 sockets itself.
    let lim = getrlimit(Resource::Nofile);
    let _ = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    );
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    let port = free_port();
    with_schedule(&h, "[schedules.fast]\ncron = \"* * * * * *\"\n", "fast");
    edit_config(&h, |t| {
        t.replace(
            "[daemon]\n",
            &format!("[daemon]\nmetrics = \"127.0.0.1:{port}\"\n"),
        )
    });
    let d = Daemon::start_under(
        &h,
        &["prlimit", "--nofile=1024:20000", "--"],
        &h.config(),
        &[],
        &[],
    );
    assert!(d.wait_log("metrics on /metrics").await, "{}", d.log());
    let stop = tokio_util::sync::CancellationToken::new();
    let mut holders = Vec::new();
    for _ in 0..1100 {
        let stop = stop.clone();
        holders.push(tokio::spawn(async move {
            // Hold a connection open, idle; reopen it whenever the server closes it.
            while !stop.is_cancelled() {
                let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut buf = [0u8; 64];
                tokio::select! {
                    _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf) => {}
                    () = stop.cancelled() => {}
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = h.sim.rotations();
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let r = probe
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .expect("/healthz answers within a second");
        assert_eq!(r.status(), 200, "{}", d.log());
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        wait_for(Duration::from_secs(10), || h.sim.rotations() >= before + 2).await,
        "rotations go on: {}",
        d.log()
    );
    stop.cancel();
    for t in holders {
        let _ = t.await;
    }
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("Too many open files"), "{log}");
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
}
