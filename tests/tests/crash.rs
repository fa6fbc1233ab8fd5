//! Decision durability with real processes: `treaty serve` runs as a child and dies by
//! SIGKILL at a failpoint (FAILPOINTS=...=return), then restarts on the same data
//! directory and address. Participants run in this process over real gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::TreatyClient;
use treaty_sdk::client::{BeginOptions, BranchSpec, Decision, TransactionState};
use treaty_tests::harness::{ParticipantServer, eventually};
use treaty_tests::process::{exit_status, killed_by_sigkill, start_treaty};
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
        vec![
            BranchSpec::new("a", &self.a.endpoint, "yes"),
            BranchSpec::new("b", &self.b.endpoint, "yes"),
        ]
    }

    async fn stop(self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

/// Begins a two-branch transaction on a coordinator that will die during Commit, and
/// returns its id once the Commit call failed and the process is gone (by SIGKILL).
async fn commit_until_the_coordinator_dies(
    dir: &std::path::Path,
    participants: &Participants,
    failpoint: &str,
) -> (String, std::net::SocketAddr) {
    let mut coordinator =
        start_treaty(&dir.join("coordinator"), "127.0.0.1:0", Some(failpoint)).await;
    let client = TreatyClient::connect(coordinator.endpoint()).await.unwrap();
    let id = client
        .begin(BeginOptions::default(), participants.branches())
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
        "expected death by SIGKILL at {failpoint}, got {status:?}; log:\n{}",
        coordinator.log_tail(60)
    );
    // Both voted YES and are in doubt: neither has committed or aborted.
    assert_eq!(participants.a.participant.ops(&id, "a"), [Op::Prepare]);
    assert_eq!(participants.b.participant.ops(&id, "b"), [Op::Prepare]);
    (id, coordinator.address)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_decision_logged_before_a_kill_9_is_carried_out_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let (id, address) = commit_until_the_coordinator_dies(
        dir.path(),
        &participants,
        "coordinator::after_decision_logged=return",
    )
    .await;

    let mut restarted =
        start_treaty(&dir.path().join("coordinator"), &address.to_string(), None).await;
    let client = TreatyClient::connect(restarted.endpoint()).await.unwrap();
    eventually("phase 2 completes after the restart", || async {
        let txn = client.get(&id).await.unwrap()?;
        (txn.state == TransactionState::Committed as i32).then_some(())
    })
    .await;
    assert_eq!(
        participants.a.participant.ops(&id, "a"),
        [Op::Prepare, Op::Commit]
    );
    assert_eq!(
        participants.b.participant.ops(&id, "b"),
        [Op::Prepare, Op::Commit]
    );
    assert_eq!(client.outcome(&id).await.unwrap(), Decision::Commit);

    restarted.terminate();
    assert!(
        exit_status(&mut restarted).await.success(),
        "{}",
        restarted.log_tail(60)
    );
    participants.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_9_before_the_decision_aborts_everything() {
    let dir = tempfile::tempdir().unwrap();
    let participants = Participants::start(dir.path()).await;
    let (id, address) = commit_until_the_coordinator_dies(
        dir.path(),
        &participants,
        "coordinator::before_decision_logged=return",
    )
    .await;

    let mut restarted =
        start_treaty(&dir.path().join("coordinator"), &address.to_string(), None).await;
    let client = TreatyClient::connect(restarted.endpoint()).await.unwrap();
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

    restarted.terminate();
    assert!(
        exit_status(&mut restarted).await.success(),
        "{}",
        restarted.log_tail(60)
    );
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
