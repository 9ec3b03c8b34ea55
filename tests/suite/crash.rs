//! Crash safety, proven: the process is killed at every step of the rotation, and after
//! `deliver` every sink holds exactly the set the portal accepts, old codes are dead, and
//! nothing is left pending. Needs `--features failpoints`.

use std::time::Duration;

use serde_json::Value;
use tfa_rotator::simulator::{Fault, FaultAction};

use crate::support::*;

/// A portal with a plain and an age sink, rotated once so the sinks hold a first set.
async fn rotated_once() -> (Harness, age::x25519::Identity, Vec<String>) {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let id = age::x25519::Identity::generate();
    // A short settle window: a crash before the PUT leaves an intent that only a GET after
    // the window may close.
    h.schedule = Some("conv".into());
    let extra = format!(
        "{}{}",
        age_sink("vault", ".age", &id),
        quiet_schedule("conv", "2s", "off")
    );
    h.write_config(&extra, &["plain", "vault"]);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let first = h.accepted("acme");
    (h, id, first)
}

fn sinks_hold(h: &Harness, id: &age::x25519::Identity) -> (Vec<String>, Vec<String>) {
    let plain = h.plain_sink("codes/acme.txt").unwrap_or_default();
    let sealed = std::fs::read(h.path("codes/acme.age")).unwrap_or_default();
    (
        plain,
        codes_in(&crate::suite::file_sink::age_decrypt(&sealed, id)),
    )
}

async fn assert_settled(h: &Harness, id: &age::x25519::Identity, first: &[String], label: &str) {
    assert!(
        wait_for_exit(h, &["deliver"], 0, Duration::from_secs(15)).await,
        "{label}: deliver settles everything (at the latest once the settle window has closed)"
    );
    let accepted = h.accepted("acme");
    let (plain, vault) = sinks_hold(h, id);
    assert_eq!(
        plain, accepted,
        "{label}: the plain sink holds the accepted set"
    );
    assert_eq!(
        vault, accepted,
        "{label}: the age sink holds the accepted set"
    );
    if accepted != first {
        assert!(
            !h.sim.login(&Harness::email("acme"), &first[0]),
            "{label}: an old code is dead"
        );
    }
    let status: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert!(
        status["portals"][0]["pending_deliveries"]
            .as_array()
            .unwrap()
            .is_empty(),
        "{label}: nothing pending"
    );
    let again = h.run(&["deliver"]).await;
    assert!(
        again.stdout.contains("nothing pending"),
        "{label}: the journal is closed: {}",
        again.all()
    );
    // The portal rotates normally afterwards.
    let out = h.run(&["rotate", "acme", "--force"]).await;
    assert_eq!(
        out.code,
        Some(0),
        "{label}: rotate after recovery: {}",
        out.all()
    );
    let (plain, vault) = sinks_hold(h, id);
    assert_eq!(
        (plain.clone(), vault),
        (h.accepted("acme"), h.accepted("acme")),
        "{label}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_at_every_step_loses_nothing() {
    let steps = [
        ("rotation::after_intent", false),
        ("rotation::after_put", true),
        ("rotation::after_seal", true),
        ("rotation::mid_delivery", true),
        ("rotation::before_done", true),
    ];
    let runs = steps.iter().map(|(point, rotates)| async move {
        let (h, id, first) = rotated_once().await;
        let out = h
            .run_env(
                &["rotate", "acme", "--force"],
                &[("TFA_ROTATOR_ABORT_AT", point)],
            )
            .await;
        assert_eq!(
            out.code,
            None,
            "{point}: the process was killed: {}",
            out.all()
        );
        assert_eq!(h.sim.rotations(), if *rotates { 2 } else { 1 }, "{point}");
        assert_settled(&h, &id, &first, point).await;
    });
    futures::future::join_all(runs).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_the_put_loses_nothing() {
    let (h, id, first) = rotated_once().await;
    h.sim.inject(Fault::on_put(FaultAction::HangAfterApply));
    let mut child = h.spawn(&["rotate", "acme", "--force"], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 2).await,
        "the PUT reached the portal"
    );
    child.start_kill().unwrap();
    let status = child.wait().await.unwrap();
    assert_eq!(status.code(), None, "killed by a signal");
    assert_ne!(
        h.accepted("acme"),
        first,
        "the portal holds a set nobody has seen"
    );
    assert_settled(&h, &id, &first, "during the PUT").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_rotate_settles_an_open_intent_before_its_own_put() {
    let (h, id, first) = rotated_once().await;
    let out = h
        .run_env(
            &["rotate", "acme", "--force"],
            &[("TFA_ROTATOR_ABORT_AT", "rotation::after_put")],
        )
        .await;
    assert_eq!(out.code, None);
    let orphan = h.accepted("acme");
    assert_ne!(orphan, first);
    // No `deliver`: the next rotate first delivers the orphaned set, then makes a new one.
    let out = h.run(&["rotate", "acme", "--force"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("recovered") || out.stdout.contains("delivered"),
        "{}",
        out.stdout
    );
    assert_eq!(h.sim.rotations(), 3);
    let (plain, vault) = sinks_hold(&h, &id);
    assert_eq!(plain, h.accepted("acme"));
    assert_eq!(vault, h.accepted("acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_delivery_stays_sealed_until_deliver_succeeds() {
    let (h, id, first) = rotated_once().await;
    let out = h
        .run_env(
            &["rotate", "acme", "--force"],
            &[("FAILPOINTS", "file_sink::before_rename=return")],
        )
        .await;
    assert_eq!(
        out.code,
        Some(1),
        "a delivery left pending is a failure: {}",
        out.all()
    );
    assert!(out.stdout.contains("pending"), "{}", out.stdout);
    let (plain, _) = sinks_hold(&h, &id);
    assert_eq!(plain, first, "the sink still holds the old file");
    let status = h.run(&["status", "--json"]).await;
    assert_eq!(status.code, Some(1));
    let doc: Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(
        doc["portals"][0]["pending_deliveries"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert!(!h.state_bytes().is_empty());
    assert_eq!(doc["portals"][0]["last_result"], "delivery_pending");
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    let doc: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(
        doc["portals"][0]["last_result"], "ok",
        "status reflects the cleared delivery"
    );
    assert_settled(&h, &id, &first, "failed delivery").await;
}
