//! Decision durability with real processes: `treaty serve` runs as a child and dies by
//! SIGKILL at a failpoint (FAILPOINTS=...=return), then restarts on the same data
//! directory and address. Participants run in this process over real gRPC. Both ways of
//! deciding a two-phase commit are covered: the classic one (`TREATY_PARALLEL_COMMIT=false`:
//! the decision forced after the votes) and parallel commit (the default: the intent
//! forced alongside the prepares, the votes decide).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::TreatyClient;
use treaty_sdk::client::{BeginOptions, BranchSpec, Decision, TransactionState};
use treaty_tests::harness::{ParticipantServer, eventually};
use treaty_tests::process::{
    ServerProcess, exit_status, killed_by_sigkill, start_treaty, start_treaty_with_env,
};
use treaty_tests::scripted::Op;

struct Participants {
    a: ParticipantServer,
    b: ParticipantServer,
}

impl Participants {
    async fn start(dir: &std::path::Path) -> Self {
        Self {
            a: ParticipantServer::start(&dir.join("a")).await,
            b: ParticipantServer::start(&dir.join("b")).await,
        }
    }

    fn branches(&self) -> Vec<BranchSpec> {
        self.voting("yes", "yes")
    }

    /// The two branches, with what each participant is scripted to vote.
    fn voting(&self, a: &str, b: &str) -> Vec<BranchSpec> {
        vec![
            BranchSpec::new("a", &self.a.endpoint, a),
            BranchSpec::new("b", &self.b.endpoint, b),
        ]
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

/// The classic protocol: the commit decision forced after the votes.
const CLASSIC: (&str, &str) = ("TREATY_PARALLEL_COMMIT", "false");

/// Begins a two-branch transaction on a coordinator (with `envs`) that will die during
/// Commit at the failpoint armed there, and returns its id once the Commit call failed
/// and the process is gone (by SIGKILL).
async fn commit_until_the_coordinator_dies(
    dir: &std::path::Path,
    branches: Vec<BranchSpec>,
    envs: &[(&str, &str)],
) -> (String, std::net::SocketAddr) {
    let mut coordinator =
        start_treaty_with_env(&dir.join("coordinator"), "127.0.0.1:0", envs).await;
    let client = TreatyClient::connect(coordinator.endpoint()).await.unwrap();
    let id = client
        .begin(BeginOptions::default(), branches)
        .await
        .unwrap();
    let commit = client.commit(&id).await;
    assert!(
        commit.is_err(),
        "the coordinator died, so no outcome: {commit:?}"
    );
    let status = exit_status(&mut coordinator).await;
    assert!(
        killed_by_sigkill(status),
        "expected death by SIGKILL at {envs:?}, got {status:?}; log:\n{}",
        coordinator.log_tail(60)
    );
    (id, coordinator.address)
}

/// [`commit_until_the_coordinator_dies`] with both branches voting YES, dying where both
/// have voted and are in doubt: neither has committed or aborted.
async fn commit_until_the_coordinator_dies_in_doubt(
    dir: &std::path::Path,
    participants: &Participants,
    envs: &[(&str, &str)],
) -> (String, std::net::SocketAddr) {
    let (id, address) = commit_until_the_coordinator_dies(dir, participants.branches(), envs).await;
    assert_eq!(participants.a.participant.ops(&id, "a"), [Op::Prepare]);
    assert_eq!(participants.b.participant.ops(&id, "b"), [Op::Prepare]);
    (id, address)
}

/// Starts the coordinator of `dir` again on `address`, with a client of it.
async fn restart(
    dir: &std::path::Path,
    address: std::net::SocketAddr,
) -> (ServerProcess, TreatyClient) {
    let restarted = start_treaty(&dir.join("coordinator"), &address.to_string(), None).await;
    let client = TreatyClient::connect(restarted.endpoint()).await.unwrap();
    (restarted, client)
}

/// Stops a coordinator with SIGTERM; it must exit cleanly.
async fn stop_cleanly(mut coordinator: ServerProcess) {
    coordinator.terminate();
    assert!(
        exit_status(&mut coordinator).await.success(),
        "{}",
        coordinator.log_tail(60)
    );
}

/// Restarts the coordinator of `dir` on `address` and waits until transaction `id` is
/// committed and both participants have committed it, exactly once each.
async fn restart_and_see_it_committed(
    dir: &std::path::Path,
    address: std::net::SocketAddr,
    participants: &Participants,
    id: &str,
) {
    let (restarted, client) = restart(dir, address).await;
    eventually("phase 2 completes after the restart", || async {
        let txn = client.get(id).await.unwrap()?;
        (txn.state == TransactionState::Committed as i32).then_some(())
    })
    .await;
    assert_eq!(
        participants.a.participant.ops(id, "a"),
        [Op::Prepare, Op::Commit]
    );
    assert_eq!(
        participants.b.participant.ops(id, "b"),
        [Op::Prepare, Op::Commit]
    );
    assert_eq!(client.outcome(id).await.unwrap(), Decision::Commit);
    stop_cleanly(restarted).await;
}

/// Classic protocol: the commit decision durable, then kill -9 before phase 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_decision_logged_before_a_kill_9_is_carried_out_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let failpoint = ("FAILPOINTS", "coordinator::after_decision_logged=return");
    let (id, address) = commit_until_the_coordinator_dies_in_doubt(
        dir.path(),
        &participants,
        &[failpoint, CLASSIC],
    )
    .await;
    restart_and_see_it_committed(dir.path(), address, &participants, &id).await;
    participants.stop().await;
}

/// Parallel commit: every vote YES and the intent durable, the commit is decided though
/// nothing was written after the votes. Killed right there, the restarted coordinator
/// asks the participants again (each answers YES from its record, its user code not run
/// again) and commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_its_votes_decided_is_carried_out_after_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let failpoint = ("FAILPOINTS", "coordinator::commit_implied=return");
    let (id, address) =
        commit_until_the_coordinator_dies_in_doubt(dir.path(), &participants, &[failpoint]).await;
    restart_and_see_it_committed(dir.path(), address, &participants, &id).await;
    participants.stop().await;
}

/// Parallel commit: killed as soon as the intent is durable, whatever the votes had
/// reached by then, the restarted coordinator asks every branch to prepare (with the
/// payload from the intent) and the votes decide: both YES, so it commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intent_logged_before_a_kill_9_is_decided_by_the_votes_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let failpoint = ("FAILPOINTS", "coordinator::after_intent_logged=return");
    let (id, address) =
        commit_until_the_coordinator_dies(dir.path(), participants.branches(), &[failpoint]).await;
    for (participant, branch) in [(&participants.a, "a"), (&participants.b, "b")] {
        let ops = participant.participant.ops(&id, branch);
        assert!(ops.is_empty() || ops == [Op::Prepare], "{branch}: {ops:?}");
    }
    restart_and_see_it_committed(dir.path(), address, &participants, &id).await;
    participants.stop().await;
}

/// Parallel commit: an abort decided after the intent was written is forced before
/// anyone hears it. Killed before that write, the restarted coordinator asks again:
/// the NO is answered from its participant's record, so the YES voter is aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_after_the_intent_killed_before_it_was_logged_is_decided_again_by_the_votes() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let failpoint = ("FAILPOINTS", "coordinator::before_decision_logged=return");
    let (id, address) = commit_until_the_coordinator_dies(
        dir.path(),
        participants.voting("yes", "no"),
        &[failpoint],
    )
    .await;
    // Nobody heard of the abort: the YES voter is in doubt.
    assert_eq!(participants.a.participant.ops(&id, "a"), [Op::Prepare]);

    let (restarted, client) = restart(dir.path(), address).await;
    eventually("the abort is delivered after the restart", || async {
        let txn = client.get(&id).await.unwrap()?;
        (txn.state == TransactionState::Aborted as i32).then_some(())
    })
    .await;
    assert_eq!(
        participants.a.participant.ops(&id, "a"),
        [Op::Prepare, Op::Abort]
    );
    assert!(
        !participants
            .b
            .participant
            .ops(&id, "b")
            .contains(&Op::Commit)
    );
    assert_eq!(client.outcome(&id).await.unwrap(), Decision::Abort);
    stop_cleanly(restarted).await;
    participants.stop().await;
}

/// Parallel commit: killed before its intent is written (its prepares may have gone
/// out), the transaction is unknown after the restart: presumed abort, and a participant
/// that prepared hears ABORT when it asks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_before_the_intent_is_logged_aborts_everything() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let failpoint = ("FAILPOINTS", "coordinator::before_intent_logged=return");
    let (id, address) =
        commit_until_the_coordinator_dies(dir.path(), participants.branches(), &[failpoint]).await;
    let (restarted, client) = restart(dir.path(), address).await;
    assert_eq!(client.outcome(&id).await.unwrap(), Decision::Abort);
    assert_eq!(client.get(&id).await.unwrap(), None);
    eventually("no participant is left in doubt", || async {
        let settled =
            [(&participants.a, "a"), (&participants.b, "b")]
                .iter()
                .all(|(participant, branch)| {
                    let ops = participant.participant.ops(&id, branch);
                    ops.is_empty() || ops == [Op::Prepare, Op::Abort]
                });
        settled.then_some(())
    })
    .await;
    let late = client.commit(&id).await.unwrap_err();
    assert_eq!(late.code(), Some(tonic::Code::InvalidArgument), "{late}");
    stop_cleanly(restarted).await;
    participants.stop().await;
}

/// Classic protocol: every vote YES, kill -9 before the decision is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_before_the_decision_aborts_everything() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let failpoint = ("FAILPOINTS", "coordinator::before_decision_logged=return");
    let (id, address) = commit_until_the_coordinator_dies_in_doubt(
        dir.path(),
        &participants,
        &[failpoint, CLASSIC],
    )
    .await;

    let (restarted, client) = restart(dir.path(), address).await;
    // Presumed abort: the coordinator has no record of the transaction.
    assert_eq!(client.outcome(&id).await.unwrap(), Decision::Abort);
    assert_eq!(client.get(&id).await.unwrap(), None);
    // The participants, in doubt, ask and abort.
    eventually("both in-doubt participants abort", || async {
        let a = participants.a.participant.ops(&id, "a");
        let b = participants.b.participant.ops(&id, "b");
        (a == [Op::Prepare, Op::Abort] && b == [Op::Prepare, Op::Abort]).then_some(())
    })
    .await;
    // A late Commit of the forgotten transaction cannot revive it.
    let late = client.commit(&id).await.unwrap_err();
    assert_eq!(late.code(), Some(tonic::Code::InvalidArgument), "{late}");

    stop_cleanly(restarted).await;
    participants.stop().await;
}

/// A one-phase commit told COMMITTED, then kill -9 at once: after the restart the
/// coordinator still says COMMITTED everywhere (its final record was forced before the
/// client heard), never ABORT or "unknown".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_phase_commit_told_committed_stays_committed_after_a_kill_9() {
    use treaty_sdk::Outcome;
    use treaty_tests::process::kill9;
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let data_dir = dir.path().join("coordinator");
    let mut coordinator = start_treaty(&data_dir, "127.0.0.1:0", None).await;
    let client = TreatyClient::connect(coordinator.endpoint()).await.unwrap();
    let mut told = Vec::new();
    for _ in 0..5 {
        let branch = vec![BranchSpec::new("a", &participants.a.endpoint, "yes")];
        let (id, outcome) = client
            .run_two_phase(branch, BeginOptions::default())
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Committed);
        told.push(id);
    }
    assert!(killed_by_sigkill(kill9(&mut coordinator).await));

    let address = coordinator.address.to_string();
    let mut restarted = start_treaty(&data_dir, &address, None).await;
    let client = TreatyClient::connect(restarted.endpoint()).await.unwrap();
    for id in &told {
        let txn = client.get(id).await.unwrap().expect("still known");
        assert_eq!(txn.state, TransactionState::Committed as i32, "{id}");
        assert_eq!(client.outcome(id).await.unwrap(), Decision::Commit, "{id}");
        assert_eq!(client.commit(id).await.unwrap(), Outcome::Committed, "{id}");
        assert_eq!(
            participants.a.participant.ops(id, "a"),
            [Op::Prepare, Op::Commit]
        );
    }
    restarted.terminate();
    assert!(exit_status(&mut restarted).await.success());
    participants.stop().await;
}
