//! Exactly-once effects for a participant whose data and barrier live in SQLite (the
//! `rewards` example, its own process): it dies by SIGKILL right after a commit was
//! applied, before answering; restarted, the redelivered commit is answered from the
//! barrier's record, written in the same SQLite transaction as the effect.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::sync::Arc;

use treaty_examples::rewards::{self, PointsLeg, SqliteStore};
use treaty_sdk::barrier::{Barrier, BranchStatus};
use treaty_sdk::client::{BeginOptions, BranchSpec, TransactionState};
use treaty_sdk::{BranchContext, TreatyClient};
use treaty_tests::harness::eventually;
use treaty_tests::process::{
    exit_status, killed_by_sigkill, start_server, start_treaty, workspace_binary,
};

async fn start_rewards(
    data_dir: &std::path::Path,
    listen: &str,
    failpoints: Option<&str>,
) -> treaty_tests::process::ServerProcess {
    let args: Vec<String> = [
        "--members",
        "alice=100,bob=0",
        "--listen",
        listen,
        "--data-dir",
        &data_dir.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut envs = Vec::new();
    if let Some(failpoints) = failpoints {
        envs.push(("FAILPOINTS", failpoints));
    }
    start_server(
        &workspace_binary("treaty-examples", "rewards"),
        &args,
        &envs,
        "rewards listening on",
        data_dir.with_extension("log"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_applied_before_a_kill_9_is_applied_once_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rewards_dir = dir.path().join("rewards");
    let mut coordinator = start_treaty(&dir.path().join("coordinator"), "127.0.0.1:0", None).await;
    let mut service = start_rewards(
        &rewards_dir,
        "127.0.0.1:0",
        Some("participant::after_commit_applied=return"),
    )
    .await;
    let address = service.address.to_string();
    let client = TreatyClient::connect(coordinator.endpoint()).await.unwrap();
    let leg = |member, points| PointsLeg { member, points }.payload();
    let id = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("redeem", service.endpoint(), leg("alice", -30)),
                BranchSpec::new("earn", service.endpoint(), leg("bob", 30)),
            ],
        )
        .await
        .unwrap();
    // The decision is logged before any commit is sent, so Commit answers COMMITTED even
    // though the service dies while applying it.
    let outcome = client.commit(&id).await.unwrap();
    assert!(outcome.is_committed(), "{outcome:?}");
    let status = exit_status(&mut service).await;
    assert!(
        killed_by_sigkill(status),
        "expected death at the failpoint, got {status:?}; log:\n{}",
        service.log_tail(40)
    );

    let mut restarted = start_rewards(&rewards_dir, &address, None).await;
    eventually("the coordinator delivers both commits", || async {
        let txn = client.get(&id).await.unwrap()?;
        (txn.state == TransactionState::Committed as i32).then_some(())
    })
    .await;
    for process in [&mut restarted, &mut coordinator] {
        process.terminate();
        assert!(
            exit_status(process).await.success(),
            "{}",
            process.log_tail(40)
        );
    }

    let database = rewards_dir.join("rewards.sqlite3");
    assert_eq!(
        rewards::balances(&database).unwrap(),
        BTreeMap::from([("alice".to_string(), 70), ("bob".to_string(), 30)]),
        "each leg applied exactly once"
    );
    assert_eq!(rewards::open_holds(&database).unwrap(), 0);
    let barrier = Barrier::new(Arc::new(SqliteStore::open(&database).unwrap()));
    for branch in ["redeem", "earn"] {
        let record = barrier
            .record(&BranchContext::new(id.clone(), branch))
            .unwrap()
            .unwrap();
        assert_eq!(record.status, BranchStatus::Committed, "{branch}");
    }
    assert!(barrier.in_doubt(10).unwrap().is_empty());
}
