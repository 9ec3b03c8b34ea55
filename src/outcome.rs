//! What happened to one portal, typed: the one vocabulary of reports, `--json`, the
//! metrics' `result` label and the daemon's bookkeeping (a skip is never a success).

use serde::Serialize;

/// Why a rotation was not attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The process is stopping: nothing was sent, and the portal stays due.
    Stopping,
    /// `min_interval` has not passed since the last success.
    MinInterval,
    /// No longer due when its turn came (another process rotated it meanwhile).
    NotDue,
    /// In a cluster: another instance holds the portal, or took it over (fenced) before
    /// this one's PUT; that instance carries on.
    Held,
}

/// What happened to one portal: typed, so that only what really happened is recorded as
/// done (a skip is never a success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new set was issued and sealed (its deliveries may still be pending).
    Rotated,
    /// An earlier process's rotation was finished (settled, or its payloads delivered).
    Recovered,
    /// The current set was delivered again.
    Resent,
    /// Pending payloads were delivered, or nothing was pending.
    Delivered,
    /// A watch read the portal and nothing needed doing (its set is what the sinks hold,
    /// enough codes are unused; or drift was recorded while the portal flaps).
    Unchanged,
    /// A dry run passed every read-only step.
    WouldRotate,
    /// A PUT's outcome is unknown; its intent stays open.
    Settling,
    /// Nothing was attempted.
    Skipped(Skip),
    /// An open intent was closed by hand.
    Abandoned,
    /// Pending work was dropped on purpose.
    Forgotten,
    /// Something failed (see the error kind).
    Failed,
}

impl Outcome {
    /// The name in reports, `--json` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Rotated => "rotated",
            Outcome::Recovered => "recovered",
            Outcome::Resent => "resent",
            Outcome::Delivered => "delivered",
            Outcome::Unchanged => "unchanged",
            Outcome::WouldRotate => "would_rotate",
            Outcome::Settling => "settling",
            Outcome::Skipped(_) => "skipped",
            Outcome::Abandoned => "abandoned",
            Outcome::Forgotten => "forgotten",
            Outcome::Failed => "failed",
        }
    }

    /// A new set reached the spool in this run (a rotation the schedule may count as done).
    pub fn issued_a_set(self) -> bool {
        matches!(self, Outcome::Rotated | Outcome::Recovered)
    }
}

impl Serialize for Outcome {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// How one delivery attempt ended: the `result` label of `tfa_rotator_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryResult {
    /// The sink took the payload.
    Delivered,
    /// It did not; the payload stays in the spool.
    Failed,
}

impl DeliveryResult {
    /// The label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryResult::Delivered => "delivered",
            DeliveryResult::Failed => "failed",
        }
    }
}

/// A PUT's answer that was not trusted: the `answer` label of
/// `tfa_rotator_put_answers_untrusted` (the GET's set is delivered either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutAnswer {
    /// It named another set than the portal holds.
    Differs,
    /// It could not be read as a set.
    Unusable,
}

impl PutAnswer {
    /// The label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            PutAnswer::Differs => "differs",
            PutAnswer::Unusable => "unusable",
        }
    }
}
