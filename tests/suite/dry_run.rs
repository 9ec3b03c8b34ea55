//! Dry run (SPEC §7): every read-only step, and nothing changes: no PUT, no sink file, the
//! state untouched.

use std::collections::BTreeMap;

use crate::support::*;

/// File name → SHA-256 of its content.
fn snapshot(dir: &std::path::Path) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut out = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_file() {
                out.insert(
                    e.file_name().to_string_lossy().into_owned(),
                    hex::encode(sha2::Sha256::digest(std::fs::read(e.path()).unwrap())),
                );
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_sends_no_put_writes_no_sink_and_creates_no_state() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    h.write_config("", &["plain"]);
    let out = h.run(&["rotate", "--all", "--dry-run", "-v"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("acme: preflight passed") && out.stdout.contains("would rotate"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("dry run: would rotate"),
        "logged: {}",
        out.stderr
    );
    assert_eq!(h.sim.count("PUT"), 0);
    assert!(h.sim.count("GET") >= 4, "the read-only steps ran");
    assert!(h.plain_sink("codes/acme.txt").is_none());
    assert!(!h.path("state").exists(), "no state was created");
    let leftovers = std::fs::read_dir(h.path("codes")).unwrap().count();
    assert_eq!(leftovers, 0, "the sink preflight removed its temp file");
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_leaves_an_existing_state_byte_for_byte_unchanged() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let sink_before = std::fs::read(h.path("codes/acme.txt")).unwrap();
    let state_before = snapshot(&h.path("state"));
    assert!(state_before.contains_key("state.sqlite"));
    let puts = h.sim.count("PUT");
    let out = h.run(&["rotate", "acme", "--dry-run", "--force"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), puts);
    assert_eq!(
        snapshot(&h.path("state")),
        state_before,
        "the state directory is unchanged"
    );
    assert_eq!(
        std::fs::read(h.path("codes/acme.txt")).unwrap(),
        sink_before
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_reports_a_failing_preflight_with_exit_1() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    h.sim.set_tfa_app_enabled(false);
    let out = h.run(&["rotate", "acme", "--dry-run"]).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout
            .contains("TFA application settings are not available"),
        "{}",
        out.all()
    );
    assert_eq!(h.sim.count("PUT"), 0);
}
