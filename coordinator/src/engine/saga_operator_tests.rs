//! Operator verbs and cancels on sagas: the exact actions each emits, and what is
//! refused (and then changed nothing). Statements about a step with a call for it in
//! flight are in `saga_operator_call_tests.rs`; the set-ups both use are here.

use super::messages::{OperatorCommand, Refusal};
use super::operator_tests::{T0, ops, resolve};
use super::saga::{NewSaga, Saga, SagaAction, SagaEvent, StepAnswer};
use crate::model::{
    BranchState, CallNumber, Resolution, RetryPolicy, SagaDefinition, StepDefinition, TxnId,
    TxnState, UnixMs,
};

pub(super) fn saga(steps: usize, deadline_unix_ms: Option<UnixMs>) -> (Saga, Vec<SagaAction>) {
    let definition = SagaDefinition {
        steps: (0..steps)
            .map(|i| StepDefinition {
                id: format!("s{i}"),
                endpoint: "http://127.0.0.1:1".into(),
                payload: Vec::new(),
                compensation: Vec::new(),
                timeout_ms: 1_000,
                retry: RetryPolicy {
                    max_attempts: 3,
                    initial_backoff_ms: 10,
                    max_backoff_ms: 100,
                },
                after: if i == 0 { vec![] } else { vec![i - 1] },
                requested: Default::default(),
            })
            .collect(),
        stuck_after_attempts: 3,
    };
    let (mut saga, _) = Saga::submit(NewSaga {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        definition,
        idempotency_key: None,
        owner: None,
        deadline_unix_ms,
    });
    let actions = saga.handle_event(SagaEvent::Persisted, T0 + 1);
    (saga, actions)
}

#[test]
fn a_cancelled_saga_compensates_what_ran_once_the_decision_is_durable() {
    let (mut saga, _) = saga(2, None);
    saga.handle_event(
        SagaEvent::StepAnswered {
            step: 0,
            call: saga.step_call(0),
            answer: StepAnswer::Committed,
        },
        T0 + 2,
    );
    assert_eq!(
        saga.cancel("cancelled by its initiator".into()),
        Ok(vec![SagaAction::PersistForced])
    );
    assert_eq!(saga.state(), TxnState::Running, "not shown before durable");
    assert_eq!(saga.cancel("again".into()), Err(Refusal::DecisionInFlight));
    // Step 1 was sent after step 0 committed: it may have run, so it is undone first.
    assert_eq!(
        saga.handle_event(SagaEvent::Persisted, T0 + 3),
        vec![SagaAction::SendCompensation { step: 1, call: 2 }]
    );
    assert_eq!(saga.state(), TxnState::Compensating);
    assert_eq!(saga.reason(), Some("cancelled by its initiator"));
    assert_eq!(
        saga.cancel("again".into()),
        Err(Refusal::AlreadyEnding(TxnState::Compensating))
    );
}

#[test]
fn a_saga_past_its_deadline_is_compensated_and_the_deadline_survives_in_its_record() {
    let (mut saga, actions) = saga(1, Some(T0 + 500));
    assert_eq!(
        actions,
        vec![
            SagaAction::StartDeadlineTimer {
                at_unix_ms: T0 + 500
            },
            SagaAction::SendStep { step: 0, call: 1 }
        ]
    );
    assert_eq!(saga.record().deadline_unix_ms, T0 + 500);
    assert_eq!(
        saga.handle_event(SagaEvent::DeadlineReached, T0 + 500),
        vec![SagaAction::PersistForced]
    );
    assert_eq!(
        saga.handle_event(SagaEvent::Persisted, T0 + 501),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    assert_eq!(saga.reason(), Some("the saga's deadline passed"));
    // After a restart the timer is set again from the record.
    let (recovered, actions) = Saga::recover(saga.log_record(), T0 + 600);
    assert_eq!(recovered.state(), TxnState::Compensating);
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, SagaAction::StartDeadlineTimer { .. })),
        "a compensating saga needs no deadline"
    );
    let (_, running) = saga_running_recovered();
    assert!(running.contains(&SagaAction::StartDeadlineTimer {
        at_unix_ms: T0 + 500
    }));
}

/// A running saga with a deadline, recovered from its record.
pub(super) fn saga_running_recovered() -> (Saga, Vec<SagaAction>) {
    let (saga, _) = saga(1, Some(T0 + 500));
    Saga::recover(saga.log_record(), T0 + 100)
}

/// A two-step saga whose first step committed, cancelled, with its second step
/// compensated; returns what that compensation's answer asked for (the first step's
/// compensation goes out).
pub(super) fn compensating_first_step() -> (Saga, Vec<SagaAction>) {
    let mut saga = cancelled_after_first_step();
    let actions = saga.handle_event(
        SagaEvent::Compensated {
            step: 1,
            call: saga.compensation_call(1),
        },
        T0 + 3,
    );
    (saga, actions)
}

/// A two-step saga whose first step committed, cancelled (the decision durable) while
/// its second step's forward call is still out.
pub(super) fn cancelled_after_first_step() -> Saga {
    let (mut saga, _) = saga(2, None);
    saga.handle_event(
        SagaEvent::StepAnswered {
            step: 0,
            call: saga.step_call(0),
            answer: StepAnswer::Committed,
        },
        T0 + 2,
    );
    saga.cancel("stop".into()).unwrap();
    saga.handle_event(SagaEvent::Persisted, T0 + 3);
    saga
}

/// Forward call `call` of step `step` fails with `error`, without an answer.
pub(super) fn fail_step(
    saga: &mut Saga,
    (step, call): (usize, CallNumber),
    error: &str,
    now: UnixMs,
) -> Vec<SagaAction> {
    let error = error.into();
    saga.handle_event(SagaEvent::StepFailed { step, call, error }, now)
}

/// Compensation call `call` of step `step` fails with `error`, without an answer (not
/// for good).
pub(super) fn fail_compensation(
    saga: &mut Saga,
    (step, call): (usize, CallNumber),
    error: &str,
    now: UnixMs,
) -> Vec<SagaAction> {
    let error = error.into();
    let failed = SagaEvent::CompensationFailed {
        step,
        call,
        error,
        permanent: false,
    };
    saga.handle_event(failed, now)
}

#[test]
fn a_compensation_that_cannot_succeed_flags_the_saga_stuck_at_once() {
    let (mut saga, _) = compensating_first_step();
    let actions = saga.handle_event(
        SagaEvent::CompensationFailed {
            step: 0,
            call: saga.compensation_call(0),
            error: "participant answered FailedPrecondition: past the barrier retention".into(),
            permanent: true,
        },
        T0 + 4,
    );
    assert!(saga.is_stuck());
    assert!(
        actions.contains(&SagaAction::WarnStuck { step: 0 }),
        "{actions:?}"
    );
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, SagaAction::ScheduleCompensationRetry { step: 0, .. })),
        "{actions:?}"
    );
}

#[test]
fn a_stuck_compensation_is_resolved_by_hand_but_never_as_committed() {
    let (mut saga, actions) = compensating_first_step();
    assert_eq!(
        actions,
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendCompensation { step: 0, call: 2 }
        ]
    );
    fail_compensation(&mut saga, (0, 2), "participant unreachable", T0 + 4);
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Commit), T0 + 5),
        Err(Refusal::ContradictsDecision {
            branch: "s0".into(),
            wanted: Resolution::Commit,
            decided: "compensate"
        })
    );
    // Paused: the compensation's retry timer sends nothing; resume sends it.
    saga.handle_operator(&ops(OperatorCommand::Pause), T0 + 5)
        .unwrap();
    assert!(
        saga.handle_event(
            SagaEvent::CompensationRetryDue {
                step: 0,
                attempt: 1
            },
            T0 + 6
        )
        .is_empty()
    );
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Abort), T0 + 7),
        Ok(vec![SagaAction::PersistLazy, SagaAction::PersistForced])
    );
    assert_eq!(saga.steps()[0].state, BranchState::Compensated);
    saga.handle_event(SagaEvent::Persisted, T0 + 8);
    assert_eq!(saga.state(), TxnState::Compensated);
    assert!(saga.record().branches[0].resolution.is_some());
}

#[test]
fn a_step_that_keeps_failing_is_resolved_as_committed_and_the_saga_goes_on() {
    let (mut saga, _) = saga(2, None);
    fail_step(&mut saga, (0, 1), "participant unreachable", T0 + 2);
    assert_eq!(
        saga.handle_operator(&resolve("s1", Resolution::Commit), T0 + 3),
        Err(Refusal::NothingToResolve {
            branch: "s1".into(),
            state: BranchState::Pending
        })
    );
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Commit), T0 + 3),
        Ok(vec![
            SagaAction::PersistLazy,
            SagaAction::SendStep { step: 1, call: 1 }
        ])
    );
    // Its retry timer is stale now.
    assert!(
        saga.handle_event(
            SagaEvent::StepRetryDue {
                step: 0,
                attempt: 1
            },
            T0 + 4
        )
        .is_empty()
    );
}

/// A two-step saga whose first step's call failed and was stated committed by an
/// operator, and whose second step was then rejected; returns what the rejection asked
/// for (the decision to compensate is forced).
pub(super) fn stated_committed_then_rejected() -> (Saga, Vec<SagaAction>) {
    let (mut saga, _) = saga(2, None);
    fail_step(&mut saga, (0, 1), "participant unreachable", T0 + 2);
    saga.handle_operator(&resolve("s0", Resolution::Commit), T0 + 3)
        .unwrap();
    let rejected = SagaEvent::StepAnswered {
        step: 1,
        call: saga.step_call(1),
        answer: StepAnswer::Rejected {
            reason: "out of stock".into(),
        },
    };
    let actions = saga.handle_event(rejected, T0 + 4);
    (saga, actions)
}

/// A step an operator stated committed may be work done by hand: when the saga then
/// compensates, its participant's compensation undoes only what the participant
/// applied (it records a null compensation if it holds nothing). So the saga waits,
/// flagged stuck, until an operator states the step undone.
#[test]
fn a_step_stated_committed_is_undone_only_when_an_operator_says_so() {
    let (mut saga, actions) = stated_committed_then_rejected();
    assert_eq!(actions, vec![SagaAction::PersistForced]);
    assert_eq!(
        saga.handle_event(SagaEvent::Persisted, T0 + 5),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    // Its participant answers; that does not undo what was done by hand.
    assert_eq!(
        saga.handle_event(
            SagaEvent::Compensated {
                step: 0,
                call: saga.compensation_call(0)
            },
            T0 + 6
        ),
        vec![SagaAction::PersistLazy, SagaAction::WarnStuck { step: 0 }]
    );
    assert!(
        saga.log_record().stuck,
        "the flag and the note reach the log"
    );
    assert_eq!(saga.state(), TxnState::Compensating);
    assert!(saga.is_stuck());
    assert!(saga.steps()[0].awaits_operator());
    assert!(
        saga.record().branches[0].awaits_operator,
        "the record shown to operators says so"
    );
    assert!(
        !saga.log_record().branches[0].awaits_operator,
        "and no log keeps it"
    );
    let note = &saga.transitions().last().unwrap().reason;
    assert!(note.contains("by hand"), "{note}");
    // Nothing is sent again for it, and a repeated answer changes nothing.
    assert_eq!(
        saga.handle_operator(&ops(OperatorCommand::RetryNow), T0 + 7),
        Err(Refusal::NothingToRetry)
    );
    assert!(
        saga.handle_event(SagaEvent::Nudge { stale_after_ms: 0 }, T0 + 8)
            .is_empty()
    );
    assert!(
        saga.handle_event(
            SagaEvent::Compensated {
                step: 0,
                call: saga.compensation_call(0)
            },
            T0 + 9
        )
        .is_empty()
    );
    // Nor does a stray failure of the call already answered, nor a retry timer.
    assert!(
        saga.handle_event(
            SagaEvent::CompensationFailed {
                step: 0,
                call: saga.compensation_call(0),
                error: "lost".into(),
                permanent: false
            },
            T0 + 9
        )
        .is_empty()
    );
    let attempt = saga.steps()[0].compensation_attempts;
    assert!(
        saga.handle_event(SagaEvent::CompensationRetryDue { step: 0, attempt }, T0 + 9)
            .is_empty()
    );
    assert_eq!(saga.steps()[0].failing_since, None);
    assert_eq!(saga.state(), TxnState::Compensating);
    // After a restart (the statement is in the log: the runtime forces it before the
    // operator hears), the compensation is sent again and waits for an operator again.
    let (mut recovered, actions) = Saga::recover(saga.log_record(), T0 + 9);
    assert!(actions.contains(&SagaAction::SendCompensation { step: 0, call: 3 }));
    assert!(recovered.is_stuck());
    assert_eq!(
        recovered.handle_event(
            SagaEvent::Compensated {
                step: 0,
                call: recovered.compensation_call(0)
            },
            T0 + 9
        ),
        vec![SagaAction::PersistLazy, SagaAction::WarnStuck { step: 0 }]
    );
    assert!(recovered.steps()[0].awaits_operator());
    // Stated undone by an operator, it is compensated, and so is the saga.
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Abort), T0 + 10),
        Ok(vec![SagaAction::PersistLazy, SagaAction::PersistForced])
    );
    assert!(!saga.steps()[0].awaits_operator());
    assert!(!saga.record().branches[0].awaits_operator);
    assert_eq!(saga.handle_event(SagaEvent::Persisted, T0 + 11), Vec::new());
    assert_eq!(saga.state(), TxnState::Compensated);
    assert!(!saga.is_stuck());
}

/// Once the operator has stated the waiting step undone, the saga is no longer stuck for
/// it, and a compensation that fails afterwards flags it again, with its own note.
#[test]
fn a_step_stated_undone_clears_the_stuck_flag_it_raised() {
    let (mut saga, _) = saga(3, None);
    saga.handle_event(
        SagaEvent::StepAnswered {
            step: 0,
            call: saga.step_call(0),
            answer: StepAnswer::Committed,
        },
        T0 + 2,
    );
    fail_step(&mut saga, (1, 1), "participant unreachable", T0 + 3);
    saga.handle_operator(&resolve("s1", Resolution::Commit), T0 + 3)
        .unwrap();
    saga.handle_event(
        SagaEvent::StepAnswered {
            step: 2,
            call: saga.step_call(2),
            answer: StepAnswer::Rejected {
                reason: "out of stock".into(),
            },
        },
        T0 + 4,
    );
    assert_eq!(
        saga.handle_event(SagaEvent::Persisted, T0 + 5),
        vec![SagaAction::SendCompensation { step: 1, call: 2 }]
    );
    saga.handle_event(
        SagaEvent::Compensated {
            step: 1,
            call: saga.compensation_call(1),
        },
        T0 + 6,
    );
    assert!(saga.is_stuck());
    // The sweeper sends nothing for it, and a stray failure of its forward action
    // (none is in flight) is no retry waiting.
    assert!(
        saga.handle_event(SagaEvent::Nudge { stale_after_ms: 0 }, T0 + 100_000)
            .is_empty()
    );
    assert!(
        saga.handle_event(
            SagaEvent::StepFailed {
                step: 1,
                call: saga.step_call(1),
                error: "late".into()
            },
            T0 + 100_001
        )
        .is_empty()
    );
    assert_eq!(saga.steps()[1].failing_since, None);
    assert_eq!(
        saga.handle_operator(&resolve("s1", Resolution::Abort), T0 + 7),
        Ok(vec![
            SagaAction::PersistLazy,
            SagaAction::SendCompensation { step: 0, call: 2 }
        ])
    );
    assert!(!saga.is_stuck());
    assert_eq!(
        saga.handle_event(
            SagaEvent::CompensationFailed {
                step: 0,
                call: saga.compensation_call(0),
                error: "past the barrier retention".into(),
                permanent: true,
            },
            T0 + 8,
        ),
        vec![
            SagaAction::ScheduleCompensationRetry {
                step: 0,
                attempt: 1,
                policy: saga.definition().steps[0].retry,
            },
            SagaAction::WarnStuck { step: 0 }
        ]
    );
    assert!(saga.is_stuck());
    let note = &saga.transitions().last().unwrap().reason;
    assert!(note.contains("compensating step s0"), "{note}");
}
