//! The audit record (SPEC §6, issue #24): one record per event with who and what set it
//! off, JSON Lines and CSV, filters, never a code; `--verify` finds a record changed,
//! removed (middle or newest) or inserted behind the tool's back, and accepts the tool's
//! own pruning.

use std::time::Duration;

use serde_json::Value;
use tfa_rotator::simulator::{Fault, FaultAction};

use crate::support::*;

/// An exec sink that fails while `fail` exists in the test directory, else keeps the
/// payload in `out/{portal}`.
fn flaky_sink(h: &Harness) -> String {
    std::fs::create_dir_all(h.path("out")).unwrap();
    format!(
        "[sinks.flaky]\ntype = \"exec\"\ncommand = [\"/bin/sh\", \"-c\", \"test ! -e {0}/fail && cat > {0}/out/$TFA_PORTAL\"]\ntimeout = \"10s\"\n",
        h.path("").display()
    )
}

fn lines(out: &str) -> Vec<Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

async fn history_json(h: &Harness, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["history", "--json"];
    all.extend_from_slice(args);
    let out = h.run(&all).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    lines(&out.stdout)
}

/// Every code any set of the portal held, as the sinks received them.
fn codes_seen(h: &Harness) -> Vec<String> {
    let mut all = h.plain_sink("codes/acme.txt").unwrap_or_default();
    if let Ok(t) = std::fs::read_to_string(h.path("out/acme")) {
        all.extend(codes_in(&t));
    }
    all.extend(h.accepted("acme"));
    all
}

fn state_db(h: &Harness) -> rusqlite::Connection {
    rusqlite::Connection::open(h.path("state/state.sqlite")).unwrap()
}

async fn verify(h: &Harness) -> Output {
    h.run(&["history", "--verify"]).await
}

/// The sequence of the issue: a manual rotation, a daemon (cron) rotation, a resend, a
/// 504-then-apply settled, an abandon, a failing-then-succeeding delivery.
async fn sequence() -> Harness {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let flaky = flaky_sink(&h);
    let schedule = "[schedules.often]\ncron = \"*/2 * * * * *\"\ncatch_up = false\nrotate_on_change = false\nmin_interval = \"1s\"\nwatch_every = \"off\"\nsettle_window = \"3s\"\n";
    h.schedule = Some("quiet".into());
    let quiet = quiet_schedule("quiet", "3s", "off");
    h.write_config(&format!("{quiet}{schedule}{flaky}"), &["plain", "flaky"]);
    // 1. By hand.
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // 2. The daemon, on a cron fire.
    edit_config(&h, |t| {
        t.replace("schedule = \"quiet\"", "schedule = \"often\"")
    });
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() >= 2).await,
        "{}",
        d.log()
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    edit_config(&h, |t| {
        t.replace("schedule = \"often\"", "schedule = \"quiet\"")
    });
    // 3. A resend.
    let out = h.run(&["resend", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // 4. A 504 whose PUT the portal applies later, settled by `deliver`.
    let before = h.sim.rotations();
    h.sim
        .inject(Fault::on_put(FaultAction::GatewayTimeoutThenApplyMs(500)));
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(1));
    assert!(wait_for(Duration::from_secs(10), || h.sim.rotations() > before).await);
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // 5. An abandon: a 504 that never reached the portal, closed by hand.
    h.sim.inject(Fault::on_put(FaultAction::Status(504)));
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(1));
    let out = h
        .run(&["settle", "acme", "--abandon", "--reason", "key revoked"])
        .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // 6. A delivery that fails, then goes through.
    std::fs::write(h.path("fail"), "").unwrap();
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(1));
    std::fs::remove_file(h.path("fail")).unwrap();
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    h
}

fn events(records: &[Value]) -> Vec<(String, String)> {
    records
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap_or_default().to_string(),
                r["trigger"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_event_is_recorded_once_with_its_cause_and_no_code() {
    let h = sequence().await;
    let records = history_json(&h, &[]).await;
    let ev = events(&records);
    // Everything but the daemon's (which may have rotated more than once), in order.
    let by_hand: Vec<(&str, &str)> = ev
        .iter()
        .filter(|(_, t)| t != "cron")
        .map(|(e, t)| (e.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        by_hand,
        [
            // 1. rotate: the rotation, then each sink's delivery.
            ("rotated", "manual"),
            ("delivered", "manual"),
            ("delivered", "manual"),
            // 3. resend: each sink's delivery, no rotation.
            ("delivered", "manual"),
            ("delivered", "manual"),
            // 4. the 504, then `deliver` finds the set applied.
            ("rotation_failed", "manual"),
            ("settled", "settle"),
            ("rotated", "settle"),
            ("delivered", "settle"),
            ("delivered", "settle"),
            // 5. a 504 never applied, abandoned by hand.
            ("rotation_failed", "manual"),
            ("abandoned", "manual"),
            // 6. one sink fails, then `deliver` delivers it.
            ("rotated", "manual"),
            ("delivered", "manual"),
            ("delivery_failed", "manual"),
            ("delivered", "manual"),
        ],
        "{records:#?}"
    );
    let count = |e: &str, t: &str| ev.iter().filter(|(a, b)| a == e && b == t).count();
    // 1: rotated by hand, delivered to both sinks.
    // 2: rotated on a cron fire (maybe more than once while the daemon ran).
    assert!(count("rotated", "manual") >= 1, "{ev:?}");
    assert!(count("rotated", "cron") >= 1, "{ev:?}");
    // 3: the resend: a delivery per sink, by hand, no rotation.
    // 4: the 504: an attempt of unknown outcome, then settled as applied by `deliver`.
    let unknown: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "rotation_failed" && r["outcome"] == "unknown")
        .collect();
    assert_eq!(unknown.len(), 2, "the 504s: {records:#?}");
    assert_eq!(count("settled", "settle"), 1, "{ev:?}");
    assert_eq!(count("rotated", "settle"), 1, "{ev:?}");
    // 5: the abandon, with who and why.
    let abandoned: Vec<&Value> = records
        .iter()
        .filter(|r| r["event"] == "abandoned")
        .collect();
    assert_eq!(abandoned.len(), 1, "{ev:?}");
    assert_eq!(abandoned[0]["reason"], "key revoked");
    let uid = rustix::process::getuid().as_raw();
    let by = abandoned[0]["by"].as_str().unwrap();
    assert!(
        by.starts_with("user:") && by.ends_with(&format!("({uid})")),
        "{by}"
    );
    // 6: the failed delivery (attempt 1), then the delivered one (attempt 2).
    let flaky: Vec<(&str, i64)> = records
        .iter()
        .filter(|r| r["sink"] == "flaky")
        .map(|r| (r["event"].as_str().unwrap(), r["attempt"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        &flaky[flaky.len() - 2..],
        &[("delivery_failed", 1), ("delivered", 2)],
        "{flaky:?}"
    );
    // A rotation names the account, the set's keyed fingerprint and each sink's result.
    let manual = records
        .iter()
        .find(|r| r["event"] == "rotated" && r["trigger"] == "manual")
        .unwrap();
    assert_eq!(manual["outcome"], "ok");
    assert_eq!(manual["sinks"]["plain"], "delivered");
    assert_eq!(manual["sinks"]["flaky"], "delivered");
    assert!(manual["fingerprint"].as_str().unwrap().len() >= 32);
    assert!(!manual["account"].as_str().unwrap().is_empty());
    let daemon = records
        .iter()
        .find(|r| r["event"] == "rotated" && r["trigger"] == "cron")
        .unwrap();
    assert!(
        daemon["by"].as_str().unwrap().starts_with("daemon:"),
        "{daemon}"
    );
    // Every record is chained: each `prev` is the hash of the one before it.
    for pair in records.windows(2) {
        assert_eq!(pair[1]["prev"], pair[0]["hash"], "{pair:?}");
    }
    // No code of any set appears in any output.
    let codes = codes_seen(&h);
    assert!(codes.len() >= 10, "{codes:?}");
    let table = h.run(&["history"]).await;
    let csv = h.run(&["history", "--csv"]).await;
    let json = h.run(&["history", "--json"]).await;
    for out in [&table, &csv, &json] {
        assert_eq!(out.code, Some(0), "{}", out.all());
        for c in &codes {
            assert!(
                !out.stdout.contains(c.as_str()),
                "a code in: {}",
                out.stdout
            );
        }
    }
    assert_eq!(verify(&h).await.code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_and_the_filters() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    h.write_config("", &["plain"]);
    assert_eq!(h.run(&["rotate", "--all"]).await.code, Some(0));
    let all = history_json(&h, &[]).await;
    assert_eq!(all.len(), 4, "a rotation and a delivery each: {all:#?}");
    let acme = history_json(&h, &["acme"]).await;
    assert_eq!(acme.len(), 2);
    assert!(acme.iter().all(|r| r["portal"] == "acme"));
    // --since: a time after every record, and an age that takes them all.
    let last = all.last().unwrap()["at"].as_str().unwrap().to_string();
    let after =
        chrono::DateTime::parse_from_rfc3339(&last).unwrap() + chrono::Duration::milliseconds(1);
    assert!(
        history_json(&h, &["--since", &after.to_rfc3339()])
            .await
            .is_empty()
    );
    assert_eq!(history_json(&h, &["--since", "1h"]).await.len(), 4);
    let bad = h.run(&["history", "--since", "last tuesday"]).await;
    assert_eq!(bad.code, Some(2), "{}", bad.all());
    let typo = h.run(&["history", "acm"]).await;
    assert_eq!(typo.code, Some(2), "{}", typo.all());
    assert!(
        typo.stderr.contains("no portal named `acm`"),
        "{}",
        typo.stderr
    );
    // CSV: a header of the JSON keys, a row per record, `sinks` as name=result pairs.
    let out = h.run(&["history", "--csv", "beta"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let mut r = csv::Reader::from_reader(out.stdout.as_bytes());
    let header: Vec<String> = r.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(
        header,
        [
            "id",
            "at",
            "event",
            "portal",
            "account",
            "trigger",
            "by",
            "outcome",
            "reason",
            "sink",
            "attempt",
            "sinks",
            "fingerprint",
            "prev",
            "hash"
        ]
    );
    let rows: Vec<csv::StringRecord> = r.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(&rows[0][2], "rotated");
    assert_eq!(&rows[0][11], "plain=delivered");
    assert_eq!(&rows[1][2], "delivered");
    assert_eq!(&rows[1][9], "plain");
    assert_eq!(&rows[1][10], "1");
    assert_eq!(&rows[1][13], &rows[0][14], "chained");
}

/// The rows of one portal's chain, by id.
fn ids(c: &rusqlite::Connection, portal: &str) -> Vec<(i64, String)> {
    let mut st = c
        .prepare("SELECT id, uuid FROM history WHERE portal = ?1 ORDER BY id")
        .unwrap();
    st.query_map([portal], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Three rotations of one portal: six records.
async fn six_records() -> Harness {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    for _ in 0..3 {
        assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(0));
    }
    assert_eq!(verify(&h).await.code, Some(0));
    h
}

fn assert_names(out: &Output, uuid: &str, why: &str) {
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains(&format!("record {uuid} at ")) && out.stderr.contains(why),
        "expected record {uuid} ({why}): {}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_a_changed_record() {
    let h = six_records().await;
    let c = state_db(&h);
    let rows = ids(&c, "acme");
    let (id, uuid) = &rows[2];
    c.execute(
        "UPDATE history SET record = replace(record, '\"by\":\"user:', '\"by\":\"user:x') WHERE id = ?1",
        [id],
    )
    .unwrap();
    assert_names(&verify(&h).await, uuid, "changed after it was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_a_changed_column() {
    let h = six_records().await;
    let c = state_db(&h);
    let rows = ids(&c, "acme");
    let (id, uuid) = &rows[3];
    c.execute("UPDATE history SET at = at - 86400000 WHERE id = ?1", [id])
        .unwrap();
    assert_names(&verify(&h).await, uuid, "changed after it was written");
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_a_removed_middle_record() {
    let h = six_records().await;
    let c = state_db(&h);
    let rows = ids(&c, "acme");
    c.execute("DELETE FROM history WHERE id = ?1", [rows[2].0])
        .unwrap();
    // The record after the gap is named.
    assert_names(
        &verify(&h).await,
        &rows[3].1,
        "a record before it was removed",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_a_removed_newest_record() {
    let h = six_records().await;
    let c = state_db(&h);
    let rows = ids(&c, "acme");
    c.execute("DELETE FROM history WHERE id = ?1", [rows[5].0])
        .unwrap();
    assert_names(&verify(&h).await, &rows[4].1, "a newer record was removed");
}

/// Inserts a well-formed record of `acme`, correctly chained after the record whose hash
/// is `prev`, with this UUID and row id (`None`: the next).
fn forge(c: &rusqlite::Connection, id: Option<i64>, uuid: &str, prev: &str, at: i64) {
    let at_text = tfa_rotator::json::rfc3339(at).unwrap();
    let record = format!(
        "{{\"id\":\"{uuid}\",\"at\":\"{at_text}\",\"event\":\"rotated\",\"portal\":\"acme\",\"by\":\"user:mallory(666)\",\"outcome\":\"ok\"}}"
    );
    let hash = tfa_rotator::state::history::chain_hash(Some(prev), &record);
    c.execute(
        "INSERT INTO history (id, uuid, portal, at, event, record, prev, hash) VALUES (?1, ?2, 'acme', ?3, 'rotated', ?4, ?5, ?6)",
        rusqlite::params![id, uuid, at, record, prev, hash],
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_finds_an_inserted_record() {
    let h = six_records().await;
    let c = state_db(&h);
    let rows = ids(&c, "acme");
    // A well-formed record, correctly chained after the newest: only the head knows.
    let (prev, at): (String, i64) = c
        .query_row(
            "SELECT hash, at FROM history WHERE id = ?1",
            [rows[5].0],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let uuid = "00000000-0000-4000-8000-000000000000";
    forge(&c, None, uuid, &prev, at + 1);
    assert_names(&verify(&h).await, uuid, "added behind the tool's back");
    // And one slipped into the middle, with an id of its own between two others.
    let h = six_records().await;
    let c = state_db(&h);
    let rows = ids(&c, "acme");
    c.execute(
        "UPDATE history SET id = id + 100 WHERE id > ?1",
        [rows[2].0],
    )
    .unwrap();
    let prev: String = c
        .query_row("SELECT hash FROM history WHERE id = ?1", [rows[2].0], |r| {
            r.get(0)
        })
        .unwrap();
    let uuid = "11111111-0000-4000-8000-000000000000";
    forge(&c, Some(rows[2].0 + 1), uuid, &prev, at + 1);
    // The forged record links to the one before it; the genuine one after no longer
    // follows what precedes it.
    assert_names(
        &verify(&h).await,
        &rows[3].1,
        "a record before it was removed",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tools_own_pruning_keeps_the_chain_verifiable() {
    let h = six_records().await;
    // Make the first four records old: a year and a half ago (`at` and the JSON's `at`
    // are rewritten together, so they would verify if the hash were not checked; here
    // the history is rebuilt as the tool itself would have written it then).
    let c = state_db(&h);
    let rows = ids(&c, "acme");
    drop(c);
    // `history_keep = "1ms"` makes every record old; the daemon's upkeep prunes at start.
    edit_config(&h, |t| {
        t.replace(
            "http_timeout = \"3s\"",
            "http_timeout = \"3s\"\nhistory_keep = \"1ms\"",
        )
    });
    let out = h.run(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let c = state_db(&h);
    let left = ids(&c, "acme");
    assert!(
        left.iter().all(|r| !rows.contains(r)),
        "every old record pruned: {left:?}"
    );
    let records = history_json(&h, &[]).await;
    let checkpoint = records.iter().find(|r| r["event"] == "checkpoint").unwrap();
    assert_eq!(checkpoint["pruned"], 6, "{checkpoint}");
    let out = verify(&h).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // Pruned again later (the checkpoint itself is old then): still verifiable.
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(0));
    tokio::time::sleep(Duration::from_millis(5)).await;
    let out = h.run(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let out = verify(&h).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // Removing the checkpoint leaves the chain's first record hanging.
    let c = state_db(&h);
    c.execute("DELETE FROM history WHERE event = 'checkpoint'", [])
        .unwrap();
    assert_eq!(verify(&h).await.code, Some(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn history_is_read_only_and_creates_no_file() {
    let h = six_records().await;
    // A daemon-less state: the WAL files exist; nothing else may appear.
    let list = |h: &Harness| {
        let mut v: Vec<String> = std::fs::read_dir(h.path("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = list(&h);
    let bytes = h.state_bytes();
    for args in [
        &["history"][..],
        &["history", "--json"],
        &["history", "--csv"],
        &["history", "--verify"],
    ] {
        assert_eq!(h.run(args).await.code, Some(0));
    }
    assert_eq!(list(&h), before);
    assert_eq!(h.state_bytes(), bytes);
}
