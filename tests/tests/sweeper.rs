//! The sweeper: a participant's answer that never reaches the coordinator's engine (the
//! call succeeded, the answer was lost) leaves no timer running. The sweeper notices the
//! transaction made no progress and sends the outstanding work again; the barrier
//! answers the repeat from its record without running user code twice.
//!
//! Own test binary: failpoints are process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::client::{BeginOptions, BranchSpec, BranchState, Outcome, TransactionState};
use treaty_sdk::{SagaStep, SubmitOptions};
use treaty_tests::harness::{Coordinator, PATIENCE, ParticipantServer, coordinator_config};
use treaty_tests::scripted::Op;

/// A coordinator that sweeps often and sends a call again after 1 s without an answer
/// (calls time out after 500 ms, so by then the answer is lost).
async fn sweeping_coordinator(dir: &std::path::Path) -> Coordinator {
    let mut config = coordinator_config(&dir.join("coordinator"));
    config.participant_call_timeout_ms = 500;
    config.default_step_timeout_ms = 500;
    config.sweep_interval_ms = 100;
    config.stale_after_ms = 1_000;
    Coordinator::start_with(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_answer_is_delivered_again_and_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = sweeping_coordinator(dir.path()).await;
    let a = ParticipantServer::start(&dir.path().join("a")).await;
    let b = ParticipantServer::start(&dir.path().join("b")).await;
    let client = coordinator.client().await;
    fail::cfg("coordinator::lose_delivery_answer", "1*return").unwrap();

    let (id, outcome) = client
        .run_two_phase(
            vec![
                BranchSpec::new("a", &a.endpoint, "yes"),
                BranchSpec::new("b", &b.endpoint, "yes"),
            ],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
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
    let coordinator = sweeping_coordinator(dir.path()).await;
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
