//! Operator statements about a saga step with a call for it in flight: refused while
//! the call could do again what the operator did by hand, taken once it has ended (or,
//! paused, once the sweeper took it as lost), and a running step given up with its call
//! still out. The exact actions, as in `saga_operator_tests.rs`.

use super::messages::{NO_ANSWER_AWAITING_OPERATOR, NO_ANSWER_PAUSED, OperatorCommand, Refusal};
use super::operator_tests::{T0, ops, resolve};
use super::saga::{CALL_START_GRACE_MS, SagaAction, SagaEvent, StepAnswer};
use super::saga_operator_tests::*;
use crate::model::{BranchState, Resolution, TxnState};

/// An operator who states a step committed may have done its work by hand; a call for
/// the step still in flight could then do it a second time. So the statement is refused
/// while a call is in flight, and changes nothing; paused, the saga sends nothing more
/// for it, and once the call has ended the statement is taken.
#[test]
fn a_step_is_not_stated_committed_while_its_call_is_in_flight() {
    let (mut saga, actions) = saga(2, None);
    assert_eq!(actions, vec![SagaAction::SendStep { step: 0, call: 1 }]);
    let before = saga.record();
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Commit), T0 + 2),
        Err(Refusal::CallInFlight("s0".into()))
    );
    assert_eq!(saga.record(), before, "a refusal changes nothing");
    saga.handle_operator(&ops(OperatorCommand::Pause), T0 + 3)
        .unwrap();
    let actions = fail_step(&mut saga, (0, 1), "deadline exceeded", T0 + 4);
    let Some(&SagaAction::ScheduleStepRetry { attempt, .. }) = actions.first() else {
        panic!("a retry is scheduled: {actions:?}");
    };
    assert!(
        saga.handle_event(SagaEvent::StepRetryDue { step: 0, attempt }, T0 + 5)
            .is_empty(),
        "paused, nothing is sent again"
    );
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Commit), T0 + 5),
        Ok(vec![
            SagaAction::PersistLazy,
            SagaAction::SendStep { step: 1, call: 1 }
        ])
    );
}

/// The same for a compensation in flight, which the operator would state done by hand.
#[test]
fn a_step_is_not_stated_undone_while_its_compensation_is_in_flight() {
    let (mut saga, actions) = compensating_first_step();
    assert!(actions.contains(&SagaAction::SendCompensation { step: 0, call: 2 }));
    let before = saga.record();
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Abort), T0 + 4),
        Err(Refusal::CallInFlight("s0".into()))
    );
    assert_eq!(saga.record(), before, "a refusal changes nothing");
    fail_compensation(&mut saga, (0, 2), "participant unreachable", T0 + 5);
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Abort), T0 + 6),
        Ok(vec![SagaAction::PersistLazy, SagaAction::PersistForced])
    );
}

/// Giving up a running step is taken with its call in flight: the step's compensation
/// undoes the call if it went through, and the participant's barrier refuses the call if
/// it arrives after the compensation. A late answer to it changes nothing.
#[test]
fn a_running_step_is_given_up_with_its_call_in_flight() {
    let (mut saga, actions) = saga(2, None);
    assert_eq!(actions, vec![SagaAction::SendStep { step: 0, call: 1 }]);
    assert!(saga.steps()[0].history.open_for_at_least(0, T0 + 2));
    assert_eq!(
        saga.handle_operator(&resolve("s0", Resolution::Abort), T0 + 2),
        Ok(vec![SagaAction::PersistForced])
    );
    assert_eq!(
        saga.handle_event(SagaEvent::Persisted, T0 + 3),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    assert!(
        saga.handle_event(
            SagaEvent::StepAnswered {
                step: 0,
                call: saga.step_call(0),
                answer: StepAnswer::Committed,
            },
            T0 + 4,
        )
        .is_empty()
    );
    assert_eq!(saga.steps()[0].state, BranchState::Compensating);
    assert_eq!(
        saga.handle_event(
            SagaEvent::Compensated {
                step: 0,
                call: saga.compensation_call(0)
            },
            T0 + 5
        ),
        vec![SagaAction::PersistLazy, SagaAction::PersistForced]
    );
    // Each answer is recorded against its own call.
    let results: Vec<_> = saga.steps()[0]
        .history
        .attempts()
        .iter()
        .map(|a| a.result.as_deref())
        .collect();
    assert_eq!(results, [Some("committed"), Some("compensated")]);
    saga.handle_event(SagaEvent::Persisted, T0 + 6);
    assert_eq!(saga.state(), TxnState::Compensated);
}

/// Paused, a call whose answer was lost is not sent again by the sweeper, but it is taken
/// as lost, so that the operator (told to pause, then resolve once the call has ended)
/// can resolve the step.
#[test]
fn paused_a_lost_step_call_is_given_up_but_not_sent_again() {
    let (mut saga, _) = saga(2, None);
    saga.handle_operator(&ops(OperatorCommand::Pause), T0 + 2)
        .unwrap();
    let nudge = SagaEvent::Nudge {
        stale_after_ms: 100,
    };
    // Within its own call timeout (1 s) the call may still be answered.
    assert!(saga.handle_event(nudge.clone(), T0 + 500).is_empty());
    assert!(saga.steps()[0].history.open_for_at_least(0, T0 + 500));
    assert!(
        saga.handle_event(nudge, T0 + 2_000 + CALL_START_GRACE_MS)
            .is_empty(),
        "paused: nothing is sent again"
    );
    let last = saga.steps()[0].history.attempts().last().cloned();
    assert_eq!(
        last.and_then(|a| a.result).as_deref(),
        Some(NO_ANSWER_PAUSED)
    );
    assert_eq!(
        saga.handle_operator(
            &resolve("s0", Resolution::Commit),
            T0 + 2_001 + CALL_START_GRACE_MS
        ),
        Ok(vec![
            SagaAction::PersistLazy,
            SagaAction::SendStep { step: 1, call: 1 }
        ])
    );
}

/// While compensating, any call for a step keeps its statement waiting: a forward call
/// still out from before the decision to compensate could apply what the operator
/// states undone by hand.
#[test]
fn a_step_is_not_stated_undone_while_its_forward_call_is_out() {
    // Step 1's forward call is out when the saga is cancelled.
    let mut saga = cancelled_after_first_step();
    assert_eq!(saga.state(), TxnState::Compensating);
    fail_compensation(&mut saga, (1, 2), "participant unreachable", T0 + 4);
    assert!(saga.steps()[1].history.open_for_at_least(0, T0 + 5));
    assert_eq!(
        saga.handle_operator(&resolve("s1", Resolution::Abort), T0 + 5),
        Err(Refusal::CallInFlight("s1".into()))
    );
    fail_step(&mut saga, (1, 1), "deadline exceeded", T0 + 6);
    assert!(
        saga.handle_operator(&resolve("s1", Resolution::Abort), T0 + 7)
            .is_ok()
    );
}

/// A step stated committed hears its compensation's answer from a call the sweeper gave
/// up, while the call sent again is still out; then that call's answer is lost. The
/// step waits for an operator, so nothing is sent for it again, but the lost call is
/// taken as lost all the same: else the operator's resolve would be refused for ever
/// (the saga property test found this once answers closed their own calls).
#[test]
fn a_lost_call_of_a_step_that_waits_for_an_operator_is_taken_as_lost() {
    let (mut saga, _) = stated_committed_then_rejected();
    assert_eq!(
        saga.handle_event(SagaEvent::Persisted, T0 + 5),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    let nudge = SagaEvent::Nudge {
        stale_after_ms: 100,
    };
    assert_eq!(
        saga.handle_event(nudge.clone(), T0 + 2_000 + CALL_START_GRACE_MS),
        vec![SagaAction::SendCompensation { step: 0, call: 3 }]
    );
    // The late answer of the call given up: the step now waits for an operator, with
    // call 3 still out.
    let late = SagaEvent::Compensated { step: 0, call: 2 };
    saga.handle_event(late, T0 + 2_100 + CALL_START_GRACE_MS);
    assert!(saga.steps()[0].awaits_operator());
    assert!(saga.steps()[0].history.in_flight());
    assert_eq!(
        saga.handle_operator(
            &resolve("s0", Resolution::Abort),
            T0 + 2_200 + CALL_START_GRACE_MS
        ),
        Err(Refusal::CallInFlight("s0".into()))
    );
    // Call 3's answer never comes: the sweeper takes it as lost and sends nothing.
    assert!(
        saga.handle_event(nudge, T0 + 4_000 + CALL_START_GRACE_MS)
            .is_empty()
    );
    assert!(!saga.steps()[0].history.in_flight());
    assert_eq!(
        saga.steps()[0]
            .history
            .attempts()
            .last()
            .unwrap()
            .result
            .as_deref(),
        Some(NO_ANSWER_AWAITING_OPERATOR)
    );
    assert!(
        saga.handle_operator(
            &resolve("s0", Resolution::Abort),
            T0 + 4_001 + CALL_START_GRACE_MS
        )
        .is_ok()
    );
}
