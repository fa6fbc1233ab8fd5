//! One test per situation, asserting the exact actions each step of a saga emits.

use super::saga::*;
use super::saga_graph::*;
use crate::model::{
    BranchState, RetryPolicy, SagaDefinition, StepDefinition, TxnId, TxnState, UnixMs,
};

pub(super) const T0: UnixMs = 1_700_000_000_000;

pub(super) const RETRY: RetryPolicy = RetryPolicy {
    max_attempts: 3,
    initial_backoff_ms: 10,
    max_backoff_ms: 100,
};

/// Steps named by letter; `graph` lists, per step, the indices it runs after.
pub(super) fn definition(graph: &[&[usize]]) -> SagaDefinition {
    SagaDefinition {
        steps: graph
            .iter()
            .enumerate()
            .map(|(i, after)| StepDefinition {
                id: ((b'a' + i as u8) as char).to_string(),
                endpoint: "http://127.0.0.1:1".into(),
                payload: vec![i as u8],
                compensation: vec![100 + i as u8],
                timeout_ms: 1_000,
                retry: RETRY,
                after: after.to_vec(),
                requested: Default::default(),
            })
            .collect(),
        stuck_after_attempts: 3,
    }
}

/// A saga past submission: its definition durable, its root steps sent.
pub(super) fn running(graph: &[&[usize]]) -> Saga {
    let (mut saga, actions) = Saga::submit(NewSaga {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        definition: definition(graph),
        idempotency_key: Some("order-1".into()),
        owner: None,
        deadline_unix_ms: None,
    });
    assert_eq!(actions, vec![SagaAction::PersistForced]);
    assert!(!saga.is_accepted());
    let roots: Vec<SagaAction> = graph
        .iter()
        .enumerate()
        .filter(|(_, after)| after.is_empty())
        .map(|(step, _)| SagaAction::SendStep { step, call: 1 })
        .collect();
    assert_eq!(saga.handle_event(SagaEvent::Persisted, T0 + 1), roots);
    assert!(saga.is_accepted());
    saga
}

pub(super) fn answer(saga: &mut Saga, step: usize, answer: StepAnswer) -> Vec<SagaAction> {
    saga.handle_event(
        SagaEvent::StepAnswered {
            step,
            call: saga.step_call(step),
            answer,
        },
        T0 + 2,
    )
}

pub(super) fn committed(saga: &mut Saga, step: usize) -> Vec<SagaAction> {
    answer(saga, step, StepAnswer::Committed)
}

pub(super) fn rejected(saga: &mut Saga, step: usize) -> Vec<SagaAction> {
    answer(
        saga,
        step,
        StepAnswer::Rejected {
            reason: "out of stock".into(),
        },
    )
}

pub(super) fn compensated(saga: &mut Saga, step: usize) -> Vec<SagaAction> {
    saga.handle_event(
        SagaEvent::Compensated {
            step,
            call: saga.compensation_call(step),
        },
        T0 + 3,
    )
}

pub(super) fn persisted(saga: &mut Saga) -> Vec<SagaAction> {
    saga.handle_event(SagaEvent::Persisted, T0 + 4)
}

pub(super) fn states(saga: &Saga) -> Vec<BranchState> {
    saga.steps().iter().map(|s| s.state).collect()
}

#[test]
fn nothing_runs_before_the_definition_is_durable() {
    let (saga, actions) = Saga::submit(NewSaga {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        definition: definition(&[&[], &[0]]),
        idempotency_key: None,
        owner: None,
        deadline_unix_ms: None,
    });
    assert_eq!(actions, vec![SagaAction::PersistForced]);
    assert_eq!(states(&saga), [BranchState::Pending, BranchState::Pending]);
    // The record forced carries the whole definition.
    let logged = saga.log_record();
    assert_eq!(logged.state, TxnState::Running);
    assert_eq!(logged.saga.unwrap().steps[1].after, vec![0]);
    assert!(logged.transitions.is_empty());
}

#[test]
fn records_share_the_definition_instead_of_copying_it() {
    let mut saga = running(&[&[], &[0]]);
    let logged = saga.log_record();
    committed(&mut saga, 0);
    let shown = saga.record();
    let (Some(logged), Some(shown)) = (logged.saga, shown.saga) else {
        panic!("a saga's records carry its definition");
    };
    assert!(std::sync::Arc::ptr_eq(&logged, &shown));
    assert_eq!(*logged, definition(&[&[], &[0]]));
}

#[test]
fn a_chain_runs_step_by_step_and_completion_is_durable_before_it_shows() {
    let mut saga = running(&[&[], &[0], &[1]]);
    assert_eq!(
        committed(&mut saga, 0),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendStep { step: 1, call: 1 }
        ]
    );
    assert_eq!(
        committed(&mut saga, 1),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendStep { step: 2, call: 1 }
        ]
    );
    assert_eq!(
        committed(&mut saga, 2),
        vec![SagaAction::PersistLazy, SagaAction::PersistForced]
    );
    assert_eq!(
        saga.state(),
        TxnState::Running,
        "not completed until durable"
    );
    assert_eq!(saga.log_record().state, TxnState::Completed);
    assert!(persisted(&mut saga).is_empty());
    assert_eq!(saga.state(), TxnState::Completed);
    let transitions: Vec<TxnState> = saga.record().transitions.iter().map(|t| t.state).collect();
    assert_eq!(transitions, [TxnState::Running, TxnState::Completed]);
}

#[test]
fn a_rejected_step_compensates_the_earlier_ones_and_later_ones_never_start() {
    let mut saga = running(&[&[], &[0], &[1]]);
    committed(&mut saga, 0);
    // The decision is forced first; nothing is undone or shown before it is durable.
    assert_eq!(rejected(&mut saga, 1), vec![SagaAction::PersistForced]);
    assert_eq!(saga.state(), TxnState::Running);
    assert_eq!(saga.log_record().state, TxnState::Compensating);
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    assert_eq!(saga.state(), TxnState::Compensating);
    assert_eq!(
        states(&saga),
        [
            BranchState::Compensating,
            BranchState::Rejected,
            BranchState::Skipped
        ]
    );
    assert_eq!(
        compensated(&mut saga, 0),
        vec![SagaAction::PersistLazy, SagaAction::PersistForced]
    );
    assert_eq!(
        saga.state(),
        TxnState::Compensating,
        "not compensated until durable"
    );
    persisted(&mut saga);
    assert_eq!(saga.state(), TxnState::Compensated);
    assert_eq!(saga.reason(), Some("step b was rejected: out of stock"));
    // Step c was never sent: no Step attempt in its history.
    assert!(saga.steps()[2].history.attempts().is_empty());
}

#[test]
fn compensation_runs_in_reverse_dependency_order() {
    let mut saga = running(&[&[], &[0], &[1], &[2]]);
    committed(&mut saga, 0);
    committed(&mut saga, 1);
    committed(&mut saga, 2);
    rejected(&mut saga, 3);
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 2, call: 2 }]
    );
    assert_eq!(
        compensated(&mut saga, 2),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendCompensation { step: 1, call: 2 }
        ]
    );
    assert_eq!(
        compensated(&mut saga, 1),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendCompensation { step: 0, call: 2 }
        ]
    );
    assert_eq!(
        compensated(&mut saga, 0),
        vec![SagaAction::PersistLazy, SagaAction::PersistForced]
    );
}

#[test]
fn independent_steps_run_and_are_compensated_in_parallel() {
    // a and b in parallel; c after both.
    let mut saga = running(&[&[], &[], &[0, 1]]);
    assert_eq!(committed(&mut saga, 1), vec![SagaAction::PersistLazy]);
    assert_eq!(
        committed(&mut saga, 0),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendStep { step: 2, call: 1 }
        ]
    );
    rejected(&mut saga, 2);
    assert_eq!(
        persisted(&mut saga),
        vec![
            SagaAction::SendCompensation { step: 0, call: 2 },
            SagaAction::SendCompensation { step: 1, call: 2 }
        ]
    );
}

#[test]
fn a_failing_branch_of_a_parallel_group_compensates_its_sibling_in_flight() {
    // a and b in parallel; c after both. b is rejected while a is still running.
    let mut saga = running(&[&[], &[], &[0, 1]]);
    assert_eq!(rejected(&mut saga, 1), vec![SagaAction::PersistForced]);
    // a's answer arrives while the decision is being written: recorded, nothing sent.
    assert_eq!(committed(&mut saga, 0), vec![SagaAction::PersistLazy]);
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    assert_eq!(saga.steps()[2].state, BranchState::Skipped);

    // The same, but a's forward action is still in flight at the decision: it is
    // compensated anyway (the barrier makes that safe), and its late answer changes nothing.
    let mut saga = running(&[&[], &[], &[0, 1]]);
    rejected(&mut saga, 1);
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
    assert!(committed(&mut saga, 0).is_empty());
    assert_eq!(
        compensated(&mut saga, 0),
        vec![SagaAction::PersistLazy, SagaAction::PersistForced]
    );
}

#[test]
fn out_of_attempts_the_uncertain_step_is_compensated_too() {
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    for attempt in 1..RETRY.max_attempts {
        let actions = saga.handle_event(
            SagaEvent::StepFailed {
                step: 1,
                call: saga.step_call(1),
                error: "timeout".into(),
            },
            T0 + 5,
        );
        assert_eq!(
            actions,
            vec![SagaAction::ScheduleStepRetry {
                step: 1,
                attempt,
                policy: RETRY
            }]
        );
        saga.handle_event(SagaEvent::StepRetryDue { step: 1, attempt }, T0 + 6);
    }
    let last = saga.handle_event(
        SagaEvent::StepFailed {
            step: 1,
            call: saga.step_call(1),
            error: "timeout".into(),
        },
        T0 + 7,
    );
    assert_eq!(last, vec![SagaAction::PersistForced]);
    assert_eq!(saga.steps()[1].state, BranchState::Uncertain);
    assert_eq!(saga.reason(), Some("step b failed 3 times (last: timeout)"));
    // b may have run: it is compensated first, then a.
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 1, call: 4 }]
    );
    assert_eq!(
        compensated(&mut saga, 1),
        vec![
            SagaAction::PersistLazy,
            SagaAction::SendCompensation { step: 0, call: 2 }
        ]
    );
}

#[test]
fn a_compensation_failing_repeatedly_flags_the_saga_stuck_until_it_succeeds() {
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    rejected(&mut saga, 1);
    persisted(&mut saga);
    for attempt in 1..=5u32 {
        let actions = saga.handle_event(
            SagaEvent::CompensationFailed {
                step: 0,
                call: saga.compensation_call(0),
                error: "refund service down".into(),
                permanent: false,
            },
            T0 + 10,
        );
        let mut expected = vec![SagaAction::ScheduleCompensationRetry {
            step: 0,
            attempt,
            policy: RETRY,
        }];
        // Flagged once, at the third failure (stuck_after_attempts = 3).
        if attempt == 3 {
            expected.push(SagaAction::WarnStuck { step: 0 });
        }
        assert_eq!(actions, expected, "attempt {attempt}");
        assert_eq!(saga.is_stuck(), attempt >= 3);
        assert_eq!(
            saga.handle_event(
                SagaEvent::CompensationRetryDue { step: 0, attempt },
                T0 + 11
            ),
            vec![SagaAction::SendCompensation {
                step: 0,
                call: 2 + attempt
            }]
        );
    }
    assert!(saga.record().stuck);
    assert!(
        saga.record()
            .transitions
            .iter()
            .any(|t| t.reason.starts_with("stuck:"))
    );
    compensated(&mut saga, 0);
    persisted(&mut saga);
    assert_eq!(saga.state(), TxnState::Compensated);
    assert!(!saga.is_stuck());
    assert_eq!(saga.steps()[0].compensation_attempts, 6);
}

#[test]
fn no_forward_retry_once_compensation_is_decided() {
    let mut saga = running(&[&[], &[]]);
    saga.handle_event(
        SagaEvent::StepFailed {
            step: 0,
            call: saga.step_call(0),
            error: "unavailable".into(),
        },
        T0 + 2,
    );
    rejected(&mut saga, 1);
    assert!(
        saga.handle_event(
            SagaEvent::StepRetryDue {
                step: 0,
                attempt: 1
            },
            T0 + 3
        )
        .is_empty()
    );
    // Step 0 may have run: it is compensated.
    assert_eq!(
        persisted(&mut saga),
        vec![SagaAction::SendCompensation { step: 0, call: 2 }]
    );
}

#[test]
fn step_graphs_must_be_acyclic_with_known_unique_ids() {
    let ids = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let after = |lists: &[&[&str]]| {
        lists
            .iter()
            .map(|l| l.iter().map(|s| s.to_string()).collect())
            .collect::<Vec<Vec<String>>>()
    };
    assert_eq!(
        resolve_dependencies(
            &ids(&["a", "b", "c"]),
            &after(&[&[], &["a"], &["a", "b", "a"]])
        ),
        Ok(vec![vec![], vec![0], vec![0, 1]])
    );
    assert!(matches!(
        resolve_dependencies(&ids(&["a", "a"]), &after(&[&[], &[]])),
        Err(GraphError::DuplicateStep { step: 1, .. })
    ));
    assert!(matches!(
        resolve_dependencies(&ids(&["a", "b"]), &after(&[&[], &["x"]])),
        Err(GraphError::UnknownStep { step: 1, .. })
    ));
    assert_eq!(
        resolve_dependencies(&ids(&["a"]), &after(&[&["a"]])),
        Err(GraphError::SelfDependency { step: 0 })
    );
    let cycle = resolve_dependencies(&ids(&["a", "b", "c"]), &after(&[&["c"], &["a"], &["b"]]));
    assert!(matches!(cycle, Err(GraphError::Cycle { .. })), "{cycle:?}");
    assert_eq!(
        cycle.unwrap_err().to_string(),
        "is part of a cycle: a after c after b after a"
    );
}

#[test]
fn the_final_record_is_written_as_it_will_be_shown() {
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    rejected(&mut saga, 1);
    persisted(&mut saga);
    for _ in 0..3 {
        saga.handle_event(
            SagaEvent::CompensationFailed {
                step: 0,
                call: saga.compensation_call(0),
                error: "down".into(),
                permanent: false,
            },
            T0 + 10,
        );
        let attempt = saga.steps()[0].compensation_attempts;
        saga.handle_event(
            SagaEvent::CompensationRetryDue { step: 0, attempt },
            T0 + 11,
        );
    }
    assert!(saga.is_stuck());
    let finished_at = T0 + 50;
    assert_eq!(
        saga.handle_event(
            SagaEvent::Compensated {
                step: 0,
                call: saga.compensation_call(0)
            },
            finished_at
        ),
        vec![SagaAction::PersistLazy, SagaAction::PersistForced]
    );
    // The forced final record: not stuck, ending with its final transition.
    let logged = saga.log_record();
    assert_eq!(logged.state, TxnState::Compensated);
    assert!(!logged.stuck);
    assert_eq!(logged.ended_unix_ms, Some(finished_at));
    let last = logged.transitions.last().unwrap();
    assert_eq!(
        (last.state, last.at_unix_ms),
        (TxnState::Compensated, finished_at)
    );
    // Once durable, what is shown is the same.
    saga.handle_event(SagaEvent::Persisted, finished_at + 5);
    assert_eq!(saga.record(), logged);
}

#[test]
fn a_step_compensated_before_it_ran_makes_the_saga_compensate() {
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    assert_eq!(
        answer(&mut saga, 1, StepAnswer::AlreadyCompensated),
        vec![SagaAction::PersistForced]
    );
    assert_eq!(saga.steps()[1].state, BranchState::Uncertain);
}

#[test]
fn the_reason_for_a_decision_is_shown_only_once_it_is_durable() {
    let mut saga = running(&[&[], &[0]]);
    committed(&mut saga, 0);
    rejected(&mut saga, 1);
    assert_eq!(saga.record().reason, None);
    assert!(saga.log_record().reason.is_some());
    persisted(&mut saga);
    assert_eq!(
        saga.record().reason.as_deref(),
        Some("step b was rejected: out of stock")
    );
}
