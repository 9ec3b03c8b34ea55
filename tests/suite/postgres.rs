//! The scale-out coordinator's SQL against a real PostgreSQL: claims never overlap, a
//! stale epoch changes nothing, the intent is fenced by the live claim and the PUT budget,
//! one open intent per portal, seals are never thrown away, and a new owner waits out the
//! old intent's PUT deadline. Only the server's clock is read.

use std::collections::BTreeSet;
use std::time::Duration;

use tfa_rotator::state::pg::{Claim, Coordinator};

use crate::support::postgres::Postgres;

const LEASE: Duration = Duration::from_secs(60);
const BUDGET: Duration = Duration::from_secs(10);
const GRACE: Duration = Duration::from_secs(2);

async fn two(pg: &Postgres) -> (Coordinator, Coordinator) {
    (
        Coordinator::connect(&pg.url(), "node-a", 4).await.unwrap(),
        Coordinator::connect(&pg.url(), "node-b", 4).await.unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_claims_over_200_due_portals_never_overlap() {
    let pg = Postgres::start();
    let (a, b) = two(&pg).await;
    for i in 0..200 {
        a.upsert_portal(&format!("p{i:03}"), Duration::ZERO)
            .await
            .unwrap();
    }
    // Both claim at once, in small batches, until nothing is left.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let claim_all = |c: Coordinator| {
        let start = start.clone();
        async move {
            start.wait().await;
            let mut got = Vec::new();
            loop {
                let batch = c.claim_due(LEASE, 7).await.unwrap();
                if batch.is_empty() {
                    break got;
                }
                got.extend(batch);
            }
        }
    };
    let (ga, gb) = tokio::join!(
        tokio::spawn(claim_all(a.clone())),
        tokio::spawn(claim_all(b.clone()))
    );
    let (ga, gb) = (ga.unwrap(), gb.unwrap());
    let sa: BTreeSet<String> = ga.iter().map(|c| c.portal.clone()).collect();
    let sb: BTreeSet<String> = gb.iter().map(|c| c.portal.clone()).collect();
    assert_eq!(sa.len(), ga.len(), "no portal twice for one node");
    assert!(
        sa.is_disjoint(&sb),
        "no portal claimed by both: {:?}",
        sa.intersection(&sb).collect::<Vec<_>>()
    );
    assert_eq!(sa.len() + sb.len(), 200, "every due portal claimed once");
    eprintln!("claims: node-a {}, node-b {}", sa.len(), sb.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_epoch_renews_releases_and_writes_nothing() {
    let pg = Postgres::start();
    let (a, b) = two(&pg).await;
    a.upsert_portal("acme", Duration::ZERO).await.unwrap();
    let old = a.claim_due(Duration::from_millis(300), 10).await.unwrap();
    assert_eq!(old.len(), 1);
    let old = old[0].clone();
    assert!(
        b.claim_due(LEASE, 10).await.unwrap().is_empty(),
        "a live lease is not taken"
    );
    // a stalls past its lease; b takes the portal over with a new epoch.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let new = b.claim_due(LEASE, 10).await.unwrap();
    assert_eq!(
        new,
        vec![Claim {
            portal: "acme".into(),
            epoch: old.epoch + 1
        }]
    );
    assert!(
        !a.renew(&old, LEASE).await.unwrap(),
        "renewal after a takeover: 0 rows"
    );
    assert!(
        a.fenced_intent(&old, BUDGET, GRACE)
            .await
            .unwrap()
            .is_none(),
        "stale epoch: no intent"
    );
    assert!(
        !a.release(&old, LEASE).await.unwrap(),
        "release after a takeover: 0 rows"
    );
    assert!(
        b.renew(&new[0], LEASE).await.unwrap(),
        "the new owner's claim stands"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_intent_needs_the_claim_live_for_the_whole_put_budget() {
    let pg = Postgres::start();
    let (a, _) = two(&pg).await;
    a.upsert_portal("acme", Duration::ZERO).await.unwrap();
    // A lease shorter than budget + grace cannot license a PUT.
    let short = a
        .claim_due(Duration::from_secs(5), 1)
        .await
        .unwrap()
        .remove(0);
    assert!(
        a.fenced_intent(&short, BUDGET, GRACE)
            .await
            .unwrap()
            .is_none()
    );
    assert!(a.renew(&short, LEASE).await.unwrap());
    let before = a.server_now_ms().await.unwrap();
    let intent = a
        .fenced_intent(&short, BUDGET, GRACE)
        .await
        .unwrap()
        .expect("licensed");
    let after = a.server_now_ms().await.unwrap();
    let budget = BUDGET.as_millis() as i64;
    assert!(
        (before + budget..=after + budget).contains(&intent.put_deadline_ms),
        "put_deadline is the server's now + budget"
    );
    // One open intent per portal, whatever the epoch.
    let err = a.fenced_intent(&short, BUDGET, GRACE).await.unwrap_err();
    assert!(
        err.is_unique_violation() && err.to_string().contains("one_open_intent"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_seal_is_kept_and_marked_fenced_and_the_new_owner_waits_the_deadline_out() {
    let pg = Postgres::start();
    let (a, b) = two(&pg).await;
    a.upsert_portal("acme", Duration::ZERO).await.unwrap();
    let lease = BUDGET + GRACE + Duration::from_millis(500);
    let old = a.claim_due(lease, 1).await.unwrap().remove(0);
    let short_budget = Duration::from_millis(300);
    let intent = a
        .fenced_intent(&old, short_budget, Duration::from_millis(100))
        .await
        .unwrap()
        .expect("licensed");
    // The lease lapses with the intent open (a stalled PUT); b takes over.
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    let new = b.claim_due(LEASE, 1).await.unwrap().remove(0);
    assert_eq!(new.epoch, old.epoch + 1);
    // The deadline has passed (300 ms + 100 ms grace, long ago): b may settle it.
    let open = b
        .settleable(&new, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(open, vec![intent.clone()]);
    // Not before its deadline plus the grace: with a grace longer than the time since.
    let none = b.settleable(&new, Duration::from_secs(3600)).await.unwrap();
    assert!(
        none.is_empty(),
        "an intent within its deadline is not settled"
    );
    // a's PUT answered late: its set is sealed anyway, marked fenced.
    assert!(
        a.seal(&intent, "fp-late").await.unwrap(),
        "sealed under a moved epoch: fenced"
    );
    assert!(
        b.settleable(&new, Duration::ZERO).await.unwrap().is_empty(),
        "sealed, no longer open"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_seal_under_the_live_claim_is_not_fenced() {
    let pg = Postgres::start();
    let (a, _) = two(&pg).await;
    a.upsert_portal("acme", Duration::ZERO).await.unwrap();
    let c = a.claim_due(LEASE, 1).await.unwrap().remove(0);
    let i = a.fenced_intent(&c, BUDGET, GRACE).await.unwrap().unwrap();
    assert!(!a.seal(&i, "fp").await.unwrap());
    assert!(a.release(&c, Duration::from_secs(3600)).await.unwrap());
    assert!(
        a.claim_due(LEASE, 1).await.unwrap().is_empty(),
        "not due again before its time"
    );
}
