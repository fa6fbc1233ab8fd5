//! The sweeper: a participant's answer that never reaches the coordinator's engine (the
//! call succeeded, the answer was lost) leaves no timer running. The sweeper notices the
//! transaction made no progress and sends the outstanding work again; the barrier
//! answers the repeat from its record without running user code twice. In a paused
//! transaction it only takes the call as lost, which lets an operator resolve the branch.
//!
//! Own test binary: failpoints are process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_proto::v1 as pb;
use treaty_proto::v1::admin_client::AdminClient;
use treaty_sdk::client::{BranchState, TransactionState};
use treaty_sdk::{SagaStep, SubmitOptions};
use treaty_tests::harness::{
    Coordinator, PATIENCE, ParticipantServer, commit_over, coordinator_config, eventually,
};
use treaty_tests::scripted::Op;

/// Held by each test that sets `coordinator::lose_delivery_answer`: the tests of one
/// binary run at once, and a failpoint is the process's.
static LOSING_DELIVERY_ANSWERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A coordinator that sweeps often and sends a call again after `stale_after_ms` without
/// an answer (calls time out after `call_timeout_ms`, so by then the answer is lost).
async fn sweeping_coordinator(
    dir: &std::path::Path,
    call_timeout_ms: u64,
    stale_after_ms: u64,
) -> Coordinator {
    let mut config = coordinator_config(&dir.join("coordinator"));
    config.participant_call_timeout_ms = call_timeout_ms;
    config.default_step_timeout_ms = call_timeout_ms;
    config.sweep_interval_ms = 100;
    config.stale_after_ms = stale_after_ms;
    Coordinator::start_with(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_answer_is_delivered_again_and_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = sweeping_coordinator(dir.path(), 500, 1_000).await;
    let a = ParticipantServer::start(&dir.path().join("a")).await;
    let b = ParticipantServer::start(&dir.path().join("b")).await;
    let client = coordinator.client().await;
    let _alone = LOSING_DELIVERY_ANSWERS.lock().await;
    fail::cfg("coordinator::lose_delivery_answer", "1*return").unwrap();

    let id = commit_over(&client, &a, &b).await;
    let txn = client
        .wait_until_finished(&id, PATIENCE)
        .await
        .unwrap()
        .unwrap();
    fail::remove("coordinator::lose_delivery_answer");
    assert_eq!(
        txn.state,
        TransactionState::Committed as i32,
        "the sweeper finished it: {txn:?}"
    );
    // One branch's first commit answer was lost and it was delivered twice; user code
    // committed once everywhere.
    let attempts: Vec<u32> = txn.branches.iter().map(|b| b.attempts).collect();
    assert!(
        attempts.contains(&2) && attempts.iter().all(|a| *a <= 2),
        "{attempts:?}"
    );
    assert!(
        txn.transitions
            .iter()
            .all(|t| t.state != TransactionState::Aborted as i32)
    );
    assert_eq!(a.participant.ops(&id, "a"), [Op::Prepare, Op::Commit]);
    assert_eq!(b.participant.ops(&id, "b"), [Op::Prepare, Op::Commit]);

    coordinator.stop().await.unwrap();
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_step_answer_is_asked_again_and_the_step_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = sweeping_coordinator(dir.path(), 500, 1_000).await;
    let p = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    fail::cfg("coordinator::lose_step_answer", "1*return").unwrap();

    let steps = vec![
        SagaStep::new("first", &p.endpoint, "yes").compensation("undo first"),
        SagaStep::new("second", &p.endpoint, "yes")
            .compensation("undo second")
            .after(["first"]),
    ];
    let submitted = tokio::time::timeout(
        PATIENCE,
        client.submit_saga(
            steps,
            SubmitOptions {
                wait_for_outcome: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("the saga finishes in time")
    .unwrap();
    fail::remove("coordinator::lose_step_answer");
    let txn = submitted.transaction;
    assert_eq!(
        txn.state,
        TransactionState::Completed as i32,
        "the sweeper finished it: {txn:?}"
    );
    assert!(
        txn.branches
            .iter()
            .all(|b| b.state == BranchState::Committed as i32)
    );
    assert_eq!(txn.branches[0].attempts, 2, "{txn:?}");
    let lost = &txn.branches[0].history[0];
    assert_eq!(lost.result, "no answer; sent again");
    assert_ne!(lost.finished_unix_ms, 0);
    let id = &txn.transaction_id;
    assert_eq!(p.participant.ops(id, "first"), [Op::Prepare, Op::Commit]);
    assert_eq!(p.participant.ops(id, "second"), [Op::Prepare, Op::Commit]);
    assert!(p.participant.compensated().is_empty());

    coordinator.stop().await.unwrap();
    p.stop().await;
}

/// An operator's resolve of a branch whose commit answer was lost: refused while the
/// call is in flight (its answer could still settle the branch), and accepted once the
/// transaction is paused and the sweeper has taken the call as lost, which it then does
/// not send again. The answers stay lost throughout, so only the resolves end it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_blocks_a_resolve_until_the_paused_sweeper_takes_it_as_lost() {
    let dir = tempfile::tempdir().unwrap();
    // Calls that do not time out on a loaded machine (a timeout is a failure the engine
    // hears, not a lost answer), and long enough for the first resolve to come while
    // they are surely in flight.
    let coordinator = sweeping_coordinator(dir.path(), 3_000, 8_000).await;
    let a = ParticipantServer::start(&dir.path().join("a")).await;
    let b = ParticipantServer::start(&dir.path().join("b")).await;
    let client = coordinator.client().await;
    let mut admin = AdminClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let _alone = LOSING_DELIVERY_ANSWERS.lock().await;
    fail::cfg("coordinator::lose_delivery_answer", "return").unwrap();

    let id = commit_over(&client, &a, &b).await;
    let operator = |reason: &str| pb::OperatorRequest {
        transaction_id: id.clone(),
        reason: reason.into(),
    };
    let resolve = |branch: &str| pb::ResolveRequest {
        transaction_id: id.clone(),
        branch_id: branch.into(),
        outcome: pb::Resolution::Commit as i32,
        reason: "committed at the participant, seen in its records".into(),
    };
    let paused = admin.pause(operator("answers are lost")).await.unwrap();
    assert!(paused.get_ref().applied, "{paused:?}");
    let refused = admin.resolve(resolve("a")).await.unwrap().into_inner();
    assert!(!refused.applied, "{refused:?}");
    assert!(refused.detail.contains("in flight"), "{}", refused.detail);

    // The sweeper takes both commits as lost, and sends neither again while paused.
    let txn = eventually("the sweeper takes the lost calls as lost", || async {
        let txn = client.get(&id).await.unwrap().unwrap();
        let all_lost = txn.branches.iter().all(|b| {
            b.history
                .iter()
                .all(|a| a.finished_unix_ms != 0 && a.result != "committed")
        });
        all_lost.then_some(txn)
    })
    .await;
    assert_eq!(txn.state, TransactionState::Committing as i32, "{txn:?}");
    for branch in &txn.branches {
        let commit = branch.history.last().unwrap();
        assert_eq!(commit.result, "no answer; taken as lost while paused");
        assert_eq!(branch.attempts, 1, "sent once: {txn:?}");
    }
    for branch in ["a", "b"] {
        let resolved = admin.resolve(resolve(branch)).await.unwrap().into_inner();
        assert!(resolved.applied, "{resolved:?}");
    }
    let txn = client.get(&id).await.unwrap().unwrap();
    assert_eq!(txn.state, TransactionState::Committed as i32, "{txn:?}");
    fail::remove("coordinator::lose_delivery_answer");
    assert_eq!(a.participant.ops(&id, "a"), [Op::Prepare, Op::Commit]);
    assert_eq!(b.participant.ops(&id, "b"), [Op::Prepare, Op::Commit]);

    coordinator.stop().await.unwrap();
    a.stop().await;
    b.stop().await;
}
