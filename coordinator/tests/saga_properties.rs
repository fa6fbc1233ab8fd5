//! Property tests of the saga state machine against a simulated world: random step graphs,
//! participants that commit, reject or fail as scripted and obey the barrier (null
//! compensation, anti-hanging), messages delivered in any order, duplicated or lost, a log
//! that applies writes in order and loses unflushed ones in a crash, and restarts. An
//! operator may state a step's outcome, as a careful one would (truthfully, with no call
//! for the step in flight unless it gives up a running step, the statement in the log
//! before it is taken as done): a step stated committed whose participant holds nothing
//! is applied by hand, and a step stated undone while compensating is undone by hand.
//!
//! Invariants, checked after every step:
//! - no step runs before the definition is durable, nor before every step it runs after
//!   has committed at its participant;
//! - no step is compensated while a step that runs after it is still applied;
//! - COMPENSATING / COMPLETED / COMPENSATED are shown only once durable, and once the
//!   decision to compensate is durable the saga never completes (irreversibility);
//! - a completed saga has every step applied (by its participant or by hand);
//! - nothing done by hand is sent to a participant again: neither the forward action of
//!   a step applied by hand, nor the compensation of a step undone by hand;
//! - nothing is sent for a step that waits for an operator, and while one waits the
//!   saga is flagged stuck;
//! - when the world settles (the sweeper recovering answers that vanished, the operator
//!   undoing by hand what only an operator can), the saga is final, a compensated saga
//!   has no step still applied, by its participant or by hand, and the log holds the
//!   saga as memory does (late answers included).
//!
//! The simulated participants are in `saga_properties/participants.rs`, the operator in
//! `saga_properties/operators.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use proptest::prelude::*;
use treaty_coordinator::engine::saga::{NewSaga, Saga, SagaAction, SagaEvent, StepAnswer};
use treaty_coordinator::engine::twopc::{OperatorCommand, OperatorRequest};
use treaty_coordinator::model::{
    CallNumber, Operation, Resolution, RetryPolicy, SagaDefinition, StepDefinition, TxnId,
    TxnRecord, TxnState,
};

#[path = "saga_properties/operators.rs"]
mod operators;
#[path = "saga_properties/participants.rs"]
mod participants;

const T0: u64 = 1_700_000_000_000;
const STEP_TIMEOUT_MS: u64 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Commit,
    Reject,
}

/// What a participant's barrier holds for one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Barrier {
    None,
    Committed,
    Rejected,
    Compensated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    /// Step, and the call's number.
    Step(usize, CallNumber),
    Compensate(usize, CallNumber),
}

#[derive(Debug, Clone)]
enum Step {
    Deliver(usize),
    LoseAnswer(usize),
    Duplicate(usize),
    /// Deliver it, and lose the answer without a trace (no failure either): only the
    /// sweeper's nudge can recover.
    Vanish(usize),
    /// The sweeper's nudge, once every open call has outlived its timeout.
    Nudge,
    /// Apply the oldest pending log write.
    Flush,
    Retry(usize),
    Crash,
    /// The initiator cancels (compensation if still running).
    Cancel,
    /// An operator sends every waiting retry now.
    RetryNow,
    /// An operator states this step (mod the number of steps) committed: its work
    /// stands, done by hand if its participant holds none (see `World::resolve`).
    ResolveCommit(usize),
    /// An operator states this step undone: while running, that it did not happen;
    /// while compensating, that its work was undone by hand.
    ResolveAbort(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => any::<usize>().prop_map(Step::Deliver),
        1 => any::<usize>().prop_map(Step::LoseAnswer),
        1 => any::<usize>().prop_map(Step::Duplicate),
        1 => any::<usize>().prop_map(Step::Vanish),
        1 => Just(Step::Nudge),
        4 => Just(Step::Flush),
        2 => any::<usize>().prop_map(Step::Retry),
        1 => Just(Step::Crash),
        1 => Just(Step::Cancel),
        1 => Just(Step::RetryNow),
        1 => any::<usize>().prop_map(Step::ResolveCommit),
        1 => any::<usize>().prop_map(Step::ResolveAbort),
    ]
}

/// A random DAG: each step runs after a random subset of the ones before it.
fn graph() -> impl Strategy<Value = Vec<(Script, Vec<usize>)>> {
    (2..6usize).prop_flat_map(|n| {
        (0..n)
            .map(|i| {
                let script = prop_oneof![5 => Just(Script::Commit), 1 => Just(Script::Reject)];
                let after = prop::collection::vec(any::<bool>(), i).prop_map(|picks| {
                    picks
                        .iter()
                        .enumerate()
                        .filter(|(_, p)| **p)
                        .map(|(d, _)| d)
                        .collect()
                });
                (script, after)
            })
            .collect::<Vec<_>>()
    })
}

struct World {
    scripts: Vec<Script>,
    after: Vec<Vec<usize>>,
    saga: Option<Saga>,
    calls: Vec<Call>,
    /// Calls whose answer vanished: the coordinator still waits for them.
    vanished: Vec<Call>,
    retries: Vec<SagaEvent>,
    /// Writes issued to the log, applied in order; forced ones report back.
    log_queue: Vec<(TxnRecord, bool)>,
    durable: Option<TxnRecord>,
    barriers: Vec<Barrier>,
    /// Steps whose work an operator applied by hand (its participant holding none).
    by_hand: Vec<bool>,
    /// Steps whose work (by hand or at the participant) an operator undid by hand.
    undone_by_hand: Vec<bool>,
    decided_compensation: bool,
    now: u64,
}

impl World {
    fn new(graph: Vec<(Script, Vec<usize>)>) -> Self {
        let steps = graph
            .iter()
            .enumerate()
            .map(|(i, (_, after))| StepDefinition {
                id: format!("s{i}"),
                endpoint: "http://127.0.0.1:1".into(),
                payload: Vec::new(),
                compensation: Vec::new(),
                timeout_ms: STEP_TIMEOUT_MS,
                retry: RetryPolicy {
                    max_attempts: 3,
                    initial_backoff_ms: 10,
                    max_backoff_ms: 10,
                },
                after: after.clone(),
                requested: Default::default(),
            })
            .collect();
        let (saga, actions) = Saga::submit(NewSaga {
            id: TxnId::generate(T0),
            created_unix_ms: T0,
            definition: SagaDefinition {
                steps,
                stuck_after_attempts: 3,
            },
            idempotency_key: None,
            owner: None,
            deadline_unix_ms: None,
        });
        let n = graph.len();
        let mut world = Self {
            scripts: graph.iter().map(|(s, _)| *s).collect(),
            after: graph.into_iter().map(|(_, a)| a).collect(),
            saga: Some(saga),
            calls: Vec::new(),
            vanished: Vec::new(),
            retries: Vec::new(),
            log_queue: Vec::new(),
            durable: None,
            barriers: vec![Barrier::None; n],
            by_hand: vec![false; n],
            undone_by_hand: vec![false; n],
            decided_compensation: false,
            now: T0,
        };
        world.carry_out(actions);
        world
    }

    fn carry_out(&mut self, actions: Vec<SagaAction>) {
        for action in actions {
            match action {
                SagaAction::SendStep { step, call } => {
                    assert!(
                        self.durable.is_some(),
                        "step {step} sent before the definition was durable"
                    );
                    self.calls.push(Call::Step(step, call));
                }
                SagaAction::SendCompensation { step, call } => {
                    assert!(
                        !self.saga.as_ref().unwrap().steps()[step].awaits_operator(),
                        "a compensation sent for step {step}, which waits for an operator"
                    );
                    self.calls.push(Call::Compensate(step, call));
                }
                SagaAction::ScheduleStepRetry { step, attempt, .. } => {
                    self.retries.push(SagaEvent::StepRetryDue { step, attempt })
                }
                SagaAction::ScheduleCompensationRetry { step, attempt, .. } => self
                    .retries
                    .push(SagaEvent::CompensationRetryDue { step, attempt }),
                SagaAction::PersistForced | SagaAction::PersistLazy => {
                    let record = self.saga.as_ref().unwrap().log_record();
                    let forced = action == SagaAction::PersistForced;
                    self.log_queue.push((record, forced));
                }
                SagaAction::WarnStuck { .. } | SagaAction::StartDeadlineTimer { .. } => {}
            }
        }
    }

    /// The sweeper's look, after every call in flight has outlived its timeout.
    fn nudge(&mut self) {
        self.now += STEP_TIMEOUT_MS;
        self.feed(SagaEvent::Nudge { stale_after_ms: 1 });
    }

    fn feed(&mut self, event: SagaEvent) {
        self.now += 1;
        if let Some(saga) = self.saga.as_mut() {
            let actions = saga.handle_event(event, self.now);
            self.carry_out(actions);
        }
    }

    fn take(&mut self, index: usize) -> Option<Call> {
        if self.calls.is_empty() {
            return None;
        }
        let i = index % self.calls.len();
        Some(self.calls.remove(i))
    }

    fn flush(&mut self) {
        if self.log_queue.is_empty() {
            return;
        }
        let (record, forced) = self.log_queue.remove(0);
        if record.state == TxnState::Compensating || record.state == TxnState::Compensated {
            self.decided_compensation = true;
        }
        self.durable = Some(record);
        if forced {
            self.feed(SagaEvent::Persisted);
        }
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Deliver(i) => {
                if let Some(call) = self.take(*i) {
                    let event = self.participant(&call);
                    self.feed(event);
                }
            }
            Step::LoseAnswer(i) => {
                if let Some(call) = self.take(*i) {
                    self.participant(&call);
                    self.feed(Self::failure(&call));
                }
            }
            Step::Duplicate(i) => {
                if let Some(call) = self.take(*i) {
                    for _ in 0..2 {
                        let event = self.participant(&call);
                        self.feed(event);
                    }
                }
            }
            Step::Vanish(i) => {
                if let Some(call) = self.take(*i) {
                    self.participant(&call);
                    self.vanished.push(call);
                }
            }
            Step::Nudge => self.nudge(),
            Step::Flush => self.flush(),
            Step::Retry(i) => {
                if !self.retries.is_empty() {
                    let event = self.retries.remove(i % self.retries.len());
                    self.feed(event);
                }
            }
            Step::Cancel => {
                if let Some(saga) = self.saga.as_mut() {
                    if let Ok(actions) = saga.cancel("cancelled by the test".into()) {
                        self.carry_out(actions);
                    }
                }
            }
            Step::RetryNow => {
                self.now += 1;
                if let Some(saga) = self.saga.as_mut() {
                    let request = OperatorRequest {
                        command: OperatorCommand::RetryNow,
                        by: "ops".into(),
                        reason: String::new(),
                    };
                    if let Ok(actions) = saga.handle_operator(&request, self.now) {
                        self.carry_out(actions);
                    }
                }
            }
            Step::ResolveCommit(i) => {
                self.resolve(*i, Resolution::Commit);
            }
            Step::ResolveAbort(i) => {
                self.resolve(*i, Resolution::Abort);
            }
            Step::Crash => {
                self.calls.clear();
                self.vanished.clear();
                self.retries.clear();
                self.log_queue.clear();
                self.now += 1;
                self.saga = None;
                if let Some(record) = self.durable.clone() {
                    if matches!(record.state, TxnState::Running | TxnState::Compensating) {
                        let (saga, actions) = Saga::recover(record, self.now);
                        self.saga = Some(saga);
                        self.carry_out(actions);
                    }
                }
            }
        }
        self.check();
    }

    fn check(&self) {
        let durable_state = self.durable.as_ref().map(|r| r.state);
        if let Some(saga) = &self.saga {
            // A call the coordinator shows in flight was made, under that number, and has
            // not been answered (or its answer vanished).
            for (step, s) in saga.steps().iter().enumerate() {
                let history = s.history.attempts();
                for attempt in history.iter().filter(|a| a.finished_unix_ms.is_none()) {
                    let call = match attempt.operation {
                        Operation::Step => Call::Step(step, attempt.call),
                        _ => Call::Compensate(step, attempt.call),
                    };
                    assert!(
                        self.calls.contains(&call) || self.vanished.contains(&call),
                        "step {step} shows {call:?} in flight, which is not: {history:?}"
                    );
                }
            }
            if saga.steps().iter().any(|step| step.awaits_operator()) {
                assert!(saga.is_stuck(), "a step waits for an operator, unflagged");
            }
            match saga.state() {
                TxnState::Compensating | TxnState::Compensated => assert!(
                    matches!(
                        durable_state,
                        Some(TxnState::Compensating | TxnState::Compensated)
                    ),
                    "shown {:?} before it was durable ({durable_state:?})",
                    saga.state()
                ),
                TxnState::Completed => {
                    assert_eq!(
                        durable_state,
                        Some(TxnState::Completed),
                        "completion not durable"
                    );
                    assert!(
                        (0..self.barriers.len()).all(|i| self.applied(i)),
                        "completed with steps not applied: {:?}, by hand {:?}",
                        self.barriers,
                        self.by_hand
                    );
                }
                _ => {}
            }
            if self.decided_compensation {
                assert_ne!(
                    saga.state(),
                    TxnState::Completed,
                    "completed after a durable decision to compensate"
                );
                assert_ne!(saga.log_record().state, TxnState::Completed);
            }
        }
        if self.decided_compensation {
            assert_ne!(durable_state, Some(TxnState::Completed));
        }
    }

    fn settle(&mut self) {
        for _ in 0..10_000 {
            // A step stated committed, compensated at its participant, waits for the
            // operator to undo by hand what was done by hand.
            let waiting = self.saga.as_ref().and_then(|saga| {
                let waiting = saga
                    .steps()
                    .iter()
                    .position(|step| step.awaits_operator())?;
                let stated = saga.steps()[waiting].resolution.as_ref().map(|r| r.outcome);
                assert_eq!(
                    stated,
                    Some(Resolution::Commit),
                    "step {waiting} waits for an operator, yet was not stated committed"
                );
                Some(waiting)
            });
            if waiting.is_some_and(|step| self.resolve(step, Resolution::Abort)) {
                self.check();
                continue;
            }
            if !self.log_queue.is_empty() {
                self.flush();
            } else if let Some(call) = self.take(0) {
                let event = self.participant(&call);
                self.feed(event);
            } else if !self.retries.is_empty() {
                let event = self.retries.remove(0);
                self.feed(event);
            } else if self.saga.as_ref().is_some_and(|s| !s.state().is_final()) {
                // Nothing pending, yet not finished: answers vanished, and the sweeper
                // sends their calls again.
                self.nudge();
            } else {
                break;
            }
            self.check();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_schedule_keeps_the_direction_and_undoes_what_ran(
        graph in graph(),
        steps in prop::collection::vec(step(), 0..80),
    ) {
        let mut world = World::new(graph);
        for step in &steps {
            world.run(step);
        }
        world.settle();
        // The outcome: the saga's state, or (after a crash once it was final) the log's.
        let outcome = match (&world.saga, &world.durable) {
            (Some(saga), _) => saga.state(),
            (None, Some(record)) => record.state,
            (None, None) => {
                // Gone before its definition was durable: nothing may have run.
                prop_assert!(world.barriers.iter().all(|b| *b == Barrier::None));
                return Ok(());
            }
        };
        prop_assert!(outcome.is_final(), "not final: {:?}", outcome);
        // Nothing the saga recorded after its last write is missing from the log: a late
        // answer, heard after the final record was issued, was written too.
        if let (Some(saga), Some(durable)) = (&world.saga, &world.durable) {
            prop_assert_eq!(durable, &saga.log_record(), "the log lacks what memory holds");
        }
        let applied: Vec<bool> = (0..world.barriers.len()).map(|i| world.applied(i)).collect();
        if outcome == TxnState::Completed {
            prop_assert!(applied.iter().all(|a| *a), "completed, not applied: {:?}", applied);
        }
        if outcome == TxnState::Compensated {
            prop_assert!(
                applied.iter().all(|a| !*a),
                "compensated, but still applied: {:?}, by hand {:?}",
                world.barriers,
                world.by_hand
            );
        }
        // A step its participant rejects completes only if an operator applied it by hand.
        let rejected = (0..world.scripts.len())
            .any(|i| world.scripts[i] == Script::Reject && !world.by_hand[i]);
        if rejected {
            prop_assert_eq!(outcome, TxnState::Compensated);
        }
    }
}
