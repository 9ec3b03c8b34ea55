//! Webhook sinks (SPEC §5, issue #24), against a real receiver no one here wrote: Debian's
//! `webhook`, whose trigger rule checks the HMAC-SHA256 signature. Events arrive signed and
//! in order, never with a code; a refused or unreachable receiver leaves them pending, sent
//! later with the same `X-TFA-Delivery`; a crash before the POST loses none.

use std::time::Duration;

use tfa_rotator::simulator::{Fault, FaultAction};

use crate::support::webhook::{Received, Receiver};
use crate::support::*;

const SECRET: &str = "test-only webhook secret";

fn hook_sink(url: &str, extra: &str) -> String {
    format!(
        "[sinks.hook]\ntype = \"webhook\"\nurl = \"{url}\"\nsecret = {{ file = \"hook-secret\" }}\ntimeout = \"5s\"\n{extra}\n"
    )
}

async fn world(tls: bool, extra: &str) -> (Harness, Receiver) {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let r = Receiver::start(&h.path(""), SECRET, tls);
    write_private(&h.path("hook-secret"), &format!("{SECRET}\n"));
    let ca = if tls {
        format!("ca_file = \"{}\"", r.ca().display())
    } else {
        String::new()
    };
    h.schedule = Some("quiet".into());
    let quiet = quiet_schedule("quiet", "3s", "off");
    h.write_config(
        &format!("{quiet}{}", hook_sink(&r.url(), &format!("{ca}\n{extra}"))),
        &["plain", "hook"],
    );
    (h, r)
}

fn names(got: &[Received]) -> Vec<&str> {
    got.iter().map(|r| r.event.as_str()).collect()
}

/// The history's records of the webhook's own deliveries: (event, attempt, reason).
async fn hook_records(h: &Harness) -> Vec<(String, i64, String)> {
    let out = h.run(&["history", "--json"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    out.stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["sink"] == "hook")
        .map(|r| {
            (
                r["event"].as_str().unwrap().to_string(),
                r["attempt"].as_i64().unwrap(),
                r["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn events_arrive_signed_in_order_and_without_codes() {
    let (h, r) = world(false, "").await;
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let got = r.received();
    // The rotation and the delivery to the code sink; the webhook's own delivery raises
    // no event.
    assert_eq!(names(&got), ["rotated", "delivered"], "{}", r.log());
    let rotated = &got[0].body;
    assert_eq!(
        got[0].delivery, rotated["id"],
        "X-TFA-Delivery is the record's id"
    );
    assert_eq!(rotated["portal"], "acme");
    assert_eq!(rotated["trigger"], "manual");
    assert_eq!(rotated["outcome"], "ok");
    assert_eq!(rotated["sinks"]["plain"], "delivered");
    assert!(rotated["by"].as_str().unwrap().starts_with("user:"));
    assert!(rotated["fingerprint"].as_str().unwrap().len() >= 32);
    assert_eq!(rotated["chain"].as_str().unwrap().len(), 64);
    assert_eq!(got[1].body["sink"], "plain");
    for code in h.accepted("acme") {
        assert!(
            !got.iter().any(|g| g.raw.contains(&code)),
            "a code was sent"
        );
    }
    // Its deliveries are recorded, one per event, and the chain still verifies.
    let records = hook_records(&h).await;
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|(e, a, _)| e == "delivered" && *a == 1));
    assert_eq!(h.run(&["history", "--verify"]).await.code, Some(0));
    // Nothing is sent twice.
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    assert_eq!(r.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_is_refused_and_the_event_waits_with_its_id() {
    let (h, r) = world(false, "").await;
    write_private(&h.path("hook-secret"), "not the receiver's secret\n");
    let out = h.run(&["rotate", "acme"]).await;
    // The rotation itself went through: a webhook never holds it back.
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stderr.contains("did not take their events"),
        "{}",
        out.stderr
    );
    assert!(r.received().is_empty());
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(1), "an event left pending: {}", out.all());
    assert!(r.received().is_empty(), "{}", r.log());
    // The secret is put right; the retry is signed with it.
    write_private(&h.path("hook-secret"), &format!("{SECRET}\n"));
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let got = r.received();
    assert_eq!(names(&got), ["rotated", "delivered"]);
    let records = hook_records(&h).await;
    let failed: Vec<&(String, i64, String)> = records
        .iter()
        .filter(|(e, _, _)| e == "delivery_failed")
        .collect();
    assert_eq!(failed.len(), 2, "{records:?}");
    assert_eq!((failed[0].1, failed[1].1), (1, 2), "attempts counted");
    for (_, _, reason) in &failed {
        assert!(reason.contains("500"), "{reason}");
        assert!(
            reason.contains(&got[0].delivery),
            "the same X-TFA-Delivery on every try: {reason}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_down_during_a_rotation_gets_each_event_once_when_up() {
    let (h, mut r) = world(false, "").await;
    r.down();
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
    r.up();
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    let got = r.received();
    assert_eq!(names(&got), ["rotated", "delivered"], "each once");
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tls_with_the_sinks_ca_file() {
    let (h, r) = world(true, "").await;
    assert!(r.url().starts_with("https://"));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(
        names(&r.received()),
        ["rotated", "delivered"],
        "{}",
        r.log()
    );
    // Without the CA, the receiver's certificate is not trusted: the event waits.
    edit_config(&h, |t| {
        t.lines()
            .filter(|l| !l.starts_with("ca_file"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let out = h.run(&["rotate", "acme", "--force"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(r.received().len(), 2);
    let records = hook_records(&h).await;
    assert!(
        records
            .iter()
            .any(|(e, _, why)| e == "delivery_failed" && why.contains("certificate")),
        "{records:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_before_the_post_sends_the_events_after_restart() {
    for point in ["webhook::before_send", "rotation::after_seal"] {
        let (h, r) = world(false, "").await;
        let out = h
            .run_env(&["rotate", "acme"], &[("TFA_ROTATOR_ABORT_AT", point)])
            .await;
        assert_eq!(out.code, None, "{point}: killed: {}", out.all());
        assert!(r.received().is_empty(), "{point}");
        let out = h.run(&["deliver"]).await;
        assert_eq!(out.code, Some(0), "{point}: {}", out.all());
        let got = r.received();
        assert_eq!(names(&got), ["rotated", "delivered"], "{point}");
        assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
        assert_eq!(h.run(&["history", "--verify"]).await.code, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn events_filter_and_alerts() {
    let (h, r) = world(false, "events = [\"rotated\", \"failed\"]").await;
    edit_config(&h, |t| {
        format!("[alerts]\nsinks = [\"hook\"]\nafter_failures = 1\n\n{t}")
    });
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    assert_eq!(
        names(&r.received()),
        ["rotated"],
        "delivered is not asked for"
    );
    h.sim
        .inject(Fault::on_get_codes(FaultAction::Status(401)).times(10));
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(1));
    let got = r.received();
    assert_eq!(
        names(&got),
        ["rotated", "rotation_failed", "alert"],
        "{}",
        r.log()
    );
    assert!(
        got[2].body["reason"]
            .as_str()
            .unwrap()
            .contains("rotation failing"),
        "{:?}",
        got[2].body
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_webhooks_pending_events_are_dropped_and_recorded() {
    let (h, mut r) = world(false, "").await;
    r.down();
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    edit_config(&h, |t| {
        t.replace("sinks = [\"plain\", \"hook\"]", "sinks = [\"plain\"]")
    });
    let out = h.run(&["deliver"]).await;
    assert_eq!(
        out.code,
        Some(0),
        "the dropped events hold nothing back: {}",
        out.all()
    );
    let out = h.run(&["history", "--json"]).await;
    let forgotten: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["event"] == "forgotten")
        .collect();
    assert_eq!(forgotten.len(), 1, "{}", out.stdout);
    assert_eq!(forgotten[0]["sink"], "hook");
    assert!(
        forgotten[0]["outcome"]
            .as_str()
            .unwrap()
            .contains("dropped")
    );
    r.up();
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    assert!(r.received().is_empty());
    // A webhook that took every event leaves nothing waiting: removing it drops nothing.
    edit_config(&h, |t| {
        t.replace("sinks = [\"plain\"]", "sinks = [\"plain\", \"hook\"]")
    });
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(0));
    assert_eq!(names(&r.received()), ["rotated", "delivered"]);
    edit_config(&h, |t| {
        t.replace("sinks = [\"plain\", \"hook\"]", "sinks = [\"plain\"]")
    });
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    let out = h.run(&["history", "--json"]).await;
    assert_eq!(
        out.stdout.matches("\"event\":\"forgotten\"").count(),
        1,
        "only the first removal dropped events: {}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_sends_its_events_and_retries_a_receiver_that_was_down() {
    let (h, mut r) = world(false, "").await;
    r.down();
    let port = free_port();
    edit_config(&h, |t| {
        t.replace("rotate_on_change = false", "rotate_on_change = true")
            .replace(
                "http_timeout = \"3s\"",
                &format!("http_timeout = \"3s\"\nmetrics = \"127.0.0.1:{port}\""),
            )
    });
    // A new portal is rotated at start; the receiver comes up a little later.
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 1).await,
        "{}",
        d.log()
    );
    // Its first try fails (the receiver is down) before the receiver comes up.
    let failed = "tfa_rotator_deliveries_total{portal=\"acme\",sink=\"hook\",result=\"failed\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !metrics(port).await.contains(failed) {
        assert!(std::time::Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.up();
    assert!(
        // The retry comes after the deliveries' first backoff, 15 to 30 s.
        wait_for(Duration::from_secs(60), || r.received().len() == 2).await,
        "the daemon retries on its own: {}",
        d.log()
    );
    // The metrics: records written (the rotation, the file sink's delivery, and the
    // webhook's own attempts, failed and delivered), and the webhook's attempts by result.
    let text = metrics(port).await;
    let value = |needle: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(needle))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{needle} in {text}"))
    };
    assert!(
        value("tfa_rotator_history_records_written_total") >= 4.0,
        "{text}"
    );
    assert_eq!(value("tfa_rotator_history_records_pruned_total"), 0.0);
    assert!(
        value("tfa_rotator_deliveries_total{portal=\"acme\",sink=\"hook\",result=\"failed\"}")
            >= 1.0,
        "{text}"
    );
    assert_eq!(
        value("tfa_rotator_deliveries_total{portal=\"acme\",sink=\"hook\",result=\"delivered\"}"),
        2.0
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    let got = r.received();
    assert_eq!(names(&got), ["rotated", "delivered"]);
    assert_eq!(got[0].body["trigger"], "new");
    assert!(got[0].body["by"].as_str().unwrap().starts_with("daemon:"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_config_refuses_what_a_webhook_cannot_be() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    write_private(&h.path("hook-secret"), "s\n");
    let cases = [
        (
            hook_sink("http://hooks.rotator.test/x", ""),
            vec!["plain", "hook"],
            "sinks.hook.url",
            "not https",
        ),
        (
            hook_sink("https://hooks.example.com/tfa", ""),
            vec!["plain", "hook"],
            "sinks.hook.url",
            "example URL",
        ),
        (
            hook_sink("https://hooks.rotator.test/x", "events = [\"rotatd\"]"),
            vec!["plain", "hook"],
            "sinks.hook.events",
            "not an event",
        ),
        (
            hook_sink("https://hooks.rotator.test/x", "path = \"x\""),
            vec!["plain", "hook"],
            "sinks.hook.path",
            "not a key of a webhook sink",
        ),
        (
            hook_sink("https://hooks.rotator.test/x", ""),
            vec!["hook"],
            "portals.acme.sinks",
            "only webhook sinks",
        ),
    ];
    for (sink, sinks, key, why) in cases {
        h.write_config(&sink, &sinks);
        let out = h.run(&["check", "--offline"]).await;
        assert_eq!(out.code, Some(78), "{key}: {}", out.all());
        assert!(
            out.stderr.contains(key) && out.stderr.contains(why),
            "{key} / {why}: {}",
            out.stderr
        );
    }
    // A webhook's keys are not taken by the sinks of codes either.
    h.write_config(
        "[sinks.x]\ntype = \"file\"\npath = \"codes/x-{portal}\"\nevents = [\"rotated\"]\nurl = \"https://hooks.rotator.test/x\"\n",
        &["plain", "x"],
    );
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    for k in ["sinks.x.events", "sinks.x.url"] {
        assert!(
            out.stderr.contains(&format!(
                "{k}: is not a key of a file sink; accepted: type, path, encrypt, mode, shared"
            )),
            "{k}: {}",
            out.stderr
        );
    }
    // A good one is fine, and `check` does not contact it.
    h.write_config(
        &hook_sink("https://hooks.rotator.test/x", ""),
        &["plain", "hook"],
    );
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
}

/// The same on a PostgreSQL state: the cursors, the events in order, a refusal waiting.
#[tokio::test(flavor = "multi_thread")]
async fn webhook_events_from_a_postgres_state() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let mut r = Receiver::start(&h.path(""), SECRET, false);
    write_private(&h.path("hook-secret"), &format!("{SECRET}\n"));
    let pg = crate::support::postgres::Postgres::start();
    write_private(&h.path("pg.url"), &format!("{}\n", pg.url()));
    let text = format!(
        "[daemon]\nstate_dir = \"state\"\nhttp_timeout = \"2s\"\n\n\
         [storage]\ntype = \"postgres\"\nurl = {{ file = \"pg.url\" }}\nlease = \"6s\"\ngrace = \"1s\"\n\n\
         [sinks.plain]\ntype = \"file\"\npath = \"codes/{{portal}}.txt\"\nshared = true\n\n{}\n{}",
        hook_sink(&r.url(), ""),
        h.portals_toml(&["plain", "hook"])
    );
    write_private(&h.config(), &text);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(
        names(&r.received()),
        ["rotated", "delivered"],
        "{}",
        r.log()
    );
    r.down();
    let out = h.run(&["rotate", "acme", "--force"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.run(&["deliver"]).await.code, Some(1));
    r.up();
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    assert_eq!(
        names(&r.received()),
        ["rotated", "delivered", "rotated", "delivered"]
    );
    let out = h.run(&["history", "--verify"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
}
