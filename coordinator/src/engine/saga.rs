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
//!   one step the saga is flagged stuck (and keeps retrying).
//! - The initiator or an operator may cancel a running saga, and it may carry an overall
//!   deadline: either is a decision to compensate like any other (forced first).
//! - An operator may pause retries, send them at once, or state a stuck step's outcome;
//!   a stated outcome that contradicts the decision to compensate is refused.

use std::sync::Arc;

use super::messages::{
    NO_ANSWER, OperatorCommand, OperatorRequest, Refusal, RetryControl, stuck_note,
};
use crate::model::{
    AttemptLog, BranchRecord, BranchState, Operation, OperatorResolution, Resolution, RetryPolicy,
    SagaDefinition, Transition, TxnId, TxnKind, TxnRecord, TxnState, UnixMs,
};

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
    StepAnswered {
        step: usize,
        answer: StepAnswer,
    },
    /// No answer: a transport error, a timeout, or an error status.
    StepFailed {
        step: usize,
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
    },
    CompensationFailed {
        step: usize,
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
    /// `stale_after_ms`.
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
    SendStep {
        step: usize,
    },
    SendCompensation {
        step: usize,
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
    /// A compensation keeps failing: tell the operator.
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub state: BranchState,
    pub attempts: u32,
    pub compensation_attempts: u32,
    pub last_error: Option<String>,
    pub history: AttemptLog,
    /// A compensation is in flight or waiting to be retried.
    compensation_sent: bool,
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
            compensation_sent: false,
            failing_since: None,
            resolution: None,
        }
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

    /// A saga found unfinished in the log after a restart: forward steps are driven
    /// again from where the log says they stood (participants answer replays from their
    /// barrier), or compensation resumes.
    pub fn recover(record: TxnRecord, now: UnixMs) -> (Self, Vec<SagaAction>) {
        let Some(definition) = record.saga.clone() else {
            panic!("invariant: a saga is recovered only with its definition (the runtime checks)");
        };
        let mut steps: Vec<Step> = record
            .branches
            .iter()
            .map(|b| {
                let mut history = b.history.clone();
                history.abandon_open("unknown: the coordinator restarted", now);
                Step {
                    state: b.state,
                    attempts: b.attempts,
                    compensation_attempts: b.compensation_attempts,
                    last_error: b.last_error.clone(),
                    history,
                    compensation_sent: false,
                    failing_since: None,
                    resolution: b.resolution.clone(),
                }
            })
            .collect();
        steps.resize_with(definition.steps.len(), || Step::new(BranchState::Pending));
        let mut saga = Self {
            id: record.id,
            phase: SagaPhase::Running,
            created_unix_ms: record.created_unix_ms,
            definition,
            idempotency_key: record.idempotency_key,
            steps,
            reason: record.reason,
            stuck: record.stuck,
            transitions: record.transitions,
            recovered: true,
            owner: record.owner,
            deadline_unix_ms: (record.deadline_unix_ms != 0).then_some(record.deadline_unix_ms),
            paused: false,
        };
        if saga.transitions.is_empty() {
            // Only the definition reached the disk: it was accepted when that write returned.
            saga.transitions.push(Transition {
                state: TxnState::Running,
                at_unix_ms: saga.created_unix_ms,
                reason: String::new(),
            });
        }
        let recovered = "recovered after a coordinator restart".to_string();
        match record.state {
            TxnState::Compensating => {
                saga.phase = SagaPhase::Compensating;
                saga.note(recovered, now);
                let actions = saga.compensate_what_is_left(now);
                (saga, actions)
            }
            TxnState::Running => {
                saga.note(recovered, now);
                // A rejection whose decision had not reached the disk: decide again.
                let rejected = saga
                    .steps
                    .iter()
                    .position(|s| s.state == BranchState::Rejected);
                let actions = match rejected {
                    Some(index) => {
                        let id = &saga.definition.steps[index].id;
                        let why = format!("step {id} was rejected");
                        saga.decide_compensation(why)
                    }
                    None => saga.resume_forward(now),
                };
                let mut actions = actions;
                if saga.phase == SagaPhase::Running {
                    actions.extend(saga.deadline_timer());
                }
                (saga, actions)
            }
            other => panic!(
                "invariant: only RUNNING and COMPENSATING sagas are recovered, not {other:?}"
            ),
        }
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

    /// What GetTransaction shows: nothing that is not durable yet (not even the reason
    /// for a decision still being written).
    pub fn record(&self) -> TxnRecord {
        let mut record = self.record_in(self.state());
        if record.state == TxnState::Running {
            record.reason = None;
        }
        record
    }

    /// What the log must hold: the decisions taken, even while their write is in flight,
    /// and while finishing, the final state as it will be shown.
    pub fn log_record(&self) -> TxnRecord {
        let mut record = self.record_in(self.phase.logged_state());
        if let SagaPhase::Finishing { at, .. } = self.phase {
            record.transitions.push(Transition {
                state: record.state,
                at_unix_ms: at,
                reason: String::new(),
            });
            record.ended_unix_ms = Some(at);
        }
        record
    }

    fn record_in(&self, state: TxnState) -> TxnRecord {
        TxnRecord {
            id: self.id,
            kind: TxnKind::Saga,
            state,
            created_unix_ms: self.created_unix_ms,
            deadline_unix_ms: self.deadline_unix_ms.unwrap_or(0),
            prepare_timeout_ms: 0,
            reason: self.reason.clone(),
            branches: self
                .steps
                .iter()
                .zip(&self.definition.steps)
                .map(|(step, definition)| BranchRecord {
                    id: definition.id.clone(),
                    endpoint: definition.endpoint.clone(),
                    payload: Vec::new(),
                    state: step.state,
                    attempts: step.attempts,
                    compensation_attempts: step.compensation_attempts,
                    last_error: step.last_error.clone(),
                    history: step.history.clone(),
                    heuristic: None,
                    resolution: step.resolution.clone(),
                })
                .collect(),
            transitions: self.transitions.clone(),
            ended_unix_ms: state
                .is_final()
                .then(|| self.transitions.last().map_or(0, |t| t.at_unix_ms)),
            idempotency_key: self.idempotency_key.clone(),
            stuck: self.stuck,
            saga: Some(Arc::clone(&self.definition)),
            owner: self.owner.clone(),
            paused: self.paused,
        }
    }

    pub fn handle_event(&mut self, event: SagaEvent, now: UnixMs) -> Vec<SagaAction> {
        match event {
            SagaEvent::Persisted => self.on_persisted(now),
            SagaEvent::Nudge { stale_after_ms } => self.nudge(stale_after_ms, now),
            SagaEvent::StepAnswered { step, answer } => self.on_step_answer(step, answer, now),
            SagaEvent::StepFailed { step, error } => self.on_step_failure(step, error, now),
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
                        s.history.start(Operation::Step, now);
                        vec![SagaAction::SendStep { step }]
                    }
                    _ => Vec::new(),
                }
            }
            SagaEvent::Compensated { step } => {
                let Some(s) = self.steps.get_mut(step) else {
                    return Vec::new();
                };
                s.history
                    .finish(&[Operation::Compensate], "compensated", now);
                s.failing_since = None;
                if s.state != BranchState::Compensating || self.phase != SagaPhase::Compensating {
                    return Vec::new();
                }
                s.state = BranchState::Compensated;
                s.compensation_sent = false;
                let mut actions = vec![SagaAction::PersistLazy];
                actions.extend(self.compensate_what_is_left(now));
                actions
            }
            SagaEvent::CompensationFailed {
                step,
                error,
                permanent,
            } => {
                let stuck_after = self.definition.stuck_after_attempts;
                let Some(s) = self.steps.get_mut(step) else {
                    return Vec::new();
                };
                s.history
                    .finish(&[Operation::Compensate], format!("error: {error}"), now);
                s.failing_since.get_or_insert(now);
                if s.state != BranchState::Compensating {
                    return Vec::new();
                }
                let attempt = s.compensation_attempts;
                s.last_error = Some(error.clone());
                let mut actions = vec![SagaAction::ScheduleCompensationRetry {
                    step,
                    attempt,
                    policy: self.definition.steps[step].retry,
                }];
                if (attempt >= stuck_after || permanent) && !self.stuck {
                    self.stuck = true;
                    let id = &self.definition.steps[step].id;
                    let what = format!("compensating step {id}");
                    self.note(stuck_note(&what, attempt, &error, permanent), now);
                    actions.push(SagaAction::WarnStuck { step });
                }
                actions
            }
            SagaEvent::CompensationRetryDue { step, attempt } => match self.steps.get_mut(step) {
                Some(s)
                    if s.state == BranchState::Compensating
                        && s.compensation_attempts == attempt
                        && !self.paused =>
                {
                    s.compensation_attempts += 1;
                    s.history.start(Operation::Compensate, now);
                    vec![SagaAction::SendCompensation { step }]
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

    fn on_step_answer(&mut self, step: usize, answer: StepAnswer, now: UnixMs) -> Vec<SagaAction> {
        let Some(s) = self.steps.get_mut(step) else {
            return Vec::new();
        };
        s.history.finish(
            &[Operation::Step],
            match &answer {
                StepAnswer::Committed => "committed".to_string(),
                StepAnswer::Rejected { reason } => format!("rejected: {reason}"),
                StepAnswer::AlreadyCompensated => "already compensated".to_string(),
            },
            now,
        );
        s.failing_since = None;
        if s.state != BranchState::Running {
            // A late or repeated answer: the step has moved on (compensation under way).
            return Vec::new();
        }
        match answer {
            StepAnswer::Committed => {
                s.state = BranchState::Committed;
                let mut actions = vec![SagaAction::PersistLazy];
                match self.phase {
                    SagaPhase::Running => {
                        if self.steps.iter().all(|s| s.state == BranchState::Committed) {
                            actions.extend(self.finish(false, now));
                        } else {
                            actions.extend(self.start_runnable_steps(now, false));
                        }
                    }
                    // It will be compensated with the others.
                    SagaPhase::Compensating => actions.extend(self.compensate_what_is_left(now)),
                    _ => {}
                }
                actions
            }
            StepAnswer::Rejected { reason } => {
                s.state = BranchState::Rejected;
                let id = &self.definition.steps[step].id;
                let why = format!("step {id} was rejected: {reason}");
                match self.phase {
                    SagaPhase::Running => self.decide_compensation(why),
                    SagaPhase::Compensating => self.compensate_what_is_left(now),
                    _ => Vec::new(),
                }
            }
            StepAnswer::AlreadyCompensated => {
                // Compensated before it ran, so it never will: the saga cannot complete.
                s.state = BranchState::Uncertain;
                let id = &self.definition.steps[step].id;
                let why = format!("step {id} was compensated before it could run");
                match self.phase {
                    SagaPhase::Running => self.decide_compensation(why),
                    SagaPhase::Compensating => self.compensate_what_is_left(now),
                    _ => Vec::new(),
                }
            }
        }
    }

    fn on_step_failure(&mut self, step: usize, error: String, now: UnixMs) -> Vec<SagaAction> {
        let running = self.phase == SagaPhase::Running;
        let Some(s) = self.steps.get_mut(step) else {
            return Vec::new();
        };
        s.history
            .finish(&[Operation::Step], format!("error: {error}"), now);
        s.failing_since.get_or_insert(now);
        if s.state != BranchState::Running {
            return Vec::new();
        }
        s.last_error = Some(error.clone());
        if !running {
            // Compensation is decided; this step will be compensated, not retried.
            return Vec::new();
        }
        let policy = self.definition.steps[step].retry;
        if s.attempts < policy.max_attempts {
            return vec![SagaAction::ScheduleStepRetry {
                step,
                attempt: s.attempts,
                policy,
            }];
        }
        s.state = BranchState::Uncertain;
        let attempts = s.attempts;
        let id = &self.definition.steps[step].id;
        let why = format!("step {id} failed {attempts} times (last: {error})");
        self.decide_compensation(why)
    }

    /// Starts every pending step whose dependencies have all committed. After a restart
    /// (`again`), steps that were running are sent again too.
    fn start_runnable_steps(&mut self, now: UnixMs, again: bool) -> Vec<SagaAction> {
        let mut actions = Vec::new();
        for step in 0..self.steps.len() {
            let state = self.steps[step].state;
            let startable =
                state == BranchState::Pending || (again && state == BranchState::Running);
            let ready = self.definition.steps[step]
                .after
                .iter()
                .all(|&d| self.steps[d].state == BranchState::Committed);
            if startable && ready {
                let s = &mut self.steps[step];
                s.state = BranchState::Running;
                s.attempts += 1;
                s.history.start(Operation::Step, now);
                actions.push(SagaAction::SendStep { step });
            }
        }
        actions
    }

    /// Sends again every forward action or compensation whose call has had no answer for
    /// `stale_after_ms`, or for its own call timeout if longer (the answer was lost; the
    /// barrier answers a repeat from its record). Steps waiting for a retry have their
    /// timer.
    fn nudge(&mut self, stale_after_ms: u64, now: UnixMs) -> Vec<SagaAction> {
        if self.paused {
            return Vec::new();
        }
        let (state, operation) = match self.phase {
            SagaPhase::Running => (BranchState::Running, Operation::Step),
            SagaPhase::Compensating => (BranchState::Compensating, Operation::Compensate),
            _ => return Vec::new(),
        };
        let mut actions = Vec::new();
        for (step, s) in self.steps.iter_mut().enumerate() {
            let call_timeout_ms = self.definition.steps[step].timeout_ms;
            if s.state != state
                || !s
                    .history
                    .open_for_at_least(stale_after_ms.max(call_timeout_ms), now)
            {
                continue;
            }
            s.history.abandon_open(NO_ANSWER, now);
            s.history.start(operation, now);
            if operation == Operation::Step {
                s.attempts += 1;
                actions.push(SagaAction::SendStep { step });
            } else {
                s.compensation_attempts += 1;
                actions.push(SagaAction::SendCompensation { step });
            }
        }
        actions
    }

    /// Compensates a running saga (the initiator's or an operator's cancel): a decision
    /// like any other, forced before anything is undone. A saga already compensating
    /// answers as such; one completed (or completing) cannot be cancelled.
    pub fn cancel(&mut self, reason: String) -> Result<Vec<SagaAction>, Refusal> {
        match self.phase {
            SagaPhase::Running => Ok(self.decide_compensation(reason)),
            SagaPhase::Submitting
            | SagaPhase::DecidingCompensation
            | SagaPhase::Finishing {
                compensated: false, ..
            } => Err(Refusal::DecisionInFlight),
            SagaPhase::Compensating
            | SagaPhase::Finishing {
                compensated: true, ..
            } => Err(Refusal::AlreadyEnding(TxnState::Compensating)),
            SagaPhase::Completed | SagaPhase::Compensated => Err(Refusal::Final(self.state())),
        }
    }

    /// Handles an operator's request (the API checked the caller is an admin).
    pub fn handle_operator(
        &mut self,
        request: &OperatorRequest,
        now: UnixMs,
    ) -> Result<Vec<SagaAction>, Refusal> {
        let state = self.state();
        match &request.command {
            OperatorCommand::Cancel => self.cancel(request.describe("cancelled")),
            _ if state.is_final() => Err(Refusal::Final(state)),
            OperatorCommand::RetryNow | OperatorCommand::Pause | OperatorCommand::Resume => {
                self.control_retries(request, now)
            }
            OperatorCommand::Resolve { branch_id, outcome } => {
                self.resolve(request, branch_id, *outcome, now)
            }
        }
    }

    /// An operator states a step's outcome: a forward action that keeps failing is
    /// taken as committed (applied by hand) or given up (compensated, which the barrier
    /// makes a no-op if it never ran); a compensation that keeps failing as done by hand.
    /// Committing a step of a saga decided to compensate is refused.
    fn resolve(
        &mut self,
        request: &OperatorRequest,
        step_id: &str,
        outcome: Resolution,
        now: UnixMs,
    ) -> Result<Vec<SagaAction>, Refusal> {
        let step = self
            .definition
            .steps
            .iter()
            .position(|d| d.id == step_id)
            .ok_or_else(|| Refusal::UnknownBranch(step_id.to_string()))?;
        let compensating = match self.phase {
            SagaPhase::Running => false,
            SagaPhase::Compensating => true,
            _ => return Err(Refusal::DecisionInFlight),
        };
        let state = self.steps[step].state;
        let expected = if compensating {
            BranchState::Compensating
        } else {
            BranchState::Running
        };
        if compensating && outcome == Resolution::Commit {
            return Err(Refusal::ContradictsDecision {
                branch: step_id.to_string(),
                wanted: outcome,
                decided: "compensate",
            });
        }
        if state != expected {
            return Err(Refusal::NothingToResolve {
                branch: step_id.to_string(),
                state,
            });
        }
        let what = format!("step {step_id} resolved as {outcome:?}");
        self.note(request.describe(&what), now);
        let s = &mut self.steps[step];
        s.resolution = Some(OperatorResolution {
            outcome,
            by: request.by.clone(),
            at_unix_ms: now,
            reason: request.reason.clone(),
        });
        s.failing_since = None;
        if compensating {
            s.state = BranchState::Compensated;
            s.compensation_sent = false;
            let mut actions = vec![SagaAction::PersistLazy];
            actions.extend(self.compensate_what_is_left(now));
            return Ok(actions);
        }
        match outcome {
            Resolution::Commit => {
                s.state = BranchState::Committed;
                let mut actions = vec![SagaAction::PersistLazy];
                if self.steps.iter().all(|s| s.state == BranchState::Committed) {
                    actions.extend(self.finish(false, now));
                } else {
                    actions.extend(self.start_runnable_steps(now, false));
                }
                Ok(actions)
            }
            Resolution::Abort => {
                s.state = BranchState::Uncertain;
                Ok(self.decide_compensation(request.describe(&what)))
            }
        }
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

    /// After a restart, sends every step that was running or may run now. A saga with
    /// nothing left to send either completed (its final write was lost) or cannot go on.
    fn resume_forward(&mut self, now: UnixMs) -> Vec<SagaAction> {
        let actions = self.start_runnable_steps(now, true);
        if !actions.is_empty() {
            return actions;
        }
        if self.steps.iter().all(|s| s.state == BranchState::Committed) {
            return self.finish(false, now);
        }
        self.decide_compensation("the saga could not be resumed after a restart".into())
    }

    /// The decision to compensate: forced before anything is undone or anyone is told.
    fn decide_compensation(&mut self, reason: String) -> Vec<SagaAction> {
        self.reason = Some(reason);
        self.phase = SagaPhase::DecidingCompensation;
        vec![SagaAction::PersistForced]
    }

    /// Sends the compensations that may go now (every dependent step is undone), and
    /// finishes the saga when nothing is left to undo.
    fn compensate_what_is_left(&mut self, now: UnixMs) -> Vec<SagaAction> {
        // Steps that never started never will: nothing to wait for, nothing to undo.
        // After a restart the log's "pending" may be stale (progress is lazy): such a step
        // may have run, so it is compensated like any uncertain one (the barrier makes
        // that a recorded no-op if it never ran).
        let recovered = self.recovered;
        for step in &mut self.steps {
            if step.state == BranchState::Pending {
                step.state = if recovered {
                    BranchState::Uncertain
                } else {
                    BranchState::Skipped
                };
            }
        }
        let mut actions = Vec::new();
        for step in 0..self.steps.len() {
            let s = &self.steps[step];
            let needs = s.state.may_have_run()
                || (s.state == BranchState::Compensating && !s.compensation_sent);
            if !needs {
                continue;
            }
            let dependents_undone = self
                .definition
                .steps
                .iter()
                .enumerate()
                .filter(|(_, d)| d.after.contains(&step))
                .all(|(d, _)| self.steps[d].undone());
            if dependents_undone {
                let s = &mut self.steps[step];
                s.state = BranchState::Compensating;
                s.compensation_sent = true;
                s.compensation_attempts += 1;
                s.history.start(Operation::Compensate, now);
                actions.push(SagaAction::SendCompensation { step });
            }
        }
        if self.phase == SagaPhase::Compensating && self.steps.iter().all(Step::undone) {
            actions.extend(self.finish(true, now));
        }
        actions
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

impl RetryControl for Saga {
    type Action = SagaAction;

    fn paused_mut(&mut self) -> &mut bool {
        &mut self.paused
    }

    /// Sends now every call that waits (for a retry timer, or for `Resume`): forward
    /// actions of running steps, or compensations, with no call in flight.
    fn send_waiting(&mut self, now: UnixMs) -> Vec<SagaAction> {
        let compensating = match self.phase {
            SagaPhase::Running => false,
            SagaPhase::Compensating => true,
            _ => return Vec::new(),
        };
        let mut actions = Vec::new();
        for (step, s) in self.steps.iter_mut().enumerate() {
            if s.history.open_for_at_least(0, now) {
                continue;
            }
            if !compensating && s.state == BranchState::Running {
                s.attempts += 1;
                s.history.start(Operation::Step, now);
                actions.push(SagaAction::SendStep { step });
            } else if compensating && s.state == BranchState::Compensating && s.compensation_sent {
                s.compensation_attempts += 1;
                s.history.start(Operation::Compensate, now);
                actions.push(SagaAction::SendCompensation { step });
            }
        }
        actions
    }

    /// A notable event in the history, without a change of state.
    fn note(&mut self, reason: String, now: UnixMs) {
        self.transitions.push(Transition {
            state: self.state(),
            at_unix_ms: now,
            reason,
        });
    }
}
