//! Deliveries: one-phase commits and their deadline probe, phase 2 retried until every
//! branch acknowledges, sent again after a restart or by the sweeper, and each answer
//! recorded against the call it answers. The exact actions, as in `twopc_tests.rs`.

use super::twopc::*;
use super::twopc_tests::*;
use crate::model::{BranchState, MAX_ATTEMPTS_KEPT, Operation, TxnState, UnixMs};

#[test]
fn single_branch_commits_in_one_phase_with_one_forced_final_record() {
    let mut txn = new_txn(1);
    assert_eq!(
        txn.handle_command(Command::Commit, T0),
        Ok(vec![Action::SendOnePhaseCommit { branch: 0, call: 1 }])
    );
    assert_eq!(txn.state(), TxnState::Preparing);
    assert_eq!(
        deliver(&mut txn, 0, Answer::Committed),
        vec![Action::PersistDecision]
    );
    // Not shown as committed until the final record is durable.
    assert_eq!(txn.state(), TxnState::Preparing);
    let logged = txn.log_record();
    assert_eq!(logged.state, TxnState::Committed);
    assert!(logged.state.is_final());
    // A late answer or the deadline changes nothing while it is written.
    assert!(deliver(&mut txn, 0, Answer::Aborted).is_empty());
    assert!(
        txn.handle_event(Event::DeadlineReached, DEADLINE)
            .is_empty()
    );
    assert!(
        txn.handle_event(Event::DecisionPersisted, T0 + 9)
            .is_empty()
    );
    assert_eq!(txn.state(), TxnState::Committed);
    assert_eq!(txn.branch(0).unwrap().state, BranchState::Committed);
    assert_eq!(txn.record(), logged);
}

#[test]
fn single_branch_rejection_aborts() {
    let mut txn = new_txn(1);
    txn.handle_command(Command::Commit, T0).unwrap();
    let actions = deliver(
        &mut txn,
        0,
        Answer::Rejected {
            reason: "out of stock".into(),
        },
    );
    assert_eq!(actions, vec![Action::RecordHistory]);
    assert_eq!(txn.state(), TxnState::Aborted);
    assert_eq!(
        txn.reason(),
        Some("branch b0 rejected the one-phase commit: out of stock")
    );
}

#[test]
fn one_phase_deadline_probes_with_an_abort_and_takes_the_first_definitive_answer() {
    // The participant had not committed: the abort wins.
    let mut txn = new_txn(1);
    txn.handle_command(Command::Commit, T0).unwrap();
    assert_eq!(
        txn.handle_event(
            Event::DeliveryFailed {
                branch: 0,
                call: txn.latest_call(0),
                error: "unavailable".into(),
                permanent: false,
            },
            T0 + 1
        ),
        vec![Action::ScheduleRetry {
            branch: 0,
            attempt: 1
        }]
    );
    assert_eq!(
        txn.handle_event(Event::DeadlineReached, DEADLINE),
        vec![Action::SendAbort { branch: 0, call: 2 }]
    );
    // The retry timer of the failed commit is stale: the probe went out since.
    assert!(
        txn.handle_event(
            Event::RetryDue {
                branch: 0,
                attempt: 1
            },
            DEADLINE + 1
        )
        .is_empty()
    );
    // A retry after the probe failed probes with an abort too.
    assert_eq!(
        txn.handle_event(
            Event::RetryDue {
                branch: 0,
                attempt: 2
            },
            DEADLINE + 1
        ),
        vec![Action::SendAbort { branch: 0, call: 3 }]
    );
    assert_eq!(
        deliver(&mut txn, 0, Answer::Aborted),
        vec![Action::RecordHistory]
    );
    assert_eq!(txn.state(), TxnState::Aborted);
    assert!(deliver(&mut txn, 0, Answer::Committed).is_empty());
    assert_eq!(txn.state(), TxnState::Aborted);

    // The participant had committed: the abort is answered "already committed", and
    // the commit is final once its record is durable.
    let mut txn = new_txn(1);
    txn.handle_command(Command::Commit, T0).unwrap();
    txn.handle_event(Event::DeadlineReached, DEADLINE);
    assert_eq!(
        deliver(&mut txn, 0, Answer::Committed),
        vec![Action::PersistDecision]
    );
    txn.handle_event(Event::DecisionPersisted, DEADLINE + 1);
    assert_eq!(txn.state(), TxnState::Committed);
}

#[test]
fn abort_during_a_one_phase_commit_waits_for_its_outcome() {
    let mut txn = new_txn(1);
    txn.handle_command(Command::Commit, T0).unwrap();
    let abort = |txn: &mut TwoPhaseCommit| {
        txn.handle_command(
            Command::Abort {
                reason: String::new(),
            },
            T0,
        )
    };
    // The participant holds the outcome; then it is being written: wait either way.
    assert_eq!(abort(&mut txn), Err(Refusal::CommitInFlight));
    deliver(&mut txn, 0, Answer::Committed);
    assert_eq!(abort(&mut txn), Err(Refusal::CommitInFlight));
    txn.handle_event(Event::DecisionPersisted, T0 + 1);
    assert_eq!(abort(&mut txn), Err(Refusal::AlreadyCommitting));
}

#[test]
fn phase_two_failures_are_retried_until_acknowledged() {
    let mut txn = committing(2);
    let failed = |txn: &mut TwoPhaseCommit| {
        txn.handle_event(
            Event::DeliveryFailed {
                branch: 1,
                call: txn.latest_call(1),
                error: "connection refused".into(),
                permanent: false,
            },
            T0 + 3,
        )
    };
    assert_eq!(
        failed(&mut txn),
        vec![Action::ScheduleRetry {
            branch: 1,
            attempt: 1
        }]
    );
    assert_eq!(
        txn.handle_event(
            Event::RetryDue {
                branch: 1,
                attempt: 1
            },
            T0 + 4
        ),
        vec![Action::SendCommit { branch: 1, call: 3 }]
    );
    assert_eq!(
        failed(&mut txn),
        vec![Action::ScheduleRetry {
            branch: 1,
            attempt: 2
        }]
    );
    assert_eq!(
        txn.branch(1).unwrap().last_error.as_deref(),
        Some("connection refused")
    );
    deliver(&mut txn, 0, Answer::Committed);
    assert_eq!(
        deliver(&mut txn, 1, Answer::Committed),
        vec![Action::PersistEnd]
    );
    // Redelivered acks and retries after the end do nothing.
    assert!(deliver(&mut txn, 1, Answer::Committed).is_empty());
    assert!(
        txn.handle_event(
            Event::RetryDue {
                branch: 1,
                attempt: 2
            },
            T0 + 5
        )
        .is_empty()
    );
    assert!(failed(&mut txn).is_empty());
    assert_eq!(txn.branch(1).unwrap().attempts, 2);
}

#[test]
fn a_branch_is_failing_since_its_first_failed_delivery_however_long_it_lasts() {
    let mut txn = committing(2);
    // Far more failures than the history keeps.
    for attempt in 0..(3 * MAX_ATTEMPTS_KEPT as u64) {
        txn.handle_event(
            Event::DeliveryFailed {
                branch: 1,
                call: txn.latest_call(1),
                error: "connection refused".into(),
                permanent: false,
            },
            T0 + 10 + 2 * attempt,
        );
        let attempt_now = txn.branch(1).unwrap().attempts;
        txn.handle_event(
            Event::RetryDue {
                branch: 1,
                attempt: attempt_now,
            },
            T0 + 11 + 2 * attempt,
        );
    }
    assert_eq!(txn.branch(1).unwrap().failing_since, Some(T0 + 10));
    assert_eq!(txn.branch(0).unwrap().failing_since, None);
    deliver(&mut txn, 1, Answer::Committed);
    assert_eq!(txn.branch(1).unwrap().failing_since, None);
}

#[test]
fn decision_persisted_twice_sends_phase_two_once() {
    let mut txn = committing(2);
    assert!(
        txn.handle_event(Event::DecisionPersisted, T0 + 1)
            .is_empty()
    );
}

#[test]
fn recovery_redelivers_the_commit_to_every_yes_voter() {
    let mut txn = preparing(3);
    vote(&mut txn, 0, Vote::Yes);
    vote(&mut txn, 1, Vote::ReadOnly);
    vote(&mut txn, 2, Vote::Yes);
    let logged = txn.decision_record();
    txn.handle_event(Event::DecisionPersisted, T0 + 1);

    let (mut recovered, actions) = TwoPhaseCommit::recover(logged, 4, T0 + 10);
    assert_eq!(
        actions,
        vec![
            Action::SendCommit { branch: 0, call: 2 },
            Action::SendCommit { branch: 2, call: 2 }
        ]
    );
    assert_eq!(recovered.state(), TxnState::Committing);
    deliver(&mut recovered, 0, Answer::Committed);
    assert_eq!(
        deliver(&mut recovered, 2, Answer::Committed),
        vec![Action::PersistEnd]
    );
    assert_eq!(recovered.state(), TxnState::Committed);
}

#[test]
fn a_participant_that_broke_its_yes_vote_is_recorded_as_heuristic() {
    let mut txn = committing(2);
    deliver(&mut txn, 0, Answer::NotPrepared);
    assert_eq!(
        deliver(&mut txn, 1, Answer::Committed),
        vec![Action::PersistEnd]
    );
    let branch = txn.branch(0).unwrap();
    assert_eq!(branch.state, BranchState::Aborted);
    assert!(
        branch
            .last_error
            .as_deref()
            .unwrap()
            .starts_with("HEURISTIC")
    );
    // The decision itself stands.
    assert_eq!(txn.state(), TxnState::Committed);
}

#[test]
fn a_nudge_sends_again_only_calls_unanswered_for_too_long() {
    let nudge = |txn: &mut TwoPhaseCommit, at: UnixMs| {
        txn.handle_event(
            Event::Nudge {
                stale_after_ms: 1_000,
            },
            at,
        )
    };
    // Commits went out at T0 + 1; branch 1 answered, branch 2 failed and waits for its
    // retry timer, branch 0's answer never came.
    let mut txn = committing(3);
    deliver(&mut txn, 1, Answer::Committed);
    let failed = Event::DeliveryFailed {
        branch: 2,
        call: txn.latest_call(2),
        error: "connection refused".into(),
        permanent: false,
    };
    assert_eq!(
        txn.handle_event(failed, T0 + 2),
        vec![Action::ScheduleRetry {
            branch: 2,
            attempt: 1
        }]
    );
    assert!(nudge(&mut txn, T0 + 500).is_empty(), "not stale yet");
    assert_eq!(
        nudge(&mut txn, T0 + 1_001),
        vec![Action::SendCommit { branch: 0, call: 3 }]
    );
    let calls = txn.branch(0).unwrap().history.attempts();
    let results: Vec<Option<&str>> = calls.iter().map(|a| a.result.as_deref()).collect();
    assert_eq!(results, [Some("voted YES"), Some(NO_ANSWER), None]);
    assert_eq!(txn.branch(0).unwrap().attempts, 2);
    assert!(
        nudge(&mut txn, T0 + 1_002).is_empty(),
        "the resent call is fresh"
    );

    // Phase 1 has its own timer: a nudge changes nothing there.
    let mut txn = preparing(2);
    assert!(nudge(&mut txn, T0 + 10_000).is_empty());
    // Nor after the end.
    let mut txn = committing(2);
    deliver(&mut txn, 0, Answer::Committed);
    deliver(&mut txn, 1, Answer::Committed);
    assert_eq!(txn.state(), TxnState::Committed);
    assert!(nudge(&mut txn, T0 + 10_000).is_empty());
}

/// A one-phase commit still in flight at the deadline, and the abort that probes it:
/// each answer is recorded against its own call. (The commit's answer was once recorded
/// against the probe, the newest phase-2 call, and the probe's against the commit.)
#[test]
fn a_one_phase_commit_and_its_probe_are_each_answered_on_its_own_call() {
    let mut txn = new_txn(1);
    assert_eq!(
        txn.handle_command(Command::Commit, T0),
        Ok(vec![Action::SendOnePhaseCommit { branch: 0, call: 1 }])
    );
    assert_eq!(
        txn.handle_event(Event::DeadlineReached, DEADLINE),
        vec![Action::SendAbort { branch: 0, call: 2 }]
    );
    let committed = Event::Delivered {
        branch: 0,
        call: 1,
        answer: Answer::Committed,
    };
    assert_eq!(
        txn.handle_event(committed, DEADLINE + 1),
        vec![Action::PersistDecision]
    );
    let calls = |txn: &TwoPhaseCommit| -> Vec<(Operation, Option<String>)> {
        let history = txn.branch(0).unwrap().history.attempts();
        history
            .iter()
            .map(|a| (a.operation, a.result.clone()))
            .collect()
    };
    assert_eq!(
        calls(&txn),
        [
            (Operation::OnePhaseCommit, Some("committed".to_string())),
            (Operation::Abort, None)
        ]
    );
    let probe_failed = Event::DeliveryFailed {
        branch: 0,
        call: 2,
        error: "deadline exceeded".into(),
        permanent: false,
    };
    // Its final record is being written without it: the failure is written on its own,
    // in the final record.
    assert_eq!(
        txn.handle_event(probe_failed, DEADLINE + 2),
        vec![Action::PersistProgress]
    );
    assert_eq!(
        calls(&txn)[1],
        (
            Operation::Abort,
            Some("error: deadline exceeded".to_string())
        )
    );
    let written = txn.log_record();
    assert_eq!(written.state, TxnState::Committed);
    let probe = &written.branches[0].history.attempts()[1];
    assert_eq!(probe.result.as_deref(), Some("error: deadline exceeded"));
}

/// A failure of a delivery the sweeper gave up, heard after the delivery sent again went
/// out, schedules no retry: the call in flight will have its own answer or failure.
#[test]
fn a_late_failure_of_a_delivery_given_up_schedules_no_retry() {
    let mut txn = committing(2);
    deliver(&mut txn, 1, Answer::Committed);
    assert_eq!(
        txn.handle_event(
            Event::Nudge {
                stale_after_ms: 1_000
            },
            T0 + 1_001
        ),
        vec![Action::SendCommit { branch: 0, call: 3 }]
    );
    let failed = |call| Event::DeliveryFailed {
        branch: 0,
        call,
        error: "deadline exceeded".into(),
        permanent: false,
    };
    assert!(txn.handle_event(failed(2), T0 + 1_100).is_empty());
    assert_eq!(txn.branch(0).unwrap().failing_since, None);
    assert!(txn.branch(0).unwrap().history.in_flight());
    assert_eq!(
        txn.handle_event(failed(3), T0 + 1_200),
        vec![Action::ScheduleRetry {
            branch: 0,
            attempt: 2
        }]
    );
}

/// The sweeper sends a commit again; the first call's answer ends the transaction, and
/// the second call's answer comes after its end record was issued. The log gets it by a
/// write of its own, as memory does. (It once changed memory only: `txn show` read from
/// the log after a restart, or after the transaction left memory, showed the call open.)
#[test]
fn an_answer_after_the_end_record_is_written_to_the_log_too() {
    let late_answer = |call| Event::Delivered {
        branch: 0,
        call,
        answer: Answer::Committed,
    };
    let late_failure = |call| Event::DeliveryFailed {
        branch: 0,
        call,
        error: "connection reset".into(),
        permanent: false,
    };
    for (late, result) in [
        (late_answer(3), "committed"),
        (late_failure(3), "error: connection reset"),
    ] {
        let mut txn = committing(2);
        deliver(&mut txn, 1, Answer::Committed);
        let nudge = Event::Nudge {
            stale_after_ms: 1_000,
        };
        assert_eq!(
            txn.handle_event(nudge, T0 + 1_001),
            vec![Action::SendCommit { branch: 0, call: 3 }]
        );
        assert_eq!(
            txn.handle_event(late_answer(2), T0 + 1_100),
            vec![Action::PersistEnd]
        );
        assert_eq!(txn.state(), TxnState::Committed);
        assert!(txn.branch(0).unwrap().history.in_flight());
        assert_eq!(
            txn.handle_event(late, T0 + 1_200),
            vec![Action::PersistProgress]
        );
        let history = &txn.log_record().branches[0].history;
        assert_eq!(history.attempts()[2].result.as_deref(), Some(result));
        assert!(!history.in_flight());
        assert_eq!(txn.branch(0).unwrap().failing_since, None);
        // Heard twice, it is written once.
        assert!(txn.handle_event(late_answer(3), T0 + 1_300).is_empty());
    }
}
