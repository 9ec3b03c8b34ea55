//! Several instances on one real PostgreSQL (`[storage] type = "postgres"`): the state's
//! statements behave the same on both backends (one conformance function run on each), the
//! claims fence the intent, two daemons over 200 due portals send exactly one PUT each, a
//! `rotate` by hand waits for the instance that holds the portal and sends no second PUT,
//! a stalled instance sends no PUT after its deadline, and a SQLite state moves over.

use std::time::Duration;

use tfa_rotator::state::{self, StateError, Store};

use crate::support::postgres::Postgres;
use crate::support::{Daemon, Harness, edit_config, json_ms, write_private};

/// A config for every added portal with a shared plain file sink on PostgreSQL.
fn cluster_config(h: &Harness, pg: &Postgres, extra: &str) -> std::path::PathBuf {
    cluster_config_with(h, &pg.url(), extra, 2)
}

/// [`cluster_config`] with this `http_timeout` (seconds), a grace of 1 s (`storage.grace`:
/// the tests wait leases and graces out in seconds, not tens of seconds) and a short
/// lease it allows (6 s at least: renewed every 2 s, a loaded machine still renews it).
fn cluster_config_with(
    h: &Harness,
    url: &str,
    extra: &str,
    http_timeout_s: u64,
) -> std::path::PathBuf {
    write_private(&h.path("pg.url"), &format!("{url}\n"));
    let lease = (2 * (http_timeout_s + 1)).max(6);
    let text = format!(
        "[daemon]\nstate_dir = \"state\"\nhttp_timeout = \"{http_timeout_s}s\"\n\n\
         [storage]\ntype = \"postgres\"\nurl = {{ file = \"pg.url\" }}\nlease = \"{lease}s\"\ngrace = \"1s\"\n\n\
         [sinks.plain]\ntype = \"file\"\npath = \"codes/{{portal}}.txt\"\nshared = true\n\n{extra}\n{}",
        h.portals_toml(&["plain"])
    );
    let path = h.config();
    write_private(&path, &text);
    path
}

/// The plain file sink `rel` holds the set the simulator accepts for `portal`.
fn assert_sink_accepted(h: &Harness, rel: &str, portal: &str) {
    assert_eq!(
        h.plain_sink(rel).as_deref(),
        Some(&h.accepted(portal)[..]),
        "{rel}"
    );
}

/// Waits until `b` has watched its portal three more times.
async fn three_watch_reads(b: &Daemon) {
    let watched = |log: &str| log.matches("due: watch read").count();
    let seen = watched(&b.log());
    assert!(
        crate::support::wait_for(Duration::from_secs(20), || watched(&b.log()) >= seen + 3).await,
        "{}",
        b.log()
    );
}

/// `b`, on an older config generation, says so, goes on watching (three watch reads), and
/// does not rotate back: the PUTs stay at `puts`.
async fn older_does_not_rotate_back(h: &Harness, b: &Daemon, puts: usize) {
    assert!(
        b.wait_log("another instance runs a newer configuration")
            .await,
        "{}",
        b.log()
    );
    three_watch_reads(b).await;
    assert_eq!(
        h.sim.count("PUT"),
        puts,
        "b did not rotate back: {}",
        b.log()
    );
}

/// SIGTERM to each daemon; each exits 0.
async fn stop_clean<const N: usize>(daemons: [Daemon; N]) {
    for d in daemons {
        let (code, _, log) = d.term().await;
        assert_eq!(code, Some(0), "{log}");
    }
}

/// The state's operations, as rotation and the daemon use them, on any backend.
async fn conformance(store: Store) {
    let lock = store
        .lock_portal("acme", Duration::from_secs(1))
        .await
        .unwrap();
    let id = store
        .write(|c| state::begin_intent(c, "acme", "rotate", Some("fp-old"), 5_000))
        .await
        .unwrap();
    let second = store
        .write(|c| state::begin_intent(c, "acme", "rotate", Some("fp-old"), 5_000))
        .await;
    assert!(second.is_err(), "a second open intent is refused");
    let open = store
        .call(|c| state::open_journal(c, Some("acme")))
        .await
        .unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(open[0].phase, state::Phase::Intent);
    assert_eq!(open[0].before_fp.as_deref(), Some("fp-old"));
    assert_eq!(open[0].window_ms, Some(5_000));
    let payloads = vec![
        ("file".to_string(), zeroize::Zeroizing::new(b"one".to_vec())),
        (
            "mail".to_string(),
            zeroize::Zeroizing::new(vec![0u8, 255, 7]),
        ),
    ];
    let ids = store
        .write(move |c| state::seal(c, id, "acme", "fp-new", 9, 10, &payloads))
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    let pending = store
        .call(|c| state::pending(c, Some("acme"), None))
        .await
        .unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(
        &pending[1].payload[..],
        &[0u8, 255, 7],
        "bytes kept exactly"
    );
    let sets = store.call(|c| state::sink_sets(c, "acme")).await.unwrap();
    assert_eq!(sets["file"], "fp-new");
    let first = ids[0];
    let after = store
        .write(move |c| {
            state::delivered(c, first, &cause())?;
            state::delivery_failed(c, ids[1], "refused", 0, true, Some(b"rest"), &cause())?;
            state::close_journal(c, id, state::Closed::Done, None)?;
            state::record_rotated(
                c,
                "acme",
                state::LastResult::DeliveryPending,
                Some(state::history::Record::new(
                    state::history::Event::Rotated,
                    "acme",
                    &cause(),
                )),
            )
        })
        .await
        .unwrap();
    // What the update returned is what the state holds after it.
    let row = after.row.as_ref().unwrap();
    assert_eq!(
        (
            row.last_result,
            row.failures,
            after.pending,
            after.open.len()
        ),
        (Some(state::LastResult::DeliveryPending), 0, 1, 0)
    );
    assert!(after.sink_sets.is_empty(), "not asked for");
    let pending = store
        .call(|c| state::pending(c, None, Some(i64::MAX)))
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        &pending[0].payload[..],
        b"rest",
        "the rest replaced the payload"
    );
    let due = store.call(|c| state::alerts_due(c, 1, 0)).await.unwrap();
    assert!(
        due.iter()
            .any(|d| matches!(d, state::AlertDue::Pending { sink, .. } if sink == "mail")),
        "a permanent refusal is alerted at once: {due:?}"
    );
    // The last fire acted on only moves forward; failures count.
    let n = store
        .write(|c| {
            state::record_schedule(c, "acme", Some("entry"), Some(2_000))?;
            state::record_schedule(c, "acme", None, Some(1_000))?;
            state::record_schedule(c, "acme", None, None)?;
            state::record_failure(c, "acme", "boom", None, &cause())?;
            state::record_failure(c, "acme", "boom", Some(5), &cause())
        })
        .await
        .unwrap();
    assert_eq!(n, 2);
    let row = store
        .call(|c| state::portal_row(c, "acme"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.last_fire_at, Some(2_000));
    assert_eq!(row.entry_fp.as_deref(), Some("entry"));
    assert_eq!((row.failures, row.retry_at), (2, Some(5)));
    assert_eq!(row.set_fp.as_deref(), Some("fp-new"));
    let counts = store.call(state::pending_by_portal).await.unwrap();
    assert_eq!(
        counts.iter().map(|(_, n)| n).sum::<i64>(),
        1,
        "one payload left: {counts:?}"
    );
    assert!(
        store
            .call(state::next_delivery_due)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .call(|c| state::open_journal(c, None))
            .await
            .unwrap()
            .is_empty()
    );
    drop(lock);
    merged_writes(&store).await;
    failed_transactions_leave_nothing(&store).await;
    rows_added_in_batches(&store).await;
}

/// Rows for many new portals at once, with their first plans, in statements of several
/// rows: each added once; one that has a row already is kept as it is (and not reported
/// added), and a plan written to an existing row is the same as one inserted.
async fn rows_added_in_batches(store: &Store) {
    store
        .write(|c| state::record_failure(c, "batch-7", "kept", None, &cause()))
        .await
        .unwrap();
    let names: Vec<String> = (0..450).map(|i| format!("batch-{i}")).collect();
    for round in 0..2 {
        let names = names.clone();
        let added = store
            .write(move |c| {
                let plans: Vec<state::NewPlan<'_>> = names
                    .iter()
                    .map(|n| state::NewPlan {
                        portal: n,
                        entry_fp: Some("entry"),
                        last_fire_at: Some(7),
                        next_due_at: Some(9),
                        reason: Some("new"),
                        watch_retry_at: None,
                    })
                    .collect();
                state::insert_plans(c, &plans)
            })
            .await
            .unwrap();
        assert_eq!(added.len(), if round == 0 { 449 } else { 0 });
        assert!(!added.contains("batch-7"));
    }
    store
        .write(|c| {
            state::record_plan_and_schedule(
                c,
                "batch-x",
                Some("entry"),
                Some(7),
                Some(9),
                Some("new"),
                None,
            )
        })
        .await
        .unwrap();
    let rows = store.call(state::portal_rows).await.unwrap();
    let shape = |r: &state::PortalRow| {
        (
            r.entry_fp.clone(),
            r.last_fire_at,
            r.next_due_at,
            r.next_reason.clone(),
            r.watch_retry_at,
        )
    };
    let updated = rows.iter().find(|r| r.name == "batch-x").unwrap();
    let batch: Vec<_> = rows
        .iter()
        .filter(|r| r.name.starts_with("batch-") && r.name != "batch-x")
        .collect();
    assert_eq!(batch.len(), 450);
    for r in batch.iter().filter(|r| r.name != "batch-7") {
        assert_eq!(shape(r), shape(updated), "{}", r.name);
    }
    let kept = batch.iter().find(|r| r.name == "batch-7").unwrap();
    assert_eq!(
        (kept.failures, kept.last_error.as_deref(), kept.next_due_at),
        (1, Some("kept"), None)
    );
}

/// The statements a rotation merged: the attempt with the set seen, the seal with the
/// pinned account and the schedule, the plan with the schedule, a row with its spool count.
async fn merged_writes(store: &Store) {
    let lock = store
        .lock_portal("beta", Duration::from_secs(1))
        .await
        .unwrap();
    let id = store
        .write(|c| state::begin_rotation(c, "beta", Some("fp-0"), (7, 10), 5_000))
        .await
        .unwrap();
    let row = store
        .call(|c| state::portal_row(c, "beta"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.set_fp.as_deref(), row.unused, row.total),
        (Some("fp-0"), Some(7), Some(10))
    );
    assert!(row.seen_at.is_some() && row.seen_at == row.last_attempt_at);
    let payloads = vec![("file".to_string(), zeroize::Zeroizing::new(b"x".to_vec()))];
    store
        .write(move |c| {
            state::record_schedule(c, "beta", Some("old-entry"), Some(9_000))?;
            let pin = state::Pin {
                account_id: "account-1",
                entry_fp: "entry-1",
                fires_to: 5_000,
            };
            state::seal_pinned(c, id, "beta", "fp-1", 10, 10, &payloads, Some(&pin))
        })
        .await
        .unwrap();
    let seen = store
        .call(|c| state::outlook(c, "beta", true))
        .await
        .unwrap();
    let row = seen.row.unwrap();
    assert_eq!(seen.pending, 1);
    assert_eq!(
        seen.open
            .iter()
            .map(|j| (j.id, j.phase))
            .collect::<Vec<_>>(),
        [(id, state::Phase::Sealed)]
    );
    assert_eq!(
        seen.sink_sets,
        [("file".to_string(), "fp-1".to_string())].into()
    );
    let counted = store
        .call(|c| state::outlook(c, "beta", false))
        .await
        .unwrap();
    assert!(
        counted.sink_sets.is_empty() && counted.open.len() == 1,
        "without the sets, only the open entries"
    );
    assert_eq!(
        (row.set_fp.as_deref(), row.unused, row.total),
        (Some("fp-1"), Some(10), Some(10))
    );
    assert_eq!(row.account_id.as_deref(), Some("account-1"));
    assert_eq!(row.account_entry_fp.as_deref(), Some("entry-1"));
    assert_eq!(row.entry_fp.as_deref(), Some("entry-1"));
    assert_eq!(
        row.last_fire_at,
        Some(9_000),
        "the last fire never moves back"
    );
    store
        .write(|c| {
            state::record_plan_and_schedule(
                c,
                "beta",
                None,
                Some(12_000),
                Some(20_000),
                Some("cron"),
                None,
            )?;
            // A portal without a row yet: added.
            state::record_plan_and_schedule(c, "gamma", Some("e"), None, None, None, Some(3))
        })
        .await
        .unwrap();
    let row = store
        .call(|c| state::outlook(c, "beta", false))
        .await
        .unwrap()
        .row
        .unwrap();
    assert_eq!(
        row.entry_fp.as_deref(),
        Some("entry-1"),
        "kept when none is given"
    );
    assert_eq!(
        (row.last_fire_at, row.next_due_at),
        (Some(12_000), Some(20_000))
    );
    let gamma = store
        .call(|c| state::outlook(c, "gamma", true))
        .await
        .unwrap();
    assert!(gamma.open.is_empty() && gamma.sink_sets.is_empty());
    let (gamma, pending) = (gamma.row.unwrap(), gamma.pending);
    assert_eq!(
        (gamma.entry_fp.as_deref(), gamma.watch_retry_at, pending),
        (Some("e"), Some(3), 0)
    );
    let none = store
        .call(|c| state::outlook(c, "nobody", true))
        .await
        .unwrap();
    assert!(none.row.is_none() && none.pending == 0 && none.open.is_empty());
    drop(lock);
}

/// A transaction whose closure fails, or panics, writes nothing, and the next one starts
/// clean (on PostgreSQL, not inside what the failed one left open).
async fn failed_transactions_leave_nothing(store: &Store) {
    let failed = store
        .write(|c| {
            state::record_failure(c, "delta", "one", None, &cause())?;
            Err::<(), _>(StateError::Db {
                action: "testing",
                detail: "refused on purpose".into(),
            })
        })
        .await;
    assert!(
        matches!(
            failed,
            Err(StateError::Db {
                action: "testing",
                ..
            })
        ),
        "{failed:?}"
    );
    let panicked = store
        .write(|c| -> Result<(), StateError> {
            state::record_failure(c, "delta", "two", None, &cause())?;
            panic!("a bug in a closure");
        })
        .await;
    assert!(panicked.is_err());
    // A deferred write that fails (on PostgreSQL, sent with the COMMIT) fails the
    // transaction, and what ran before it is rolled back with it.
    let deferred = store
        .write(|c| {
            state::record_failure(c, "delta", "five", None, &cause())?;
            c.defer(
                "testing",
                "INSERT INTO history (portal, at, event, detail) VALUES (?1, NULL, 'x', 'y')",
                &["delta".into()],
            )
        })
        .await;
    assert!(
        matches!(
            &deferred,
            Err(StateError::Db {
                action: "testing",
                ..
            } | StateError::Sqlite {
                action: "testing",
                ..
            })
        ),
        "{deferred:?}"
    );
    let among = store
        .call(|c| c.defer("testing", "DELETE FROM history", &[]))
        .await;
    assert!(
        matches!(&among, Err(StateError::Db { detail, .. }) if detail.contains("a write among reads")),
        "{among:?}"
    );
    // Reads are lent the connection without a transaction: a write among them is refused.
    let among_reads = store
        .call(|c| state::record_failure(c, "delta", "four", None, &cause()))
        .await;
    assert!(
        matches!(&among_reads, Err(StateError::Db { detail, .. }) if detail.contains("a write among reads")),
        "{among_reads:?}"
    );
    // A read that panics is an error too; the connections live on (on PostgreSQL, more
    // reads than it has lanes follow).
    let panicked_read = store
        .call(|_| -> Result<(), StateError> { panic!("a bug in a read") })
        .await;
    assert!(panicked_read.is_err());
    // Each of a few transactions after it (the pool hands out its connections again).
    for _ in 0..12 {
        let row = store.call(|c| state::portal_row(c, "delta")).await.unwrap();
        assert!(row.is_none(), "neither failed transaction wrote: {row:?}");
    }
    store
        .write(|c| state::record_failure(c, "delta", "three", None, &cause()))
        .await
        .unwrap();
    let row = store
        .call(|c| state::portal_row(c, "delta"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.failures, row.last_error.as_deref()),
        (1, Some("three"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_state_behaves_the_same_on_sqlite_and_postgres() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let sqlite = Store::open(&h.path("state")).unwrap();
    conformance(sqlite).await;
    let pg = Postgres::start();
    let path = cluster_config(&h, &pg, "");
    let config = tfa_rotator::config::load(&path).unwrap();
    let store = Store::open_configured(&config).unwrap();
    assert!(store.postgres().is_some());
    conformance(store).await;
}

/// Connections the server closed while they waited (a restart, an administrator's
/// `pg_terminate_backend`) cost no failed transaction: each is seen closed and replaced.
#[tokio::test(flavor = "multi_thread")]
async fn connections_closed_by_the_server_are_replaced_without_a_failure() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pg = Postgres::start();
    let path = cluster_config(&h, &pg, "");
    let config = tfa_rotator::config::load(&path).unwrap();
    let store = Store::open_configured(&config).unwrap();
    // Enough reads and writes that every lane has connected.
    for i in 0..24 {
        store
            .write(move |c| state::record_failure(c, "acme", &format!("{i}"), None, &cause()))
            .await
            .unwrap();
        store.call(|c| state::portal_row(c, "acme")).await.unwrap();
    }
    let (admin, admin_conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let admin_task = tokio::spawn(admin_conn);
    let killed: i64 = admin
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND backend_type = 'client backend'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        killed >= 2,
        "the store's connections were there to close: {killed}"
    );
    let gone = async {
        for _ in 0..100 {
            let n: i64 = admin
                .query_one(
                    "SELECT COUNT(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND pid <> pg_backend_pid()
                        AND backend_type = 'client backend'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if n == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(gone.await, "the server closed them");
    for i in 0..24 {
        store
            .write(move |c| state::record_failure(c, "acme", &format!("after {i}"), None, &cause()))
            .await
            .unwrap_or_else(|e| panic!("write {i} after the connections were closed: {e}"));
        store
            .call(|c| state::portal_row(c, "acme"))
            .await
            .unwrap_or_else(|e| panic!("read {i} after the connections were closed: {e}"));
    }
    drop(admin);
    let _ = admin_task.await;
}

/// The fence sits on the intent: a portal held by another instance is busy (naming it);
/// a claim taken over is fenced, and so is a claim that cannot outlive the PUT budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_claim_fences_the_intent() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pg = Postgres::start();
    let path = cluster_config(&h, &pg, "");
    let text = std::fs::read_to_string(&path).unwrap();
    let named = |n: &str| {
        let p = h.path(&format!("{n}.toml"));
        write_private(
            &p,
            &text.replace(
                "lease = \"6s\"",
                &format!("lease = \"6s\"\ninstance = \"{n}\""),
            ),
        );
        tfa_rotator::config::load(&p).unwrap()
    };
    let a = Store::open_configured(&named("node-a")).unwrap();
    let b = Store::open_configured(&named("node-b")).unwrap();
    let held = a.lock_portal("acme", Duration::ZERO).await.unwrap();
    match b.lock_portal("acme", Duration::from_millis(300)).await {
        Err(StateError::Busy { holder, .. }) => assert_eq!(holder, "instance node-a"),
        other => panic!("expected busy, got {:?}", other.map(|_| ())),
    }
    // node-a stalls past its lease: expire it by hand; node-b takes the portal over.
    let client = a.postgres().unwrap().client().await.unwrap();
    client
        .execute(
            "UPDATE portals SET lease_until = clock_timestamp() - interval '1 second' WHERE name = 'acme'",
            &[],
        )
        .await
        .unwrap();
    let taken = b.lock_portal("acme", Duration::ZERO).await.unwrap();
    let stale = a
        .write(|c| state::begin_intent(c, "acme", "rotate", None, 1_000))
        .await;
    assert!(
        matches!(stale, Err(StateError::Fenced { .. })),
        "the old owner writes no intent: {stale:?}"
    );
    // A claim with less than the PUT budget and its grace left licenses no PUT either.
    client
        .execute(
            "UPDATE portals SET lease_until = clock_timestamp() + interval '2 seconds' WHERE name = 'acme'",
            &[],
        )
        .await
        .unwrap();
    let short = b
        .write(|c| state::begin_intent(c, "acme", "rotate", None, 1_000))
        .await;
    assert!(matches!(short, Err(StateError::Fenced { .. })), "{short:?}");
    client
        .execute(
            "UPDATE portals SET lease_until = clock_timestamp() + interval '60 seconds' WHERE name = 'acme'",
            &[],
        )
        .await
        .unwrap();
    let id = b
        .write(|c| state::begin_intent(c, "acme", "rotate", None, 1_000))
        .await
        .unwrap();
    let open = b
        .call(|c| state::open_journal(c, Some("acme")))
        .await
        .unwrap();
    assert_eq!(open[0].id, id);
    let deadline = open[0]
        .put_deadline
        .expect("a cluster intent has a PUT deadline");
    let now = b.now().await.unwrap();
    assert!(
        (now..=now + 2_000).contains(&deadline),
        "deadline = the server's now + http_timeout (2 s): {deadline} vs {now}"
    );
    drop((held, taken));
}

/// Two daemons, one PostgreSQL, 200 portals due at once: every account gets exactly one
/// PUT, every sink holds the set the portal accepts, and both instances did some.
#[tokio::test(flavor = "multi_thread")]
async fn two_daemons_over_200_due_portals_send_one_put_each() {
    let mut h = Harness::new().await;
    for i in 0..200 {
        h.add_portal(&format!("p{i:03}"));
    }
    h.schedule = Some("yearly".into());
    let pg = Postgres::start();
    cluster_config(
        &h,
        &pg,
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\n",
    );
    // Two daemons start together: all 200 portals are new, so due at once for both.
    let started = std::time::Instant::now();
    let (a, b) = (Daemon::start(&h, &[], &[]), Daemon::start(&h, &[], &[]));
    let rotated = |log: &str| log.matches("the portal issued a new set").count();
    assert!(
        crate::support::wait_for(Duration::from_secs(90), || {
            rotated(&a.log()) + rotated(&b.log()) >= 200
        })
        .await,
        "{} + {} rotations",
        rotated(&a.log()),
        rotated(&b.log())
    );
    let took = started.elapsed();
    for (portal, key) in &h.keys {
        assert!(
            crate::support::wait_for(Duration::from_secs(10), || {
                h.plain_sink(&format!("codes/{portal}.txt")).as_deref()
                    == Some(&h.accepted(portal)[..])
            })
            .await,
            "{portal}: the sink holds the accepted set"
        );
        assert_eq!(h.sim.puts_applied(key), 1, "{portal}: exactly one PUT");
    }
    let (ra, rb) = (rotated(&a.log()), rotated(&b.log()));
    eprintln!("two daemons over 200 portals: {ra} + {rb} rotations in {took:?}");
    assert_eq!(ra + rb, 200);
    assert!(ra > 0 && rb > 0, "both instances rotated: {ra} + {rb}");
    // A portal the other instance held was skipped, not failed: no claim error, no
    // failed rotation in either log.
    for log in [a.log(), b.log()] {
        assert!(
            !log.contains("claiming the portal") && !log.contains("rotation failed"),
            "{log}"
        );
    }
    stop_clean([a, b]).await;
    assert_eq!(h.sim.count("PUT"), 200);
    // Again, as two `run --once` at once: nothing is due, nothing is sent.
    let (a, b) = tokio::join!(h.run(&["run", "--once"]), h.run(&["run", "--once"]));
    assert_eq!(a.code, Some(0), "{}", a.all());
    assert_eq!(b.code, Some(0), "{}", b.all());
    assert_eq!(h.sim.count("PUT"), 200, "no second rotation");
}

/// A `rotate` by hand while a daemon of another instance holds the portal waits for it,
/// then sees the rotation done meanwhile and sends no second PUT; `status` names the holder.
#[tokio::test(flavor = "multi_thread")]
async fn rotate_by_hand_waits_for_the_holder_and_sends_no_second_put() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("yearly".into());
    let pg = Postgres::start();
    cluster_config_with(
        &h,
        &pg.url(),
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\n",
        8,
    );
    // The PUT is applied, then answered 5 s later: the daemon holds the portal meanwhile.
    h.sim.inject(tfa_rotator::simulator::Fault::on_put(
        tfa_rotator::simulator::FaultAction::DelayAfterApplyMs(5_000),
    ));
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        crate::support::wait_for(Duration::from_secs(20), || h.sim.count("PUT") == 1).await,
        "{}",
        d.log()
    );
    let status = h.run(&["status"]).await;
    assert!(
        status.stdout.contains("held by instance"),
        "{}",
        status.all()
    );
    assert!(
        status.stdout.contains("INSTANCES (PostgreSQL)"),
        "{}",
        status.all()
    );
    let by_hand = h.run(&["rotate", "acme"]).await;
    assert!(
        by_hand
            .all()
            .contains("rotated meanwhile by another process"),
        "{}",
        by_hand.all()
    );
    assert_eq!(h.sim.puts_applied(&h.keys["acme"]), 1, "no second PUT");
    assert_sink_accepted(&h, "codes/acme.txt", "acme");
    // Each rotation ended its claim with its last write: nobody holds the portal, and the
    // claim's renewal, racing that write, took it for no loss.
    let config = tfa_rotator::config::load(&h.config()).unwrap();
    let store = Store::open_configured(&config).unwrap();
    let client = store.postgres().unwrap().client().await.unwrap();
    let owner: Option<String> = client
        .query_one("SELECT lease_owner FROM portals WHERE name = 'acme'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, None, "{}", d.log());
    assert!(!d.log().contains("the claim was lost"), "{}", d.log());
    stop_clean([d]).await;
}

/// An instance frozen (SIGSTOP) right after its intent for longer than its lease sends no
/// PUT when it wakes: the other instance took the portal over, waited the PUT deadline
/// out, settled the intent as not applied and rotated once.
// Needs the crash points of the `failpoints` feature.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_instance_sends_no_put_after_its_deadline() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("yearly".into());
    let pg = Postgres::start();
    cluster_config(
        &h,
        &pg,
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\nsettle_window = \"1s\"\n",
    );
    // The failpoint holds the first instance right after its intent, long enough for the
    // test to freeze it there.
    let a = Daemon::start(
        &h,
        &[],
        &[("FAILPOINTS", "rotation::after_intent=sleep(2000)")],
    );
    assert!(a.wait_log("intent recorded").await, "{}", a.log());
    let pid = a.child.id().unwrap().to_string();
    crate::support::tool("kill", "procps")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let b = Daemon::start(&h, &[], &[]);
    // b waits for the lease (6 s), then the deadline and its grace, then settles and
    // rotates once.
    assert!(
        crate::support::wait_for(Duration::from_secs(60), || h.sim.count("PUT") == 1).await,
        "{}",
        b.log()
    );
    assert!(
        crate::support::wait_for(Duration::from_secs(20), || {
            h.plain_sink("codes/acme.txt").as_deref() == Some(&h.accepted("acme")[..])
        })
        .await,
        "{}",
        b.log()
    );
    crate::support::tool("kill", "procps")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert!(
        a.wait_log("no PUT was sent").await,
        "the woken instance sends no PUT: {}",
        a.log()
    );
    assert_eq!(h.sim.count("PUT"), 1, "one PUT in all");
    assert_sink_accepted(&h, "codes/acme.txt", "acme");
    stop_clean([a, b]).await;
}

/// `migrate-state --to postgres` copies a SQLite state: the rotation history, the
/// fingerprint key (no drift afterwards) and the id sequences (new rows do not collide).
#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_state_moves_to_postgres() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let pg = Postgres::start();
    cluster_config(&h, &pg, "");
    let out = h.run(&["migrate-state", "--to", "postgres"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("journal: 1 row(s)"), "{}", out.all());
    // The records and the heads are copied unchanged: the chain verifies on PostgreSQL.
    let moved = h.run(&["history", "--json"]).await;
    assert_eq!(moved.code, Some(0), "{}", moved.all());
    assert_eq!(moved.stdout.lines().count(), 2, "{}", moved.stdout);
    let verified = h.run(&["history", "--verify"]).await;
    assert_eq!(verified.code, Some(0), "{}", verified.all());
    let again = h.run(&["migrate-state", "--to", "postgres"]).await;
    assert_eq!(again.code, Some(1), "{}", again.all());
    assert!(
        again.all().contains("empty database only"),
        "{}",
        again.all()
    );
    let status = h.run(&["status", "--json"]).await;
    let doc: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert!(
        json_ms(&doc["portals"][0]["last_success_at"]).is_some(),
        "{}",
        status.stdout
    );
    // The same key: the set the sink holds matches, so a resend finds nothing to change,
    // and a new rotation writes new journal and spool rows past the copied ids.
    let out = h.run(&["rotate", "--force", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_eq!(h.sim.puts_applied(&h.keys["acme"]), 2);
    assert_sink_accepted(&h, "codes/acme.txt", "acme");
    // The chain goes on from the copied head.
    let after = h.run(&["history", "--json"]).await;
    assert!(after.stdout.starts_with(&moved.stdout), "{}", after.stdout);
    assert_eq!(after.stdout.lines().count(), 4);
    assert_eq!(h.run(&["history", "--verify"]).await.code, Some(0));
}

/// The audit record on PostgreSQL (SPEC §6): chained by the same statements, so a change,
/// a removal (middle or newest) or an insertion made in the database is found by
/// `--verify`, and the tool's own pruning leaves it verifiable.
#[tokio::test(flavor = "multi_thread")]
async fn the_history_on_postgres_is_chained_and_tampering_is_found() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pg = Postgres::start();
    cluster_config(&h, &pg, "");
    for _ in 0..3 {
        let out = h.run(&["rotate", "--force", "acme"]).await;
        assert_eq!(out.code, Some(0), "{}", out.all());
    }
    let verify = || async { h.run(&["history", "--verify"]).await };
    let out = verify().await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("6 record(s)"), "{}", out.stdout);
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let rows: Vec<(i64, String)> = client
        .query(
            "SELECT id, uuid FROM history WHERE portal = 'acme' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 6);
    let names = |out: &crate::support::Output, uuid: &str| {
        assert_eq!(out.code, Some(1), "{}", out.all());
        assert!(
            out.stderr.contains(&format!("record {uuid} at ")),
            "{uuid}: {}",
            out.stderr
        );
    };
    let backup = "CREATE TABLE saved AS SELECT * FROM history; CREATE TABLE saved_heads AS SELECT name, history_head, history_prev FROM portals";
    let restore = "DELETE FROM history; INSERT INTO history SELECT * FROM saved;                    UPDATE portals p SET history_head = s.history_head, history_prev = s.history_prev FROM saved_heads s WHERE s.name = p.name";
    client.batch_execute(backup).await.unwrap();
    // A changed field.
    client
        .execute(
            r#"UPDATE history SET record = replace(record, '"outcome":"ok"', '"outcome":"failed"') WHERE id = $1"#,
            &[&rows[2].0],
        )
        .await
        .unwrap();
    names(&verify().await, &rows[2].1);
    client.batch_execute(restore).await.unwrap();
    assert_eq!(verify().await.code, Some(0));
    // A removed middle record: the one after the gap is named.
    client
        .execute("DELETE FROM history WHERE id = $1", &[&rows[3].0])
        .await
        .unwrap();
    names(&verify().await, &rows[4].1);
    client.batch_execute(restore).await.unwrap();
    // The removed newest record: the head no longer matches.
    client
        .execute("DELETE FROM history WHERE id = $1", &[&rows[5].0])
        .await
        .unwrap();
    names(&verify().await, &rows[4].1);
    client.batch_execute(restore).await.unwrap();
    // An inserted record, chained after the newest: only the head knows.
    client
        .execute(
            "INSERT INTO history (portal, at, event, uuid, record, prev, hash)
             SELECT portal, at + 1, event, '22222222-0000-4000-8000-000000000000', record, hash, sha256hex(hash || record)
               FROM history WHERE id = $1",
            &[&rows[5].0],
        )
        .await
        .unwrap();
    names(&verify().await, "22222222-0000-4000-8000-000000000000");
    client.batch_execute(restore).await.unwrap();
    assert_eq!(verify().await.code, Some(0));
    // The tool's own pruning: a checkpoint, and the chain still verifies.
    edit_config(&h, |t| {
        t.replace(
            "http_timeout = \"2s\"",
            "http_timeout = \"2s\"\nhistory_keep = \"1ms\"",
        )
    });
    let out = h.run(&["run", "--once"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let n: i64 = client
        .query_one(
            "SELECT COUNT(*) FROM history WHERE event = 'checkpoint'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let out = verify().await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    drop(client);
    let _ = conn.await;
}

/// The cluster's config rules: a lease too short for two PUT budgets with their grace,
/// and a file sink not marked shared, are errors naming their keys.
#[tokio::test]
async fn the_cluster_rules_are_config_errors() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    write_private(&h.path("pg.url"), "host=/nonexistent\n");
    let text = format!(
        "[daemon]\nhttp_timeout = \"30s\"\n\n[storage]\ntype = \"postgres\"\nurl = {{ file = \"pg.url\" }}\nlease = \"60s\"\n\n\
         [sinks.plain]\ntype = \"file\"\npath = \"codes/{{portal}}.txt\"\n\n{}",
        h.portals_toml(&["plain"])
    );
    write_private(&h.config(), &text);
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(out.stderr.contains("storage.lease"), "{}", out.stderr);
    assert!(out.stderr.contains("at least 1m 20s"), "{}", out.stderr);
    assert!(out.stderr.contains("sinks.plain.shared"), "{}", out.stderr);
    // Valid: `check` prints the PUT budget the lease must outlive.
    let fixed = text
        .replace("lease = \"60s\"", "lease = \"80s\"")
        .replace("{portal}.txt\"\n", "{portal}.txt\"\nshared = true\n");
    write_private(&h.config(), &fixed);
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout
            .contains("PUT budget 30s (daemon.http_timeout) + grace 10s"),
        "{}",
        out.stdout
    );
}

/// One daemon is killed at each step of a rotation while another runs: the other takes the
/// portal over once the lease lapses and finishes it. Exactly one PUT for the one due
/// rotation, and the sink holds the set the portal accepts.
// Needs the crash points of the `failpoints` feature.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn killing_a_daemon_at_every_step_loses_nothing_and_puts_once() {
    let pg = Postgres::start();
    let steps = [
        "rotation::after_intent",
        "rotation::after_put",
        "rotation::after_seal",
        "rotation::mid_delivery",
        "rotation::before_done",
    ];
    let runs = steps.iter().enumerate().map(|(i, point)| {
        let pg = &pg;
        async move {
            let url = pg.database(&format!("kill{i}")).await;
            let mut h = Harness::new().await;
            h.add_portal("acme");
            h.schedule = Some("yearly".into());
            cluster_config_with(
                &h,
                &url,
                "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\nsettle_window = \"1s\"\n",
                2,
            );
            let a = Daemon::start(&h, &[], &[("TFA_ROTATOR_ABORT_AT", point)]);
            assert!(a.wait_log("due: new portal").await, "{point}: {}", a.log());
            // The other instance starts while the first holds the portal.
            let b = Daemon::start(&h, &[], &[]);
            let mut a = a;
            let status = tokio::time::timeout(Duration::from_secs(20), a.child.wait())
                .await
                .expect("killed at the failpoint")
                .unwrap();
            assert_eq!(status.code(), None, "{point}: killed: {}", a.log());
            // Done when the state says so: nothing pending, nothing open (status exits 0),
            // the last success recorded.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                let out = h.run(&["status", "--json"]).await;
                let doc: serde_json::Value =
                    serde_json::from_str(&out.stdout).unwrap_or_default();
                if out.code == Some(0) && json_ms(&doc["portals"][0]["last_success_at"]).is_some() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{point}: not finished: {}\nb: {}",
                    out.stdout,
                    b.log()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            assert_eq!(
                h.plain_sink("codes/acme.txt").as_deref(),
                Some(&h.accepted("acme")[..]),
                "{point}"
            );
            let (code, _, log) = b.term().await;
            assert_eq!(code, Some(0), "{point}: {log}");
            assert_eq!(h.sim.count("PUT"), 1, "{point}: one PUT in all");
            assert_eq!(h.sim.puts_applied(&h.keys["acme"]), 1, "{point}");
            let out = h.run(&["status", "--json"]).await;
            let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            assert!(
                doc["portals"][0]["pending_deliveries"]
                    .as_array()
                    .is_some_and(|a| a.is_empty()),
                "{point}: nothing pending: {}",
                out.stdout
            );
        }
    });
    futures::future::join_all(runs).await;
}

/// The portal holds a PUT past the lease of the instance that sent it and applies it then;
/// that instance dies meanwhile. The other takes the portal over, its settle GETs find the
/// late set and seal it: no second PUT, and the sink holds that set.
#[tokio::test(flavor = "multi_thread")]
async fn a_put_applied_after_the_lease_is_sealed_by_the_other_instance() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("yearly".into());
    let pg = Postgres::start();
    cluster_config(
        &h,
        &pg,
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\nsettle_window = \"60s\"\n",
    );
    h.sim.inject(tfa_rotator::simulator::Fault::on_put(
        // Past the 6 s lease of the instance that sent it.
        tfa_rotator::simulator::FaultAction::ApplyAfterMs(8_000),
    ));
    let before = h.accepted("acme");
    let mut a = Daemon::start(&h, &[], &[]);
    assert!(a.wait_log("rotation not settled").await, "{}", a.log());
    a.child.kill().await.unwrap();
    let b = Daemon::start(&h, &[], &[]);
    assert!(
        crate::support::wait_for(Duration::from_secs(90), || {
            h.plain_sink("codes/acme.txt")
                .is_some_and(|s| s == h.accepted("acme") && s != before)
        })
        .await,
        "b: {}",
        b.log()
    );
    assert!(
        b.log()
            .contains("the portal holds a new set, so the rotation happened"),
        "{}",
        b.log()
    );
    // One change applied in all: a second PUT from b would have been applied at once.
    assert_eq!(h.sim.rotations(), 1, "no second PUT");
    assert_eq!(h.sim.puts_applied(&h.keys["acme"]), 1);
    let (code, _, log) = b.term().await;
    assert_eq!(code, Some(0), "{log}");
}

/// A rolling config change: the instance that gets the new config first rotates for the
/// changed entry once; the one still on the old config does not rotate back (it says so),
/// and once it runs the new config it finds nothing to do. Two PUTs in all.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_config_change_does_not_ping_pong() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("yearly".into());
    std::fs::create_dir(h.path("codes2")).unwrap();
    let pg = Postgres::start();
    let old = std::fs::read_to_string(cluster_config(
        &h,
        &pg,
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"1s\"\n\n\
         [sinks.plain2]\ntype = \"file\"\npath = \"codes2/{portal}.txt\"\nshared = true\n",
    ))
    .unwrap();
    let new = old.replace("sinks = [\"plain\"]", "sinks = [\"plain\", \"plain2\"]");
    assert_ne!(old, new);
    let (ca, cb) = (h.path("a.toml"), h.path("b.toml"));
    write_private(&ca, &old);
    write_private(&cb, &old);
    let a = Daemon::start_with(&h, &ca, &[], &[]);
    assert!(
        crate::support::wait_for(Duration::from_secs(20), || h.sim.count("PUT") == 1).await,
        "{}",
        a.log()
    );
    let b = Daemon::start_with(&h, &cb, &[], &[]);
    assert!(b.wait_log("ready").await, "{}", b.log());
    // a gets the new config: it rotates once for the changed entry.
    write_private(&ca, &new);
    assert!(
        crate::support::wait_for(Duration::from_secs(20), || h.sim.count("PUT") == 2).await,
        "{}",
        a.log()
    );
    // b, still on the old config, watches the portal every second (and so re-reads its
    // row, which a changed): it neither rotates nor adopts, and says why.
    older_does_not_rotate_back(&h, &b, 2).await;
    // b queued one notice for [alerts] saying so.
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let notices: i64 = client
        .query_one("SELECT COUNT(*) FROM notices WHERE kind = 'config'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(notices, 1, "one notice of the older configuration");
    drop(client);
    let _ = task.await;
    // b gets the new config too: nothing changed for it any more.
    write_private(&cb, &new);
    assert!(b.wait_log("configuration reloaded").await, "{}", b.log());
    assert!(
        b.wait_log("this instance runs the newest configuration again")
            .await,
        "{}",
        b.log()
    );
    three_watch_reads(&b).await;
    assert_eq!(
        h.sim.count("PUT"),
        2,
        "no ping-pong: {}\n{}",
        a.log(),
        b.log()
    );
    assert_sink_accepted(&h, "codes2/acme.txt", "acme");
    stop_clean([a, b]).await;
}

/// The config generation digest covers the included files: two instances whose config
/// files are the same and whose included files differ run different generations. When only
/// an included file changes on one, it rotates for the changed entry and the other (older)
/// one stops following changes, says why, and does not rotate back.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_of_an_included_file_alone_is_a_new_config_generation() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("yearly".into());
    std::fs::create_dir(h.path("codes2")).unwrap();
    let pg = Postgres::start();
    let text = std::fs::read_to_string(cluster_config(
        &h,
        &pg,
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"1s\"\n\n\
         [sinks.plain2]\ntype = \"file\"\npath = \"codes2/{portal}.txt\"\nshared = true\n",
    ))
    .unwrap();
    // Every path absolute, so that a/ and b/ mean the same files.
    let root = h.path("").display().to_string();
    let text = text
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{root}state\""),
        )
        .replace("\"pg.url\"", &format!("\"{root}pg.url\""))
        .replace("\"codes", &format!("\"{root}codes"))
        .replace("\"keys/", &format!("\"{root}keys/"));
    let at = text.find("[portals.acme]").unwrap();
    let (main, portal) = text.split_at(at);
    let main = format!("include = [\"portals.d/*.toml\"]\n{main}");
    for d in ["a", "b"] {
        std::fs::create_dir_all(h.path(&format!("{d}/portals.d"))).unwrap();
        write_private(&h.path(&format!("{d}/config.toml")), &main);
        write_private(&h.path(&format!("{d}/portals.d/acme.toml")), portal);
    }
    let a = Daemon::start_with(&h, &h.path("a/config.toml"), &[], &[]);
    assert!(
        crate::support::wait_for(Duration::from_secs(20), || h.sim.count("PUT") == 1).await,
        "{}",
        a.log()
    );
    let b = Daemon::start_with(&h, &h.path("b/config.toml"), &[], &[]);
    assert!(b.wait_log("ready").await, "{}", b.log());
    // Only a's included file changes: a reloads it and rotates once for the changed entry.
    write_private(
        &h.path("a/portals.d/acme.toml"),
        &portal.replace("sinks = [\"plain\"]", "sinks = [\"plain\", \"plain2\"]"),
    );
    assert!(a.wait_log("configuration reloaded").await, "{}", a.log());
    assert!(
        crate::support::wait_for(Duration::from_secs(20), || h.sim.count("PUT") == 2).await,
        "{}",
        a.log()
    );
    older_does_not_rotate_back(&h, &b, 2).await;
    assert_sink_accepted(&h, "codes2/acme.txt", "acme");
    stop_clean([a, b]).await;
}

/// Over TCP the connection is TLS (rustls), verified against `[storage] ca_file`: with the
/// test CA it connects and the server reports an encrypted session; without it the
/// certificate is refused and nothing is written.
#[tokio::test(flavor = "multi_thread")]
async fn tls_to_postgres_is_verified_against_the_ca_file() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pg = Postgres::start_with(true);
    let path = cluster_config_with(&h, &pg.tls_url(), "", 2);
    let text = std::fs::read_to_string(&path).unwrap();
    // The CA is copied beside the config: the server's directory belongs to `postgres`, and
    // a file the config names must pass the trust rule (SPEC §3).
    let ca = path.with_file_name("ca.pem");
    std::fs::copy(pg.path().join("ca.pem"), &ca).unwrap();
    let with_ca = text.replace(
        "lease = \"6s\"",
        &format!("lease = \"6s\"\nca_file = \"{}\"", ca.display()),
    );
    write_private(&path, &with_ca);
    let config = tfa_rotator::config::load(&path).unwrap();
    let store = Store::open_configured(&config).unwrap();
    let client = store.postgres().unwrap().client().await.unwrap();
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the session is encrypted");
    drop(client);
    conformance(store).await;
    // `check` connects for real: with the CA it passes.
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // Without the CA the server's certificate is not trusted, by `status` and `check` alike.
    write_private(&path, &text);
    for args in [&["status"][..], &["check"]] {
        let out = h.run(args).await;
        assert_eq!(out.code, Some(1), "{args:?}: {}", out.all());
        assert!(
            out.stderr.to_lowercase().contains("certificate"),
            "{args:?}: {}",
            out.stderr
        );
    }
}

/// SPEC §2: `check` connects to the `[storage]` database (authentication included): a role
/// the server refuses fails it, instead of the first rotation.
#[tokio::test(flavor = "multi_thread")]
async fn check_connects_to_postgres_and_fails_on_a_refused_login() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pg = Postgres::start();
    let url = pg.database("tfa_check").await;
    cluster_config_with(&h, &url, "", 2);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    cluster_config_with(&h, &url.replace("user=postgres", "user=nosuchrole"), "", 2);
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("error: storage:") && out.stderr.contains("nosuchrole"),
        "{}",
        out.stderr
    );
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(
        out.code,
        Some(0),
        "offline makes no connection: {}",
        out.all()
    );
}

/// A table's shape, for comparing the two backends: columns with a type family, the
/// primary key, and each index's columns (and whether it is unique or partial).
#[derive(Debug, Default, PartialEq, Eq)]
struct Shape {
    columns: std::collections::BTreeMap<String, &'static str>,
    primary_key: Vec<String>,
    indexes: std::collections::BTreeMap<String, String>,
}

/// An index as both backends are compared on: unique or not, its columns, partial or not.
fn index_text(unique: bool, cols: &[String], partial: bool) -> String {
    format!(
        "{}({}){}",
        if unique { "unique " } else { "" },
        cols.join(", "),
        if partial { " partial" } else { "" }
    )
}

/// SQLite's and PostgreSQL's names of a column type, as one family.
fn type_family(t: &str) -> &'static str {
    match t.to_ascii_lowercase().as_str() {
        "integer" | "bigint" | "bigserial" | "int" => "integer",
        "text" | "character varying" => "text",
        "blob" | "bytea" => "bytes",
        "timestamp with time zone" => "timestamp",
        "boolean" => "boolean",
        other => panic!("a column type neither backend should use: {other}"),
    }
}

fn sqlite_shapes(path: &std::path::Path) -> std::collections::BTreeMap<String, Shape> {
    let c = rusqlite::Connection::open(path).unwrap();
    let mut out = std::collections::BTreeMap::new();
    for table in tfa_rotator::state::migrate::sqlite_tables(&c).unwrap() {
        let mut shape = Shape::default();
        let mut st = c
            .prepare("SELECT name, type, pk FROM pragma_table_info(?1) ORDER BY pk, cid")
            .unwrap();
        let cols = st
            .query_map([&table], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .unwrap();
        for col in cols {
            let (name, ty, pk) = col.unwrap();
            if pk > 0 {
                shape.primary_key.push(name.clone());
            }
            shape.columns.insert(name, type_family(&ty));
        }
        let mut st = c
            .prepare(
                "SELECT name, \"unique\", partial FROM pragma_index_list(?1) WHERE origin = 'c'",
            )
            .unwrap();
        let idx: Vec<(String, bool, bool)> = st
            .query_map([&table], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        for (name, unique, partial) in idx {
            let mut st = c
                .prepare("SELECT name FROM pragma_index_info(?1) ORDER BY seqno")
                .unwrap();
            let cols: Vec<String> = st
                .query_map([&name], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            shape
                .indexes
                .insert(name, index_text(unique, &cols, partial));
        }
        out.insert(table, shape);
    }
    out
}

async fn postgres_shapes(url: &str) -> std::collections::BTreeMap<String, Shape> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let mut out = std::collections::BTreeMap::new();
    let tables = client
        .query(
            "SELECT table_name::TEXT FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .unwrap();
    for t in tables {
        let table: String = t.get(0);
        let mut shape = Shape::default();
        for r in client
            .query(
                "SELECT column_name::TEXT, data_type::TEXT FROM information_schema.columns
                  WHERE table_schema = 'public' AND table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
        {
            shape
                .columns
                .insert(r.get(0), type_family(&r.get::<_, String>(1)));
        }
        shape.primary_key = client
            .query(
                "SELECT a.attname::TEXT FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                  WHERE i.indrelid = $1::TEXT::regclass AND i.indisprimary
                  ORDER BY array_position(i.indkey::INT2[], a.attnum)",
                &[&table],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        for r in client
            .query(
                "SELECT c.relname::TEXT, i.indisunique, i.indpred IS NOT NULL,
                        array(SELECT a.attname::TEXT FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
                               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n
                              ORDER BY k.o)
                   FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
                  WHERE i.indrelid = $1::TEXT::regclass AND NOT i.indisprimary
                    AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)",
                &[&table],
            )
            .await
            .unwrap()
        {
            let (name, unique, partial, cols): (String, bool, bool, Vec<String>) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            shape
                .indexes
                .insert(name, index_text(unique, &cols, partial));
        }
        out.insert(table, shape);
    }
    drop(client);
    let _ = task.await;
    out
}

/// One schema on two backends: after their migrations, SQLite and PostgreSQL have the
/// same tables, columns (by name and type family), primary keys and indexes, but for what
/// only a cluster has (named here, with why); and `migrate-state` copies every table of
/// the SQLite schema, every column (read from the schema itself).
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_and_postgres_have_one_schema_and_migrate_state_copies_all_of_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    drop(Store::open(dir.path()).unwrap());
    let sqlite = sqlite_shapes(&dir.path().join("state.sqlite"));
    let pg = Postgres::start();
    let h = Harness::new().await;
    let path = cluster_config(&h, &pg, "");
    drop(Store::open_configured(&tfa_rotator::config::load(&path).unwrap()).unwrap());
    let mut postgres = postgres_shapes(&pg.url()).await;
    // Only a cluster has these: its instances, its config generations (SQLite keeps its
    // schema version in `PRAGMA user_version`), and the claims on each portal.
    for t in ["nodes", "config_generations", "schema_version"] {
        assert!(postgres.remove(t).is_some(), "{t}");
    }
    let portals = postgres.get_mut("portals").unwrap();
    for c in ["lease_owner", "lease_epoch", "lease_until"] {
        assert!(portals.columns.remove(c).is_some(), "portals.{c}");
    }
    let sqlite_names: Vec<&String> = sqlite.keys().collect();
    let postgres_names: Vec<&String> = postgres.keys().collect();
    assert_eq!(sqlite_names, postgres_names, "the same tables");
    for (table, shape) in &sqlite {
        assert_eq!(shape, &postgres[table], "table {table}");
    }
    let mut copied: Vec<&str> = tfa_rotator::state::migrate::TABLES.to_vec();
    copied.sort_unstable();
    assert_eq!(
        sqlite_names, copied,
        "migrate-state copies every table of the schema"
    );
}

/// Who the records these tests write are for.
fn cause() -> state::history::Cause {
    state::history::Cause {
        trigger: None,
        by: "user:test(0)".into(),
    }
}
