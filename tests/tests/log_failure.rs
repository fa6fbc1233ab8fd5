//! A decision-log write that fails is fatal: the commit is never acknowledged, the daemon
//! stops with an error, and after a restart every participant ends the same way as the
//! coordinator's answer; a lazy write that fails once queued, or a logger thread that
//! dies, fails the log, which is how the runtime hears of it (it does not await lazy
//! writes). The failpoint registry is
//! process-wide, so the coordinator runs in this test binary and the participants as
//! processes of their own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_coordinator::log::{DecisionLog, Durability, SledLog};
use treaty_coordinator::model::{TxnId, TxnState};
use treaty_sdk::barrier::BranchStatus;
use treaty_sdk::client::{BeginOptions, BranchSpec, Decision};
use treaty_tests::harness::{Coordinator, bare_record, barrier_record, eventually, recorded_vote};
use treaty_tests::process::{exit_status, start_scripted_participant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_decision_write_is_never_acknowledged_and_stops_the_daemon() {
    // Failpoints are process-wide: one test at a time sets them.
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let mut a = start_scripted_participant(&a_dir, "127.0.0.1:0").await;
    let mut b = start_scripted_participant(&b_dir, "127.0.0.1:0").await;
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let id = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("a", a.endpoint(), "yes"),
                BranchSpec::new("b", b.endpoint(), "yes"),
            ],
        )
        .await
        .unwrap();

    fail::cfg("durable::sync", "return").unwrap();
    let commit = client.commit(&id).await;
    fail::remove("durable::sync");
    assert!(
        commit.is_err(),
        "a commit whose decision write failed was answered: {commit:?}"
    );
    let stopped = coordinator.stop().await;
    assert!(
        matches!(
            stopped,
            Err(treaty_coordinator::daemon::DaemonError::Fatal(_))
        ),
        "{stopped:?}"
    );

    // Whatever the restarted coordinator finds (the failed write may or may not have
    // reached the disk), both participants end with its answer.
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let decision = eventually("the restarted coordinator decides", || async {
        match client.outcome(&id).await.unwrap() {
            Decision::Pending => None,
            decided => Some(decided),
        }
    })
    .await;
    eprintln!("the restarted coordinator answers {decision:?}");
    if decision == Decision::Commit {
        eventually("phase 2 completes", || async {
            let txn = client.get(&id).await.unwrap()?;
            (txn.state == treaty_sdk::client::TransactionState::Committed as i32).then_some(())
        })
        .await;
    } else {
        // Presumed abort: the in-doubt participants learn it by asking.
        eventually("both in-doubt participants abort", || async {
            for (participant, branch) in [(&a, "a"), (&b, "b")] {
                let vote = recorded_vote(&participant.endpoint(), &id, branch).await?;
                if vote != treaty_proto::v1::Vote::No as i32 {
                    return None;
                }
            }
            Some(())
        })
        .await;
    }
    coordinator.stop().await.unwrap();
    for participant in [&mut a, &mut b] {
        participant.terminate();
        assert!(exit_status(participant).await.success());
    }
    let wanted = match decision {
        Decision::Commit => BranchStatus::Committed,
        _ => BranchStatus::Aborted {
            after_prepare: true,
        },
    };
    for (dir, branch) in [(&a_dir, "a"), (&b_dir, "b")] {
        assert_eq!(
            barrier_record(dir, &id, branch).unwrap().status,
            wanted,
            "branch {branch}"
        );
    }
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_write_that_fails_once_queued_fails_the_log() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let id = TxnId::generate(1_700_000_000_000);
    log.write(
        &bare_record(id, TxnState::Committing, 0),
        Durability::Forced,
    )
    .await
    .unwrap();

    fail::cfg("durable::apply", "return").unwrap();
    // Nobody polls it, as the runtime does not poll its lazy writes.
    drop(log.write(&bare_record(id, TxnState::Committed, 0), Durability::Lazy));
    let reason = tokio::time::timeout(std::time::Duration::from_secs(30), log.failed())
        .await
        .expect("the failed lazy write never failed the log");
    fail::remove("durable::apply");
    assert!(reason.contains("injected apply failure"), "{reason}");
    // Nothing after it is accepted.
    let refused = log
        .write(&bare_record(id, TxnState::Committed, 0), Durability::Forced)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    scenario.teardown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logger_thread_that_panics_fails_the_log() {
    let scenario = fail::FailScenario::setup();
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let id = TxnId::generate(1_700_000_000_000);
    fail::cfg("durable::apply", "panic").unwrap();
    drop(log.write(&bare_record(id, TxnState::Committed, 0), Durability::Lazy));
    let reason = tokio::time::timeout(std::time::Duration::from_secs(30), log.failed())
        .await
        .expect("a dead logger thread never failed the log");
    fail::remove("durable::apply");
    assert!(reason.contains("logger thread panicked"), "{reason}");
    let refused = log
        .write(&bare_record(id, TxnState::Committed, 0), Durability::Forced)
        .await;
    assert!(refused.is_err(), "{refused:?}");
    scenario.teardown();
}
