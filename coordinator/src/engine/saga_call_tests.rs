//! A saga's calls that fail, go unanswered or answer late: retries, the sweeper's
//! resends, and each answer recorded against the call it answers. The exact actions,
//! as in `saga_tests.rs`.

use super::messages::NO_ANSWER;
use super::saga::*;
use super::saga_tests::*;
use crate::model::{Operation, TxnState, UnixMs};

#[test]
fn transient_failures_are_retried_and_every_attempt_is_in_the_history() {
    let mut saga = running(&[&[]]);
    let failure = SagaEvent::StepFailed {
        step: 0,
        call: saga.step_call(0),
        error: "unavailable".into(),
    };
    assert_eq!(
        saga.handle_event(failure, T0 + 2),
        vec![SagaAction::ScheduleStepRetry {
            step: 0,
            attempt: 1,
            policy: RETRY
        }]
    );
    assert_eq!(
        saga.handle_event(
            SagaEvent::StepRetryDue {
                step: 0,
                attempt: 1
            },
            T0 + 20
        ),
        vec![SagaAction::SendStep { step: 0, call: 2 }]
    );
    committed(&mut saga, 0);
    let step = &saga.steps()[0];
    assert_eq!(step.attempts, 2);
    let results: Vec<(Operation, Option<&str>)> = step
        .history
        .attempts()
        .iter()
        .map(|a| (a.operation, a.result.as_deref()))
        .collect();
    assert_eq!(
        results,
        [
            (Operation::Step, Some("error: unavailable")),
            (Operation::Step, Some("committed"))
        ]
    );
}

#[test]
fn a_nudge_sends_again_only_calls_unanswered_beyond_their_timeout() {
    let nudge = |saga: &mut Saga, at: UnixMs| {
        saga.handle_event(
            SagaEvent::Nudge {
                stale_after_ms: 100,
            },
            at,
        )
    };
    // Both steps went out at T0 + 1 with a 1 s call timeout, which is longer than
    // stale_after_ms: a call may run that long, counted from its start, which trails the
    // send; so the nudge waits a grace more.
    let mut saga = running(&[&[], &[]]);
    committed(&mut saga, 0);
    assert!(nudge(&mut saga, T0 + 500).is_empty());
    assert!(nudge(&mut saga, T0 + 1_001).is_empty());
    assert_eq!(
        nudge(&mut saga, T0 + 1_001 + CALL_START_GRACE_MS),
        vec![SagaAction::SendStep { step: 1, call: 2 }]
    );
    let step = &saga.steps()[1];
    assert_eq!(step.attempts, 2);
    assert_eq!(
        step.history.attempts()[0].result.as_deref(),
        Some(NO_ANSWER)
    );
    rejected(&mut saga, 1);
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    assert!(nudge(&mut saga, T0 + 500).is_empty());
    assert_eq!(
        nudge(&mut saga, T0 + 1_004 + CALL_START_GRACE_MS),
        vec![SagaAction::SendCompensation { step: 0, call: 3 }]
    );
    assert_eq!(saga.steps()[0].compensation_attempts, 2);
}

/// The sweeper gives up a step's call and sends it again. The first call's late answer
/// is the step's answer, and is recorded against that call: the call sent again stays
/// in flight until its own answer comes. (An answer once closed the newest call of its
/// kind, so `txn show` and an operator's resolve saw nothing in flight while the
/// second call was.)
#[test]
fn a_late_answer_to_a_call_given_up_leaves_the_call_sent_again_in_flight() {
    let mut saga = running(&[&[]]);
    let first = saga.step_call(0);
    assert_eq!(
        saga.handle_event(
            SagaEvent::Nudge {
                stale_after_ms: 100
            },
            T0 + 1_001 + CALL_START_GRACE_MS
        ),
        vec![SagaAction::SendStep { step: 0, call: 2 }]
    );
    let answer = SagaEvent::StepAnswered {
        step: 0,
        call: first,
        answer: StepAnswer::Committed,
    };
    assert_eq!(
        saga.handle_event(answer, T0 + 1_500 + CALL_START_GRACE_MS),
        vec![SagaAction::PersistLazy, SagaAction::PersistForced]
    );
    let results = |saga: &Saga| saga.steps()[0].history.results();
    assert_eq!(results(&saga), [Some(NO_ANSWER.to_string()), None]);
    assert!(saga.steps()[0].history.in_flight());
    let second = SagaEvent::StepAnswered {
        step: 0,
        call: 2,
        answer: StepAnswer::Committed,
    };
    // The final record is being written without it: the answer is written on its own,
    // in the final record.
    assert_eq!(
        saga.handle_event(second, T0 + 1_600 + CALL_START_GRACE_MS),
        vec![SagaAction::PersistLazy]
    );
    let written = saga.log_record();
    assert_eq!(written.state, TxnState::Completed);
    let sent_again = &written.branches[0].history.attempts()[1];
    assert_eq!(sent_again.result.as_deref(), Some("committed"));
    assert_eq!(
        results(&saga),
        [Some(NO_ANSWER.to_string()), Some("committed".to_string())]
    );
    assert!(!saga.steps()[0].history.in_flight());
}

/// A failure of a call the sweeper gave up, heard after the call sent again went out,
/// schedules no retry: the call in flight will have its own answer or failure.
#[test]
fn a_late_failure_of_a_call_given_up_schedules_no_retry() {
    let mut saga = running(&[&[]]);
    let nudge = SagaEvent::Nudge {
        stale_after_ms: 100,
    };
    assert_eq!(
        saga.handle_event(nudge, T0 + 1_001 + CALL_START_GRACE_MS),
        vec![SagaAction::SendStep { step: 0, call: 2 }]
    );
    let failed = |call| SagaEvent::StepFailed {
        step: 0,
        call,
        error: "deadline exceeded".into(),
    };
    assert!(
        saga.handle_event(failed(1), T0 + 1_100 + CALL_START_GRACE_MS)
            .is_empty()
    );
    assert_eq!(saga.steps()[0].failing_since, None);
    assert!(saga.steps()[0].history.in_flight());
    assert_eq!(
        saga.handle_event(failed(2), T0 + 1_200 + CALL_START_GRACE_MS),
        vec![SagaAction::ScheduleStepRetry {
            step: 0,
            attempt: 2,
            policy: RETRY
        }]
    );
}

/// A call sent again by the sweeper fails after the saga completed on the first call's
/// answer: its failure is written to the log by a write of its own, and asks nothing
/// more. (It once changed memory only, so the log kept the call open for ever.)
#[test]
fn a_failure_heard_after_the_saga_ended_is_written_to_the_log_too() {
    let mut saga = running(&[&[]]);
    let first = saga.step_call(0);
    let nudge = SagaEvent::Nudge {
        stale_after_ms: 100,
    };
    assert_eq!(
        saga.handle_event(nudge, T0 + 1_001 + CALL_START_GRACE_MS),
        vec![SagaAction::SendStep { step: 0, call: 2 }]
    );
    let answer = SagaEvent::StepAnswered {
        step: 0,
        call: first,
        answer: StepAnswer::Committed,
    };
    saga.handle_event(answer, T0 + 1_500 + CALL_START_GRACE_MS);
    assert!(
        saga.handle_event(SagaEvent::Persisted, T0 + 1_510 + CALL_START_GRACE_MS)
            .is_empty()
    );
    assert_eq!(saga.state(), TxnState::Completed);
    let failed = SagaEvent::StepFailed {
        step: 0,
        call: 2,
        error: "deadline exceeded".into(),
    };
    assert_eq!(
        saga.handle_event(failed.clone(), T0 + 1_600 + CALL_START_GRACE_MS),
        vec![SagaAction::PersistLazy]
    );
    let history = &saga.log_record().branches[0].history;
    assert_eq!(
        history.attempts()[1].result.as_deref(),
        Some("error: deadline exceeded")
    );
    assert!(!history.in_flight());
    assert!(
        saga.handle_event(failed, T0 + 1_700 + CALL_START_GRACE_MS)
            .is_empty()
    );
}
