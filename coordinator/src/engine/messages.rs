//! The vocabulary of the two-phase commit state machine: what goes in (commands from the
//! API, events from the runtime) and what comes out (actions for the runtime, refusals).

use crate::model::{TxnId, TxnState, UnixMs};

/// A branch to enlist, already validated by the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchSpec {
    pub id: String,
    pub endpoint: String,
    pub payload: Vec<u8>,
}

/// A participant's vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Yes,
    No { reason: String },
    ReadOnly,
}

impl Vote {
    pub fn no(reason: impl Into<String>) -> Self {
        Vote::No {
            reason: reason.into(),
        }
    }
}

/// A participant's definitive answer to a phase-2 or one-phase delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Committed,
    Aborted,
    /// One-phase: the participant refused the work.
    Rejected {
        reason: String,
    },
    /// Two-phase commit for a branch the participant never prepared.
    NotPrepared,
}

impl Answer {
    /// How the answer reads in a branch's history.
    pub fn describe(&self) -> String {
        match self {
            Answer::Committed => "committed".into(),
            Answer::Aborted => "aborted".into(),
            Answer::Rejected { reason } => format!("rejected: {reason}"),
            Answer::NotPrepared => "not prepared".into(),
        }
    }
}

/// Requests from the API; they may be refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Enlist(BranchSpec),
    Commit,
    Abort { reason: String },
}

/// Why a command was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the transaction is {0:?}, not ACTIVE: no more branches can be enlisted")]
    NotActive(TxnState),
    #[error("branch {0:?} is already enlisted")]
    DuplicateBranch(String),
    #[error("the transaction already has {0} branches, the most allowed")]
    TooManyBranches(usize),
    #[error("the transaction has no branches to commit")]
    NoBranches,
    #[error("the commit decision is already taken")]
    AlreadyCommitting,
    /// A commit is under way whose outcome is not durable yet (one-phase commit sent,
    /// decision being written): wait for the outcome rather than act on it.
    #[error("a commit is in flight; its outcome is not known yet")]
    CommitInFlight,
}

/// Results of the runtime's work, and timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    PrepareAnswered {
        branch: usize,
        vote: Vote,
    },
    PrepareFailed {
        branch: usize,
        error: String,
    },
    /// The answer to `SendOnePhaseCommit`, `SendCommit` or `SendAbort`.
    Delivered {
        branch: usize,
        answer: Answer,
    },
    DeliveryFailed {
        branch: usize,
        error: String,
    },
    RetryDue {
        branch: usize,
    },
    PrepareTimerFired,
    DeadlineReached,
    DecisionPersisted,
    /// The sweeper's periodic look: send again every call that has had no answer for
    /// `stale_after_ms`.
    Nudge {
        stale_after_ms: u64,
    },
}

/// The result recorded for a call whose answer never came when the sweeper sends it
/// again.
pub const NO_ANSWER: &str = "no answer; sent again";

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    StartDeadlineTimer {
        at_unix_ms: UnixMs,
    },
    StartPrepareTimer {
        after_ms: u64,
    },
    SendPrepare {
        branch: usize,
    },
    SendOnePhaseCommit {
        branch: usize,
    },
    SendCommit {
        branch: usize,
    },
    SendAbort {
        branch: usize,
    },
    /// Deliver to `branch` again after a backoff for its `attempt`-th failure.
    ScheduleRetry {
        branch: usize,
        attempt: u32,
    },
    /// Force the commit decision (`decision_record()`), or the concluded one-phase or
    /// read-only commit, to the log (`log_record()`), then feed `DecisionPersisted`.
    PersistDecision,
    /// Write `record()` lazily: the logged commit is final (every branch acknowledged).
    PersistEnd,
    /// Not part of the protocol: the transaction ended without a logged decision (an
    /// abort); its history may be written lazily, if kept.
    RecordHistory,
}

/// Parameters of a new transaction, already validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransaction {
    pub id: TxnId,
    pub created_unix_ms: UnixMs,
    pub deadline_unix_ms: UnixMs,
    pub prepare_timeout_ms: u64,
    pub max_branches: usize,
    /// Who began it (opaque to the protocol; kept in its records).
    pub owner: Option<String>,
}
