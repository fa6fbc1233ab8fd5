//! The two-phase commit with parallel commit: the intent is forced alongside the
//! prepares, the votes decide, aborts after the intent are forced, and a restart asks
//! the votes again. One test per situation, asserting the exact actions.

use super::twopc::*;
use crate::model::{
    BranchState, CallNumber, Operation, OperatorResolution, Resolution, TxnId, TxnState, UnixMs,
};

const T0: UnixMs = 1_700_000_000_000;
const DEADLINE: UnixMs = T0 + 60_000;

/// A transaction with parallel commit and `n` branches `b0`, `b1`, ..., whose payloads
/// `payload` gives, past Commit; and what Commit emitted.
fn committed_to(n: usize, payload: impl Fn(usize) -> Vec<u8>) -> (TwoPhaseCommit, Vec<Action>) {
    let (mut txn, _) = TwoPhaseCommit::begin(NewTransaction {
        id: TxnId::generate(T0),
        created_unix_ms: T0,
        deadline_unix_ms: DEADLINE,
        prepare_timeout_ms: 5_000,
        max_branches: 4,
        owner: None,
        parallel_commit: true,
    });
    for i in 0..n {
        let spec = BranchSpec {
            id: format!("b{i}"),
            endpoint: "http://127.0.0.1:1".into(),
            payload: payload(i),
        };
        let enlisted = txn.handle_command(Command::Enlist(spec), T0).unwrap();
        assert!(enlisted.is_empty());
    }
    let actions = txn.handle_command(Command::Commit, T0).unwrap();
    (txn, actions)
}

/// `n` branches (payloads `b0`, `b1`, ...) past Commit, with the prepares and the intent
/// sent.
fn preparing(n: usize) -> TwoPhaseCommit {
    let (txn, actions) = committed_to(n, |i| format!("b{i}").into_bytes());
    let mut expected = vec![Action::StartPrepareTimer { after_ms: 5_000 }];
    expected.extend((0..n).map(|branch| Action::SendPrepare { branch, call: 1 }));
    expected.push(Action::PersistIntent);
    assert_eq!(actions, expected);
    // The intent holds every branch with its payload, in phase 1.
    let intent = txn.log_record();
    assert_eq!(intent.state, TxnState::Preparing);
    let payloads: Vec<_> = intent.branches.iter().map(|b| b.payload.clone()).collect();
    let expected: Vec<_> = (0..n).map(|i| format!("b{i}").into_bytes()).collect();
    assert_eq!(payloads, expected);
    txn
}

fn vote(txn: &mut TwoPhaseCommit, branch: usize, vote: Vote) -> Vec<Action> {
    txn.handle_event(
        Event::PrepareAnswered {
            branch,
            call: txn.latest_call(branch),
            vote,
        },
        T0 + 1,
    )
}

/// The commit decided by the votes, sent to `n` branches as their call number `call`.
fn commits(n: usize, call: CallNumber) -> Vec<Action> {
    let mut actions = vec![Action::NoteDecision];
    actions.extend((0..n).map(|branch| Action::SendCommit { branch, call }));
    actions
}

fn cancel() -> OperatorRequest {
    OperatorRequest {
        command: OperatorCommand::Cancel,
        by: "ops".into(),
        reason: String::new(),
    }
}

/// An operator states `branch`'s vote (commit = YES, abort = NO).
fn resolve(branch: &str, outcome: Resolution) -> OperatorRequest {
    OperatorRequest {
        command: OperatorCommand::Resolve {
            branch_id: branch.into(),
            outcome,
        },
        by: "ops".into(),
        reason: "its service is gone".into(),
    }
}

fn changed_my_mind() -> Command {
    Command::Abort {
        reason: "changed my mind".into(),
    }
}

/// Aborts sent to `branches` as their call number `call`.
fn aborts(branches: &[usize], call: CallNumber) -> Vec<Action> {
    branches
        .iter()
        .map(|&branch| Action::SendAbort { branch, call })
        .collect()
}

#[test]
fn the_votes_decide_once_the_intent_is_durable_with_no_forced_write_after_them() {
    let mut txn = preparing(2);
    assert!(txn.handle_event(Event::IntentPersisted, T0 + 1).is_empty());
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert_eq!(vote(&mut txn, 1, Vote::Yes), commits(2, 2));
    assert_eq!(txn.state(), TxnState::Committing);
    // What the lazy write holds: the decision, without the payloads.
    let noted = txn.log_record();
    assert_eq!(noted.state, TxnState::Committing);
    assert!(noted.branches.iter().all(|b| b.payload.is_empty()));
}

#[test]
fn votes_in_before_the_intent_wait_for_it() {
    let mut txn = preparing(2);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert!(vote(&mut txn, 1, Vote::Yes).is_empty());
    assert_eq!(txn.phase(), Phase::Deciding);
    assert_eq!(txn.state(), TxnState::Preparing);
    // An abort asked now waits for the outcome, which the intent's write settles.
    assert_eq!(
        txn.handle_command(changed_my_mind(), T0 + 1),
        Err(Refusal::CommitInFlight)
    );
    assert_eq!(
        txn.handle_event(Event::IntentPersisted, T0 + 2),
        commits(2, 2)
    );
    assert_eq!(txn.state(), TxnState::Committing);
    // Completed twice (a duplicate), it changes nothing.
    assert!(txn.handle_event(Event::IntentPersisted, T0 + 3).is_empty());
}

#[test]
fn an_abort_after_the_intent_is_forced_before_anyone_hears_it() {
    let mut txn = preparing(3);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert_eq!(
        vote(&mut txn, 1, Vote::no("out of stock")),
        vec![Action::PersistDecision]
    );
    // Not reported yet, not even its reason (a restart could still commit: the votes
    // are asked again); what is written is the abort, with its reason.
    assert_eq!(txn.state(), TxnState::Preparing);
    assert_eq!(txn.phase(), Phase::DecidingAbort { at_unix_ms: T0 + 1 });
    assert_eq!(txn.record().reason, None);
    let decision = txn.log_record();
    assert_eq!(decision.state, TxnState::Aborting);
    assert!(decision.reason.is_some_and(|r| r.contains("out of stock")));
    assert!(decision.branches.iter().all(|b| b.payload.is_empty()));
    // Nothing changes it while it is written.
    assert!(vote(&mut txn, 2, Vote::Yes).is_empty());
    assert!(txn.handle_event(Event::IntentPersisted, T0 + 2).is_empty());
    assert!(txn.handle_event(Event::DeadlineReached, T0 + 2).is_empty());
    assert_eq!(
        txn.handle_operator(&cancel(), T0 + 2),
        Err(Refusal::DecisionInFlight)
    );
    // Durable: the branches that may hold a YES hear it (the NO voter need not).
    assert_eq!(
        txn.handle_event(Event::DecisionPersisted, T0 + 3),
        aborts(&[0, 2], 2)
    );
    assert_eq!(txn.state(), TxnState::Aborting);
    assert!(
        txn.record()
            .reason
            .is_some_and(|r| r.contains("out of stock"))
    );
    txn.handle_event(
        Event::Delivered {
            branch: 0,
            call: txn.latest_call(0),
            answer: Answer::Aborted,
        },
        T0 + 4,
    );
    // The end is written: the log holds the intent, which a restart would ask again.
    let ended = txn.handle_event(
        Event::Delivered {
            branch: 2,
            call: txn.latest_call(2),
            answer: Answer::Aborted,
        },
        T0 + 4,
    );
    assert_eq!(ended, vec![Action::PersistEnd]);
    assert_eq!(txn.state(), TxnState::Aborted);
}

/// Branch 0's YES comes after the abort sent to it, whose answer ended the transaction
/// and issued its end record. The abort's intent is in the log, so the vote is written
/// with the record, whatever `history_records` says. (It was once written as history
/// only, which that setting can turn off.)
#[test]
fn a_vote_heard_after_a_logged_abort_ended_is_written_with_its_record() {
    let mut txn = preparing(2);
    assert_eq!(
        vote(&mut txn, 1, Vote::no("out of stock")),
        vec![Action::PersistDecision]
    );
    assert_eq!(
        txn.handle_event(Event::DecisionPersisted, T0 + 2),
        aborts(&[0], 2)
    );
    let aborted = Event::Delivered {
        branch: 0,
        call: 2,
        answer: Answer::Aborted,
    };
    assert_eq!(txn.handle_event(aborted, T0 + 3), vec![Action::PersistEnd]);
    assert_eq!(txn.state(), TxnState::Aborted);
    let late_yes = Event::PrepareAnswered {
        branch: 0,
        call: 1,
        vote: Vote::Yes,
    };
    assert_eq!(
        txn.handle_event(late_yes, T0 + 4),
        vec![Action::PersistProgress]
    );
    assert_eq!(
        txn.log_record().branches[0].history.results(),
        [Some("voted YES".to_string()), Some("aborted".to_string())]
    );
    assert_eq!(txn.log_record().state, TxnState::Aborted);
}

#[test]
fn a_prepare_timeout_and_an_abort_request_are_forced_too() {
    let mut txn = preparing(2);
    assert_eq!(
        txn.handle_event(Event::PrepareTimerFired, T0 + 5_000),
        vec![Action::PersistDecision]
    );
    assert_eq!(txn.state(), TxnState::Preparing);
    assert_eq!(
        txn.handle_event(Event::DecisionPersisted, T0 + 5_001),
        aborts(&[0, 1], 2)
    );

    let mut txn = preparing(2);
    assert_eq!(
        txn.handle_command(changed_my_mind(), T0 + 1),
        Ok(vec![Action::PersistDecision])
    );
    assert_eq!(txn.state(), TxnState::Preparing);
}

#[test]
fn all_read_only_concludes_with_its_forced_final_record() {
    let mut txn = preparing(2);
    assert!(vote(&mut txn, 0, Vote::ReadOnly).is_empty());
    assert_eq!(
        vote(&mut txn, 1, Vote::ReadOnly),
        vec![Action::PersistDecision]
    );
    assert_eq!(txn.log_record().state, TxnState::Committed);
    assert!(
        txn.handle_event(Event::DecisionPersisted, T0 + 2)
            .is_empty()
    );
    assert_eq!(txn.state(), TxnState::Committed);
}

#[test]
fn payloads_too_large_for_an_intent_decide_the_classic_way() {
    let (mut txn, actions) = committed_to(2, |_| vec![0; MAX_INTENT_PAYLOAD_BYTES / 2 + 1]);
    assert!(!actions.contains(&Action::PersistIntent), "{actions:?}");
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert_eq!(vote(&mut txn, 1, Vote::Yes), vec![Action::PersistDecision]);
    // And an abort of such a commit is not written.
    let mut txn = preparing(2);
    txn.handle_event(Event::IntentPersisted, T0 + 1);
    assert_eq!(
        vote(&mut txn, 0, Vote::no("no")),
        vec![Action::PersistDecision]
    );
}

/// The intent of `preparing(n)` as a restart reads it, recovered: every branch is asked
/// again, with its payload (call 2: the record is taken from memory, which has numbered
/// the first prepares; read back from the log, numbering starts again).
fn recovered(n: usize) -> TwoPhaseCommit {
    let intent = preparing(n).log_record();
    let (txn, actions) = TwoPhaseCommit::recover(intent, 4, T0 + 10);
    assert_eq!(
        actions,
        (0..n)
            .map(|branch| Action::SendPrepare { branch, call: 2 })
            .collect::<Vec<_>>()
    );
    assert_eq!(txn.state(), TxnState::Preparing);
    assert!(
        txn.branches()
            .iter()
            .enumerate()
            .all(|(i, b)| b.payload == format!("b{i}").into_bytes() && b.attempts == 1)
    );
    txn
}

#[test]
fn after_a_restart_the_votes_asked_again_decide_the_commit() {
    let mut txn = recovered(2);
    assert!(vote(&mut txn, 1, Vote::Yes).is_empty());
    assert_eq!(vote(&mut txn, 0, Vote::Yes), commits(2, 3));
    assert_eq!(txn.state(), TxnState::Committing);
    // Phase 2 counts its own attempts, from the first.
    assert!(txn.branches().iter().all(|b| b.attempts == 1));
}

#[test]
fn after_a_restart_only_a_no_aborts_and_it_is_forced() {
    let mut txn = recovered(2);
    // No timer, deadline or request aborts it: its caller may have heard COMMITTED.
    assert!(
        txn.handle_event(Event::PrepareTimerFired, T0 + 20)
            .is_empty()
    );
    assert!(txn.handle_event(Event::DeadlineReached, T0 + 20).is_empty());
    assert_eq!(
        txn.handle_command(changed_my_mind(), T0 + 20),
        Err(Refusal::CommitInFlight)
    );
    assert_eq!(
        txn.handle_operator(&cancel(), T0 + 20),
        Err(Refusal::VotesDecide)
    );
    assert_eq!(txn.state(), TxnState::Preparing);
    // A failed prepare is asked again after a backoff, without end.
    for attempt in 1..=12 {
        let failed = Event::PrepareFailed {
            branch: 0,
            call: txn.latest_call(0),
            error: "connection refused".into(),
            permanent: false,
        };
        assert_eq!(
            txn.handle_event(failed, T0 + 30),
            vec![Action::ScheduleRetry { branch: 0, attempt }]
        );
        assert_eq!(
            txn.handle_event(Event::RetryDue { branch: 0, attempt }, T0 + 31),
            vec![Action::SendPrepare {
                branch: 0,
                call: 2 + attempt
            }]
        );
    }
    assert!(txn.is_stuck(), "flagged stuck after many attempts");
    assert_eq!(txn.state(), TxnState::Preparing);
    assert_eq!(
        vote(&mut txn, 0, Vote::no("the branch was aborted")),
        vec![Action::PersistDecision]
    );
    assert_eq!(txn.log_record().state, TxnState::Aborting);
    assert_eq!(
        txn.handle_event(Event::DecisionPersisted, T0 + 40),
        aborts(&[1], 3)
    );
}

#[test]
fn after_a_restart_a_prepare_that_cannot_be_answered_flags_it_stuck_at_once() {
    // A participant past its barrier retention without a record (FAILED_PRECONDITION):
    // no answer will come by asking again, and no vote may be guessed for it.
    let mut txn = recovered(2);
    let failed = Event::PrepareFailed {
        branch: 0,
        call: txn.latest_call(0),
        error: "past the barrier retention".into(),
        permanent: true,
    };
    assert_eq!(
        txn.handle_event(failed, T0 + 30),
        vec![Action::ScheduleRetry {
            branch: 0,
            attempt: 1
        }]
    );
    assert!(txn.is_stuck(), "an operator must state the vote");
    assert_eq!(txn.state(), TxnState::Preparing);
    // Once the operator has, it is no longer stuck...
    let mut handled = txn.clone();
    assert_eq!(
        handled.handle_operator(&resolve("b0", Resolution::Commit), T0 + 40),
        Ok(Vec::new())
    );
    assert!(!handled.is_stuck());
    // ...unless another branch still fails to answer.
    let failed = Event::PrepareFailed {
        branch: 1,
        call: txn.latest_call(1),
        error: "connection refused".into(),
        permanent: false,
    };
    txn.handle_event(failed, T0 + 41);
    assert_eq!(
        txn.handle_operator(&resolve("b0", Resolution::Commit), T0 + 42),
        Ok(Vec::new())
    );
    assert!(txn.is_stuck(), "b1 still fails");
}

#[test]
fn after_a_restart_an_unanswered_prepare_is_sent_again_by_the_nudge() {
    let mut txn = recovered(2);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    // Sent again at T0 + 10; its call may run for the prepare timeout (5 s) and the
    // grace after it, from a start a little later: until a second grace has passed it is
    // not taken for lost, however stale the sweep's limit.
    let call_deadline = T0 + 10 + 5_000 + 2 * PREPARE_CALL_GRACE_MS;
    assert!(
        txn.handle_event(Event::Nudge { stale_after_ms: 5 }, T0 + 100)
            .is_empty()
    );
    assert!(
        txn.handle_event(Event::Nudge { stale_after_ms: 5 }, call_deadline - 1)
            .is_empty()
    );
    assert_eq!(txn.branches()[1].attempts, 1);
    assert_eq!(
        txn.handle_event(Event::Nudge { stale_after_ms: 5 }, call_deadline),
        vec![Action::SendPrepare { branch: 1, call: 3 }]
    );
}

#[test]
fn after_a_restart_an_operator_states_the_vote_of_a_branch_that_cannot_answer() {
    // Stated YES: with the other YES, the commit is decided.
    let mut txn = recovered(2);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    assert_eq!(
        txn.handle_operator(&resolve("b0", Resolution::Commit), T0 + 20),
        Err(Refusal::NothingToResolve {
            branch: "b0".into(),
            state: BranchState::Prepared
        })
    );
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Commit), T0 + 20),
        Ok(vec![Action::PersistDecision]),
        "a stated vote is durable only with the decision: forced before phase 2"
    );
    assert_eq!(txn.log_record().state, TxnState::Committing);
    assert_eq!(txn.state(), TxnState::Preparing);
    assert_eq!(
        txn.handle_event(Event::DecisionPersisted, T0 + 21),
        commits(2, 3)[1..]
    );
    let stated = txn.branches()[1].resolution.clone();
    assert!(matches!(
        stated,
        Some(OperatorResolution {
            outcome: Resolution::Commit,
            ..
        })
    ));
    // The prepare asked again is not shown as answered by the participant.
    let attempts = txn.branches()[1].history.attempts();
    let asked = attempts
        .iter()
        .rev()
        .find(|a| a.operation == Operation::Prepare);
    let asked = asked.unwrap();
    assert_eq!(
        asked.result.as_deref(),
        Some("no answer: an operator stated the vote")
    );
    // Stated NO: the abort is decided, and forced.
    let mut txn = recovered(2);
    assert_eq!(
        txn.handle_operator(&resolve("b1", Resolution::Abort), T0 + 20),
        Ok(vec![Action::PersistDecision])
    );
    assert_eq!(
        txn.handle_event(Event::DecisionPersisted, T0 + 21),
        aborts(&[0], 3)
    );
}

#[test]
fn a_vote_stated_after_a_restart_counts_after_the_next_one() {
    let resolve = |branch: &str| resolve(branch, Resolution::Commit);
    // b1's YES is stated while b0 and b2 are still asked: nothing is decided yet, and
    // the record the runtime forces before the operator hears carries the vote.
    let mut txn = recovered(3);
    assert_eq!(txn.handle_operator(&resolve("b1"), T0 + 20), Ok(Vec::new()));
    assert!(txn.votes_decide());
    let logged = txn.log_record();
    assert_eq!(logged.state, TxnState::Preparing);
    assert_eq!(logged.branches[1].state, BranchState::Prepared);
    // Restarted again: b1 is not asked, its stated vote counts, and its payload is kept
    // for nobody (every branch still gets phase 2).
    let (mut again, actions) = TwoPhaseCommit::recover(logged, 4, T0 + 30);
    assert_eq!(
        actions,
        vec![
            Action::SendPrepare { branch: 0, call: 3 },
            Action::SendPrepare { branch: 2, call: 3 }
        ]
    );
    assert_eq!(again.branches()[1].state, BranchState::Prepared);
    assert!(again.branches()[1].resolution.is_some());
    assert!(vote(&mut again, 0, Vote::Yes).is_empty());
    assert_eq!(
        vote(&mut again, 2, Vote::Yes),
        vec![Action::PersistDecision]
    );
    // Branch 1's vote was stated, so its prepare was not sent again.
    assert_eq!(
        again.handle_event(Event::DecisionPersisted, T0 + 40),
        [(0, 4), (1, 3), (2, 4)].map(|(branch, call)| Action::SendCommit { branch, call })
    );

    // A record in which every vote was stated (each statement forced with the record
    // as it was): read again, the commit is decided at once, and every branch hears it.
    let stated = |branch: &str| {
        let mut txn = recovered(2);
        assert_eq!(
            txn.handle_operator(&resolve(branch), T0 + 20),
            Ok(Vec::new())
        );
        txn.log_record()
    };
    let mut intent = stated("b0");
    intent.branches[1] = stated("b1").branches[1].clone();
    let (mut again, actions) = TwoPhaseCommit::recover(intent, 4, T0 + 30);
    assert_eq!(actions, vec![Action::PersistDecision]);
    assert_eq!(
        again.handle_event(Event::DecisionPersisted, T0 + 40),
        commits(2, 3)[1..]
    );
    assert_eq!(again.state(), TxnState::Committing);
}

#[test]
fn an_abort_decision_found_after_a_restart_is_delivered_again() {
    let mut txn = preparing(2);
    assert!(vote(&mut txn, 0, Vote::Yes).is_empty());
    vote(&mut txn, 1, Vote::no("out of stock"));
    let decision = txn.log_record();
    let (txn, actions) = TwoPhaseCommit::recover(decision, 4, T0 + 10);
    assert_eq!(actions, aborts(&[0], 2));
    assert_eq!(txn.state(), TxnState::Aborting);
}
