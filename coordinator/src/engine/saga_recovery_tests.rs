//! A saga recovered from its log record after a restart: where it goes on from, and
//! what it sends again. The exact actions, as in `saga_tests.rs`.

use super::saga::*;
use super::saga_tests::*;
use crate::model::{BranchState, TxnId, TxnState};

#[test]
fn recovery_resumes_forward_from_the_last_known_step() {
    let mut saga = running(&[&[], &[0], &[1]]);
    committed(&mut saga, 0);
    // The log has a committed, b running (its answer lost in the crash), c pending.
    let logged = saga.log_record();
    let (recovered, actions) = Saga::recover(logged, T0 + 100);
    assert_eq!(actions, vec![SagaAction::SendStep { step: 1, call: 2 }]);
    assert_eq!(recovered.steps()[1].attempts, 2);
    assert_eq!(recovered.state(), TxnState::Running);
}

#[test]
fn recovery_of_a_definition_alone_starts_the_saga() {
    let (saga, _) = Saga::submit(NewSaga {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        definition: definition(&[&[], &[]]),
        idempotency_key: None,
        owner: None,
        deadline_unix_ms: None,
    });
    let (recovered, actions) = Saga::recover(saga.log_record(), T0 + 100);
    assert_eq!(
        actions,
        vec![
            SagaAction::SendStep { step: 0, call: 1 },
            SagaAction::SendStep { step: 1, call: 1 }
        ]
    );
    assert_eq!(recovered.record().transitions[0].state, TxnState::Running);
}

#[test]
fn recovery_resumes_compensation_and_never_goes_forward_again() {
    let mut saga = running(&[&[], &[0], &[1]]);
    committed(&mut saga, 0);
    committed(&mut saga, 1);
    rejected(&mut saga, 2);
    persisted(&mut saga);
    compensated(&mut saga, 1);
    let (recovered, actions) = Saga::recover(saga.log_record(), T0 + 100);
    assert_eq!(
        actions,
        vec![SagaAction::SendCompensation { step: 0, call: 3 }]
    );
    assert_eq!(recovered.state(), TxnState::Compensating);

    // A decision whose write was in flight: the lazy writes after it carry it too.
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    rejected(&mut saga, 1);
    let (_, actions) = Saga::recover(saga.log_record(), T0 + 100);
    assert_eq!(
        actions,
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
}

#[test]
fn recovered_compensation_neither_hangs_on_nor_skips_steps_the_log_shows_pending() {
    // a ∥ b, c after both; b rejected and the decision logged; the coordinator dies
    // before anything is compensated. c shows pending, but progress is lazy: it may
    // have run. It is compensated (a no-op at its barrier if it never ran), then a.
    let mut saga = running(&[&[], &[], &[0, 1]]);
    rejected(&mut saga, 1);
    let logged = saga.log_record();
    assert_eq!(logged.branches[2].state, BranchState::Pending);
    let (mut recovered, actions) = Saga::recover(logged, T0 + 100);
    assert_eq!(
        actions,
        vec![SagaAction::SendCompensation { step: 2, call: 1 }]
    );
    assert_eq!(
        compensated(&mut recovered, 2),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendCompensation { step: 0, call: 2 }
        ]
    );
}

#[test]
fn a_rejection_recovered_before_its_decision_was_logged_is_decided_again() {
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    let mut logged = saga.log_record();
    logged.branches[1].state = BranchState::Rejected;
    let (recovered, actions) = Saga::recover(logged, T0 + 100);
    assert_eq!(actions, vec![SagaAction::PersistForced]);
    assert_eq!(recovered.log_record().state, TxnState::Compensating);
}

#[test]
fn after_a_restart_a_step_the_log_shows_pending_is_compensated_too() {
    // a ∥ b, c after a. Before the crash a and c committed, but only the definition
    // reached the disk (progress is lazy). After the restart b is rejected: c may have
    // run, so it is compensated (first: it runs after a), not skipped.
    let (saga, _) = Saga::submit(NewSaga {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        definition: definition(&[&[], &[], &[0]]),
        idempotency_key: None,
        owner: None,
        deadline_unix_ms: None,
    });
    let (mut saga, actions) = Saga::recover(saga.log_record(), T0 + 100);
    assert_eq!(
        actions,
        vec![
            SagaAction::SendStep { step: 0, call: 1 },
            SagaAction::SendStep { step: 1, call: 1 }
        ]
    );
    assert_eq!(rejected(&mut saga, 1), vec![SagaAction::PersistForced]);
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 2, call: 1 }]
    );
    assert_eq!(saga.steps()[2].state, BranchState::Compensating);
    assert_eq!(
        compensated(&mut saga, 2),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendCompensation { step: 0, call: 2 }
        ]
    );
}

#[test]
fn a_recovered_saga_with_nothing_left_to_send_finishes() {
    // Every step committed, but the final write was lost.
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    let mut logged = saga.log_record();
    logged.branches[1].state = BranchState::Committed;
    let (recovered, actions) = Saga::recover(logged, T0 + 100);
    assert_eq!(actions, vec![SagaAction::PersistForced]);
    assert_eq!(recovered.log_record().state, TxnState::Completed);
}

#[test]
fn attempts_in_flight_at_a_crash_are_closed_on_recovery() {
    let saga = running(&[&[]]);
    let (recovered, _) = Saga::recover(saga.log_record(), T0 + 100);
    let attempts = recovered.steps()[0].history.attempts();
    assert_eq!(
        attempts[0].result.as_deref(),
        Some("unknown: the coordinator restarted")
    );
    assert_eq!(
        attempts[1].finished_unix_ms, None,
        "the resent one is in flight"
    );
}
