//! Sagas (Garcia-Molina & Salem 1987) as a pure state machine: events in, actions out;
//! no I/O, no clock, no randomness.
//!
//! ```text
//!  Submitting ──Persisted──▶ Running ──every step committed──▶ Finishing(Completed) ──Persisted──▶ Completed
//!                               │ a step rejected, or out of attempts
//!                               ▼
//!                      DecidingCompensation ──Persisted──▶ Compensating ──all undone──▶ Finishing(Compensated) ──Persisted──▶ Compensated
//! ```
//!
//! Invariants:
//! - No step runs before the definition is durable (`Submitting` waits for `Persisted`).
//! - A step starts only when every step it runs `after` has committed.
//! - The decision to compensate is durable before the first compensation is sent or
//!   anyone is told; "completed" and "compensated" are durable before they are shown.
//!   Every log write issued after the decision carries it ([`Saga::log_record`]), so a
//!   lazy progress write can never take the direction back.
//! - Once compensating, no forward action is sent again. A step is compensated only when
//!   every step that runs after it is compensated, skipped or rejected (reverse
//!   dependency order); independent steps are compensated in parallel.
//! - Every step whose forward action may have run (committed, in flight, out of attempts)
//!   is compensated; the participant's barrier makes compensating a step that never ran
//!   a recorded no-op.
//! - Compensations are retried without limit; after `stuck_after_attempts` failures of
//!   one step the saga is flagged stuck (and keeps retrying) until an operator's
//!   statement leaves no compensation failing and no step waiting for an operator.
//! - The initiator or an operator may cancel a running saga, and it may carry an overall
//!   deadline: either is a decision to compensate like any other (forced first).
//! - An operator may pause retries, send them at once, or state a stuck step's outcome;
//!   a stated outcome that contradicts the decision to compensate is refused. A step
//!   stated committed (perhaps by hand) is undone only when an operator says so: its
//!   participant's compensation answer leaves it waiting, the saga flagged stuck.
//! - An answer or failure recorded once the final record was issued (a call sent again,
//!   heard after the saga ended) asks for a lazy write of its own: the log holds what
//!   memory does.

use std::sync::Arc;

use super::messages::{
    NO_ANSWER, NO_ANSWER_AWAITING_OPERATOR, NO_ANSWER_PAUSED, OperatorCommand, OperatorRequest,
    Refusal, RetryControl, stuck_note,
};
use crate::model::{
    AttemptLog, BranchRecord, BranchState, CallNumber, Operation, OperatorResolution, Resolution,
    RetryPolicy, SagaDefinition, Transition, TxnId, TxnKind, TxnRecord, TxnState, UnixMs,
};

#[path = "saga_operator.rs"]
mod operator;
#[path = "saga_records.rs"]
mod records;
#[path = "saga_steps.rs"]
mod steps;

/// How much longer than its own timeout a step's call (or a compensation's) stays open
/// before the nudge takes it for lost: the runtime counts the call's deadline from the
/// call's start, which trails the engine's send by the task's spawn, and a call sent
/// again a moment before the first one's deadline would only run beside it.
pub const CALL_START_GRACE_MS: u64 = 1_000;

/// What a participant answered to a step's forward action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepAnswer {
    Committed,
    Rejected {
        reason: String,
    },
    /// The step had been compensated before this forward action arrived.
    AlreadyCompensated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaEvent {
    /// The answer to `SendStep` number `call`.
    StepAnswered {
        step: usize,
        call: CallNumber,
        answer: StepAnswer,
    },
    /// No answer: a transport error, a timeout, or an error status.
    StepFailed {
        step: usize,
        call: CallNumber,
        error: String,
    },
    /// The retry timer set after the `attempt`-th forward attempt failed; stale
    /// (ignored) if the step was sent again since.
    StepRetryDue {
        step: usize,
        attempt: u32,
    },
    Compensated {
        step: usize,
        call: CallNumber,
    },
    CompensationFailed {
        step: usize,
        call: CallNumber,
        error: String,
        /// Sending it again cannot succeed (the participant refused it for good, or it
        /// is past the delivery horizon): the saga is flagged stuck at once.
        permanent: bool,
    },
    /// Like `StepRetryDue`, for the `attempt`-th compensation.
    CompensationRetryDue {
        step: usize,
        attempt: u32,
    },
    /// The saga's overall deadline passed.
    DeadlineReached,
    /// The forced write asked for last (definition, decision or final state) returned.
    Persisted,
    /// The sweeper's periodic look: send again every call that has had no answer for
    /// `stale_after_ms`, or for its own call timeout and [`CALL_START_GRACE_MS`] if
    /// longer (paused: mark it lost, and send nothing).
    Nudge {
        stale_after_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaAction {
    /// Feed `DeadlineReached` at this time.
    StartDeadlineTimer {
        at_unix_ms: UnixMs,
    },
    /// Each call carries its number ([`CallNumber`]), which its answer or failure names.
    SendStep {
        step: usize,
        call: CallNumber,
    },
    SendCompensation {
        step: usize,
        call: CallNumber,
    },
    /// Retry the forward action after a backoff for its `attempt`-th failure.
    ScheduleStepRetry {
        step: usize,
        attempt: u32,
        policy: RetryPolicy,
    },
    ScheduleCompensationRetry {
        step: usize,
        attempt: u32,
        policy: RetryPolicy,
    },
    /// Force `log_record()` to the log, then feed `Persisted`.
    PersistForced,
    /// Write `log_record()` lazily (progress only).
    PersistLazy,
    /// A compensation keeps failing, or a step stated committed waits for an operator to
    /// undo it: tell the operator.
    WarnStuck {
        step: usize,
    },
}

/// Where the saga is. Finer than [`TxnState`], which is what users see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaPhase {
    /// The definition is being forced to the log; nothing has run.
    Submitting,
    Running,
    /// The decision to compensate is being forced to the log.
    DecidingCompensation,
    Compensating,
    /// The final state (reached at `at`) is being forced to the log.
    Finishing {
        compensated: bool,
        at: UnixMs,
    },
    Completed,
    Compensated,
}

impl SagaPhase {
    /// What users see: nothing not yet durable.
    pub fn state(self) -> TxnState {
        match self {
            SagaPhase::Submitting
            | SagaPhase::Running
            | SagaPhase::DecidingCompensation
            | SagaPhase::Finishing {
                compensated: false, ..
            } => TxnState::Running,
            SagaPhase::Compensating
            | SagaPhase::Finishing {
                compensated: true, ..
            } => TxnState::Compensating,
            SagaPhase::Completed => TxnState::Completed,
            SagaPhase::Compensated => TxnState::Compensated,
        }
    }

    /// What the log must hold once this phase's writes are issued: decisions included.
    fn logged_state(self) -> TxnState {
        match self {
            SagaPhase::Submitting | SagaPhase::Running => TxnState::Running,
            SagaPhase::DecidingCompensation | SagaPhase::Compensating => TxnState::Compensating,
            SagaPhase::Finishing {
                compensated: false, ..
            }
            | SagaPhase::Completed => TxnState::Completed,
            SagaPhase::Finishing {
                compensated: true, ..
            }
            | SagaPhase::Compensated => TxnState::Compensated,
        }
    }
}

/// How far a step's compensation has got: one state at a time, which two flags ("sent",
/// "waiting for an operator") did not enforce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CompensationProgress {
    /// None outstanding: the step never compensated, is compensated, or is compensating
    /// with its compensation not sent yet (or not since a restart).
    Unsent,
    /// In flight, or waiting to be retried.
    Sent,
    /// Answered, but an operator stated the step's forward action committed: see
    /// [`Step::awaits_operator`].
    AwaitsOperator,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub state: BranchState,
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub last_error: Option<String>,
    pub history: AttemptLog,
    /// How far its compensation has got. Not logged: after a restart a compensating
    /// step sends its compensation again, and the answer brings it back here.
    compensation: CompensationProgress,
    /// When calls for this step began to fail without an answer, until one comes.
    pub failing_since: Option<UnixMs>,
    /// An operator's decision about this step.
    pub resolution: Option<OperatorResolution>,
}

impl Step {
    fn new(state: BranchState) -> Self {
        Self {
            state,
            attempts: 0,
            compensation_attempts: 0,
            last_error: None,
            history: AttemptLog::default(),
            compensation: CompensationProgress::Unsent,
            failing_since: None,
            resolution: None,
        }
    }

    /// Its compensation was answered, but an operator stated its forward action
    /// committed (perhaps by hand, which its participant cannot undo): only an
    /// operator can state it undone.
    pub fn awaits_operator(&self) -> bool {
        self.compensation == CompensationProgress::AwaitsOperator
    }

    /// An operator stated its forward action committed ("its work stands", which may be
    /// work done by hand).
    fn stated_committed(&self) -> bool {
        self.resolution
            .as_ref()
            .is_some_and(|r| r.outcome == Resolution::Commit)
    }

    /// Nothing left to undo: compensated, never started, or refused by the participant.
    fn undone(&self) -> bool {
        matches!(
            self.state,
            BranchState::Compensated | BranchState::Skipped | BranchState::Rejected
        )
    }
}

/// A new saga, validated by the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSaga {
    pub id: TxnId,
    pub created_unix_ms: UnixMs,
    pub definition: SagaDefinition,
    pub idempotency_key: Option<String>,
    /// Who submitted it (opaque to the protocol; kept in its records).
    pub owner: Option<String>,
    /// Compensate if it has not completed by then.
    pub deadline_unix_ms: Option<UnixMs>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saga {
    id: TxnId,
    phase: SagaPhase,
    created_unix_ms: UnixMs,
    /// Shared with every record built from it (`record_in`).
    definition: Arc<SagaDefinition>,
    idempotency_key: Option<String>,
    steps: Vec<Step>,
    reason: Option<String>,
    stuck: bool,
    transitions: Vec<Transition>,
    /// Rebuilt from the log after a restart: steps the log shows as pending may have run
    /// (progress is written lazily), so compensation cannot skip them.
    recovered: bool,
    owner: Option<String>,
    deadline_unix_ms: Option<UnixMs>,
    /// An operator paused retries and resends.
    paused: bool,
}

impl Saga {
    /// A new saga: its definition must be durable before anything runs. Its first
    /// transition (RUNNING) is recorded when that write returns.
    pub fn submit(params: NewSaga) -> (Self, Vec<SagaAction>) {
        let steps = params
            .definition
            .steps
            .iter()
            .map(|_| Step::new(BranchState::Pending))
            .collect();
        let saga = Self {
            id: params.id,
            phase: SagaPhase::Submitting,
            created_unix_ms: params.created_unix_ms,
            definition: Arc::new(params.definition),
            idempotency_key: params.idempotency_key,
            steps,
            reason: None,
            stuck: false,
            transitions: Vec::new(),
            recovered: false,
            owner: params.owner,
            deadline_unix_ms: params.deadline_unix_ms,
            paused: false,
        };
        (saga, vec![SagaAction::PersistForced])
    }

    /// The principal that began it (`None` without authentication).
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
    }

    pub fn id(&self) -> TxnId {
        self.id
    }

    pub fn phase(&self) -> SagaPhase {
        self.phase
    }

    pub fn state(&self) -> TxnState {
        self.phase.state()
    }

    /// Whether the definition is durable (the saga is accepted and may be reported).
    pub fn is_accepted(&self) -> bool {
        self.phase != SagaPhase::Submitting
    }

    /// The number of the latest forward call sent to `step`: what engine tests answer.
    #[cfg(test)]
    pub fn step_call(&self, step: usize) -> CallNumber {
        self.steps[step].history.latest_call_to(Operation::Step)
    }

    /// The number of the latest compensation sent to `step`.
    #[cfg(test)]
    pub fn compensation_call(&self, step: usize) -> CallNumber {
        self.steps[step]
            .history
            .latest_call_to(Operation::Compensate)
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    pub fn definition(&self) -> &SagaDefinition {
        &self.definition
    }

    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    pub fn is_stuck(&self) -> bool {
        self.stuck
    }

    /// Room of the step and transition vectors (for memory estimates).
    pub fn capacities(&self) -> (usize, usize) {
        (self.steps.capacity(), self.transitions.capacity())
    }

    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    pub fn reason(&self) -> Option<&str> {
        self.reason.as_deref()
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    pub fn created_unix_ms(&self) -> UnixMs {
        self.created_unix_ms
    }

    /// The timer for the overall deadline, if the saga has one.
    fn deadline_timer(&self) -> Option<SagaAction> {
        self.deadline_unix_ms
            .map(|at_unix_ms| SagaAction::StartDeadlineTimer { at_unix_ms })
    }

    pub fn handle_event(&mut self, event: SagaEvent, now: UnixMs) -> Vec<SagaAction> {
        match event {
            SagaEvent::Persisted => self.on_persisted(now),
            SagaEvent::Nudge { stale_after_ms } => self.nudge(stale_after_ms, now),
            SagaEvent::StepAnswered { step, call, answer } => {
                self.on_step_answer(step, call, answer, now)
            }
            SagaEvent::StepFailed { step, call, error } => {
                self.on_step_failure(step, call, error, now)
            }
            SagaEvent::DeadlineReached => match self.phase {
                SagaPhase::Running => self.decide_compensation("the saga's deadline passed".into()),
                _ => Vec::new(),
            },
            SagaEvent::StepRetryDue { step, attempt } => {
                let running = self.phase == SagaPhase::Running && !self.paused;
                match self.steps.get_mut(step) {
                    Some(s)
                        if running && s.state == BranchState::Running && s.attempts == attempt =>
                    {
                        s.attempts += 1;
                        let call = s.history.start(Operation::Step, now);
                        vec![SagaAction::SendStep { step, call }]
                    }
                    _ => Vec::new(),
                }
            }
            SagaEvent::Compensated { step, call } => self.on_compensated(step, call, now),
            SagaEvent::CompensationFailed {
                step,
                call,
                error,
                permanent,
            } => self.on_compensation_failure(step, call, error, permanent, now),
            SagaEvent::CompensationRetryDue { step, attempt } => match self.steps.get_mut(step) {
                Some(s)
                    if s.state == BranchState::Compensating
                        && !s.awaits_operator()
                        && s.compensation_attempts == attempt
                        && !self.paused =>
                {
                    s.compensation_attempts += 1;
                    let call = s.history.start(Operation::Compensate, now);
                    vec![SagaAction::SendCompensation { step, call }]
                }
                _ => Vec::new(),
            },
        }
    }

    fn on_persisted(&mut self, now: UnixMs) -> Vec<SagaAction> {
        match self.phase {
            SagaPhase::Submitting => {
                self.enter(SagaPhase::Running, String::new(), now);
                let mut actions: Vec<SagaAction> = self.deadline_timer().into_iter().collect();
                actions.extend(self.start_runnable_steps(now, false));
                actions
            }
            SagaPhase::DecidingCompensation => {
                let reason = self.reason.clone().unwrap_or_default();
                self.enter(SagaPhase::Compensating, reason, now);
                self.compensate_what_is_left(now)
            }
            SagaPhase::Finishing { compensated, at } => {
                let end = if compensated {
                    SagaPhase::Compensated
                } else {
                    SagaPhase::Completed
                };
                // The same transition the final record was written with.
                self.enter(end, String::new(), at);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Sends again every forward action or compensation whose call has had no answer for
    /// `stale_after_ms`, or for its own call timeout and [`CALL_START_GRACE_MS`] if longer
    /// (the answer was lost; the barrier answers a repeat from its record). Steps waiting for a retry have their
    /// timer. Paused, such a call is taken as lost but not sent: `Resume` sends it, and
    /// meanwhile an operator may resolve the step, which is refused while a call is in
    /// flight. A step that waits for an operator is never sent again; its call is taken
    /// as lost all the same, or a lost one would keep its resolve refused for ever.
    fn nudge(&mut self, stale_after_ms: u64, now: UnixMs) -> Vec<SagaAction> {
        let (state, operation) = match self.phase {
            SagaPhase::Running => (BranchState::Running, Operation::Step),
            SagaPhase::Compensating => (BranchState::Compensating, Operation::Compensate),
            _ => return Vec::new(),
        };
        let mut actions = Vec::new();
        for (step, s) in self.steps.iter_mut().enumerate() {
            let call_timeout_ms = self.definition.steps[step].timeout_ms;
            if s.state != state
                || !s.history.open_for_at_least(
                    stale_after_ms.max(call_timeout_ms.saturating_add(CALL_START_GRACE_MS)),
                    now,
                )
            {
                continue;
            }
            if s.awaits_operator() {
                s.history.abandon_open(NO_ANSWER_AWAITING_OPERATOR, now);
                continue;
            }
            if self.paused {
                s.history.abandon_open(NO_ANSWER_PAUSED, now);
                continue;
            }
            s.history.abandon_open(NO_ANSWER, now);
            let call = s.history.start(operation, now);
            if operation == Operation::Step {
                s.attempts += 1;
                actions.push(SagaAction::SendStep { step, call });
            } else {
                s.compensation_attempts += 1;
                actions.push(SagaAction::SendCompensation { step, call });
            }
        }
        actions
    }

    /// Every step committed or nothing left to do: the final state is forced before it is
    /// shown.
    fn finish(&mut self, compensated: bool, now: UnixMs) -> Vec<SagaAction> {
        self.phase = SagaPhase::Finishing {
            compensated,
            at: now,
        };
        self.stuck = false;
        vec![SagaAction::PersistForced]
    }

    fn enter(&mut self, phase: SagaPhase, reason: String, now: UnixMs) {
        self.phase = phase;
        self.transitions.push(Transition {
            state: phase.state(),
            at_unix_ms: now,
            reason,
        });
    }
}
