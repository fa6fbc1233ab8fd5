//! Sagas end to end: an in-process coordinator and scripted participants over real gRPC,
//! each with its own sled directory. Here, how sagas run and compensate; in
//! `submission.rs`, what a submit is refused, and what a repeated one finds.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use futures::StreamExt;
use tonic::Code;
use treaty_sdk::barrier_gc::BarrierGcOptions;
use treaty_sdk::client::{BranchState, Transaction, TransactionState};
use treaty_sdk::server::ServeOptions;
use treaty_sdk::{SagaStep, SubmitOptions, TreatyClient};
use treaty_tests::harness::{Coordinator, PATIENCE, ParticipantServer, eventually};
use treaty_tests::scripted::Op;

mod submission;

struct World {
    dir: tempfile::TempDir,
    coordinator: Coordinator,
    participant: ParticipantServer,
    client: TreatyClient,
}

impl World {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
        let participant = ParticipantServer::start(&dir.path().join("p")).await;
        let client = coordinator.client().await;
        Self {
            dir,
            coordinator,
            participant,
            client,
        }
    }

    fn step(&self, id: &str, script: &str) -> SagaStep {
        SagaStep::new(id, &self.participant.endpoint, script).compensation(format!("undo {id}"))
    }

    /// Submits and waits for the outcome.
    async fn run(&self, steps: Vec<SagaStep>) -> Transaction {
        let submit = self.client.submit_saga(
            steps,
            SubmitOptions {
                wait_for_outcome: true,
                ..Default::default()
            },
        );
        let submitted = tokio::time::timeout(PATIENCE, submit)
            .await
            .expect("the saga finishes in time")
            .unwrap();
        assert!(submitted.created);
        submitted.transaction
    }

    fn ops(&self, txn: &Transaction, step: &str) -> Vec<Op> {
        self.participant.participant.ops(&txn.transaction_id, step)
    }

    /// Stops both; the data directory stays for inspection until the returned one drops.
    async fn stop(self) -> tempfile::TempDir {
        self.coordinator.stop().await.unwrap();
        self.participant.stop().await;
        self.dir
    }
}

fn state(txn: &Transaction) -> TransactionState {
    TransactionState::try_from(txn.state).unwrap()
}

fn step_state(txn: &Transaction, step: &str) -> BranchState {
    let branch = txn.branches.iter().find(|b| b.branch_id == step).unwrap();
    BranchState::try_from(branch.state).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_commits_in_dependency_order() {
    let world = World::start().await;
    let txn = world
        .run(vec![
            world.step("charge", "yes"),
            world.step("reserve", "yes"),
            world.step("ship", "yes").after(["charge", "reserve"]),
        ])
        .await;
    assert_eq!(state(&txn), TransactionState::Completed);
    for step in ["charge", "reserve", "ship"] {
        assert_eq!(world.ops(&txn, step), [Op::Prepare, Op::Commit], "{step}");
        assert_eq!(step_state(&txn, step), BranchState::Committed);
    }
    // ship ran after both of the steps it depends on.
    let calls = world.participant.participant.calls();
    let position = |step: &str, op: Op| {
        calls
            .iter()
            .position(|c| c.branch_id == step && c.op == op)
            .unwrap()
    };
    assert!(position("ship", Op::Prepare) > position("charge", Op::Commit));
    assert!(position("ship", Op::Prepare) > position("reserve", Op::Commit));
    let ship = txn.branches.iter().find(|b| b.branch_id == "ship").unwrap();
    assert_eq!(ship.after, ["charge", "reserve"]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_step_compensates_the_earlier_ones_in_reverse_and_later_ones_never_run() {
    let world = World::start().await;
    let txn = world
        .run(vec![
            world.step("a", "yes"),
            world.step("b", "yes").after(["a"]),
            world.step("c", "yes").after(["b"]),
            world.step("d", "no").after(["c"]),
            world.step("e", "yes").after(["d"]),
        ])
        .await;
    assert_eq!(state(&txn), TransactionState::Compensated);
    assert_eq!(txn.reason, "step d was rejected: scripted NO");
    let compensated: Vec<String> = world
        .participant
        .participant
        .compensated()
        .into_iter()
        .map(|(_, step)| step)
        .collect();
    assert_eq!(compensated, ["c", "b", "a"]);
    assert_eq!(world.ops(&txn, "d"), [Op::Prepare]);
    assert!(world.ops(&txn, "e").is_empty(), "a later step ran");
    assert_eq!(step_state(&txn, "d"), BranchState::Rejected);
    assert_eq!(step_state(&txn, "e"), BranchState::Skipped);
    let transitions: Vec<i32> = txn.transitions.iter().map(|t| t.state).collect();
    assert_eq!(
        transitions,
        [
            TransactionState::Running,
            TransactionState::Compensating,
            TransactionState::Compensated
        ]
        .map(|s| s as i32)
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transient_failure_then_success_completes_with_the_attempts_in_the_history() {
    let world = World::start().await;
    let txn = world
        .run(vec![
            world.step("a", "yes"),
            world.step("b", "flaky:2").after(["a"]).retry(3, 10, 50),
        ])
        .await;
    assert_eq!(state(&txn), TransactionState::Completed);
    let b = txn.branches.iter().find(|b| b.branch_id == "b").unwrap();
    assert_eq!(b.attempts, 3);
    let results: Vec<&str> = b.history.iter().map(|a| a.result.as_str()).collect();
    assert_eq!(
        results,
        [
            "error: participant answered Unavailable: participant: scripted transient failure 1",
            "error: participant answered Unavailable: participant: scripted transient failure 2",
            "committed"
        ]
    );
    assert!(
        b.history
            .iter()
            .all(|a| a.finished_unix_ms >= a.started_unix_ms)
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_attempts_the_saga_compensates_the_uncertain_step_too() {
    let world = World::start().await;
    let txn = world
        .run(vec![
            world.step("a", "yes"),
            world.step("b", "flaky:9").after(["a"]).retry(3, 10, 50),
        ])
        .await;
    assert_eq!(state(&txn), TransactionState::Compensated);
    assert!(
        txn.reason.starts_with("step b failed 3 times"),
        "{}",
        txn.reason
    );
    assert_eq!(
        world.ops(&txn, "a"),
        [Op::Prepare, Op::Commit, Op::Compensate]
    );
    // b never committed: its compensation was recorded by the barrier without user code.
    assert_eq!(
        world.ops(&txn, "b"),
        [Op::Prepare, Op::Prepare, Op::Prepare]
    );
    assert_eq!(step_state(&txn, "b"), BranchState::Compensated);
    world.stop().await;
}

/// A step that does not answer within its deadline fails as a timeout: not as
/// unreachable, and not as an answer (an answer would count for its circuit). The
/// coordinator enforces the deadline itself; a `grpc-timeout` header with the same
/// deadline let tonic's client or the participant's server end the call first, and the
/// failure then read "unreachable" or "answered Cancelled".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_an_answer_in_time_fails_as_a_timeout() {
    let world = World::start().await;
    let submitted = world
        .client
        .submit_saga(
            vec![
                world
                    .step("slow", "slow:3000")
                    .timeout_ms(300)
                    .retry(3, 10, 50),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    let errors = eventually("the step failed three times", || async {
        let txn = world.client.get(&id).await.unwrap()?;
        let step = txn.branches.iter().find(|b| b.branch_id == "slow")?;
        let errors: Vec<String> = step
            .history
            .iter()
            .map(|attempt| attempt.result.clone())
            .filter(|result| result.starts_with("error"))
            .collect();
        (errors.len() >= 3).then_some(errors)
    })
    .await;
    for error in &errors {
        assert!(
            error.contains("participant did not answer within 300 ms"),
            "a missed deadline reported as {error:?}; all: {errors:?}"
        );
    }
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_refused_past_the_participants_retention_flags_the_saga_stuck_at_once() {
    let world = World::start().await;
    // Step b's participant: its port is bound but not served yet, so b's step and its
    // first compensations get no answer.
    let late = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let late_endpoint = format!("http://{}", late.local_addr().unwrap());
    let submitted = world
        .client
        .submit_saga(
            vec![
                world.step("a", "yes"),
                SagaStep::new("b", &late_endpoint, "yes")
                    .compensation("undo b")
                    .timeout_ms(300)
                    .retry(1, 10, 100)
                    .after(["a"]),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    eventually("b's compensation has failed once", || async {
        let txn = world.client.get(&id).await.unwrap()?;
        let b = txn.branches.iter().find(|b| b.branch_id == "b")?;
        (b.compensation_attempts >= 1 && !b.last_error.is_empty()).then_some(())
    })
    .await;
    // It comes up keeping records for 300 ms: the saga is older by now, and b has no
    // record there, so its compensation is refused for good (FAILED_PRECONDITION).
    let dir = tempfile::tempdir().unwrap();
    let late_participant = ParticipantServer::start_on(
        late,
        dir.path(),
        ServeOptions {
            barrier_gc: BarrierGcOptions {
                retention_ms: 300,
                ..BarrierGcOptions::default()
            },
            ..ServeOptions::default()
        },
    );
    let stuck = eventually("the saga is flagged stuck", || async {
        let txn = world.client.get(&id).await.unwrap()?;
        txn.stuck.then_some(txn)
    })
    .await;
    assert_eq!(state(&stuck), TransactionState::Compensating);
    let note = stuck
        .transitions
        .iter()
        .find(|t| t.reason.starts_with("stuck:"))
        .map(|t| t.reason.clone())
        .unwrap();
    assert!(
        note.contains("compensating step b cannot succeed")
            && note.contains("FailedPrecondition")
            && note.contains("an operator must resolve it"),
        "{note}"
    );
    assert!(
        late_participant
            .participant
            .ops(&id, "b")
            .iter()
            .all(|op| !matches!(op, Op::Compensate)),
        "b's compensation ran"
    );
    world.stop().await;
    late_participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compensation_that_keeps_failing_flags_the_saga_stuck_until_it_recovers() {
    let world = World::start().await;
    world.participant.participant.fail_compensations(true);
    let submitted = world
        .client
        .submit_saga(
            vec![
                world.step("a", "yes").retry(1, 10, 100),
                world.step("b", "no").after(["a"]),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    // The harness flags a saga stuck after 3 failed compensations of one step.
    let stuck = eventually("the saga is flagged stuck", || async {
        let txn = world.client.get(&id).await.unwrap()?;
        txn.stuck.then_some(txn)
    })
    .await;
    assert_eq!(state(&stuck), TransactionState::Compensating);
    assert!(
        stuck
            .transitions
            .iter()
            .any(|t| t.reason.starts_with("stuck:")),
        "{:?}",
        stuck.transitions
    );
    let (listed, _) = world
        .client
        .list(&[TransactionState::Compensating], 10, "")
        .await
        .unwrap();
    assert!(listed.iter().any(|t| t.transaction_id == id && t.stuck));

    // It keeps retrying; once the participant recovers, the saga is compensated.
    world.participant.participant.fail_compensations(false);
    let done = world
        .client
        .wait_until_finished(&id, PATIENCE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state(&done), TransactionState::Compensated);
    assert!(!done.stuck);
    let a = done.branches.iter().find(|b| b.branch_id == "a").unwrap();
    assert!(a.compensation_attempts >= 4, "{a:?}");
    assert_eq!(
        world.participant.participant.ops(&id, "a"),
        [Op::Prepare, Op::Commit, Op::Compensate]
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_branch_of_a_parallel_group_compensates_its_siblings() {
    let world = World::start().await;
    let txn = world
        .run(vec![
            world.step("payment", "yes"),
            world.step("inventory", "slow:300"),
            world.step("loyalty", "no"),
            world
                .step("shipping", "yes")
                .after(["payment", "inventory", "loyalty"]),
        ])
        .await;
    assert_eq!(state(&txn), TransactionState::Compensated);
    assert_eq!(
        world.ops(&txn, "payment"),
        [Op::Prepare, Op::Commit, Op::Compensate]
    );
    // inventory was still running when loyalty was rejected; it is compensated once done.
    assert_eq!(
        world.ops(&txn, "inventory"),
        [Op::Prepare, Op::Commit, Op::Compensate]
    );
    assert_eq!(world.ops(&txn, "loyalty"), [Op::Prepare]);
    assert!(world.ops(&txn, "shipping").is_empty());
    world.stop().await;
}
