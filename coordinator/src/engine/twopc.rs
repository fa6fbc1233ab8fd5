//! Two-phase commit with presumed abort (R*, Mohan, Lindsay & Obermarck 1986) as a pure
//! state machine: commands and events in, actions out. No I/O, no clock, no randomness;
//! the runtime carries out the actions and feeds their results back as events.
//!
//! ```text
//!            Commit (≥2 branches)            all YES/READ_ONLY       DecisionPersisted
//!  Active ─────────────────────▶ Preparing ─────────────────▶ Deciding ───────────────▶ Committing
//!    │  Commit (1 branch)            │  NO, no answer, timeout,                              │ all acked
//!    │──────────────▶ OnePhase       │  deadline, Abort                                      ▼
//!    │                   │           ▼                          all acked               Committed
//!    └─ Abort/deadline ──┴──────▶ Aborting ─────────────────────────────────────────▶ Aborted
//!
//!  OnePhase ── committed ──▶ Concluding ── DecisionPersisted ──▶ Committed
//!  Preparing ── all READ_ONLY ──▶ Concluding
//!
//!  With parallel commit (the intent written alongside the prepares):
//!  Preparing ── all YES/READ_ONLY, intent durable ──▶ Committing (decision written lazily)
//!  Preparing ── all YES/READ_ONLY, intent not yet ──▶ Deciding ── IntentPersisted ──▶ Committing
//!  Preparing ── NO, no answer, timeout, deadline, Abort ──▶ DecidingAbort
//!                                        ── DecisionPersisted ──▶ Aborting (or Aborted)
//!  recover(intent) ──▶ Preparing, asked again; only a NO aborts it; a commit that a
//!                      vote stated by an operator completes goes through Deciding
//! ```
//!
//! **Parallel commit** (`NewTransaction::parallel_commit`, for transactions whose payloads
//! fit [`MAX_INTENT_PAYLOAD_BYTES`]): the transaction, with its branches' payloads, is
//! forced to the log (`PersistIntent`) at the same time as the prepares go out. Once that
//! intent is durable and every vote is YES / READ_ONLY, the commit is decided: every YES
//! is durable at its participant and the intent names them all, so a restart finds the
//! transaction and asks them again (`recover`), and the votes decide it the same way. The
//! decision is then written lazily (`NoteDecision`), and the client hears COMMITTED one
//! forced write sooner than with the decision forced after the votes. In exchange, an
//! abort decided after the intent went out is forced (`PersistDecision`, phase
//! `DecidingAbort`) before anyone hears it, and such a transaction always gets an end
//! record. A transaction recovered in phase 1 never aborts on a timeout or a request:
//! only a NO (or an operator stating a branch's vote) aborts it.
//!
//! Invariants:
//! - Commit is decided only after every branch voted YES or READ_ONLY, and is reported
//!   (state `Committing`) only after `PersistDecision` came back as `DecisionPersisted`,
//!   or, with parallel commit, once the intent is durable (`IntentPersisted`, or read
//!   from the log after a restart) and every vote is durable at its participant. A vote
//!   an operator stated is durable nowhere else: a commit it helps decide waits for
//!   `DecisionPersisted`.
//! - Once decided, the outcome never changes: late votes, timers and abort requests after
//!   the decision change nothing.
//! - Without an intent, aborts are never written to the log (presumed abort). A logged
//!   commit decision is followed by one lazy end record (`PersistEnd`) once every branch
//!   acknowledged: 1 forced + 1 unforced write (with parallel commit: the forced intent,
//!   the lazy decision and the lazy end; every transaction with an intent ends with a
//!   final record in the log). Transactions that end without a logged record emit
//!   `RecordHistory`, which is not a protocol write: the runtime writes their history
//!   lazily only if configured to. An answer recorded after the last record was issued
//!   (a call sent again, answering after the first one ended the transaction) asks for
//!   a write of its own, so that the log holds what memory does.
//! - An outcome once reported is never contradicted: a one-phase or all-read-only
//!   commit (which R* leaves unlogged) is forced to the log as its final record
//!   (`Concluding`, one group-committed write) before anyone sees COMMITTED, so that
//!   after a restart it is still COMMITTED rather than unknown (presumed aborted).
//! - An abort asked for while a commit is in flight (one-phase under way, decision or
//!   conclusion being written) is refused with `CommitInFlight`: the caller waits for
//!   the durable outcome rather than hearing of a decision that is not yet durable.
//! - Phase-2 deliveries are retried (`ScheduleRetry`) until every branch that needs one
//!   has acknowledged; only then is the transaction final.
//! - A one-phase commit's outcome is the participant's: at the deadline the coordinator
//!   asks for an abort, and whichever definitive answer comes first is the outcome.
//! - Aborts undelivered at the deadline are still retried (noted in the history); the
//!   runtime stops counting such a transaction as work in progress.
//! - An operator may settle a one-phase commit only once the deadline's abort probe is
//!   out (before, the commit may still arrive) and neither it nor the commit is in
//!   flight, and a branch only as the decision says.

use super::messages::stuck_note;
pub use super::messages::{
    Action, Answer, BranchSpec, Command, Event, NO_ANSWER, NO_ANSWER_PAUSED, NewTransaction,
    OperatorCommand, OperatorRequest, Refusal, RetryControl, Vote,
};
use crate::model::{
    AttemptLog, BranchRecord, BranchState, CallNumber, Operation, OperatorResolution, Resolution,
    Transition, TxnId, TxnKind, TxnRecord, TxnState, UnixMs,
};

#[path = "twopc_operator.rs"]
mod operator;
#[path = "twopc_phase_two.rs"]
mod phase_two;
#[path = "twopc_records.rs"]
mod records;
#[path = "twopc_votes.rs"]
mod votes;

/// Failed deliveries to one branch after which the transaction is flagged stuck (it
/// keeps retrying; an operator should look).
pub const STUCK_AFTER_DELIVERIES: u32 = 10;

/// How much longer a prepare call may take than the transaction's prepare timeout (the
/// runtime's deadline on the call, counted from the call's start, its wait for a permit
/// included). The nudge takes a prepare for lost only a grace after that, since the
/// call's start trails the engine's send by the task's spawn.
pub const PREPARE_CALL_GRACE_MS: u64 = 1_000;

/// Most bytes of payloads, all branches together, for which a commit writes its intent
/// (parallel commit); a larger one decides the classic way. Keeps the intent, one log
/// record, below the log's record bound, as a saga's definition is.
pub const MAX_INTENT_PAYLOAD_BYTES: usize = treaty_sdk::limits::MAX_SAGA_PAYLOAD_BYTES;

/// Where the transaction's intent (parallel commit) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// Not written: the classic protocol (or phase 1 has not started).
    Unlogged,
    /// Its forced write was issued and has not returned.
    Writing,
    /// It is durable, so the votes decide the commit; or the transaction was recovered
    /// from a record in the log, which its end record must close.
    Durable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    pub id: String,
    pub endpoint: String,
    /// Handed to prepare / one-phase commit; dropped once phase 1 is over.
    pub payload: Vec<u8>,
    pub state: BranchState,
    /// Phase-2 (or one-phase) deliveries tried; while the votes decide after a restart,
    /// the prepares asked again.
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Phase 2 must still reach this branch.
    pub awaiting_ack: bool,
    /// The latest calls to this branch and their results.
    pub history: AttemptLog,
    /// When the calls to this branch began to fail without an answer, until one comes
    /// (kept apart from the history, which holds only the latest attempts and any in
    /// flight).
    pub failing_since: Option<UnixMs>,
    /// What the participant answered against the decision, if it did.
    pub heuristic: Option<String>,
    /// An operator's decision about this branch.
    pub resolution: Option<OperatorResolution>,
}

impl Branch {
    /// Counts and records one more phase-2 (or one-phase) call, and asks for it.
    fn send_phase_two(&mut self, index: usize, operation: Operation, now: UnixMs) -> Action {
        self.attempts += 1;
        let call = self.history.start(operation, now);
        let branch = index;
        match operation {
            Operation::Abort => Action::SendAbort { branch, call },
            Operation::OnePhaseCommit => Action::SendOnePhaseCommit { branch, call },
            Operation::Prepare => Action::SendPrepare { branch, call },
            _ => Action::SendCommit { branch, call },
        }
    }
}

/// Whether a branch in `state` may hold a YES vote, or may yet cast one: an abort must
/// reach it.
fn may_hold_yes(state: BranchState) -> bool {
    matches!(
        state,
        BranchState::Preparing | BranchState::Prepared | BranchState::Unreachable
    )
}

/// The calls a `Delivered` / `DeliveryFailed` event can answer.
const PHASE_TWO: &[Operation] = &[
    Operation::Commit,
    Operation::OnePhaseCommit,
    Operation::Abort,
];

/// Where the transaction is. Finer than [`TxnState`], which is what users see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Active,
    Preparing,
    /// The transaction's only branch was sent a one-phase commit. `probing` once the
    /// deadline passed and an abort was sent to learn the outcome.
    OnePhase {
        probing: bool,
    },
    /// Every vote was YES / READ_ONLY; the commit decision is being forced to the log
    /// (or, with parallel commit, the intent is still being written).
    Deciding,
    /// With the intent written, the abort decided at `at_unix_ms` is being forced to the
    /// log before anyone hears it.
    DecidingAbort {
        at_unix_ms: UnixMs,
    },
    /// A one-phase commit's participant committed (or every branch was read-only) at
    /// `at_unix_ms`; the final record is being forced to the log before it is shown.
    Concluding {
        at_unix_ms: UnixMs,
        read_only: bool,
    },
    Committing,
    Aborting,
    Committed,
    Aborted,
}

impl Phase {
    pub fn state(self) -> TxnState {
        match self {
            Phase::Active => TxnState::Active,
            Phase::Preparing
            | Phase::OnePhase { .. }
            | Phase::Deciding
            | Phase::DecidingAbort { .. }
            | Phase::Concluding { .. } => TxnState::Preparing,
            Phase::Committing => TxnState::Committing,
            Phase::Aborting => TxnState::Aborting,
            Phase::Committed => TxnState::Committed,
            Phase::Aborted => TxnState::Aborted,
        }
    }
}

/// One two-phase commit transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwoPhaseCommit {
    id: TxnId,
    phase: Phase,
    created_unix_ms: UnixMs,
    deadline_unix_ms: UnixMs,
    prepare_timeout_ms: u64,
    max_branches: usize,
    branches: Vec<Branch>,
    reason: Option<String>,
    transitions: Vec<Transition>,
    owner: Option<String>,
    /// An operator paused retries and resends.
    paused: bool,
    /// A delivery keeps failing (flagged once, cleared at the end).
    stuck: bool,
    /// The deadline timer fired (the wall clock may read a little earlier).
    deadline_passed: bool,
    /// Write the intent at commit if the payloads fit (see the module doc).
    parallel_commit: bool,
    intent: Intent,
    /// Recovered in phase 1 with its intent in the log: the prepares are asked again
    /// until every branch answers, and only a NO aborts it.
    votes_decide: bool,
}

impl TwoPhaseCommit {
    /// A new ACTIVE transaction. Nothing is written to the log.
    pub fn begin(params: NewTransaction) -> (Self, Vec<Action>) {
        let txn = Self {
            id: params.id,
            phase: Phase::Active,
            created_unix_ms: params.created_unix_ms,
            deadline_unix_ms: params.deadline_unix_ms,
            prepare_timeout_ms: params.prepare_timeout_ms,
            max_branches: params.max_branches,
            branches: Vec::new(),
            reason: None,
            transitions: vec![Transition {
                state: TxnState::Active,
                at_unix_ms: params.created_unix_ms,
                reason: String::new(),
            }],
            owner: params.owner,
            paused: false,
            stuck: false,
            deadline_passed: false,
            parallel_commit: params.parallel_commit,
            intent: Intent::Unlogged,
            votes_decide: false,
        };
        let actions = vec![Action::StartDeadlineTimer {
            at_unix_ms: params.deadline_unix_ms,
        }];
        (txn, actions)
    }

    /// The principal that began it (`None` without authentication).
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    pub fn id(&self) -> TxnId {
        self.id
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn state(&self) -> TxnState {
        self.phase.state()
    }

    pub fn branches(&self) -> &[Branch] {
        &self.branches
    }

    /// The number of the latest call sent to `branch`: what engine tests answer.
    #[cfg(test)]
    pub fn latest_call(&self, branch: usize) -> CallNumber {
        self.branches
            .get(branch)
            .map_or(0, |b| b.history.latest_call())
    }

    pub fn branch(&self, index: usize) -> Option<&Branch> {
        self.branches.get(index)
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    /// Room of the branch and transition vectors (for memory estimates).
    pub fn capacities(&self) -> (usize, usize) {
        (self.branches.capacity(), self.transitions.capacity())
    }

    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    pub fn deadline_unix_ms(&self) -> UnixMs {
        self.deadline_unix_ms
    }

    pub fn prepare_timeout_ms(&self) -> u64 {
        self.prepare_timeout_ms
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn is_stuck(&self) -> bool {
        self.stuck
    }

    /// Recovered with its intent logged and no decision: its votes are being asked again,
    /// and they decide.
    pub fn votes_decide(&self) -> bool {
        self.votes_decide
    }

    pub fn created_unix_ms(&self) -> UnixMs {
        self.created_unix_ms
    }

    /// Whether its intent was written (parallel commit): the log then holds it until its
    /// end record.
    pub fn intent_logged(&self) -> bool {
        self.intent != Intent::Unlogged
    }

    /// Whether its decision is in the log (or being written there), so that a write of
    /// its record now keeps it: a commit's, or an abort decided after its intent.
    pub fn decision_is_logged(&self) -> bool {
        match self.phase {
            Phase::Deciding | Phase::Concluding { .. } | Phase::Committing | Phase::Committed => {
                true
            }
            Phase::Aborting | Phase::Aborted => self.intent_logged(),
            _ => false,
        }
    }

    /// An abort undelivered past its deadline that the runtime stops keeping (it keeps a
    /// bounded number): it ends ABORTED, noted so, and a participant still in doubt hears
    /// ABORT when it asks. Emits the end record of one whose intent is in the log, which
    /// would otherwise hold it unfinished (and a restart deliver it again).
    pub fn give_up_undelivered_abort(&mut self, now: UnixMs) -> Vec<Action> {
        if self.phase != Phase::Aborting {
            return Vec::new();
        }
        for b in &mut self.branches {
            b.awaiting_ack = false;
        }
        let reason = "given up undelivered: too many aborts undelivered past their deadline; \
                      a participant in doubt hears ABORT when it asks";
        self.finish(Phase::Aborted, reason.into(), now)
    }

    /// Whether it is past its deadline with only aborts left to deliver: such a
    /// transaction no longer counts as work in progress (see the runtime's admission).
    /// A one-phase commit whose participant does not answer keeps counting: its outcome
    /// is unknown until the participant answers or an operator resolves it.
    pub fn waits_past_deadline(&self, now: UnixMs) -> bool {
        (self.deadline_passed || now >= self.deadline_unix_ms) && self.phase == Phase::Aborting
    }

    /// Handles a request from the API.
    pub fn handle_command(
        &mut self,
        command: Command,
        now: UnixMs,
    ) -> Result<Vec<Action>, Refusal> {
        match command {
            Command::Enlist(spec) => {
                if self.phase != Phase::Active {
                    return Err(Refusal::NotActive(self.state()));
                }
                if self.branches.iter().any(|b| b.id == spec.id) {
                    return Err(Refusal::DuplicateBranch(spec.id));
                }
                if self.branches.len() >= self.max_branches {
                    return Err(Refusal::TooManyBranches(self.branches.len()));
                }
                self.branches.push(Branch {
                    id: spec.id,
                    endpoint: spec.endpoint,
                    payload: spec.payload,
                    state: BranchState::Enlisted,
                    attempts: 0,
                    last_error: None,
                    awaiting_ack: false,
                    history: AttemptLog::default(),
                    failing_since: None,
                    heuristic: None,
                    resolution: None,
                });
                Ok(Vec::new())
            }
            Command::Commit => match self.phase {
                Phase::Active => self.start_commit(now),
                // Asked again: the caller waits for the outcome already under way.
                _ => Ok(Vec::new()),
            },
            Command::Abort { reason } => match self.phase {
                // The votes decide: the caller waits for them.
                Phase::Preparing if self.votes_decide => Err(Refusal::CommitInFlight),
                Phase::Active | Phase::Preparing => Ok(self.decide_abort(reason, now)),
                // The outcome is not durable yet: the caller waits for it.
                Phase::OnePhase { .. }
                | Phase::Deciding
                | Phase::DecidingAbort { .. }
                | Phase::Concluding { .. } => Err(Refusal::CommitInFlight),
                Phase::Committing | Phase::Committed => Err(Refusal::AlreadyCommitting),
                Phase::Aborting | Phase::Aborted => Ok(Vec::new()),
            },
        }
    }

    /// Handles the result of the runtime's work. Events that come too late to matter
    /// (a vote after the decision, a timer after the end, a duplicate answer) are ignored.
    pub fn handle_event(&mut self, event: Event, now: UnixMs) -> Vec<Action> {
        match event {
            Event::PrepareAnswered { branch, call, vote } => {
                self.on_vote_answered(branch, call, vote, now)
            }
            Event::PrepareFailed {
                branch,
                call,
                error,
                permanent,
            } => {
                let result = format!("error: {error}");
                match self.finish_call(branch, call, &[Operation::Prepare], result, now) {
                    // A call given up: what it says is asked again (or stated) since.
                    None => return Vec::new(),
                    Some(true) => return self.write_again().into_iter().collect(),
                    Some(false) => {}
                }
                if self.phase != Phase::Preparing || !self.branch_is(branch, BranchState::Preparing)
                {
                    return Vec::new();
                }
                if self.votes_decide {
                    return self.ask_again_later(branch, error, permanent, now);
                }
                let b = &mut self.branches[branch];
                let id = b.id.clone();
                b.last_error = Some(error.clone());
                if permanent {
                    // No answer would be true (past the participant's retention, with no
                    // record; or not sent, past the horizon): it holds no YES and runs
                    // nothing, so no abort is owed to it, now or after a restart.
                    b.state = BranchState::VotedNo;
                    return self.decide_abort(format!("branch {id} refused prepare: {error}"), now);
                }
                b.state = BranchState::Unreachable;
                self.decide_abort(format!("branch {id} did not answer prepare: {error}"), now)
            }
            Event::Delivered {
                branch,
                call,
                answer,
            } => self.on_delivered(branch, call, answer, now),
            Event::DeliveryFailed {
                branch,
                call,
                error,
                permanent,
            } => {
                let result = format!("error: {error}");
                match self.finish_call(branch, call, PHASE_TWO, result, now) {
                    // A call given up, whose delivery is sent again: nothing to retry.
                    None => return Vec::new(),
                    Some(true) => return self.write_again().into_iter().collect(),
                    Some(false) => {}
                }
                let b = &mut self.branches[branch];
                b.failing_since.get_or_insert(now);
                if !b.awaiting_ack {
                    return Vec::new();
                }
                let attempt = b.attempts;
                let id = b.id.clone();
                b.last_error = Some(error.clone());
                if (attempt >= STUCK_AFTER_DELIVERIES || permanent) && !self.stuck {
                    self.stuck = true;
                    let what = format!("delivering to branch {id}");
                    self.note(stuck_note(&what, attempt, &error, permanent), now);
                }
                vec![Action::ScheduleRetry { branch, attempt }]
            }
            Event::RetryDue { branch, attempt } => self.on_retry_due(branch, attempt, now),
            Event::PrepareTimerFired => match self.phase {
                Phase::Preparing if !self.votes_decide => {
                    let ms = self.prepare_timeout_ms;
                    self.decide_abort(format!("prepare timed out after {ms} ms"), now)
                }
                _ => Vec::new(),
            },
            Event::DeadlineReached => {
                self.deadline_passed = true;
                match self.phase {
                    // Its caller may have heard COMMITTED before the restart.
                    Phase::Preparing if self.votes_decide => Vec::new(),
                    Phase::Active | Phase::Preparing => {
                        self.decide_abort("the transaction's deadline passed".into(), now)
                    }
                    Phase::OnePhase { probing: false } => {
                        // The participant holds the outcome; an abort settles it either way.
                        self.phase = Phase::OnePhase { probing: true };
                        // Only aborts go out from now on: the payload is not needed.
                        self.branches[0].payload = Vec::new();
                        self.branches[0].attempts += 1;
                        let call = self.branches[0].history.start(Operation::Abort, now);
                        vec![Action::SendAbort { branch: 0, call }]
                    }
                    Phase::Aborting => {
                        let note = "abort undelivered at the deadline: still retried, and a \
                                participant in doubt hears ABORT when it asks";
                        self.note(note.to_string(), now);
                        Vec::new()
                    }
                    _ => Vec::new(),
                }
            }
            Event::DecisionPersisted => match self.phase {
                Phase::Deciding => {
                    self.enter(Phase::Committing, String::new(), now);
                    self.deliver_to_awaiting(Operation::Commit, now)
                }
                // The final record is what was written: nothing more to log.
                Phase::Concluding {
                    at_unix_ms,
                    read_only,
                } => {
                    self.conclude(at_unix_ms, read_only);
                    Vec::new()
                }
                Phase::DecidingAbort { at_unix_ms } => self.enter_abort(at_unix_ms),
                _ => Vec::new(),
            },
            Event::IntentPersisted => {
                // Only the write under way completes it: a decision being forced
                // (`Deciding` with the intent durable already, after a stated vote)
                // is not this event's to take.
                if self.intent != Intent::Writing {
                    return Vec::new();
                }
                self.intent = Intent::Durable;
                match self.phase {
                    Phase::Deciding => self.commit_implied(now),
                    _ => Vec::new(),
                }
            }
            Event::Nudge { stale_after_ms } => self.nudge(stale_after_ms, now),
        }
    }

    fn enter(&mut self, phase: Phase, reason: String, now: UnixMs) {
        let before = self.phase.state();
        self.phase = phase;
        if phase.state() != before {
            self.transitions.push(Transition {
                state: phase.state(),
                at_unix_ms: now,
                reason,
            });
        }
    }

    fn branch_is(&self, index: usize, state: BranchState) -> bool {
        self.branches.get(index).is_some_and(|b| b.state == state)
    }
}
