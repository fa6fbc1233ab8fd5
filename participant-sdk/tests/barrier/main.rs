//! The barrier's rules, against a real sled directory: user code runs at most once per
//! operation, duplicates are answered from the record, null aborts and anti-hanging,
//! concurrent duplicates serialized, records durable across a reopen. What it writes and
//! when it forces it is in `writes.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use treaty_sdk::barrier::{AbortAnswer, Barrier, BranchMode, BranchStatus, CommitAnswer};
use treaty_sdk::durable::{DurableStore, StoreOptions};
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

mod writes;

/// Counts calls into user code; votes by payload ("no" → NO, else YES).
#[derive(Debug, Default)]
struct Counting {
    prepares: AtomicUsize,
    commits: AtomicUsize,
    aborts: AtomicUsize,
    compensations: AtomicUsize,
}

impl Participant for Counting {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, ParticipantError> {
        self.prepares.fetch_add(1, Ordering::SeqCst);
        // Long enough for concurrent duplicates to pile up behind the lock.
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(if payload == b"no" {
            Vote::no("refused")
        } else {
            Vote::Yes
        })
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.commits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.aborts.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.compensations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn counts(p: &Counting) -> [usize; 4] {
    [
        p.prepares.load(Ordering::SeqCst),
        p.commits.load(Ordering::SeqCst),
        p.aborts.load(Ordering::SeqCst),
        p.compensations.load(Ordering::SeqCst),
    ]
}

fn branch(id: &str) -> BranchContext {
    BranchContext::new("t1", id)
}

fn open(dir: &std::path::Path) -> Barrier {
    Barrier::new(Arc::new(
        DurableStore::open(dir, StoreOptions::default()).unwrap(),
    ))
}

const COORDINATOR: &str = "http://127.0.0.1:7420";

#[tokio::test]
async fn duplicates_are_answered_from_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    let b = branch("b");
    for _ in 0..3 {
        assert_eq!(
            barrier.prepare(&p, &b, b"yes", COORDINATOR).await.unwrap(),
            Vote::Yes
        );
    }
    for _ in 0..3 {
        assert_eq!(
            barrier
                .commit(&p, &b, BranchMode::TwoPhase, &[], COORDINATOR)
                .await
                .unwrap(),
            CommitAnswer::Committed
        );
    }
    assert_eq!(counts(&p), [1, 1, 0, 0]);
    // A late abort of a committed branch undoes nothing.
    assert_eq!(
        barrier.abort(&p, &b).await.unwrap(),
        AbortAnswer::AlreadyCommitted
    );
    assert_eq!(counts(&p), [1, 1, 0, 0]);
}

#[tokio::test]
async fn a_no_vote_is_repeated_and_aborting_it_calls_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    let b = branch("b");
    assert_eq!(
        barrier.prepare(&p, &b, b"no", COORDINATOR).await.unwrap(),
        Vote::no("refused")
    );
    assert_eq!(
        barrier.prepare(&p, &b, b"yes", COORDINATOR).await.unwrap(),
        Vote::no("refused")
    );
    assert_eq!(barrier.abort(&p, &b).await.unwrap(), AbortAnswer::Aborted);
    assert_eq!(counts(&p), [1, 0, 0, 0]);
}

#[tokio::test]
async fn abort_before_prepare_is_recorded_and_the_late_prepare_refused() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    let b = branch("b");
    assert_eq!(barrier.abort(&p, &b).await.unwrap(), AbortAnswer::Aborted);
    assert_eq!(
        barrier.record(&b).unwrap().unwrap().status,
        BranchStatus::Aborted {
            after_prepare: false
        }
    );
    let late = barrier.prepare(&p, &b, b"yes", COORDINATOR).await.unwrap();
    assert!(matches!(late, Vote::No { .. }), "{late:?}");
    // Nor can a one-phase commit or a saga step slip in after it.
    assert_eq!(
        barrier
            .commit(&p, &b, BranchMode::OnePhase, b"yes", COORDINATOR)
            .await
            .unwrap(),
        CommitAnswer::AlreadyAborted
    );
    assert_eq!(counts(&p), [0, 0, 0, 0]);
}

#[tokio::test]
async fn compensation_before_the_step_is_null_and_blocks_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    let b = branch("step");
    barrier.compensate(&p, &b, b"undo").await.unwrap();
    assert_eq!(
        barrier
            .commit(&p, &b, BranchMode::SagaStep, b"do", COORDINATOR)
            .await
            .unwrap(),
        CommitAnswer::AlreadyAborted
    );
    assert_eq!(counts(&p), [0, 0, 0, 0]);

    // The normal order: step, then compensation, each once.
    let b = branch("step-2");
    assert_eq!(
        barrier
            .commit(&p, &b, BranchMode::SagaStep, b"do", COORDINATOR)
            .await
            .unwrap(),
        CommitAnswer::Committed
    );
    barrier.compensate(&p, &b, b"undo").await.unwrap();
    barrier.compensate(&p, &b, b"undo").await.unwrap();
    assert_eq!(counts(&p), [1, 1, 0, 1]);
}

#[tokio::test]
async fn two_phase_commit_without_a_prepare_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    assert_eq!(
        barrier
            .commit(&p, &branch("b"), BranchMode::TwoPhase, &[], COORDINATOR)
            .await
            .unwrap(),
        CommitAnswer::NotPrepared
    );
    assert_eq!(counts(&p), [0, 0, 0, 0]);
}

/// Sixteen duplicates at once: the first `1 + MAX_WAITING_PER_KEY` to arrive are let in
/// and the rest may be refused as busy; user code runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_run_user_code_once() {
    use treaty_sdk::barrier::{BarrierError, MAX_WAITING_PER_KEY};

    let dir = tempfile::tempdir().unwrap();
    let barrier = Arc::new(open(dir.path()));
    let p = Arc::new(Counting::default());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (barrier, p) = (barrier.clone(), p.clone());
        tasks.push(tokio::spawn(async move {
            barrier
                .prepare(p.as_ref(), &branch("b"), b"yes", COORDINATOR)
                .await
        }));
    }
    let mut voted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(vote) => {
                assert_eq!(vote, Vote::Yes);
                voted += 1;
            }
            Err(error) => assert!(matches!(error, BarrierError::Busy(_)), "{error}"),
        }
    }
    assert!(voted > MAX_WAITING_PER_KEY, "{voted} answered");
    assert_eq!(counts(&p), [1, 0, 0, 0]);
}

#[tokio::test]
async fn a_yes_vote_survives_reopen_and_is_listed_in_doubt_until_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let p = Counting::default();
    {
        let barrier = open(dir.path());
        barrier
            .prepare(&p, &branch("b"), b"yes", COORDINATOR)
            .await
            .unwrap();
        barrier.store().close().unwrap();
    }
    let barrier = open(dir.path());
    let in_doubt = barrier.in_doubt(10).unwrap();
    assert_eq!(in_doubt.len(), 1);
    assert_eq!(in_doubt[0].branch, branch("b"));
    assert_eq!(in_doubt[0].coordinator_endpoint, COORDINATOR);
    // The duplicate prepare after the reopen does not run user code again.
    assert_eq!(
        barrier
            .prepare(&p, &branch("b"), b"yes", COORDINATOR)
            .await
            .unwrap(),
        Vote::Yes
    );
    assert_eq!(counts(&p), [1, 0, 0, 0]);
    barrier.abort(&p, &branch("b")).await.unwrap();
    assert!(barrier.in_doubt(10).unwrap().is_empty());
    assert_eq!(counts(&p), [1, 0, 1, 0]);
}

#[tokio::test]
async fn in_doubt_branches_are_paged_with_a_cursor_so_none_is_starved() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    for i in 0..5 {
        barrier
            .prepare(&p, &branch(&format!("b{i}")), b"yes", COORDINATOR)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    for _ in 0..10 {
        let (page, next) = barrier.in_doubt_after(cursor.as_ref(), 2).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.into_iter().map(|b| b.branch.branch_id));
        cursor = next;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, ["b0", "b1", "b2", "b3", "b4"]);
}
