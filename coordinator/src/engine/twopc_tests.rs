//! One test per situation, asserting the exact actions each step emits.

use super::twopc::*;
use crate::model::{BranchState, Operation, TxnId, TxnState, UnixMs};

pub(super) const T0: UnixMs = 1_700_000_000_000;
pub(super) const DEADLINE: UnixMs = T0 + 60_000;

pub(super) fn new_txn(branches: usize) -> TwoPhaseCommit {
    let (mut txn, actions) = TwoPhaseCommit::begin(NewTransaction {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        deadline_unix_ms: DEADLINE,
        prepare_timeout_ms: 5_000,
        max_branches: 4,
        owner: None,
        parallel_commit: false,
    });
    assert_eq!(
        actions,
        vec![Action::StartDeadlineTimer {
            at_unix_ms: DEADLINE
        }]
    );
    for i in 0..branches {
        let actions = txn
            .handle_command(Command::Enlist(spec(&format!("b{i}"))), T0)
            .unwrap();
        assert!(actions.is_empty());
    }
    txn
}

pub(super) fn spec(id: &str) -> BranchSpec {
    BranchSpec {
        id: id.into(),
        endpoint: "http://127.0.0.1:1".into(),
        payload: id.as_bytes().to_vec(),
    }
}

/// `branch`'s answer to its latest prepare call, sent or not.
pub(super) fn vote(txn: &mut TwoPhaseCommit, branch: usize, vote: Vote) -> Vec<Action> {
    let call = txn
        .branch(branch)
        .map_or(0, |b| b.history.latest_call_to(Operation::Prepare));
    txn.handle_event(Event::PrepareAnswered { branch, call, vote }, T0 + 1)
}

pub(super) fn deliver(txn: &mut TwoPhaseCommit, branch: usize, answer: Answer) -> Vec<Action> {
    txn.handle_event(
        Event::Delivered {
            branch,
            call: txn.latest_call(branch),
            answer,
        },
        T0 + 2,
    )
}

/// A transaction of `n` branches past Commit, with every prepare sent.
pub(super) fn preparing(n: usize) -> TwoPhaseCommit {
    let mut txn = new_txn(n);
    let actions = txn.handle_command(Command::Commit, T0).unwrap();
    let mut expected = vec![Action::StartPrepareTimer { after_ms: 5_000 }];
    expected.extend((0..n).map(|branch| Action::SendPrepare { branch, call: 1 }));
    assert_eq!(actions, expected);
    assert_eq!(txn.state(), TxnState::Preparing);
    txn
}

/// A transaction of `n` branches whose commit decision is durable.
pub(super) fn committing(n: usize) -> TwoPhaseCommit {
    let mut txn = preparing(n);
    for branch in 0..n - 1 {
        assert!(vote(&mut txn, branch, Vote::Yes).is_empty());
    }
    assert_eq!(
        vote(&mut txn, n - 1, Vote::Yes),
        vec![Action::PersistDecision]
    );
    let actions = txn.handle_event(Event::DecisionPersisted, T0 + 1);
    assert_eq!(
        actions,
        (0..n)
            .map(|branch| Action::SendCommit { branch, call: 2 })
            .collect::<Vec<_>>()
    );
    txn
}

#[test]
fn all_yes_commits_only_after_the_decision_is_durable() {
    let mut txn = preparing(3);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert!(vote(&mut txn, 2, Vote::Yes).is_empty());
    assert_eq!(vote(&mut txn, 1, Vote::Yes), vec![Action::PersistDecision]);
    // The decision is being written: not reported as committing yet, but what is
    // written is a commit decision.
    assert_eq!(txn.state(), TxnState::Preparing);
    assert_eq!(txn.phase(), Phase::Deciding);
    let decision = txn.decision_record();
    assert_eq!(decision.state, TxnState::Committing);
    assert!(
        decision
            .branches
            .iter()
            .all(|b| b.state == BranchState::Prepared)
    );

    let actions = txn.handle_event(Event::DecisionPersisted, T0 + 1);
    assert_eq!(
        actions,
        vec![
            Action::SendCommit { branch: 0, call: 2 },
            Action::SendCommit { branch: 1, call: 2 },
            Action::SendCommit { branch: 2, call: 2 },
        ]
    );
    assert_eq!(txn.state(), TxnState::Committing);
    assert_eq!(txn.record().state, TxnState::Committing);

    assert!(deliver(&mut txn, 1, Answer::Committed).is_empty());
    assert!(deliver(&mut txn, 0, Answer::Committed).is_empty());
    assert_eq!(
        deliver(&mut txn, 2, Answer::Committed),
        vec![Action::PersistEnd]
    );
    assert_eq!(txn.state(), TxnState::Committed);
    let record = txn.record();
    assert_eq!(record.ended_unix_ms, Some(T0 + 2));
    assert!(
        record
            .branches
            .iter()
            .all(|b| b.state == BranchState::Committed)
    );
    let states: Vec<_> = record.transitions.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        vec![
            TxnState::Active,
            TxnState::Preparing,
            TxnState::Committing,
            TxnState::Committed
        ]
    );
}

#[test]
fn one_no_vote_aborts_and_tells_every_branch_that_may_have_prepared() {
    let mut txn = preparing(3);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    let actions = vote(&mut txn, 1, Vote::no("insufficient funds"));
    // Branch 0 voted YES, branch 2 has not answered yet: both get an abort; the NO voter
    // does not need one.
    assert_eq!(
        actions,
        vec![
            Action::SendAbort { branch: 0, call: 2 },
            Action::SendAbort { branch: 2, call: 2 }
        ]
    );
    assert_eq!(txn.state(), TxnState::Aborting);
    assert_eq!(txn.reason(), Some("branch b1 voted NO: insufficient funds"));

    assert!(deliver(&mut txn, 0, Answer::Aborted).is_empty());
    // Aborts are never logged (no PersistEnd); only their history may be kept.
    assert_eq!(
        deliver(&mut txn, 2, Answer::Aborted),
        vec![Action::RecordHistory]
    );
    assert_eq!(txn.state(), TxnState::Aborted);
}

#[test]
fn duplicate_vote_is_ignored() {
    let mut txn = preparing(2);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert!(vote(&mut txn, 0, Vote::no("changed my mind")).is_empty());
    assert_eq!(txn.branch(0).unwrap().state, BranchState::Prepared);
    assert_eq!(vote(&mut txn, 1, Vote::Yes), vec![Action::PersistDecision]);
}

#[test]
fn late_vote_after_the_decision_changes_nothing() {
    // Abort decided by a NO; a YES arriving afterwards must not revive the commit.
    let mut txn = preparing(2);
    vote(&mut txn, 0, Vote::no(""));
    assert!(vote(&mut txn, 1, Vote::Yes).is_empty());
    assert_eq!(txn.state(), TxnState::Aborting);

    // Commit decided; a NO for an unknown branch index or a repeated vote does nothing.
    let mut txn = committing(2);
    assert!(vote(&mut txn, 1, Vote::no("late")).is_empty());
    assert!(vote(&mut txn, 7, Vote::Yes).is_empty());
    assert_eq!(txn.state(), TxnState::Committing);
}

#[test]
fn a_vote_that_arrives_after_the_abort_ended_has_the_history_written_again() {
    // Branch 0's YES is answered after the abort it was sent, and the shard happens to
    // hear the abort's answer first: the abort has ended and its history was written
    // without the vote.
    let mut txn = preparing(2);
    assert_eq!(
        vote(&mut txn, 1, Vote::no("no")),
        vec![Action::SendAbort { branch: 0, call: 2 }]
    );
    assert_eq!(
        deliver(&mut txn, 0, Answer::Aborted),
        vec![Action::RecordHistory]
    );
    assert_eq!(vote(&mut txn, 0, Vote::Yes), vec![Action::RecordHistory]);
    assert_eq!(txn.state(), TxnState::Aborted);
    assert_eq!(
        txn.branch(0).unwrap().history.results(),
        [Some("voted YES".to_string()), Some("aborted".to_string())]
    );
}

#[test]
fn a_failed_prepare_heard_after_the_abort_ended_has_the_history_written_again() {
    // As above, with branch 0's prepare call failing instead of answering.
    let mut txn = preparing(2);
    vote(&mut txn, 1, Vote::no("no"));
    assert_eq!(
        deliver(&mut txn, 0, Answer::Aborted),
        vec![Action::RecordHistory]
    );
    let failed = Event::PrepareFailed {
        branch: 0,
        call: 1, // the prepare, not the abort sent since
        error: "unavailable".into(),
        permanent: false,
    };
    assert_eq!(
        txn.handle_event(failed, T0 + 3),
        vec![Action::RecordHistory]
    );
    let prepare = &txn.branch(0).unwrap().history.attempts()[0];
    assert_eq!(prepare.result.as_deref(), Some("error: unavailable"));
    // A second answer to the same call changes nothing, and writes nothing.
    assert_eq!(vote(&mut txn, 0, Vote::Yes), Vec::new());
}

#[test]
fn prepare_timeout_aborts_and_a_timer_after_the_decision_does_nothing() {
    let mut txn = preparing(2);
    vote(&mut txn, 0, Vote::Yes);
    let actions = txn.handle_event(Event::PrepareTimerFired, T0 + 5_000);
    assert_eq!(
        actions,
        vec![
            Action::SendAbort { branch: 0, call: 2 },
            Action::SendAbort { branch: 1, call: 2 }
        ]
    );
    assert_eq!(txn.reason(), Some("prepare timed out after 5000 ms"));

    let mut txn = committing(2);
    assert!(
        txn.handle_event(Event::PrepareTimerFired, T0 + 5_000)
            .is_empty()
    );
    assert!(
        txn.handle_event(Event::DeadlineReached, DEADLINE)
            .is_empty()
    );
    assert_eq!(txn.state(), TxnState::Committing);
}

#[test]
fn abort_requested_while_preparing() {
    let mut txn = preparing(2);
    vote(&mut txn, 1, Vote::Yes);
    let actions = txn
        .handle_command(
            Command::Abort {
                reason: "user cancelled".into(),
            },
            T0 + 1,
        )
        .unwrap();
    assert_eq!(
        actions,
        vec![
            Action::SendAbort { branch: 0, call: 2 },
            Action::SendAbort { branch: 1, call: 2 }
        ]
    );
    assert_eq!(txn.reason(), Some("user cancelled"));
    // Asking again is fine; a commit now waits for the abort already decided.
    assert_eq!(
        txn.handle_command(
            Command::Abort {
                reason: "again".into()
            },
            T0 + 2
        ),
        Ok(vec![])
    );
    assert_eq!(txn.handle_command(Command::Commit, T0 + 2), Ok(vec![]));
    assert_eq!(txn.state(), TxnState::Aborting);
}

#[test]
fn abort_waits_while_the_commit_decision_is_being_written_then_is_refused() {
    let mut txn = preparing(2);
    vote(&mut txn, 0, Vote::Yes);
    vote(&mut txn, 1, Vote::Yes);
    // Not durable yet: a crash now would abort it, so nothing may be said of it.
    assert_eq!(
        txn.handle_command(
            Command::Abort {
                reason: String::new()
            },
            T0 + 1
        ),
        Err(Refusal::CommitInFlight)
    );
    assert_eq!(txn.state(), TxnState::Preparing);
    let mut txn = committing(2);
    assert_eq!(
        txn.handle_command(
            Command::Abort {
                reason: String::new()
            },
            T0 + 1
        ),
        Err(Refusal::AlreadyCommitting)
    );
}

#[test]
fn read_only_branch_gets_no_phase_two() {
    let mut txn = preparing(3);
    vote(&mut txn, 0, Vote::Yes);
    vote(&mut txn, 1, Vote::ReadOnly);
    assert_eq!(vote(&mut txn, 2, Vote::Yes), vec![Action::PersistDecision]);
    assert_eq!(
        txn.handle_event(Event::DecisionPersisted, T0 + 1),
        vec![
            Action::SendCommit { branch: 0, call: 2 },
            Action::SendCommit { branch: 2, call: 2 }
        ]
    );
    deliver(&mut txn, 0, Answer::Committed);
    assert_eq!(
        deliver(&mut txn, 2, Answer::Committed),
        vec![Action::PersistEnd]
    );
    assert_eq!(txn.branch(1).unwrap().state, BranchState::ReadOnly);
}

#[test]
fn all_read_only_commits_with_one_forced_final_record_and_no_phase_two() {
    let mut txn = preparing(2);
    assert!(vote(&mut txn, 0, Vote::ReadOnly).is_empty());
    // No decision and no phase 2, but the outcome is durable before it is shown.
    assert_eq!(
        vote(&mut txn, 1, Vote::ReadOnly),
        vec![Action::PersistDecision]
    );
    assert_eq!(txn.state(), TxnState::Preparing);
    let logged = txn.log_record();
    assert_eq!(logged.state, TxnState::Committed);
    assert_eq!(logged.ended_unix_ms, Some(T0 + 1));
    assert!(
        txn.handle_event(Event::DecisionPersisted, T0 + 5)
            .is_empty()
    );
    assert_eq!(txn.state(), TxnState::Committed);
    // What is shown is what was written, to the millisecond.
    assert_eq!(txn.record(), logged);
}

#[test]
fn prepare_without_an_answer_aborts_including_the_silent_branch() {
    let mut txn = preparing(2);
    vote(&mut txn, 0, Vote::Yes);
    let actions = txn.handle_event(
        Event::PrepareFailed {
            branch: 1,
            call: txn.latest_call(1),
            error: "deadline exceeded".into(),
            permanent: false,
        },
        T0 + 1,
    );
    assert_eq!(
        actions,
        vec![
            Action::SendAbort { branch: 0, call: 2 },
            Action::SendAbort { branch: 1, call: 2 }
        ]
    );
    assert_eq!(txn.branch(1).unwrap().state, BranchState::Unreachable);
}

#[test]
fn a_prepare_refused_for_good_aborts_with_no_abort_owed_to_that_branch() {
    // FAILED_PRECONDITION (past the participant's retention, no record): it holds no YES
    // and would refuse an abort the same way for ever.
    let mut txn = preparing(2);
    vote(&mut txn, 0, Vote::Yes);
    let actions = txn.handle_event(
        Event::PrepareFailed {
            branch: 1,
            call: txn.latest_call(1),
            error: "past the barrier retention".into(),
            permanent: true,
        },
        T0 + 1,
    );
    assert_eq!(actions, vec![Action::SendAbort { branch: 0, call: 2 }]);
    assert_eq!(txn.branch(1).unwrap().state, BranchState::VotedNo);
    assert!(txn.reason().unwrap().contains("refused prepare"));
    assert_eq!(
        txn.handle_event(
            Event::Delivered {
                branch: 0,
                call: txn.latest_call(0),
                answer: Answer::Aborted
            },
            T0 + 2
        ),
        vec![Action::RecordHistory]
    );
    assert_eq!(txn.state(), TxnState::Aborted);
}

#[test]
fn deadline_while_active_aborts_without_contacting_anyone() {
    let mut txn = new_txn(2);
    assert_eq!(
        txn.handle_event(Event::DeadlineReached, DEADLINE),
        vec![Action::RecordHistory]
    );
    assert_eq!(txn.state(), TxnState::Aborted);
    assert_eq!(txn.reason(), Some("the transaction's deadline passed"));
}

#[test]
fn enlist_rules() {
    let mut txn = new_txn(2);
    assert_eq!(
        txn.handle_command(Command::Enlist(spec("b0")), T0),
        Err(Refusal::DuplicateBranch("b0".into()))
    );
    txn.handle_command(Command::Enlist(spec("b2")), T0).unwrap();
    txn.handle_command(Command::Enlist(spec("b3")), T0).unwrap();
    assert_eq!(
        txn.handle_command(Command::Enlist(spec("b4")), T0),
        Err(Refusal::TooManyBranches(4))
    );
    txn.handle_command(Command::Commit, T0).unwrap();
    assert_eq!(
        txn.handle_command(Command::Enlist(spec("b5")), T0),
        Err(Refusal::NotActive(TxnState::Preparing))
    );
    let mut empty = new_txn(0);
    assert_eq!(
        empty.handle_command(Command::Commit, T0),
        Err(Refusal::NoBranches)
    );
    assert_eq!(empty.state(), TxnState::Active);
}
