//! Groundwork for several instances on one PostgreSQL: the coordinator's claims and the
//! fenced journal (design note `scale-out.md`), against a real server. Not wired into the
//! rotation or the daemon yet: `[storage] type = "postgres"` does not exist until it is.
//!
//! The protocol, every time the server's `clock_timestamp()`:
//! - **claim**: due portals whose lease is free or expired are taken with `FOR UPDATE SKIP
//!   LOCKED`, so concurrent claimers never take the same row; each claim bumps the portal's
//!   epoch, the fencing token.
//! - **renew** and **release** only match the owner's own epoch: after a takeover they change
//!   nothing and say so.
//! - **fenced intent**: written only while the claim is live for the whole PUT budget and a
//!   grace (`lease_until > now + budget + grace`), with `put_deadline = now + budget`; one
//!   open intent per portal (a partial unique index).
//! - **seal**: always stored, marked `fenced` when the claim's epoch moved on meanwhile.
//! - **recovery**: another owner's open intent is settled only once its `put_deadline` plus
//!   the grace has passed, so a stalled PUT can no longer land after the GET that settles it.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

/// A PostgreSQL error, with what was being done and what the server said.
#[derive(Debug, thiserror::Error)]
#[error("PostgreSQL: {what}: {detail}")]
pub struct PgError {
    what: &'static str,
    detail: String,
}

impl PgError {
    /// The SQLSTATE the server answered, if it answered.
    pub fn is_unique_violation(&self) -> bool {
        self.detail.starts_with("23505")
    }
}

fn pg(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError {
    move |e| PgError {
        what,
        // tokio-postgres says only "db error" for an error the server sent: its code and
        // message are what matter.
        detail: match e.as_db_error() {
            Some(db) => format!("{} {}", db.code().code(), db.message()),
            None => crate::errors::chain(&e),
        },
    }
}

/// A portal this instance holds: the fencing token is `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Portal.
    pub portal: String,
    /// The epoch the claim made.
    pub epoch: i64,
}

/// An open intent written under a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    /// Journal row.
    pub id: i64,
    /// Portal.
    pub portal: String,
    /// The epoch it was written under.
    pub epoch: i64,
    /// Server time (Unix ms) after which no PUT may be sent for it.
    pub put_deadline_ms: i64,
}

/// The coordinator: claims, heartbeats and the fenced journal on one PostgreSQL database.
#[derive(Clone)]
pub struct Coordinator {
    pool: Pool,
    /// This instance's name in `lease_owner`.
    pub me: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS portals (
    name        TEXT PRIMARY KEY,
    next_due_at TIMESTAMPTZ,
    lease_owner TEXT,
    lease_epoch BIGINT NOT NULL DEFAULT 0,
    lease_until TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS journal (
    id           BIGSERIAL PRIMARY KEY,
    portal       TEXT NOT NULL REFERENCES portals(name),
    epoch        BIGINT NOT NULL,
    phase        TEXT NOT NULL CHECK (phase IN ('intent', 'sealed', 'done', 'not_applied')),
    started_at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    put_deadline TIMESTAMPTZ NOT NULL,
    set_fp       TEXT,
    sealed_epoch BIGINT,
    fenced       BOOLEAN
);
CREATE UNIQUE INDEX IF NOT EXISTS one_open_intent ON journal (portal) WHERE phase = 'intent';
";

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Coordinator {
    /// Connects (a pool of `size`) to `url` (a libpq connection string) as `me`, and
    /// creates the tables.
    pub async fn connect(url: &str, me: &str, size: usize) -> Result<Self, PgError> {
        let config: tokio_postgres::Config = url.parse().map_err(pg("parsing the URL"))?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(size)
            .build()
            .map_err(|e| PgError {
                what: "building the pool",
                detail: e.to_string(),
            })?;
        let c = Self {
            pool,
            me: me.to_string(),
        };
        c.client()
            .await?
            .batch_execute(SCHEMA)
            .await
            .map_err(pg("creating the tables"))?;
        Ok(c)
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, PgError> {
        self.pool.get().await.map_err(|e| PgError {
            what: "connecting",
            detail: crate::errors::chain(&e),
        })
    }

    /// Makes `portal` known, due `due_in` from now (server time).
    pub async fn upsert_portal(&self, portal: &str, due_in: Duration) -> Result<(), PgError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO portals (name, next_due_at)
                 VALUES ($1, clock_timestamp() + $2::BIGINT * interval '1 millisecond')
                 ON CONFLICT (name) DO UPDATE SET next_due_at = EXCLUDED.next_due_at",
                &[&portal, &ms(due_in)],
            )
            .await
            .map_err(pg("adding a portal"))?;
        Ok(())
    }

    /// Claims up to `limit` due portals whose lease is free or expired, for `lease`.
    pub async fn claim_due(&self, lease: Duration, limit: i64) -> Result<Vec<Claim>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "UPDATE portals p
                    SET lease_owner = $1, lease_epoch = p.lease_epoch + 1,
                        lease_until = clock_timestamp() + $2::BIGINT * interval '1 millisecond'
                   FROM (SELECT name FROM portals
                          WHERE next_due_at <= clock_timestamp()
                            AND (lease_until IS NULL OR lease_until < clock_timestamp())
                          ORDER BY next_due_at
                          LIMIT $3
                          FOR UPDATE SKIP LOCKED) due
                  WHERE p.name = due.name
                 RETURNING p.name, p.lease_epoch",
                &[&self.me, &ms(lease), &limit],
            )
            .await
            .map_err(pg("claiming due portals"))?;
        Ok(rows
            .iter()
            .map(|r| Claim {
                portal: r.get(0),
                epoch: r.get(1),
            })
            .collect())
    }

    /// Extends a claim by `lease`; false when it was lost (expired and taken over).
    pub async fn renew(&self, claim: &Claim, lease: Duration) -> Result<bool, PgError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE portals SET lease_until = clock_timestamp() + $4::BIGINT * interval '1 millisecond'
                  WHERE name = $1 AND lease_owner = $2 AND lease_epoch = $3",
                &[&claim.portal, &self.me, &claim.epoch, &ms(lease)],
            )
            .await
            .map_err(pg("renewing a claim"))?;
        Ok(n == 1)
    }

    /// Gives a claim back with the portal's next due time; false when it was lost.
    pub async fn release(&self, claim: &Claim, next_due_in: Duration) -> Result<bool, PgError> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE portals SET lease_owner = NULL, lease_until = NULL,
                        next_due_at = clock_timestamp() + $4::BIGINT * interval '1 millisecond'
                  WHERE name = $1 AND lease_owner = $2 AND lease_epoch = $3",
                &[&claim.portal, &self.me, &claim.epoch, &ms(next_due_in)],
            )
            .await
            .map_err(pg("releasing a claim"))?;
        Ok(n == 1)
    }

    /// Writes the intent that licenses one PUT, only while the claim stays live for the
    /// PUT `budget` plus `grace`. `Ok(None)`: fenced (the claim is lost or about to lapse),
    /// send no PUT. A second open intent for the portal is an error (the unique index).
    pub async fn fenced_intent(
        &self,
        claim: &Claim,
        budget: Duration,
        grace: Duration,
    ) -> Result<Option<Intent>, PgError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "INSERT INTO journal (portal, epoch, phase, put_deadline)
                 SELECT name, lease_epoch, 'intent', clock_timestamp() + $4::BIGINT * interval '1 millisecond'
                   FROM portals
                  WHERE name = $1 AND lease_owner = $2 AND lease_epoch = $3
                    AND lease_until > clock_timestamp() + ($4::BIGINT + $5::BIGINT) * interval '1 millisecond'
                 RETURNING id, (extract(epoch FROM put_deadline) * 1000)::BIGINT",
                &[
                    &claim.portal,
                    &self.me,
                    &claim.epoch,
                    &ms(budget),
                    &ms(grace),
                ],
            )
            .await
            .map_err(pg("writing a fenced intent"))?;
        Ok(row.map(|r| Intent {
            id: r.get(0),
            portal: claim.portal.clone(),
            epoch: claim.epoch,
            put_deadline_ms: r.get(1),
        }))
    }

    /// Seals the set a PUT (or a settling GET) returned. Always stored: the set is the
    /// portal's truth whoever holds the claim now. Returns whether it was fenced (the
    /// portal's epoch moved on since the intent), which asks for a reconcile.
    pub async fn seal(&self, intent: &Intent, set_fp: &str) -> Result<bool, PgError> {
        let row = self
            .client()
            .await?
            .query_one(
                "UPDATE journal j
                    SET phase = 'sealed', set_fp = $2, sealed_epoch = p.lease_epoch,
                        fenced = (p.lease_epoch <> j.epoch)
                   FROM portals p
                  WHERE j.id = $1 AND p.name = j.portal
                 RETURNING j.fenced",
                &[&intent.id, &set_fp],
            )
            .await
            .map_err(pg("sealing"))?;
        Ok(row.get(0))
    }

    /// Open intents of `portal` written under another epoch whose PUT deadline plus
    /// `grace` has passed: the ones a new owner may settle by GET now.
    pub async fn settleable(&self, claim: &Claim, grace: Duration) -> Result<Vec<Intent>, PgError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT id, portal, epoch, (extract(epoch FROM put_deadline) * 1000)::BIGINT
                   FROM journal
                  WHERE portal = $1 AND phase = 'intent' AND epoch <> $2
                    AND put_deadline + $3::BIGINT * interval '1 millisecond' < clock_timestamp()",
                &[&claim.portal, &claim.epoch, &ms(grace)],
            )
            .await
            .map_err(pg("reading open intents"))?;
        Ok(rows
            .iter()
            .map(|r| Intent {
                id: r.get(0),
                portal: r.get(1),
                epoch: r.get(2),
                put_deadline_ms: r.get(3),
            })
            .collect())
    }

    /// The server's clock (Unix ms), the only clock the protocol reads.
    pub async fn server_now_ms(&self) -> Result<i64, PgError> {
        let row = self
            .client()
            .await?
            .query_one(
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::BIGINT",
                &[],
            )
            .await
            .map_err(pg("reading the server's clock"))?;
        Ok(row.get(0))
    }
}
