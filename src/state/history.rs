//! The audit record (SPEC §6): an append-only history, one hash chain per portal.
//!
//! Each record is a fixed JSON form ([`Record::canonical`]: keys in a fixed order, absent
//! when not applicable, times RFC 3339 UTC with milliseconds), written in the same
//! transaction as the change it records. Its row holds the hash of its portal's previous
//! record (`prev`) and its own: SHA-256 over `prev` (hex, empty for the first) followed by
//! the JSON. The portal's row holds the head, so a removed newest record is found too.
//!
//! One set of statements chains on SQLite and PostgreSQL: the head is advanced by an
//! upsert of the portal's row (`sha256hex`, a function SQLite's connections register and
//! PostgreSQL's migration creates), which takes the row's lock, and the record is inserted
//! from what that upsert left. Both are deferred writes: on PostgreSQL they travel with the
//! COMMIT, so an append costs no round trip, and two appends for one portal can never
//! fork the chain (the second waits for the first's row lock and reads its head).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::StateError;
use super::db::{Sql, Val, vals};

/// The chain of records about no portal (a recipient key's expiry): a name no portal can
/// have. Its row in `portals` holds only its head.
pub const CONFIG_CHAIN: &str = "*";

/// What a record is about. The names are the webhook events' too (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// A rotation issued a new set.
    Rotated,
    /// A rotation attempt failed, or its PUT's outcome is unknown (`outcome = "unknown"`).
    RotationFailed,
    /// A payload reached a sink.
    Delivered,
    /// A delivery attempt failed (it is retried).
    DeliveryFailed,
    /// The portal's set changed outside us.
    Drift,
    /// Drift began to come too often to act on.
    Flapping,
    /// A PUT of unknown outcome was settled.
    Settled,
    /// An open intent was closed by hand.
    Abandoned,
    /// Open intents or pending payloads were dropped on purpose.
    Forgotten,
    /// A notice was queued for `[alerts]`.
    Alert,
    /// Older records were pruned (`history_keep`); the chain goes on from here.
    Checkpoint,
}

impl Event {
    /// Every event a webhook can be sent (the checkpoint is the history's own).
    pub const ALL: [Event; 10] = [
        Event::Rotated,
        Event::RotationFailed,
        Event::Delivered,
        Event::DeliveryFailed,
        Event::Drift,
        Event::Flapping,
        Event::Settled,
        Event::Abandoned,
        Event::Forgotten,
        Event::Alert,
    ];

    /// Its name in records, webhooks and the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Rotated => "rotated",
            Event::RotationFailed => "rotation_failed",
            Event::Delivered => "delivered",
            Event::DeliveryFailed => "delivery_failed",
            Event::Drift => "drift",
            Event::Flapping => "flapping",
            Event::Settled => "settled",
            Event::Abandoned => "abandoned",
            Event::Forgotten => "forgotten",
            Event::Alert => "alert",
            Event::Checkpoint => "checkpoint",
        }
    }

    /// The event of a name, if it is one.
    pub fn parse(s: &str) -> Option<Event> {
        Event::ALL
            .into_iter()
            .chain([Event::Checkpoint])
            .find(|e| e.as_str() == s)
    }
}

/// What set a rotation (or the work a record records) off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A cron fire.
    Cron,
    /// The portal's entry changed.
    Change,
    /// The portal is new.
    New,
    /// Too few unused codes were left.
    Unused,
    /// The portal's set changed outside us.
    Drift,
    /// A command run by someone.
    Manual,
    /// A PUT of unknown outcome, settled.
    Settle,
    /// A fire missed while the daemon was down.
    CatchUp,
}

impl Trigger {
    /// Its name in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Cron => "cron",
            Trigger::Change => "change",
            Trigger::New => "new",
            Trigger::Unused => "unused",
            Trigger::Drift => "drift",
            Trigger::Manual => "manual",
            Trigger::Settle => "settle",
            Trigger::CatchUp => "catch_up",
        }
    }
}

tokio::task_local! {
    static TRIGGER: Trigger;
}

/// Runs `f` with `trigger` as what set its records off (a task-local, read by
/// [`Cause::current`]).
pub async fn triggered_by<F: std::future::Future>(trigger: Trigger, f: F) -> F::Output {
    TRIGGER.scope(trigger, f).await
}

static BY: OnceLock<String> = OnceLock::new();

/// Says who this process acts for: the daemon calls it once with `daemon:<instance>`,
/// before it records anything. Without it, a process acts for the user who runs it
/// ([`user`]).
pub fn act_as(by: String) {
    let _ = BY.set(by);
}

/// `user:<name>(<uid>)`: the login uid's user (which `su` and `sudo` keep); without one (a
/// command `tfa-rotator-run` started through systemd), the user it names in
/// `TFA_ROTATOR_INVOKED_BY`; else the real uid's.
pub fn user() -> String {
    let login = std::fs::read_to_string("/proc/self/loginuid")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&u| u != u32::MAX);
    let (name, uid) = match login {
        Some(uid) => (passwd(|_, u| u == uid).map(|(n, _)| n), Some(uid)),
        None => match std::env::var("TFA_ROTATOR_INVOKED_BY") {
            Ok(n) if !n.is_empty() => {
                let uid = passwd(|name, _| name == n).map(|(_, u)| u);
                (Some(n), uid)
            }
            _ => {
                let uid = rustix::process::getuid().as_raw();
                (passwd(|_, u| u == uid).map(|(n, _)| n), Some(uid))
            }
        },
    };
    let name = crate::docspace::model::escape_controls(name.as_deref().unwrap_or("unknown"));
    match uid {
        Some(uid) => format!("user:{name}({uid})"),
        None => format!("user:{name}"),
    }
}

/// The first /etc/passwd entry `pick` accepts, as (name, uid).
pub(super) fn passwd(pick: impl Fn(&str, u32) -> bool) -> Option<(String, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let uid = f.nth(1)?.parse().ok()?;
        pick(name, uid).then(|| (name.to_string(), uid))
    })
}

/// Who and what a record is written for: taken in the task that does the work, before its
/// transaction (which runs on another thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// What set it off; a command's work is `manual` unless it says otherwise.
    pub trigger: Option<Trigger>,
    /// `daemon:<instance>` or `user:<name>(<uid>)`.
    pub by: String,
}

impl Cause {
    /// The cause of the work the current task does.
    pub fn current() -> Self {
        // Read once per process (a rotation makes several records).
        let by = BY.get_or_init(user).clone();
        let trigger = TRIGGER
            .try_with(|t| *t)
            .ok()
            .or_else(|| by.starts_with("user:").then_some(Trigger::Manual));
        Cause { trigger, by }
    }
}

/// One record, in its canonical form: the fields in this order, `None` left out. `sinks`
/// is a sorted map, so its form is fixed too.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// A UUID (v4), also the webhook's `X-TFA-Delivery`.
    pub id: String,
    /// When, RFC 3339 UTC with milliseconds.
    pub at: String,
    /// [`Event::as_str`].
    pub event: String,
    /// The portal.
    pub portal: String,
    /// The account the portal's API key acts as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// [`Trigger::as_str`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// Who: `daemon:<instance>` or `user:<name>(<uid>)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// How it ended (`ok`, `delivery_pending`, `failed`, `unknown`, `applied`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Why (an error, a note given by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The sink of a delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
    /// Which attempt of that delivery (1 for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i64>,
    /// Each sink's delivery result, for a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sinks: Option<BTreeMap<String, String>>,
    /// The set's keyed fingerprint (never the codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// A checkpoint: how many records it replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<i64>,
    /// A checkpoint: the hash of the newest record it replaced, the `prev` of the oldest
    /// record kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
}

impl Record {
    /// A record of `event` about `portal`, for `cause`; the id and time are given when it
    /// is appended.
    pub fn new(event: Event, portal: &str, cause: &Cause) -> Self {
        Record {
            event: event.as_str().into(),
            portal: portal.into(),
            trigger: cause.trigger.map(|t| t.as_str().into()),
            by: Some(cause.by.clone()),
            ..Default::default()
        }
    }

    /// With this outcome.
    pub fn outcome(mut self, o: impl Into<String>) -> Self {
        self.outcome = Some(o.into());
        self
    }

    /// With this reason.
    pub fn reason(mut self, r: impl Into<String>) -> Self {
        self.reason = Some(r.into());
        self
    }

    /// The fixed JSON form its hash covers.
    pub fn canonical(&self) -> String {
        // Serializing a struct of strings, numbers and a string map cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The event, if it is one this version knows.
    pub fn event(&self) -> Option<Event> {
        Event::parse(&self.event)
    }
}

/// `hex(SHA-256(prev ‖ record))`: the hash a record's row holds.
pub fn chain_hash(prev: Option<&str>, record: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.unwrap_or("").as_bytes());
    h.update(record.as_bytes());
    hex::encode(h.finalize())
}

/// `sha256hex(text)` for SQLite connections (PostgreSQL's is created by its migration).
pub fn register_sqlite(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_scalar_function(
        "sha256hex",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let t: Option<String> = ctx.get(0)?;
            Ok(t.map(|t| hex::encode(Sha256::digest(t.as_bytes()))))
        },
    )
}

/// A random (v4) UUID.
fn new_uuid() -> String {
    let mut b = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

static WRITTEN: AtomicU64 = AtomicU64::new(0);
static PRUNED: AtomicU64 = AtomicU64::new(0);

/// Records this process appended and pruned (the metrics).
pub fn counts() -> (u64, u64) {
    (
        WRITTEN.load(Ordering::Relaxed),
        PRUNED.load(Ordering::Relaxed),
    )
}

/// The head's upsert: the portal's row (made if missing) gets the new head, and its old
/// head as the head's `prev`. Its lock orders the appends of one portal.
const ADVANCE: &str = "INSERT INTO portals (name, history_head) VALUES (?1, sha256hex(?2))
     ON CONFLICT (name) DO UPDATE SET history_prev = portals.history_head,
         history_head = sha256hex(COALESCE(portals.history_head, '') || ?2)";
/// The record, from what [`ADVANCE`] left in the portal's row.
const INSERT: &str = "INSERT INTO history (uuid, portal, at, event, record, sink, prev, hash)
     SELECT ?1, ?2, ?3, ?4, ?5, ?6, history_prev, history_head FROM portals WHERE name = ?2";

/// Appends `rec` to its portal's chain, in the caller's transaction; returns its id (UUID).
pub fn append(c: &dyn Sql, mut rec: Record) -> Result<String, StateError> {
    let now = c.now()?;
    rec.id = new_uuid();
    rec.at = crate::json::rfc3339(now).unwrap_or_default();
    let json = rec.canonical();
    // Nothing in the transaction reads the history or the head after it.
    c.defer(
        "advancing the history's head",
        ADVANCE,
        vals![rec.portal.as_str(), json.as_str()],
    )?;
    c.defer(
        "writing history",
        INSERT,
        vals![
            rec.id.as_str(),
            rec.portal.as_str(),
            now,
            rec.event.as_str(),
            json,
            rec.sink.as_deref()
        ],
    )?;
    WRITTEN.fetch_add(1, Ordering::Relaxed);
    Ok(rec.id)
}

/// A history row as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Row id (for order only: a gap in it means nothing).
    pub id: i64,
    /// The record's UUID column.
    pub uuid: Option<String>,
    /// Portal column.
    pub portal: String,
    /// Time column (Unix ms).
    pub at: i64,
    /// Event column.
    pub event: String,
    /// The canonical JSON.
    pub record: Option<String>,
    /// Sink column (a delivery's).
    pub sink: Option<String>,
    /// The previous record's hash.
    pub prev: Option<String>,
    /// This record's hash.
    pub hash: Option<String>,
}

impl Stored {
    /// The record it holds (`None`: not readable as one).
    pub fn parsed(&self) -> Option<Record> {
        serde_json::from_str(self.record.as_deref()?).ok()
    }
}

const STORED: &str = "id, uuid, portal, at, event, record, sink, prev, hash";

fn stored(r: &super::db::Row) -> Result<Stored, StateError> {
    Ok(Stored {
        id: r.int(0)?,
        uuid: r.opt_text(1)?,
        portal: r.text(2)?,
        at: r.int(3)?,
        event: r.text(4)?,
        record: r.opt_text(5)?,
        sink: r.opt_text(6)?,
        prev: r.opt_text(7)?,
        hash: r.opt_text(8)?,
    })
}

/// Records read per statement by `history` (a page in memory, not the table).
pub const PAGE: i64 = 2_000;

/// A page of the records after row `after_id`, in the order they were written (by id),
/// of `portals` (all when empty) at or after `since`.
pub fn read_page(
    c: &dyn Sql,
    portals: &[String],
    since: Option<i64>,
    after_id: i64,
) -> Result<(Vec<Stored>, Option<i64>), StateError> {
    let rows = c.rows(
        "reading the history",
        &format!(
            "SELECT {STORED} FROM history
              WHERE id > ?1 AND (CAST(?2 AS BIGINT) IS NULL OR at >= ?2)
              ORDER BY id LIMIT ?3"
        ),
        vals![after_id, since, PAGE],
    )?;
    let last = (rows.len() as i64 == PAGE)
        .then(|| rows.last().map(|r| r.int(0)))
        .flatten()
        .transpose()?;
    let wanted: HashSet<&str> = portals.iter().map(String::as_str).collect();
    let page = rows
        .iter()
        .map(stored)
        .filter(|s| {
            s.as_ref().map_or(true, |s| {
                wanted.is_empty() || wanted.contains(s.portal.as_str())
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((page, last))
}

/// Whether `portal` has any record (by the `(portal, id)` index).
pub fn has_records(c: &dyn Sql, portal: &str) -> Result<bool, StateError> {
    Ok(c.row(
        "reading the history",
        "SELECT 1 FROM history WHERE portal = ?1 LIMIT 1",
        vals![portal],
    )?
    .is_some())
}

/// The first record that does not verify, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broken {
    /// The portal.
    pub portal: String,
    /// The record's UUID (or its row id, when even that is unreadable).
    pub id: String,
    /// Its time, RFC 3339.
    pub at: String,
    /// What is wrong.
    pub why: String,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "record {} at {} (portal {}) does not verify: {}",
            self.id,
            self.at,
            crate::docspace::model::escape_controls(&self.portal),
            self.why
        )
    }
}

fn broken(s: &Stored, why: impl Into<String>) -> Broken {
    Broken {
        portal: s.portal.clone(),
        id: s.uuid.clone().unwrap_or_else(|| format!("(row {})", s.id)),
        at: crate::json::rfc3339(s.at).unwrap_or_else(|| s.at.to_string()),
        why: why.into(),
    }
}

/// Checks one record against its row: the JSON parses, is canonical, names what the row's
/// columns say, and hashes (after `prev`) to the row's hash.
fn check_record(s: &Stored) -> Result<Record, Broken> {
    let changed = "its content does not match its hash (changed after it was written)";
    let (Some(json), Some(hash)) = (&s.record, &s.hash) else {
        return Err(broken(
            s,
            "it has no record or hash (written behind the tool's back)",
        ));
    };
    let rec = s.parsed().ok_or_else(|| broken(s, changed))?;
    if rec.canonical() != *json
        || chain_hash(s.prev.as_deref(), json) != *hash
        || Some(&rec.id) != s.uuid.as_ref()
        || rec.portal != s.portal
        || rec.event != s.event
        || rec.sink != s.sink
        || Some(&rec.at) != crate::json::rfc3339(s.at).as_ref()
    {
        return Err(broken(s, changed));
    }
    Ok(rec)
}

/// One portal's chain, checked record by record in id order (a page at a time, so the
/// whole table is never in memory), then against the head its row holds.
struct ChainCheck<'a> {
    head: Option<&'a String>,
    /// Hashes of the newest records pruned, from the checkpoints: where the chain may start.
    anchors: HashSet<String>,
    expected: Option<String>,
    n: usize,
    first: Option<Stored>,
    last: Option<Stored>,
    /// The first record after one whose hash is the head (something was added behind it).
    after_head: Option<Stored>,
}

impl<'a> ChainCheck<'a> {
    fn new(head: Option<&'a String>, anchors: HashSet<String>) -> Self {
        ChainCheck {
            head,
            anchors,
            expected: None,
            n: 0,
            first: None,
            last: None,
            after_head: None,
        }
    }

    fn feed(&mut self, s: &Stored) -> Result<(), Broken> {
        check_record(s)?;
        let linked = if self.n == 0 {
            s.prev.as_ref().is_none_or(|p| self.anchors.contains(p))
        } else {
            s.prev == self.expected
        };
        if !linked {
            return Err(broken(
                s,
                "it does not follow the record before it: a record before it was removed or changed",
            ));
        }
        if self.n > 0 && self.expected.as_ref() == self.head && self.after_head.is_none() {
            self.after_head = Some(s.clone());
        }
        if self.first.is_none() {
            self.first = Some(s.clone());
        }
        self.expected = s.hash.clone();
        self.last = Some(s.clone());
        self.n += 1;
        Ok(())
    }

    fn finish(self, portal: &str) -> Result<usize, Broken> {
        match (&self.last, self.head) {
            (Some(last), Some(head)) if last.hash.as_ref() == Some(head) => Ok(self.n),
            (Some(last), Some(_)) => Err(match self.after_head {
                Some(next) => broken(
                    &next,
                    "it comes after the portal's head: it was added behind the tool's back",
                ),
                None => broken(
                    last,
                    "the portal's head is not this newest record: a newer record was removed",
                ),
            }),
            (Some(last), None) => Err(broken(
                self.first.as_ref().unwrap_or(last),
                "the portal's row holds no head for its chain (the head was removed)",
            )),
            (None, Some(_)) => Err(Broken {
                portal: portal.to_string(),
                id: "(none)".into(),
                at: "-".into(),
                why: "every record of a portal whose row holds a head was removed".into(),
            }),
            (None, None) => Ok(0),
        }
    }
}

/// Verifies every chain (of `portals`, or all), a page at a time, against the heads: the
/// records and chains checked, or the first record that does not verify. Run it in one
/// snapshot ([`super::Store::snapshot`]), so that records and heads written meanwhile
/// are all seen or none.
pub fn verify(
    c: &dyn Sql,
    portals: &[String],
) -> Result<Result<(usize, usize), Broken>, StateError> {
    let heads = heads(c)?;
    let mut names: std::collections::BTreeSet<String> = c
        .rows(
            "reading the history",
            "SELECT DISTINCT portal FROM history",
            vals![],
        )?
        .iter()
        .map(|r| r.text(0))
        .collect::<Result<_, _>>()?;
    names.extend(heads.keys().cloned());
    if !portals.is_empty() {
        names.retain(|p| portals.contains(p));
    }
    let mut n = 0;
    for portal in &names {
        let anchors = c
            .rows(
                "reading the history's checkpoints",
                &format!("SELECT {STORED} FROM history WHERE portal = ?1 AND event = ?2"),
                vals![portal.as_str(), Event::Checkpoint.as_str()],
            )?
            .iter()
            .map(stored)
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .filter_map(Stored::parsed)
            .filter_map(|r| r.anchor)
            .collect();
        let mut check = ChainCheck::new(heads.get(portal), anchors);
        let mut after = i64::MIN;
        loop {
            let page = c.rows(
                "reading the history",
                &format!(
                    "SELECT {STORED} FROM history WHERE portal = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
                ),
                vals![portal.as_str(), after, PAGE],
            )?;
            for r in &page {
                let s = stored(r)?;
                if let Err(b) = check.feed(&s) {
                    return Ok(Err(b));
                }
                after = s.id;
            }
            if (page.len() as i64) < PAGE {
                break;
            }
        }
        match check.finish(portal) {
            Ok(k) => n += k,
            Err(b) => return Ok(Err(b)),
        }
    }
    Ok(Ok((n, names.len())))
}

/// Prunes the records older than `before` (Unix ms), whole, each portal's leaving a
/// checkpoint whose `anchor` is the newest pruned hash. Returns the records pruned.
pub fn prune(c: &dyn Sql, before: i64, keep: &str) -> Result<usize, StateError> {
    let cause = Cause {
        trigger: None,
        by: BY.get_or_init(user).clone(),
    };
    // One pass over the table (no index on `at`: every append would pay for it, and this
    // runs once a day), then each portal's newest old record by its id.
    let old = c.rows(
        "finding old history",
        "SELECT portal, MAX(id) FROM history WHERE at < ?1 GROUP BY portal",
        vals![before],
    )?;
    let mut pruned = 0;
    for r in old {
        let (portal, id) = (r.text(0)?, r.int(1)?);
        let anchor = c
            .row(
                "finding old history",
                "SELECT hash FROM history WHERE id = ?1",
                vals![id],
            )?
            .map_or(Ok(None), |r| r.opt_text(0))?;
        let n = c.exec(
            "pruning history",
            "DELETE FROM history WHERE portal = ?1 AND id <= ?2",
            vals![portal.as_str(), id],
        )?;
        let mut rec = Record::new(Event::Checkpoint, &portal, &cause).reason(format!(
            "records before {} pruned (history_keep = {keep})",
            crate::json::rfc3339(before).unwrap_or_default()
        ));
        rec.pruned = Some(i64::try_from(n).unwrap_or(i64::MAX));
        rec.anchor = anchor;
        append(c, rec)?;
        pruned += usize::try_from(n).unwrap_or(usize::MAX);
    }
    PRUNED.fetch_add(pruned as u64, Ordering::Relaxed);
    Ok(pruned)
}

/// Each portal's head (for the daily log line and webhook events).
pub fn heads(c: &dyn Sql) -> Result<BTreeMap<String, String>, StateError> {
    let mut out = BTreeMap::new();
    for r in c.rows(
        "reading the history's heads",
        "SELECT name, history_head FROM portals WHERE history_head IS NOT NULL ORDER BY name",
        vals![],
    )? {
        out.insert(r.text(0)?, r.text(1)?);
    }
    Ok(out)
}

/// A row of an older version (portal, time, event, free text), before its chain.
pub struct Legacy {
    /// Row id.
    pub id: i64,
    /// Portal.
    pub portal: String,
    /// Unix ms.
    pub at: i64,
    /// The old event name.
    pub event: String,
    /// The old free text.
    pub detail: Option<String>,
}

/// What chaining the rows of an older version writes: per row (id, uuid, record, prev,
/// hash), and per portal its head and the head's prev. Rows are taken in id order; the
/// migration runs before this version appends anything, so each chain starts empty.
pub type LegacyChain = (
    Vec<(i64, String, String, Option<String>, String, &'static str)>,
    HashMap<String, (String, Option<String>)>,
);

/// Chains the rows of an older version: each becomes a record (old names mapped to the
/// events of today, the old text its `reason`, `by` "migrated").
pub fn chain_legacy(rows: Vec<Legacy>) -> LegacyChain {
    let mut out = Vec::with_capacity(rows.len());
    let mut heads: HashMap<String, (String, Option<String>)> = HashMap::new();
    for l in rows {
        let (event, outcome) = match l.event.as_str() {
            "rotated" => (Event::Rotated, l.detail.clone()),
            "failed" => (Event::RotationFailed, Some("failed".into())),
            "settling" => (Event::RotationFailed, Some("unknown".into())),
            "resent" | "delivered" => (Event::Delivered, None),
            "drift" => (Event::Drift, None),
            "abandoned" => (Event::Abandoned, None),
            "forgotten" => (Event::Forgotten, None),
            _ => (Event::Alert, None),
        };
        let rec = Record {
            id: new_uuid(),
            at: crate::json::rfc3339(l.at).unwrap_or_default(),
            event: event.as_str().into(),
            portal: l.portal.clone(),
            by: Some("migrated".into()),
            outcome,
            reason: match l.detail {
                Some(d) if event != Event::Rotated => Some(format!("{}: {d}", l.event)),
                _ => Some(l.event.clone()),
            },
            ..Default::default()
        };
        let json = rec.canonical();
        let prev = heads.get(&l.portal).map(|(h, _)| h.clone());
        let hash = chain_hash(prev.as_deref(), &json);
        heads.insert(l.portal, (hash.clone(), prev.clone()));
        out.push((l.id, rec.id, json, prev, hash, event.as_str()));
    }
    (out, heads)
}

/// The statements that store a [`LegacyChain`] (`?N` placeholders).
pub const LEGACY_ROW: &str =
    "UPDATE history SET uuid = ?2, record = ?3, prev = ?4, hash = ?5, event = ?6 WHERE id = ?1";
/// The head of a migrated chain.
pub const LEGACY_HEAD: &str =
    "INSERT INTO portals (name, history_head, history_prev) VALUES (?1, ?2, ?3)
     ON CONFLICT (name) DO UPDATE SET history_head = ?2, history_prev = ?3";
/// The rows of an older version.
pub const LEGACY_ROWS: &str =
    "SELECT id, portal, at, event, detail FROM history WHERE hash IS NULL ORDER BY id";

/// Chains the rows of an older version in `c` (SQLite's migration).
pub fn migrate_legacy(c: &dyn Sql) -> Result<usize, StateError> {
    let rows = c
        .rows("reading old history", LEGACY_ROWS, vals![])?
        .iter()
        .map(|r| {
            Ok(Legacy {
                id: r.int(0)?,
                portal: r.text(1)?,
                at: r.int(2)?,
                event: r.text(3)?,
                detail: r.opt_text(4)?,
            })
        })
        .collect::<Result<Vec<_>, StateError>>()?;
    let (records, heads) = chain_legacy(rows);
    for (id, uuid, json, prev, hash, event) in &records {
        c.exec(
            "chaining old history",
            LEGACY_ROW,
            &[
                Val::from(*id),
                uuid.into(),
                json.into(),
                prev.clone().into(),
                hash.into(),
                Val::from(*event),
            ],
        )?;
    }
    for (portal, (head, prev)) in &heads {
        c.exec(
            "chaining old history",
            LEGACY_HEAD,
            &[portal.into(), head.into(), prev.clone().into()],
        )?;
    }
    Ok(records.len())
}

/// A webhook sink's place in one portal's history.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// The webhook sink.
    pub sink: String,
    /// The portal (or `*`).
    pub portal: String,
    /// The last record delivered (or skipped as not wanted).
    pub after_id: i64,
    /// Failed attempts at the next record.
    pub attempts: i64,
    /// When the next record may be tried again (Unix ms).
    pub next_attempt_at: i64,
}

/// The cursors with a record after them that may be an event: not a checkpoint, nor a
/// delivery of one of `hooks` (the webhooks' own). One statement, an index probe per
/// cursor, so a look over 10,000 quiet portals reads no batch.
pub fn pending_cursors(c: &dyn Sql, hooks: &[String]) -> Result<Vec<Cursor>, StateError> {
    let marks: Vec<String> = (1..=hooks.len()).map(|i| format!("?{i}")).collect();
    let params: Vec<Val> = hooks.iter().map(Val::from).collect();
    c.rows(
        "reading the webhook cursors",
        &format!(
            "SELECT w.sink, w.portal, w.after_id, w.attempts, w.next_attempt_at FROM webhook_cursors w
              WHERE EXISTS (SELECT 1 FROM history h WHERE h.portal = w.portal AND h.id > w.after_id
                              AND h.event <> 'checkpoint'
                              AND NOT (h.event IN ('delivered', 'delivery_failed')
                                       AND COALESCE(h.sink, '') IN ({})))
              ORDER BY w.sink, w.portal",
            marks.join(", ")
        ),
        &params,
    )?
    .iter()
    .map(cursor_of)
    .collect()
}

fn cursor_of(r: &super::db::Row) -> Result<Cursor, StateError> {
    Ok(Cursor {
        sink: r.text(0)?,
        portal: r.text(1)?,
        after_id: r.int(2)?,
        attempts: r.int(3)?,
        next_attempt_at: r.int(4)?,
    })
}

/// Every cursor.
pub fn cursors(c: &dyn Sql) -> Result<Vec<Cursor>, StateError> {
    c.rows(
        "reading the webhook cursors",
        "SELECT sink, portal, after_id, attempts, next_attempt_at FROM webhook_cursors ORDER BY sink, portal",
        vals![],
    )?
    .iter()
    .map(cursor_of)
    .collect()
}

/// Starts a cursor at the newest record of its portal for each (sink, portal) that has
/// none: a webhook is sent what happens from now on, not the history before it.
pub fn start_cursors(c: &dyn Sql, pairs: &[(String, String)]) -> Result<(), StateError> {
    for chunk in pairs.chunks(super::ROWS_PER_INSERT) {
        let values: Vec<String> = (0..chunk.len())
            .map(|i| format!("(?{}, ?{})", 2 * i + 1, 2 * i + 2))
            .collect();
        let params: Vec<Val> = chunk
            .iter()
            .flat_map(|(s, p)| [Val::from(s.as_str()), Val::from(p.as_str())])
            .collect();
        // `WHERE true`: SQLite's parser needs it before an upsert's ON CONFLICT.
        c.exec(
            "starting webhook cursors",
            &format!(
                "INSERT INTO webhook_cursors (sink, portal, after_id)
                 SELECT v.column1, v.column2,
                        COALESCE((SELECT MAX(id) FROM history h WHERE h.portal = v.column2), 0)
                   FROM (VALUES {}) v WHERE true
                 ON CONFLICT (sink, portal) DO NOTHING",
                values.join(", ")
            ),
            &params,
        )?;
    }
    Ok(())
}

/// Drops a cursor the config no longer follows.
pub fn drop_cursor(c: &dyn Sql, sink: &str, portal: &str) -> Result<(), StateError> {
    c.exec(
        "dropping a webhook cursor",
        "DELETE FROM webhook_cursors WHERE sink = ?1 AND portal = ?2",
        vals![sink, portal],
    )?;
    Ok(())
}

/// The records of `portal` after `after_id`, oldest first, at most `limit`: (id, stored).
pub fn after(
    c: &dyn Sql,
    portal: &str,
    after_id: i64,
    limit: i64,
) -> Result<Vec<Stored>, StateError> {
    c.rows(
        "reading webhook events",
        &format!("SELECT {STORED} FROM history WHERE portal = ?1 AND id > ?2 ORDER BY id LIMIT ?3"),
        vals![portal, after_id, limit],
    )?
    .iter()
    .map(stored)
    .collect()
}

/// A webhook's event was answered 2xx: its cursor moves past it (only if it still stood
/// where this process found it, so two processes never move it back), recorded.
pub fn webhook_delivered(
    c: &dyn Sql,
    cursor: &Cursor,
    to: i64,
    record: Record,
) -> Result<bool, StateError> {
    let moved = c.exec(
        "moving a webhook cursor",
        "UPDATE webhook_cursors SET after_id = ?4, attempts = 0, next_attempt_at = 0, last_error = NULL
          WHERE sink = ?1 AND portal = ?2 AND after_id = ?3",
        vals![cursor.sink.as_str(), cursor.portal.as_str(), cursor.after_id, to],
    )?;
    append(c, record)?;
    Ok(moved > 0)
}

/// Records that are no event for the cursor's webhook are passed over, without a delivery
/// (one transaction for every cursor of a look).
pub fn webhook_skipped(c: &dyn Sql, cursor: &Cursor, to: i64) -> Result<(), StateError> {
    c.exec(
        "moving a webhook cursor",
        "UPDATE webhook_cursors SET after_id = ?4 WHERE sink = ?1 AND portal = ?2 AND after_id = ?3",
        vals![cursor.sink.as_str(), cursor.portal.as_str(), cursor.after_id, to],
    )?;
    Ok(())
}

/// A webhook's event failed: tried again at `next_at`, recorded.
pub fn webhook_failed(
    c: &dyn Sql,
    cursor: &Cursor,
    error: &str,
    next_at: i64,
    record: Record,
) -> Result<(), StateError> {
    c.exec(
        "recording a failed webhook delivery",
        "UPDATE webhook_cursors SET attempts = attempts + 1, next_attempt_at = ?3, last_error = ?4
          WHERE sink = ?1 AND portal = ?2",
        vals![cursor.sink.as_str(), cursor.portal.as_str(), next_at, error],
    )?;
    append(c, record).map(drop)
}
