//! Operator verbs and cancels on two-phase commits: the exact actions each emits, and
//! what is refused (and then changed nothing). Sagas': `saga_operator_tests` and
//! `saga_operator_call_tests`.

use super::messages::{
    Action, Answer, BranchSpec, Command, Event, NO_ANSWER_PAUSED, NewTransaction, OperatorCommand,
    OperatorRequest, Refusal, Vote,
};
use super::twopc::{STUCK_AFTER_DELIVERIES, TwoPhaseCommit};
use crate::model::{BranchState, CallNumber, Resolution, TxnId, TxnState, UnixMs};

pub(super) const T0: UnixMs = 1_700_000_000_000;

pub(super) fn ops(command: OperatorCommand) -> OperatorRequest {
    OperatorRequest {
        command,
        by: "ops".into(),
        reason: "ticket 7".into(),
    }
}

pub(super) fn resolve(branch: &str, outcome: Resolution) -> OperatorRequest {
    ops(OperatorCommand::Resolve {
        branch_id: branch.into(),
        outcome,
    })
}

fn two_phase(branches: usize) -> TwoPhaseCommit {
    let (mut txn, _) = TwoPhaseCommit::begin(NewTransaction {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        deadline_unix_ms: T0 + 60_000,
        prepare_timeout_ms: 5_000,
        max_branches: 4,
        owner: None,
        parallel_commit: false,
    });
    for i in 0..branches {
        let spec = BranchSpec {
            id: format!("b{i}"),
            endpoint: format!("http://127.0.0.1:{}", 7000 + i),
            payload: Vec::new(),
        };
        txn.handle_command(Command::Enlist(spec), T0).unwrap();
    }
    txn
}

/// Two branches, commit decided and durable, both commits sent.
fn committing() -> TwoPhaseCommit {
    let mut txn = two_phase(2);
    txn.handle_command(Command::Commit, T0).unwrap();
    for branch in 0..2 {
        txn.handle_event(
            Event::PrepareAnswered {
                branch,
                call: txn.latest_call(branch),
                vote: Vote::Yes,
            },
            T0 + 1,
        );
    }
    txn.handle_event(Event::DecisionPersisted, T0 + 2);
    assert_eq!(txn.state(), TxnState::Committing);
    txn
}

fn fail_delivery(
    txn: &mut TwoPhaseCommit,
    (branch, call): (usize, CallNumber),
    now: UnixMs,
) -> Vec<Action> {
    txn.handle_event(
        Event::DeliveryFailed {
            branch,
            call,
            error: "participant unreachable".into(),
            permanent: false,
        },
        now,
    )
}

#[test]
fn pause_holds_retries_and_resends_until_resume_sends_what_waits() {
    let mut txn = committing();
    assert_eq!(
        fail_delivery(&mut txn, (1, 2), T0 + 3),
        vec![Action::ScheduleRetry {
            branch: 1,
            attempt: 1
        }]
    );
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::Pause), T0 + 4),
        Ok(vec![])
    );
    assert!(txn.record().paused);
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::Pause), T0 + 4),
        Err(Refusal::AlreadyPaused)
    );
    // The timer fires: nothing is sent while paused (the sweeper, with nothing stale yet,
    // sends nothing either; `paused_a_lost_call_is_given_up_but_not_sent_again` has it
    // find a lost call).
    assert!(
        txn.handle_event(
            Event::RetryDue {
                branch: 1,
                attempt: 1
            },
            T0 + 5
        )
        .is_empty()
    );
    assert!(
        txn.handle_event(
            Event::Nudge {
                stale_after_ms: 60_000
            },
            T0 + 6
        )
        .is_empty()
    );
    // Resume sends branch 1 (waiting), not branch 0 (its commit is in flight).
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::Resume), T0 + 7),
        Ok(vec![Action::SendCommit { branch: 1, call: 3 }])
    );
    assert_eq!(txn.branch(1).unwrap().attempts, 2);
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::Resume), T0 + 7),
        Err(Refusal::NotPaused)
    );
    let notes: Vec<&str> = txn
        .transitions()
        .iter()
        .map(|t| t.reason.as_str())
        .collect();
    assert!(
        notes.contains(&"retries paused by operator ops: ticket 7"),
        "{notes:?}"
    );
    assert!(notes.contains(&"retries resumed by operator ops: ticket 7"));
}

/// Paused, a call whose answer was lost is not sent again by the sweeper, but it is
/// taken as lost: otherwise it would stay "in flight", and an operator (told to pause,
/// then resolve once the call has ended) could never resolve the branch. Resume sends it.
#[test]
fn paused_a_lost_call_is_given_up_but_not_sent_again() {
    let mut txn = committing();
    txn.handle_operator(&ops(OperatorCommand::Pause), T0 + 3)
        .unwrap();
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 4),
        Err(Refusal::CallInFlight("b1".into()))
    );
    assert!(
        txn.handle_event(
            Event::Nudge {
                stale_after_ms: 100
            },
            T0 + 50
        )
        .is_empty()
    );
    assert!(txn.branch(1).unwrap().history.open_for_at_least(0, T0 + 50));
    assert!(
        txn.handle_event(
            Event::Nudge {
                stale_after_ms: 100
            },
            T0 + 200
        )
        .is_empty(),
        "paused: nothing is sent again"
    );
    let last = txn.branch(1).unwrap().history.attempts().last().cloned();
    assert_eq!(
        last.and_then(|a| a.result).as_deref(),
        Some(NO_ANSWER_PAUSED)
    );
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 201),
        Ok(vec![Action::PersistProgress])
    );
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::Resume), T0 + 202),
        Ok(vec![Action::SendCommit { branch: 0, call: 3 }])
    );
}

#[test]
fn retry_now_sends_what_waits_and_its_old_timer_becomes_stale() {
    let mut txn = committing();
    // Both commits in flight: nothing waits.
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::RetryNow), T0 + 3),
        Err(Refusal::NothingToRetry)
    );
    fail_delivery(&mut txn, (0, 2), T0 + 3);
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::RetryNow), T0 + 4),
        Ok(vec![Action::SendCommit { branch: 0, call: 3 }])
    );
    // The timer set after the first failure fires later: stale, nothing sent twice.
    assert!(
        txn.handle_event(
            Event::RetryDue {
                branch: 0,
                attempt: 1
            },
            T0 + 5
        )
        .is_empty()
    );
}

#[test]
fn a_branch_whose_participant_is_gone_is_resolved_only_as_the_decision_says() {
    let mut txn = committing();
    txn.handle_event(
        Event::Delivered {
            branch: 0,
            call: txn.latest_call(0),
            answer: Answer::Committed,
        },
        T0 + 3,
    );
    fail_delivery(&mut txn, (1, 2), T0 + 3);
    let before = txn.clone();
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Abort), T0 + 4),
        Err(Refusal::ContradictsDecision {
            branch: "b1".into(),
            wanted: Resolution::Abort,
            decided: "commit"
        })
    );
    assert_eq!(
        txn.handle_operator(&resolve("b0", Resolution::Commit), T0 + 4),
        Err(Refusal::NothingToResolve {
            branch: "b0".into(),
            state: BranchState::Committed
        })
    );
    assert_eq!(
        txn.handle_operator(&resolve("b9", Resolution::Commit), T0 + 4),
        Err(Refusal::UnknownBranch("b9".into()))
    );
    assert_eq!(txn, before, "refusals change nothing");
    // The last branch acknowledged by the operator: the commit ends, with its end record.
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 5),
        Ok(vec![Action::PersistEnd])
    );
    assert_eq!(txn.state(), TxnState::Committed);
    let record = txn.record();
    let resolution = record.branches[1].resolution.as_ref().unwrap();
    assert_eq!(
        (resolution.outcome, resolution.by.as_str()),
        (Resolution::Commit, "ops")
    );
    assert_eq!(record.branches[1].state, BranchState::Committed);
}

/// A branch's outcome stated while its phase-2 call is in flight: the operator may have
/// applied the work by hand, and the call could apply it too. Refused, changing nothing,
/// until the call has ended.
#[test]
fn a_branch_is_not_resolved_while_its_delivery_is_in_flight() {
    let mut txn = committing();
    let before = txn.clone();
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 3),
        Err(Refusal::CallInFlight("b1".into()))
    );
    assert_eq!(txn, before, "a refusal changes nothing");
    txn.handle_operator(&ops(OperatorCommand::Pause), T0 + 3)
        .unwrap();
    fail_delivery(&mut txn, (1, 2), T0 + 4);
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 5),
        Ok(vec![Action::PersistProgress])
    );
    assert_eq!(txn.branch(1).unwrap().state, BranchState::Committed);
}

#[test]
fn a_heuristic_answer_is_reported_and_can_be_resolved_once() {
    let mut txn = committing();
    txn.handle_event(
        Event::Delivered {
            branch: 0,
            call: txn.latest_call(0),
            answer: Answer::Committed,
        },
        T0 + 3,
    );
    assert_eq!(
        txn.handle_event(
            Event::Delivered {
                branch: 1,
                call: txn.latest_call(1),
                answer: Answer::Aborted
            },
            T0 + 4
        ),
        vec![Action::ReportHeuristic { branch: 1 }, Action::PersistEnd]
    );
    assert!(txn.branch(1).unwrap().heuristic.is_some());
    // Repaired by hand: the final record is written again with the resolution.
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 5),
        Ok(vec![Action::PersistProgress])
    );
    assert!(matches!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 6),
        Err(Refusal::NothingToResolve { .. })
    ));
    // Other verbs have nothing to do on a final transaction.
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::RetryNow), T0 + 6),
        Err(Refusal::Final(TxnState::Committed))
    );
}

#[test]
fn a_one_phase_commit_nobody_answers_is_settled_by_the_operator() {
    let mut txn = two_phase(1);
    assert_eq!(
        txn.handle_command(Command::Commit, T0),
        Ok(vec![Action::SendOnePhaseCommit { branch: 0, call: 1 }])
    );
    // Before the deadline the commit may still arrive: neither outcome may be stated.
    for outcome in [Resolution::Commit, Resolution::Abort] {
        assert_eq!(
            txn.handle_operator(&resolve("b0", outcome), T0 + 1),
            Err(Refusal::CommitInFlight)
        );
    }
    assert_eq!(
        txn.handle_event(Event::DeadlineReached, T0 + 60_000),
        vec![Action::SendAbort { branch: 0, call: 2 }]
    );
    assert!(
        txn.branch(0).unwrap().payload.is_empty(),
        "not kept while probing"
    );
    // The probe's answer (or the commit's) would settle it: nothing may be stated while
    // either is in flight.
    assert_eq!(
        txn.handle_operator(&resolve("b0", Resolution::Commit), T0 + 60_001),
        Err(Refusal::CallInFlight("b0".into()))
    );
    fail_delivery(&mut txn, (0, 2), T0 + 60_001); // the probe
    assert_eq!(
        txn.handle_operator(&resolve("b0", Resolution::Commit), T0 + 60_001),
        Err(Refusal::CallInFlight("b0".into()))
    );
    fail_delivery(&mut txn, (0, 1), T0 + 60_001); // the commit
    assert_eq!(
        txn.handle_operator(&resolve("b0", Resolution::Commit), T0 + 60_001),
        Ok(vec![Action::PersistDecision])
    );
    assert_eq!(txn.state(), TxnState::Preparing, "shown once durable");
    txn.handle_event(Event::DecisionPersisted, T0 + 2);
    assert_eq!(txn.state(), TxnState::Committed);
    // A late answer changes nothing.
    assert!(
        txn.handle_event(
            Event::Delivered {
                branch: 0,
                call: txn.latest_call(0),
                answer: Answer::Committed
            },
            T0 + 3
        )
        .is_empty()
    );
}

#[test]
fn cancel_aborts_an_undecided_commit_and_nothing_decided() {
    let mut txn = two_phase(2);
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::Cancel), T0 + 1),
        Ok(vec![Action::RecordHistory])
    );
    assert_eq!(txn.state(), TxnState::Aborted);
    assert_eq!(txn.reason(), Some("cancelled by operator ops: ticket 7"));
    let mut txn = committing();
    assert_eq!(
        txn.handle_operator(&ops(OperatorCommand::Cancel), T0 + 3),
        Err(Refusal::AlreadyCommitting)
    );
    let mut txn = two_phase(2);
    txn.handle_command(Command::Commit, T0).unwrap();
    assert_eq!(
        txn.handle_operator(&resolve("b0", Resolution::Abort), T0 + 1),
        Err(Refusal::Undecided(TxnState::Preparing))
    );
}

#[test]
fn a_delivery_that_cannot_succeed_flags_the_transaction_stuck_at_once_and_is_still_retried() {
    let mut txn = committing();
    let actions = txn.handle_event(
        Event::DeliveryFailed {
            branch: 1,
            call: txn.latest_call(1),
            error: "participant answered FailedPrecondition: past the barrier retention".into(),
            permanent: true,
        },
        T0 + 3,
    );
    assert_eq!(
        actions,
        vec![Action::ScheduleRetry {
            branch: 1,
            attempt: 1
        }]
    );
    assert!(txn.is_stuck());
    let note = &txn.transitions().last().unwrap().reason;
    assert!(
        note.starts_with("stuck: delivering to branch b1 cannot succeed")
            && note.contains("an operator must resolve it"),
        "{note}"
    );
}

#[test]
fn a_delivery_that_keeps_failing_flags_the_transaction_stuck_until_it_ends() {
    let mut txn = committing();
    for attempt in 1..=STUCK_AFTER_DELIVERIES {
        fail_delivery(&mut txn, (1, 1 + attempt), T0 + 3);
        assert_eq!(txn.is_stuck(), attempt >= STUCK_AFTER_DELIVERIES);
        txn.handle_event(Event::RetryDue { branch: 1, attempt }, T0 + 4);
    }
    for branch in 0..2 {
        txn.handle_event(
            Event::Delivered {
                branch,
                call: txn.latest_call(branch),
                answer: Answer::Committed,
            },
            T0 + 5,
        );
    }
    assert_eq!(txn.state(), TxnState::Committed);
    assert!(!txn.is_stuck());
}

#[test]
fn past_its_deadline_a_transaction_waiting_only_on_a_participant_says_so() {
    // An abort not delivered.
    let mut txn = two_phase(2);
    txn.handle_command(Command::Commit, T0).unwrap();
    txn.handle_event(
        Event::PrepareFailed {
            branch: 0,
            call: txn.latest_call(0),
            error: "participant unreachable".into(),
            permanent: false,
        },
        T0 + 1,
    );
    assert_eq!(txn.state(), TxnState::Aborting);
    assert!(!txn.waits_past_deadline(T0 + 59_999));
    assert!(
        txn.handle_event(Event::DeadlineReached, T0 + 60_000)
            .is_empty()
    );
    assert!(txn.waits_past_deadline(T0 + 60_000));
    // The timer fired: a wall clock a little behind the timer's does not hold it back.
    assert!(txn.waits_past_deadline(T0 + 59_990));
    assert!(
        txn.transitions()
            .last()
            .is_some_and(|t| t.reason.starts_with("abort undelivered at the deadline"))
    );
    // A one-phase commit whose participant never answers keeps counting: its outcome is
    // unknown.
    let mut txn = two_phase(1);
    txn.handle_command(Command::Commit, T0).unwrap();
    txn.handle_event(Event::DeadlineReached, T0 + 60_000);
    assert!(!txn.waits_past_deadline(T0 + 60_000));
    // Neither a commit being delivered.
    assert!(!committing().waits_past_deadline(T0 + 120_000));
}
