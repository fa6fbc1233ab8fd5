//! A participant that is down during phase 2 gets the commit once it is back: the
//! participant is a real process, killed with SIGKILL after it voted YES and restarted
//! on the same address and data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::barrier::BranchStatus;
use treaty_sdk::client::{BeginOptions, BranchSpec, BranchState, Outcome, TransactionState};
use treaty_tests::harness::{Coordinator, ParticipantServer, barrier_record, eventually};
use treaty_tests::process::{exit_status, kill9, killed_by_sigkill, start_scripted_participant};

fn branch_state(txn: &treaty_sdk::client::Transaction, branch: &str) -> i32 {
    txn.branches
        .iter()
        .find(|b| b.branch_id == branch)
        .map(|b| b.state)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_during_phase_two_receives_the_commit_once_back() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let fast = ParticipantServer::start(&dir.path().join("fast")).await;
    let remote_dir = dir.path().join("remote");
    let mut remote = start_scripted_participant(&remote_dir, "127.0.0.1:0").await;
    let address = remote.address;

    // The fast branch takes a while to vote, so the remote branch's YES comes first and
    // the decision waits for it; the remote participant dies in that window.
    let id = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("slow", &fast.endpoint, "slow:3000"),
                BranchSpec::new("remote", remote.endpoint(), "yes"),
            ],
        )
        .await
        .unwrap();
    let committing = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.commit(&id).await })
    };
    eventually("the remote participant voted YES", || async {
        let txn = client.get(&id).await.unwrap()?;
        (branch_state(&txn, "remote") == BranchState::Prepared as i32).then_some(())
    })
    .await;
    let status = kill9(&mut remote).await;
    assert!(killed_by_sigkill(status));

    // The decision is commit (the dead participant's YES is durable there); phase 2 to
    // it fails and is retried.
    assert_eq!(committing.await.unwrap().unwrap(), Outcome::Committed);
    eventually(
        "phase 2 to the dead participant is being retried",
        || async {
            let txn = client.get(&id).await.unwrap()?;
            let remote = txn.branches.iter().find(|b| b.branch_id == "remote")?;
            (txn.state == TransactionState::Committing as i32 && remote.attempts >= 2).then_some(())
        },
    )
    .await;

    let mut remote = start_scripted_participant(&remote_dir, &address.to_string()).await;
    eventually(
        "the restarted participant acknowledges the commit",
        || async {
            let txn = client.get(&id).await.unwrap()?;
            (txn.state == TransactionState::Committed as i32).then_some(())
        },
    )
    .await;

    remote.terminate();
    assert!(
        exit_status(&mut remote).await.success(),
        "{}",
        remote.log_tail(60)
    );
    assert_eq!(
        barrier_record(&remote_dir, &id, "remote").unwrap().status,
        BranchStatus::Committed
    );
    fast.stop().await;
    coordinator.stop().await.unwrap();
}
