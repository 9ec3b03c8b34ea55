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

/// Names, sizes and modification times of every file in `dir` and below.
fn listing(dir: &std::path::Path) -> BTreeMap<String, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.insert(
                e.path().display().to_string(),
                (m.len(), m.modified().unwrap()),
            );
        }
    }
    out
}

/// SPEC §6: right after a real rotation, `run --once --dry-run` reports what `run --once`
/// does (nothing due), `rotate --dry-run` sees `min_interval`, and none of the read-only
/// commands changes the state directory's listing (names, sizes, mtimes), SQLite's `-wal`
/// and `-shm` included.
#[tokio::test(flavor = "multi_thread")]
async fn dry_runs_read_the_state_and_agree_with_run_once_and_touch_nothing() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config(
        "[schedules.daily]\ncron = \"@daily\"\ncatch_up = false\nmin_interval = \"1h\"\n",
        &["plain"],
    );
    edit_config(&h, |t| {
        t.replace("sinks = [", "schedule = \"daily\"\nsinks = [")
    });
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let before = listing(&h.path("state"));
    assert!(
        before.keys().any(|k| k.ends_with("state.sqlite-wal")),
        "writers keep the WAL: {before:?}"
    );
    let dry = h.run(&["run", "--once", "--dry-run"]).await;
    assert_eq!(dry.code, Some(0), "{}", dry.all());
    assert!(!dry.all().contains("would rotate"), "{}", dry.all());
    let out = h.run(&["rotate", "acme", "--dry-run"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("min_interval"), "{}", out.stdout);
    for args in [&["check"][..], &["status"], &["status", "--json"]] {
        let out = h.run(args).await;
        assert_eq!(out.code, Some(0), "{args:?}: {}", out.all());
    }
    assert_eq!(listing(&h.path("state")), before, "nothing changed");
    // The real run agrees: nothing is due.
    let puts = h.sim.count("PUT");
    let real = h.run(&["run", "--once"]).await;
    assert_eq!(real.code, Some(0), "{}", real.all());
    assert_eq!(h.sim.count("PUT"), puts, "{}", real.all());
}

/// A state from before this version kept no `-wal`/`-shm`: a read-only open reads it
/// `immutable` and still creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_state_without_wal_files_is_read_without_creating_them() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    // As an older writer left it: checkpointed, its WAL files gone.
    {
        let c = rusqlite::Connection::open(h.path("state/state.sqlite")).unwrap();
        c.pragma_update(None, "journal_mode", "DELETE").unwrap();
    }
    for side in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(h.path(&format!("state/state.sqlite{side}")));
    }
    let before = listing(&h.path("state"));
    let out = h.run(&["status", "--json"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("\"acme\""), "{}", out.stdout);
    assert_eq!(listing(&h.path("state")), before, "nothing created");
}

/// `status` with no state says why and exits 1, creating nothing.
#[tokio::test(flavor = "multi_thread")]
async fn status_without_a_state_exits_1_and_creates_nothing() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    let out = h.run(&["status"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("no state yet"), "{}", out.stderr);
    assert!(!h.path("state").exists());
}
