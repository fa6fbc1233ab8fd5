//! Two-phase commit end to end: an in-process coordinator (the daemon's own code) and
//! scripted participants, over real gRPC on 127.0.0.1, each with its own sled directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use futures::StreamExt;
use treaty_proto::v1::Operation;
use treaty_sdk::barrier::{BranchMode, BranchStatus};
use treaty_sdk::client::{BeginOptions, BranchSpec, Decision, Outcome, TransactionState};
use treaty_tests::harness::{
    Coordinator, PATIENCE, ParticipantServer, barrier_record, coordinator_config, eventually,
    log_record,
};
use treaty_tests::scripted::Op;

struct World {
    _dir: tempfile::TempDir,
    coordinator: Coordinator,
    a: ParticipantServer,
    b: ParticipantServer,
}

impl World {
    async fn start() -> Self {
        Self::start_keeping_history(true).await
    }

    /// With `history_records` off, the log holds only what the protocol writes.
    async fn start_keeping_history(history_records: bool) -> Self {
        Self::start_with(history_records, true).await
    }

    /// With `parallel_commit` off, two-phase commits decide the classic way.
    async fn start_with(history_records: bool, parallel_commit: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = coordinator_config(&dir.path().join("coordinator"));
        config.history_records = history_records;
        config.parallel_commit = parallel_commit;
        let coordinator = Coordinator::start_with(config).await;
        let a = ParticipantServer::start(&dir.path().join("a")).await;
        let b = ParticipantServer::start(&dir.path().join("b")).await;
        Self {
            _dir: dir,
            coordinator,
            a,
            b,
        }
    }

    fn branch_a(&self, script: &str) -> BranchSpec {
        BranchSpec::new("a", &self.a.endpoint, script)
    }

    fn branch_b(&self, script: &str) -> BranchSpec {
        BranchSpec::new("b", &self.b.endpoint, script)
    }

    /// Stops everything; the data directories stay for inspection until the World drops.
    async fn stop(
        self,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::path::PathBuf,
        std::path::PathBuf,
    ) {
        let paths = (
            self.coordinator.data_dir.clone(),
            self.a.data_dir.clone(),
            self.b.data_dir.clone(),
        );
        self.coordinator.stop().await.unwrap();
        self.a.stop().await;
        self.b.stop().await;
        (self._dir, paths.0, paths.1, paths.2)
    }
}

async fn final_state(
    client: &treaty_sdk::TreatyClient,
    id: &str,
) -> treaty_sdk::client::Transaction {
    let txn = client
        .wait_until_finished(id, PATIENCE)
        .await
        .unwrap()
        .expect("the transaction is known");
    let state = TransactionState::try_from(txn.state).unwrap();
    assert!(
        matches!(
            state,
            TransactionState::Committed | TransactionState::Aborted
        ),
        "not final after {PATIENCE:?}: {txn:?}"
    );
    txn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_yes_commits_at_every_participant_and_logs_the_decision() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let (id, outcome) = client
        .run_two_phase(
            vec![world.branch_a("yes"), world.branch_b("yes")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let txn = final_state(&client, &id).await;
    assert_eq!(txn.state, TransactionState::Committed as i32);
    let states: Vec<i32> = txn.transitions.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            TransactionState::Active,
            TransactionState::Preparing,
            TransactionState::Committing,
            TransactionState::Committed
        ]
        .map(|s| s as i32)
    );
    assert_eq!(world.a.participant.ops(&id, "a"), [Op::Prepare, Op::Commit]);
    assert_eq!(world.b.participant.ops(&id, "b"), [Op::Prepare, Op::Commit]);
    assert_eq!(client.outcome(&id).await.unwrap(), Decision::Commit);

    let (_dir, coordinator_dir, a_dir, b_dir) = world.stop().await;
    // Durable at both participants, and the coordinator's log has the ended commit.
    for (dir, branch) in [(&a_dir, "a"), (&b_dir, "b")] {
        let record = barrier_record(dir, &id, branch).unwrap();
        assert_eq!(record.status, BranchStatus::Committed);
        assert_eq!(record.mode, BranchMode::TwoPhase);
    }
    let logged = log_record(&coordinator_dir, &id).unwrap();
    assert_eq!(logged.state, treaty_coordinator::model::TxnState::Committed);
    assert!(logged.ended_unix_ms.is_some());
}

/// Classic protocol: an abort leaves no trace in the log (presumed abort). With parallel
/// commit the intent was written, and the abort is forced before it is reported: the log
/// ends with the transaction aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_no_vote_aborts_everywhere_and_writes_nothing_to_the_log_unless_an_intent() {
    one_no_vote_aborts_everywhere(false).await;
    one_no_vote_aborts_everywhere(true).await;
}

async fn one_no_vote_aborts_everywhere(parallel_commit: bool) {
    let world = World::start_with(false, parallel_commit).await;
    let client = world.coordinator.client().await;
    let (id, outcome) = client
        .run_two_phase(
            vec![world.branch_a("yes"), world.branch_b("no")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Aborted {
            reason: "branch b voted NO: scripted NO".into()
        }
    );
    let txn = final_state(&client, &id).await;
    assert_eq!(txn.state, TransactionState::Aborted as i32);
    // The abort may reach a before its own prepare does: then the barrier records a null
    // abort and refuses the late prepare without running user code. Either way a ends
    // aborted, and its user code never committed.
    let a_ops = world.a.participant.ops(&id, "a");
    let overtaken = a_ops.is_empty();
    assert!(overtaken || a_ops == [Op::Prepare, Op::Abort], "{a_ops:?}");
    assert_eq!(world.b.participant.ops(&id, "b"), [Op::Prepare]);
    assert_eq!(client.outcome(&id).await.unwrap(), Decision::Abort);

    let (_dir, coordinator_dir, a_dir, _) = world.stop().await;
    assert_eq!(
        barrier_record(&a_dir, &id, "a").unwrap().status,
        BranchStatus::Aborted {
            after_prepare: !overtaken
        }
    );
    let logged = log_record(&coordinator_dir, &id);
    if parallel_commit {
        let logged = logged.expect("the intent's transaction ends in the log");
        assert_eq!(logged.state, treaty_coordinator::model::TxnState::Aborted);
        assert!(logged.branches.iter().all(|b| b.payload.is_empty()));
    } else {
        // Presumed abort: no trace in the coordinator's log.
        assert_eq!(logged, None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_timeout_aborts() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let options = BeginOptions {
        prepare_timeout_ms: Some(300),
        ..Default::default()
    };
    let (id, outcome) = client
        .run_two_phase(
            vec![world.branch_a("yes"), world.branch_b("slow:3000")],
            options,
        )
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Aborted {
            reason: "prepare timed out after 300 ms".into()
        }
    );
    let txn = final_state(&client, &id).await;
    assert_eq!(txn.state, TransactionState::Aborted as i32);
    // The slow branch finishes its prepare (YES) and is then aborted: the barrier runs
    // the abort after the prepare, never the other way round.
    assert_eq!(world.a.participant.ops(&id, "a"), [Op::Prepare, Op::Abort]);
    assert_eq!(world.b.participant.ops(&id, "b"), [Op::Prepare, Op::Abort]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_participant_gets_no_phase_two() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let (id, outcome) = client
        .run_two_phase(
            vec![world.branch_a("yes"), world.branch_b("readonly")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    final_state(&client, &id).await;
    assert_eq!(world.a.participant.ops(&id, "a"), [Op::Prepare, Op::Commit]);
    assert_eq!(world.b.participant.ops(&id, "b"), [Op::Prepare]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_read_only_commits_with_only_its_final_record_logged() {
    let world = World::start_keeping_history(false).await;
    let client = world.coordinator.client().await;
    let (id, outcome) = client
        .run_two_phase(
            vec![world.branch_a("readonly"), world.branch_b("readonly")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let (_dir, coordinator_dir, _, _) = world.stop().await;
    // No decision and no phase 2, but the reported outcome is durable (even without
    // history records), so that a restart can never contradict it.
    let logged = log_record(&coordinator_dir, &id).expect("the outcome is logged");
    assert_eq!(logged.state, treaty_coordinator::model::TxnState::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_participant_commits_in_one_phase_with_its_outcome_logged() {
    let world = World::start_keeping_history(false).await;
    let client = world.coordinator.client().await;
    let (id, outcome) = client
        .run_two_phase(vec![world.branch_a("yes")], BeginOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let txn = final_state(&client, &id).await;
    let states: Vec<i32> = txn.transitions.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            TransactionState::Active,
            TransactionState::Preparing,
            TransactionState::Committed
        ]
        .map(|s| s as i32)
    );
    let (_dir, coordinator_dir, a_dir, _) = world.stop().await;
    let record = barrier_record(&a_dir, &id, "a").unwrap();
    assert_eq!(record.mode, BranchMode::OnePhase);
    assert_eq!(record.status, BranchStatus::Committed);
    let logged = log_record(&coordinator_dir, &id).expect("the outcome is logged");
    assert_eq!(logged.state, treaty_coordinator::model::TxnState::Committed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_participant_that_refuses_aborts_the_transaction() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let (_, outcome) = client
        .run_two_phase(vec![world.branch_a("no")], BeginOptions::default())
        .await
        .unwrap();
    assert_eq!(
        outcome,
        Outcome::Aborted {
            reason: "branch a rejected the one-phase commit: scripted NO".into()
        }
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phase_two_failures_are_retried_until_acknowledged() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    world.b.participant.fail_next_commits(3);
    let (id, outcome) = client
        .run_two_phase(
            vec![world.branch_a("yes"), world.branch_b("yes")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let txn = final_state(&client, &id).await;
    assert_eq!(txn.state, TransactionState::Committed as i32);
    let b = txn.branches.iter().find(|b| b.branch_id == "b").unwrap();
    assert_eq!(
        b.attempts, 4,
        "three failures, then the delivery that worked"
    );
    assert!(b.last_error.contains("scripted commit failure"), "{b:?}");
    // Every call is in the branch's history with its result.
    let history: Vec<(i32, &str)> = b
        .history
        .iter()
        .map(|a| (a.operation, a.result.as_str()))
        .collect();
    let failure = "error: participant answered Unavailable: participant: scripted commit failure";
    assert_eq!(
        history,
        [
            (Operation::Prepare as i32, "voted YES"),
            (Operation::Commit as i32, failure),
            (Operation::Commit as i32, failure),
            (Operation::Commit as i32, failure),
            (Operation::Commit as i32, "committed"),
        ]
    );
    assert_eq!(world.b.participant.ops(&id, "b"), [Op::Prepare, Op::Commit]);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initiator_abort_and_repeated_commit() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let id = client
        .begin(BeginOptions::default(), vec![world.branch_a("yes")])
        .await
        .unwrap();
    client.enlist(&id, world.branch_b("yes")).await.unwrap();
    client.abort(&id, "changed my mind").await.unwrap();
    // Idempotent, and a later commit reports the abort.
    client.abort(&id, "again").await.unwrap();
    assert_eq!(
        client.commit(&id).await.unwrap(),
        Outcome::Aborted {
            reason: "changed my mind".into()
        }
    );
    // Nobody was contacted: the transaction never reached phase 1.
    assert!(world.a.participant.calls().is_empty());

    // A committed transaction: committing again returns the same outcome.
    let (id, outcome) = client
        .run_two_phase(
            vec![world.branch_a("yes"), world.branch_b("yes")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_every_state_in_order_and_outcome_is_pending_while_undecided() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let id = client
        .begin(
            BeginOptions::default(),
            vec![world.branch_a("yes"), world.branch_b("slow:3000")],
        )
        .await
        .unwrap();
    let stream = client.watch(&id).await.unwrap().expect("known transaction");
    let committer = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.commit(&id).await })
    };
    eventually("the slow prepare is under way", || async {
        let txn = client.get(&id).await.unwrap()?;
        (txn.state == TransactionState::Preparing as i32).then_some(())
    })
    .await;
    assert_eq!(client.outcome(&id).await.unwrap(), Decision::Pending);
    assert_eq!(committer.await.unwrap().unwrap(), Outcome::Committed);

    let updates: Vec<i32> = tokio::time::timeout(
        PATIENCE,
        stream.map(|u| u.unwrap().transition.state).collect(),
    )
    .await
    .expect("the stream ends after the final state");
    assert_eq!(
        updates,
        [
            TransactionState::Active,
            TransactionState::Preparing,
            TransactionState::Committing,
            TransactionState::Committed
        ]
        .map(|s| s as i32)
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_by_state_and_pages() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let mut committed = Vec::new();
    for _ in 0..5 {
        let (id, outcome) = client
            .run_two_phase(
                vec![world.branch_a("yes"), world.branch_b("yes")],
                BeginOptions::default(),
            )
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Committed);
        final_state(&client, &id).await;
        committed.push(id);
    }
    let active = client
        .begin(BeginOptions::default(), vec![world.branch_a("yes")])
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let (page, next) = client
            .list(&[TransactionState::Committed], 2, &token)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.into_iter().map(|t| t.transaction_id));
        match next {
            Some(next) => token = next,
            None => break,
        }
        // A token names no transaction (one that ends a page short of full would name
        // another principal's: docs/SECURITY.md); it was the last id listed before.
        assert!(
            !committed.iter().any(|id| token.contains(id.as_str())),
            "{token}"
        );
    }
    assert_eq!(
        seen, committed,
        "every committed transaction once, in id order"
    );
    let (page, _) = client
        .list(&[TransactionState::Active], 100, "")
        .await
        .unwrap();
    assert_eq!(
        page.iter()
            .map(|t| t.transaction_id.clone())
            .collect::<Vec<_>>(),
        vec![active]
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_of_unlogged_outcomes_is_kept_and_survives_a_restart() {
    let world = World::start().await;
    let client = world.coordinator.client().await;
    let (aborted, _) = client
        .run_two_phase(
            vec![world.branch_a("yes"), world.branch_b("no")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    let (one_phase, _) = client
        .run_two_phase(vec![world.branch_a("yes")], BeginOptions::default())
        .await
        .unwrap();
    final_state(&client, &aborted).await;
    final_state(&client, &one_phase).await;
    let data_dir = world.coordinator.data_dir.clone();
    let (_dir, ..) = world.stop().await;

    let coordinator = Coordinator::start(&data_dir).await;
    let client = coordinator.client().await;
    let txn = client
        .get(&aborted)
        .await
        .unwrap()
        .expect("kept after the restart");
    assert_eq!(txn.state, TransactionState::Aborted as i32);
    assert_eq!(txn.reason, "branch b voted NO: scripted NO");
    let a = txn.branches.iter().find(|b| b.branch_id == "a").unwrap();
    let history: Vec<(i32, &str)> = a
        .history
        .iter()
        .map(|h| (h.operation, h.result.as_str()))
        .collect();
    assert_eq!(
        history,
        [
            (Operation::Prepare as i32, "voted YES"),
            (Operation::Abort as i32, "aborted")
        ]
    );
    let txn = client
        .get(&one_phase)
        .await
        .unwrap()
        .expect("kept after the restart");
    assert_eq!(txn.state, TransactionState::Committed as i32);
    // A repeated Commit is answered from the kept history.
    assert_eq!(client.commit(&one_phase).await.unwrap(), Outcome::Committed);
    coordinator.stop().await.unwrap();
}
