//! What a command or job tells about one portal: [`Report`], and the backoff of retries.

use super::*;

/// What happened to one portal.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The portal.
    pub portal: String,
    /// What happened.
    pub outcome: Outcome,
    /// A sentence for people (no secrets).
    pub message: String,
    /// Unused codes in the set now (or seen in the preflight).
    pub unused: Option<usize>,
    /// Codes in the set.
    pub total: Option<usize>,
    /// Payloads delivered in this run.
    pub delivered: usize,
    /// Payloads still waiting.
    pub pending: usize,
    /// The error kind, for failures (`unauthorized`, `sink`, …).
    pub error_kind: Option<String>,
    /// What the job left in the state for this portal, read in its last write's own
    /// transaction: the daemon plans from it instead of reading the row back. `None` when
    /// the job wrote nothing of the kind (a skip, a dry run).
    #[serde(skip)]
    pub after: Option<StateAfter>,
    /// For a failure of the portal's API: its kind, for the hint `rotate` prints.
    #[serde(skip)]
    pub api_error: Option<crate::docspace::ApiErrorKind>,
}

/// A portal's row and its open journal entries, as a job's last write left them.
#[derive(Debug, Clone)]
pub struct StateAfter {
    /// The portal's row.
    pub row: Option<state::PortalRow>,
    /// Its open journal entries, oldest first.
    pub open: Vec<state::OpenJournal>,
    /// Its payloads waiting in the spool.
    pub pending: i64,
}

impl StateAfter {
    /// Reads them, inside the caller's transaction.
    pub fn read(c: &dyn state::db::Sql, portal: &str) -> Result<Self, StateError> {
        state::outlook(c, portal, false).map(Self::from)
    }
}

impl From<state::Outlook> for StateAfter {
    fn from(o: state::Outlook) -> Self {
        Self {
            row: o.row,
            open: o.open,
            pending: o.pending,
        }
    }
}

impl Report {
    pub(super) fn new(portal: &str, outcome: Outcome, message: impl Into<String>) -> Self {
        Self {
            portal: portal.to_string(),
            outcome,
            message: message.into(),
            unused: None,
            total: None,
            delivered: 0,
            pending: 0,
            error_kind: None,
            after: None,
            api_error: None,
        }
    }

    /// A report of a failure (or of a rotation being settled).
    pub fn failed(portal: &str, e: &RotationError) -> Self {
        let outcome = match e {
            RotationError::Settling { .. } => Outcome::Settling,
            _ => Outcome::Failed,
        };
        let mut r = Self::new(portal, outcome, e.to_string());
        if let RotationError::Api(a) = e {
            r.api_error = Some(a.kind.clone());
        }
        r.error_kind = Some(
            match e {
                RotationError::Api(a) => a.kind_name(),
                RotationError::Sink { .. } => "sink",
                RotationError::State(_) => "state",
                RotationError::Settling { .. } => "settling",
                RotationError::AccountChanged { .. } => "account_changed",
                RotationError::Secret { .. } => "secret",
                RotationError::Other { .. } => "other",
            }
            .to_string(),
        );
        r
    }

    /// A rotation task that ended without a report (it panicked): a failure to look into.
    /// Its portal is settled by the next command's recovery like after a crash.
    pub fn lost(portal: &str, why: &str) -> Self {
        let mut r = Self::new(
            portal,
            Outcome::Failed,
            format!("a rotation task was lost: {why}"),
        );
        r.error_kind = Some("internal".into());
        r
    }

    /// True when the command should exit 1 for this portal.
    pub fn is_failure(&self) -> bool {
        matches!(self.outcome, Outcome::Failed | Outcome::Settling) || self.pending > 0
    }
}

/// Capped exponential backoff with jitter: 30 s, 1 min, 2 min, … up to 1 h, each between
/// 50 % and 100 % of its step so that many portals do not retry in lockstep.
pub fn backoff(attempt: i64) -> Duration {
    let step = 30u64
        .saturating_mul(1u64 << attempt.clamp(0, 7) as u32)
        .min(3600);
    let ms = step * 1000;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}
