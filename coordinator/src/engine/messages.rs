//! The vocabulary of the two-phase commit state machine: what goes in (commands from the
//! API, events from the runtime) and what comes out (actions for the runtime, refusals).

use crate::model::{CallNumber, Resolution, TxnId, TxnState, UnixMs};

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

/// What an operator (an admin principal) asks of a transaction of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorCommand {
    /// Send now every delivery waiting for its retry timer.
    RetryNow,
    /// Send no retries (nor the sweeper's resends: a call it finds unanswered is marked
    /// lost) until `Resume`.
    Pause,
    /// Retries go on; what was waiting is sent now.
    Resume,
    /// Two-phase: abort if undecided. Saga: compensate what ran.
    Cancel,
    /// The operator states the outcome of one branch (saga step) that the protocol
    /// could not settle: refused where it contradicts the transaction's decision.
    Resolve {
        branch_id: String,
        outcome: Resolution,
    },
}

/// An operator's request, with who asks and why (both kept in the history).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRequest {
    pub command: OperatorCommand,
    /// The principal asking (empty without authentication).
    pub by: String,
    pub reason: String,
}

impl OperatorRequest {
    /// How the request reads in the transaction's history.
    pub fn describe(&self, what: &str) -> String {
        let by = if self.by.is_empty() {
            "an operator".to_string()
        } else {
            format!("operator {}", self.by)
        };
        if self.reason.is_empty() {
            format!("{what} by {by}")
        } else {
            format!("{what} by {by}: {}", self.reason)
        }
    }
}

impl Refusal {
    /// Resolving `branch` as `wanted` goes against the transaction's `decided` outcome.
    pub fn contradicts(branch: &str, wanted: Resolution, decided: Resolution) -> Self {
        Refusal::ContradictsDecision {
            branch: branch.to_string(),
            wanted,
            decided: match decided {
                Resolution::Commit => "commit",
                Resolution::Abort => "abort",
            },
        }
    }
}

/// Retry-now, pause and resume: the same for both engines, which say how they keep the
/// flag, send what waits and note an event in their history.
pub trait RetryControl {
    type Action;

    fn paused_mut(&mut self) -> &mut bool;

    /// Sends now every delivery waiting for a retry timer (or for `Resume`).
    fn send_waiting(&mut self, now: UnixMs) -> Vec<Self::Action>;

    fn note(&mut self, reason: String, now: UnixMs);

    /// Carries out `RetryNow`, `Pause` or `Resume` (other commands change nothing).
    fn control_retries(
        &mut self,
        request: &OperatorRequest,
        now: UnixMs,
    ) -> Result<Vec<Self::Action>, Refusal> {
        let (actions, what) = match request.command {
            OperatorCommand::RetryNow => {
                let actions = self.send_waiting(now);
                if actions.is_empty() {
                    return Err(Refusal::NothingToRetry);
                }
                (actions, "retried now")
            }
            OperatorCommand::Pause => {
                let paused = self.paused_mut();
                if *paused {
                    return Err(Refusal::AlreadyPaused);
                }
                *paused = true;
                (Vec::new(), "retries paused")
            }
            OperatorCommand::Resume => {
                let paused = self.paused_mut();
                if !*paused {
                    return Err(Refusal::NotPaused);
                }
                *paused = false;
                (self.send_waiting(now), "retries resumed")
            }
            _ => return Ok(Vec::new()),
        };
        self.note(request.describe(what), now);
        Ok(actions)
    }
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
    /// A saga's decision (to compensate, or that it completed) is being written.
    #[error("a decision is being written; ask again in a moment")]
    DecisionInFlight,
    /// The coordinator restarted while this commit was in phase 1 with its intent in the
    /// log: the participants' votes decide it, and its caller may have heard COMMITTED.
    #[error(
        "the participants' votes decide this commit (the coordinator restarted during phase 1): \
         it cannot be cancelled; resolve a branch whose participant cannot answer instead"
    )]
    VotesDecide,
    #[error("the transaction is final ({0:?}): there is nothing left to do")]
    Final(TxnState),
    #[error("the transaction is not final ({0:?}): forgetting it would lose its decision")]
    Unfinished(TxnState),
    #[error(
        "an operator resolved a branch of this commit without its participant's answer: \
         that participant may still ask, and must hear COMMIT; it is kept for the log's retention"
    )]
    MayStillAsk,
    #[error("the transaction is already {0:?}")]
    AlreadyEnding(TxnState),
    #[error(
        "nothing is waiting for a retry (calls in flight are answered, or sent again by the sweeper)"
    )]
    NothingToRetry,
    #[error("its retries are already paused")]
    AlreadyPaused,
    #[error("its retries are not paused")]
    NotPaused,
    #[error("there is no branch {0:?}")]
    UnknownBranch(String),
    #[error("the transaction is undecided ({0:?}): cancel it instead")]
    Undecided(TxnState),
    #[error("resolving branch {branch:?} as {wanted:?} contradicts the decision to {decided}")]
    ContradictsDecision {
        branch: String,
        wanted: Resolution,
        decided: &'static str,
    },
    /// A call for the branch is in flight: its answer may settle the branch, and work an
    /// operator did by hand would be done (or undone) a second time if the call went
    /// through.
    #[error(
        "a call for branch {0:?} is in flight, and its answer may settle it: pause the \
         transaction so that nothing is sent again, and resolve once the call has ended \
         (txn show marks it in flight; a call that timed out may still run at the participant)"
    )]
    CallInFlight(String),
    #[error("branch {branch:?} is {state:?}: it has its outcome, there is nothing to resolve")]
    NothingToResolve {
        branch: String,
        state: crate::model::BranchState,
    },
}

/// Results of the runtime's work, and timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The answer to `SendPrepare` number `call`.
    PrepareAnswered {
        branch: usize,
        call: CallNumber,
        vote: Vote,
    },
    PrepareFailed {
        branch: usize,
        call: CallNumber,
        error: String,
        /// Asking again cannot mend it (the participant answered FAILED_PRECONDITION,
        /// or the transaction is past the delivery horizon). Only consulted while the
        /// votes decide: the classic protocol aborts on any failure.
        permanent: bool,
    },
    /// The answer to `SendOnePhaseCommit`, `SendCommit` or `SendAbort` number `call`.
    Delivered {
        branch: usize,
        call: CallNumber,
        answer: Answer,
    },
    DeliveryFailed {
        branch: usize,
        call: CallNumber,
        error: String,
        /// Sending it again cannot succeed (the participant refused it for good, or it
        /// is past the delivery horizon): the transaction is flagged stuck at once.
        permanent: bool,
    },
    /// The retry timer set after the `attempt`-th delivery failed; stale (ignored) if
    /// the branch was sent again since.
    RetryDue {
        branch: usize,
        attempt: u32,
    },
    PrepareTimerFired,
    DeadlineReached,
    DecisionPersisted,
    /// The record `PersistIntent` wrote is durable.
    IntentPersisted,
    /// The sweeper's periodic look: send again every call that has had no answer for
    /// `stale_after_ms` (paused: mark it lost, and send nothing).
    Nudge {
        stale_after_ms: u64,
    },
}

/// The result recorded for a call whose answer never came when the sweeper sends it
/// again.
pub const NO_ANSWER: &str = "no answer; sent again";

/// The same while the transaction is paused: the call is taken as lost, so that an
/// operator may resolve its branch; `Resume` sends again what still waits.
pub const NO_ANSWER_PAUSED: &str = "no answer; taken as lost while paused";

/// The same for a saga step that waits for an operator: nothing more is sent for it, and
/// its call is taken as lost so that the operator may resolve it.
pub const NO_ANSWER_AWAITING_OPERATOR: &str = "no answer; taken as lost (waits for an operator)";

/// The note a transaction gets when it is flagged stuck: `what` (say "delivering to
/// branch b1") failed `attempts` times, or cannot succeed at all (`permanent`).
pub fn stuck_note(what: &str, attempts: u32, error: &str, permanent: bool) -> String {
    if permanent {
        format!(
            "stuck: {what} cannot succeed ({error}); an operator must resolve it; still retrying"
        )
    } else {
        format!("stuck: {what} failed {attempts} times (last: {error}); still retrying")
    }
}

/// What the runtime must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    StartDeadlineTimer {
        at_unix_ms: UnixMs,
    },
    StartPrepareTimer {
        after_ms: u64,
    },
    /// Each call carries its number ([`CallNumber`]), which its answer or failure names.
    SendPrepare {
        branch: usize,
        call: CallNumber,
    },
    SendOnePhaseCommit {
        branch: usize,
        call: CallNumber,
    },
    SendCommit {
        branch: usize,
        call: CallNumber,
    },
    SendAbort {
        branch: usize,
        call: CallNumber,
    },
    /// Deliver to `branch` again after a backoff for its `attempt`-th failure.
    ScheduleRetry {
        branch: usize,
        attempt: u32,
    },
    /// Force the commit decision (`decision_record()`), the abort decided after an
    /// intent, or the concluded one-phase or read-only commit, to the log
    /// (`log_record()`), then feed `DecisionPersisted`.
    PersistDecision,
    /// Force `record()` to the log alongside the prepares (the transaction, its branches
    /// and their payloads, in state PREPARING), then feed `IntentPersisted`.
    PersistIntent,
    /// Write `record()` lazily: the commit the votes and the durable intent decided
    /// (state COMMITTING), so that recovery need not ask the participants again.
    NoteDecision,
    /// Write `record()` lazily: the logged commit is final (every branch acknowledged).
    PersistEnd,
    /// Write `log_record()` lazily: what was recorded since the last write of a
    /// transaction whose decision is in the log (or being written there, as a one-phase
    /// or read-only commit's final record may be): an operator's resolution of a branch,
    /// or an answer heard after the last record was issued.
    PersistProgress,
    /// A participant answered against the decision: count it and warn the operator.
    ReportHeuristic {
        branch: usize,
    },
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
    /// Write the transaction (with its payloads) to the log alongside its prepares, so
    /// that the votes decide the commit without a forced write after them (see
    /// `twopc`'s module doc). `false`: classic presumed abort.
    pub parallel_commit: bool,
}
