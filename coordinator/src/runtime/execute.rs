//! How a shard carries out the engines' actions: participant calls are spawned and
//! report back as inputs; timers go into the shard's queue.
//!
//! Log writes are issued here, synchronously, in the order the engine asked for them
//! (the log applies them in call order). A forced write's follow-up input (the decision
//! or definition is durable) is sent only once the write returned Ok; a failed write goes
//! to the fatal channel and produces no input. A write with no follow-up is not awaited:
//! a failure after it was queued fails the log, which the runtime watches.

use std::time::Duration;

use futures::FutureExt;
use tokio::sync::mpsc;
use tracing::Instrument;
use treaty_proto::v1::CommitMode;
use treaty_sdk::failpoint::{self, crash_point};

use super::machine::{Input, Machine, Timer};
use super::now_unix_ms;
use super::shard::{Shard, txn_span};
use crate::engine::saga::{SagaAction, SagaEvent, StepAnswer};
use crate::engine::twopc::{Action, Answer, Event, PREPARE_CALL_GRACE_MS};
use crate::log::{Durability, LogError};
use crate::model::{CallNumber, RetryPolicy, TxnId};
use crate::participants::{Call, retry_delay};

/// Actions of either engine.
#[derive(Debug)]
pub(super) enum Actions {
    TwoPhase(Vec<Action>),
    Saga(Vec<SagaAction>),
}

impl Actions {
    pub(super) fn is_empty(&self) -> bool {
        match self {
            Self::TwoPhase(actions) => actions.is_empty(),
            Self::Saga(actions) => actions.is_empty(),
        }
    }
}

/// What a spawned two-phase call is for.
#[derive(Debug, Clone, Copy)]
enum CallKind {
    Prepare,
    OnePhaseCommit,
    Commit,
    Abort,
}

impl CallKind {
    /// Whether a failure that sending again cannot mend (a participant's
    /// FAILED_PRECONDITION, or past the delivery horizon) flags the transaction stuck at
    /// once: only a phase-2 commit's (and a prepare's while the votes decide, which the
    /// engine knows). An abort that cannot be delivered leaves nothing in
    /// doubt (the participant has no record, or presumed abort answers for it past the
    /// horizon), and a one-phase commit is settled by its deadline's abort probe.
    fn hopeless_needs_an_operator(self) -> bool {
        matches!(self, CallKind::Commit)
    }

    fn name(self) -> &'static str {
        match self {
            CallKind::Prepare => "prepare",
            CallKind::OnePhaseCommit => "one_phase_commit",
            CallKind::Commit => "commit",
            CallKind::Abort => "abort",
        }
    }
}

/// The span of one participant call, inside its transaction's: the transaction and
/// branch, what the call is for, and the trace and span ids it sends (which the
/// participant's logs show too).
fn call_span(id: TxnId, call: &mut Call, op: &'static str) -> tracing::Span {
    let txn = txn_span(id);
    let span = tracing::info_span!(
        parent: &txn,
        "call",
        txn_id = %id,
        branch_id = %call.branch_id,
        op,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(trace) = &mut call.trace {
        // With span export, the call sends the id of its exported span.
        #[cfg(feature = "otlp")]
        crate::otlp::adopt(&span, trace);
        if !span.is_disabled() {
            let parent = trace.traceparent();
            span.record("trace_id", tracing::field::display(parent.trace_id_hex()));
            span.record("span_id", tracing::field::display(parent.parent_id_hex()));
        }
    }
    span
}

/// Crash points around a forced write, for the crash tests.
struct ForcedWritePoints {
    before: &'static str,
    after: &'static str,
}

const DECISION_POINTS: ForcedWritePoints = ForcedWritePoints {
    before: "coordinator::before_decision_logged",
    after: "coordinator::after_decision_logged",
};

const INTENT_POINTS: ForcedWritePoints = ForcedWritePoints {
    before: "coordinator::before_intent_logged",
    after: "coordinator::after_intent_logged",
};

/// Every vote YES and the intent durable: the commit is decided, before its lazy record
/// is written, phase 2 starts or the caller hears it.
const COMMIT_IMPLIED_POINT: &str = "coordinator::commit_implied";

const SAGA_POINTS: ForcedWritePoints = ForcedWritePoints {
    before: "coordinator::before_saga_write",
    after: "coordinator::after_saga_write",
};

impl Shard {
    pub(super) fn execute(&mut self, id: TxnId, actions: Actions) {
        match actions {
            Actions::TwoPhase(actions) => self.execute_two_phase(id, actions),
            Actions::Saga(actions) => self.execute_saga(id, actions),
        }
    }

    fn execute_two_phase(&mut self, id: TxnId, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::StartDeadlineTimer { at_unix_ms } => {
                    let delay = Duration::from_millis(at_unix_ms.saturating_sub(now_unix_ms()));
                    let key = self.timers.insert((id, Timer::Deadline), delay);
                    if let Some(entry) = self.txns.get_mut(&id) {
                        entry.deadline_timer = Some(key);
                    }
                }
                Action::StartPrepareTimer { after_ms } => {
                    let key = self
                        .timers
                        .insert((id, Timer::Prepare), Duration::from_millis(after_ms));
                    if let Some(entry) = self.txns.get_mut(&id) {
                        entry.prepare_timer = Some(key);
                    }
                }
                Action::SendPrepare { branch, call } => {
                    self.spawn_call(id, branch, call, CallKind::Prepare)
                }
                Action::SendOnePhaseCommit { branch, call } => {
                    self.spawn_call(id, branch, call, CallKind::OnePhaseCommit)
                }
                Action::SendCommit { branch, call } => {
                    self.spawn_call(id, branch, call, CallKind::Commit)
                }
                Action::SendAbort { branch, call } => {
                    self.spawn_call(id, branch, call, CallKind::Abort)
                }
                Action::ScheduleRetry { branch, attempt } => {
                    let policy = RetryPolicy {
                        max_attempts: 0,
                        initial_backoff_ms: self.config.retry_backoff_initial_ms,
                        max_backoff_ms: self.config.retry_backoff_max_ms,
                    };
                    self.schedule(id, Timer::Retry { branch, attempt }, attempt, policy);
                }
                Action::PersistDecision => self.persist(
                    id,
                    Durability::Forced,
                    Some((Input::TwoPhase(Event::DecisionPersisted), DECISION_POINTS)),
                ),
                Action::PersistIntent => self.persist(
                    id,
                    Durability::Forced,
                    Some((Input::TwoPhase(Event::IntentPersisted), INTENT_POINTS)),
                ),
                Action::NoteDecision => {
                    crash_point(COMMIT_IMPLIED_POINT);
                    self.persist(id, Durability::Lazy, None);
                }
                Action::PersistEnd | Action::PersistProgress => {
                    self.persist(id, Durability::Lazy, None)
                }
                Action::ReportHeuristic { branch } => {
                    self.config.metrics.heuristic_outcome();
                    if let Some(Machine::TwoPhase(txn)) = self.txns.get(&id).map(|e| &e.machine) {
                        if let Some(b) = txn.branch(branch) {
                            tracing::warn!(
                                txn_id = %id,
                                branch_id = %b.id,
                                endpoint = %b.endpoint,
                                answer = b.heuristic.as_deref().unwrap_or(""),
                                "HEURISTIC outcome: a participant answered against the decision; see `treaty txn report`"
                            );
                        }
                    }
                }
                Action::RecordHistory => {
                    if self.config.history_records {
                        self.persist(id, Durability::Lazy, None);
                    }
                }
            }
        }
    }

    fn execute_saga(&mut self, id: TxnId, actions: Vec<SagaAction>) {
        // Every write in one batch of actions writes the saga as it is now (`persist`
        // reads the record when it runs), so a lazy write beside a forced one (the last
        // step's progress, then the final state) would write the same record twice.
        let forced = actions.contains(&SagaAction::PersistForced);
        for action in actions {
            match action {
                SagaAction::StartDeadlineTimer { at_unix_ms } => {
                    let delay = Duration::from_millis(at_unix_ms.saturating_sub(now_unix_ms()));
                    let key = self.timers.insert((id, Timer::SagaDeadline), delay);
                    if let Some(entry) = self.txns.get_mut(&id) {
                        entry.deadline_timer = Some(key);
                    }
                }
                SagaAction::SendStep { step, call } => self.spawn_step(id, step, call, false),
                SagaAction::SendCompensation { step, call } => {
                    crash_point("coordinator::compensation_sent");
                    self.spawn_step(id, step, call, true);
                }
                SagaAction::ScheduleStepRetry {
                    step,
                    attempt,
                    policy,
                } => self.schedule(id, Timer::StepRetry { step, attempt }, attempt, policy),
                SagaAction::ScheduleCompensationRetry {
                    step,
                    attempt,
                    policy,
                } => self.schedule(
                    id,
                    Timer::CompensationRetry { step, attempt },
                    attempt,
                    policy,
                ),
                SagaAction::PersistForced => self.persist(
                    id,
                    Durability::Forced,
                    Some((Input::Saga(SagaEvent::Persisted), SAGA_POINTS)),
                ),
                SagaAction::PersistLazy if forced => {}
                SagaAction::PersistLazy => self.persist(id, Durability::Lazy, None),
                SagaAction::WarnStuck { step } => {
                    if let Some(Machine::Saga(saga)) = self.txns.get(&id).map(|e| &e.machine) {
                        let definition = &saga.definition().steps[step];
                        let attempts = saga.steps()[step].compensation_attempts;
                        if saga.steps()[step].awaits_operator() {
                            tracing::warn!(
                                txn_id = %id,
                                step_id = %definition.id,
                                endpoint = %definition.endpoint,
                                "saga stuck: a step an operator stated committed was compensated at its participant, which undoes only what it applied; an operator must undo any work done by hand, then resolve the step --abort"
                            );
                        } else {
                            tracing::warn!(
                                txn_id = %id,
                                step_id = %definition.id,
                                endpoint = %definition.endpoint,
                                attempts,
                                error = saga.steps()[step].last_error.as_deref().unwrap_or(""),
                                "saga stuck: a compensation keeps failing; still retrying"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A retry `timer` after the backoff for failure number `attempt`.
    fn schedule(&mut self, id: TxnId, timer: Timer, attempt: u32, policy: RetryPolicy) {
        let delay = retry_delay(
            attempt,
            policy.initial_backoff_ms,
            policy.max_backoff_ms,
            &mut rand::rng(),
        );
        self.timers.insert((id, timer), delay);
    }

    /// Why a call about `id` must not be made: it is older than the delivery horizon,
    /// past which participants may have forgotten it (and refuse it).
    fn past_horizon(&self, id: TxnId) -> Option<String> {
        let age_ms = now_unix_ms().saturating_sub(id.created_unix_ms());
        (age_ms > self.config.delivery_horizon_ms).then(|| {
            format!(
                "not sent: the transaction is older than the delivery horizon ({} ms); \
                 an operator must resolve it (treaty txn resolve)",
                self.config.delivery_horizon_ms
            )
        })
    }

    /// Call number `call` for branch `branch_index`: its answer or failure comes back
    /// as an input naming it.
    fn spawn_call(&self, id: TxnId, branch_index: usize, call: CallNumber, kind: CallKind) {
        if let Some(error) = self.past_horizon(id) {
            let branch = branch_index;
            let event = match kind {
                CallKind::Prepare => Event::PrepareFailed {
                    branch,
                    call,
                    error,
                    permanent: true,
                },
                // Not sent, and never will be: sending again cannot succeed.
                _ => Event::DeliveryFailed {
                    branch,
                    call,
                    error,
                    permanent: kind.hopeless_needs_an_operator(),
                },
            };
            let _ = self.inputs.send((id, Input::TwoPhase(event)));
            return;
        }
        let Some(entry) = self.txns.get(&id) else {
            return;
        };
        let Machine::TwoPhase(txn) = &entry.machine else {
            return;
        };
        let Some(branch) = txn.branch(branch_index) else {
            return;
        };
        let timeout_ms = match kind {
            // The prepare timer is phase 1's limit; the call's own deadline only bounds
            // the task, so it trails the timer rather than race it.
            CallKind::Prepare => txn
                .prepare_timeout_ms()
                .saturating_add(PREPARE_CALL_GRACE_MS),
            _ => self.config.participant_call_timeout_ms,
        };
        let mut outgoing = Call {
            endpoint: branch.endpoint.clone(),
            transaction_id: id.to_string(),
            branch_id: branch.id.clone(),
            timeout: Duration::from_millis(timeout_ms),
            trace: Some(entry.trace.child()),
        };
        let span = call_span(id, &mut outgoing, kind.name());
        let payload = match kind {
            CallKind::Prepare | CallKind::OnePhaseCommit => branch.payload.clone(),
            CallKind::Commit | CallKind::Abort => Vec::new(),
        };
        let participants = self.participants.clone();
        let inputs = self.inputs.clone();
        // Boxed: the call's future is large, and tokio moves a task's future when it
        // spawns it and its stage when it ends; a box makes each move a pointer's
        // (docs/PERFORMANCE.md, "Release builds with LTO").
        tokio::spawn(
            Box::pin(async move {
                let branch = branch_index;
                let event = match kind {
                    CallKind::Prepare => match participants.prepare(&outgoing, payload).await {
                        Ok(vote) => Event::PrepareAnswered { branch, call, vote },
                        Err(failure) => Event::PrepareFailed {
                            branch,
                            call,
                            error: failure.message,
                            permanent: failure.permanent,
                        },
                    },
                    CallKind::OnePhaseCommit | CallKind::Commit | CallKind::Abort => {
                        let answer = match kind {
                            CallKind::OnePhaseCommit => {
                                participants
                                    .commit(&outgoing, CommitMode::OnePhase, payload)
                                    .await
                            }
                            CallKind::Commit => {
                                participants
                                    .commit(&outgoing, CommitMode::TwoPhase, payload)
                                    .await
                            }
                            _ => participants.abort(&outgoing).await,
                        };
                        match answer {
                            Ok(answer) => Event::Delivered {
                                branch,
                                call,
                                answer,
                            },
                            Err(failure) => {
                                // The transport details were logged where the call failed.
                                tracing::debug!(branch_id = %outgoing.branch_id, ?kind, error = %failure.message, "delivery failed; will retry");
                                Event::DeliveryFailed {
                                    branch,
                                    call,
                                    error: failure.message,
                                    permanent: failure.permanent
                                        && kind.hopeless_needs_an_operator(),
                                }
                            }
                        }
                    }
                };
                if matches!(event, Event::Delivered { .. })
                    && failpoint::triggered("coordinator::lose_delivery_answer")
                {
                    tracing::warn!("failpoint: dropping a delivery's answer");
                    return;
                }
                // The shard outlives every call it starts, except at shutdown: then the
                // answer no longer matters (recovery redelivers).
                let _ = inputs.send((id, Input::TwoPhase(event)));
            })
            .instrument(span),
        );
    }

    /// A saga step's forward action (delivered as a Commit in SAGA_STEP mode) or its
    /// compensation.
    fn spawn_step(&self, id: TxnId, step: usize, call: CallNumber, compensation: bool) {
        if let Some(error) = self.past_horizon(id) {
            let event = if compensation {
                SagaEvent::CompensationFailed {
                    step,
                    call,
                    error,
                    permanent: true,
                }
            } else {
                SagaEvent::StepFailed { step, call, error }
            };
            let _ = self.inputs.send((id, Input::Saga(event)));
            return;
        }
        let Some(entry) = self.txns.get(&id) else {
            return;
        };
        let Machine::Saga(saga) = &entry.machine else {
            return;
        };
        let Some(definition) = saga.definition().steps.get(step) else {
            return;
        };
        let mut outgoing = Call {
            endpoint: definition.endpoint.clone(),
            transaction_id: id.to_string(),
            branch_id: definition.id.clone(),
            timeout: Duration::from_millis(definition.timeout_ms),
            trace: Some(entry.trace.child()),
        };
        let op = if compensation { "compensate" } else { "step" };
        let span = call_span(id, &mut outgoing, op);
        let payload = if compensation {
            definition.compensation.clone()
        } else {
            definition.payload.clone()
        };
        let participants = self.participants.clone();
        let inputs = self.inputs.clone();
        // Boxed, as in `spawn_call`.
        tokio::spawn(
            Box::pin(async move {
                let event = if compensation {
                    match participants.compensate(&outgoing, payload).await {
                        Ok(()) => SagaEvent::Compensated { step, call },
                        Err(failure) => {
                            tracing::debug!(step_id = %outgoing.branch_id, error = %failure.message, "compensation failed; will retry");
                            SagaEvent::CompensationFailed {
                                step,
                                call,
                                error: failure.message,
                                permanent: failure.permanent,
                            }
                        }
                    }
                } else {
                    match participants.commit(&outgoing, CommitMode::SagaStep, payload).await {
                        Ok(Answer::Committed) => SagaEvent::StepAnswered {
                            step,
                            call,
                            answer: StepAnswer::Committed,
                        },
                        Ok(Answer::Rejected { reason }) => SagaEvent::StepAnswered {
                            step,
                            call,
                            answer: StepAnswer::Rejected { reason },
                        },
                        Ok(Answer::Aborted) => SagaEvent::StepAnswered {
                            step,
                            call,
                            answer: StepAnswer::AlreadyCompensated,
                        },
                        Ok(Answer::NotPrepared) => SagaEvent::StepFailed {
                            step,
                            call,
                            error: "participant answered NOT_PREPARED to a saga step".into(),
                        },
                        Err(failure) => {
                            tracing::debug!(step_id = %outgoing.branch_id, error = %failure.message, "step failed");
                            SagaEvent::StepFailed {
                                step,
                                call,
                                error: failure.message,
                            }
                        }
                    }
                };
                if failpoint::triggered("coordinator::lose_step_answer") {
                    tracing::warn!("failpoint: dropping a saga step's answer");
                    return;
                }
                let _ = inputs.send((id, Input::Saga(event)));
            })
            .instrument(span),
        );
    }

    /// Writes what the log must hold of `id` now. For a forced write, `on_durable` is fed
    /// back once it returned Ok, with crash points around it. A write with nothing to
    /// feed back is not awaited: its failure once queued is the log's
    /// [`failed`](crate::log::DecisionLog::failed), which the runtime watches, so it
    /// costs no task here.
    fn persist(
        &self,
        id: TxnId,
        durability: Durability,
        on_durable: Option<(Input, ForcedWritePoints)>,
    ) {
        let Some(entry) = self.txns.get(&id) else {
            return;
        };
        let record = entry.machine.log_record();
        if let Some((_, points)) = &on_durable {
            crash_point(points.before);
        }
        let write = self.log.write(&record, durability);
        let Some((input, points)) = on_durable else {
            // Refused at once (too large, or the log closed or failed before); polled
            // outside the task's budget, which could otherwise hide an answer there.
            if let Some(Err(error)) = tokio::task::unconstrained(write).now_or_never() {
                log_write_failed(&self.fatal, id, &error);
            }
            return;
        };
        let inputs = self.inputs.clone();
        let fatal = self.fatal.clone();
        tokio::spawn(
            async move {
                match write.await {
                    Ok(()) => {
                        crash_point(points.after);
                        let _ = inputs.send((id, input));
                    }
                    Err(error) => log_write_failed(&fatal, id, &error),
                }
            }
            .instrument(txn_span(id)),
        );
    }
}

/// A failed log write is fatal (see the module docs of `runtime`).
fn log_write_failed(fatal: &mpsc::UnboundedSender<String>, id: TxnId, error: &LogError) {
    tracing::error!(txn_id = %id, %error, "decision log write failed");
    let _ = fatal.send(format!("log write for {id} failed: {error}"));
}
