//! What the barrier writes and when it forces it: user writes and the barrier's record
//! in one batch (or the record on its own), the SDK store's conformance to the store
//! contract, and a one-phase YES forced before its commit runs, or, opted in, sharing
//! one forced write.

use super::*;

/// Keeps its data in the barrier's store, and commits it with the barrier's record.
#[derive(Debug)]
struct Atomic {
    store: Arc<DurableStore>,
    /// After its write, the operation fails as if the process died before answering.
    fail_after_write: bool,
    calls: AtomicUsize,
}

impl Atomic {
    async fn write(&self, branch: &BranchContext, key: &str) -> Result<(), ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut batch = treaty_sdk::durable::WriteBatch::new();
        batch.insert(format!("data/{key}/{}", branch.branch_id), b"x".to_vec());
        assert!(branch.include_barrier_record(&mut batch));
        assert!(!branch.include_barrier_record(&mut batch), "only once");
        self.store
            .write(batch, treaty_sdk::durable::Durability::Forced)
            .await
            .map_err(|e| ParticipantError::new(e.to_string()))?;
        if self.fail_after_write {
            return Err(ParticipantError::new("died before answering"));
        }
        Ok(())
    }
}

impl Participant for Atomic {
    async fn prepare(&self, branch: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        self.write(branch, "held").await?;
        Ok(Vote::Yes)
    }
    async fn commit(&self, branch: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.write(branch, "applied").await
    }
    async fn abort(&self, branch: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.write(branch, "released").await
    }
}

#[tokio::test]
async fn user_writes_and_the_barrier_record_commit_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), StoreOptions::default()).unwrap());
    let barrier = Barrier::new(store.clone());
    // The user's write (with the record) reached the disk, then the answer was lost.
    let p = Atomic {
        store: store.clone(),
        fail_after_write: true,
        calls: AtomicUsize::new(0),
    };
    let b = branch("b");
    assert!(barrier.prepare(&p, &b, b"", COORDINATOR).await.is_err());
    // The record came with the user's write: the retry is answered from it.
    assert_eq!(
        barrier.record(&b).unwrap().unwrap().status,
        BranchStatus::Prepared
    );
    // And the branch is in doubt with it, as if the barrier had written the record.
    let in_doubt: Vec<_> = barrier.in_doubt(10).unwrap();
    assert_eq!(in_doubt.len(), 1);
    assert_eq!(in_doubt[0].branch, b);
    assert_eq!(
        barrier.prepare(&p, &b, b"", COORDINATOR).await.unwrap(),
        Vote::Yes
    );
    assert!(
        barrier
            .commit(&p, &b, BranchMode::TwoPhase, &[], COORDINATOR)
            .await
            .is_err()
    );
    assert_eq!(
        barrier.record(&b).unwrap().unwrap().status,
        BranchStatus::Committed
    );
    assert!(barrier.in_doubt(10).unwrap().is_empty());
    assert_eq!(
        barrier
            .commit(&p, &b, BranchMode::TwoPhase, &[], COORDINATOR)
            .await
            .unwrap(),
        CommitAnswer::Committed
    );
    // User code ran once per operation, and its data is there.
    assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    for key in ["data/held/b", "data/applied/b"] {
        assert!(store.db().get(key).unwrap().is_some(), "{key}");
    }
}

#[tokio::test]
async fn without_the_record_included_the_barrier_writes_it_itself() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    let b = branch("b");
    // `include_barrier_record` outside the SDK has nothing to include.
    let mut batch = treaty_sdk::durable::WriteBatch::new();
    assert!(!b.include_barrier_record(&mut batch));
    assert!(batch.is_empty());
    barrier.prepare(&p, &b, b"yes", COORDINATOR).await.unwrap();
    assert_eq!(
        barrier.record(&b).unwrap().unwrap().status,
        BranchStatus::Prepared
    );
}

#[tokio::test]
async fn the_sdk_store_meets_the_barrier_store_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), Default::default()).unwrap();
    treaty_sdk::barrier_store::check_conformance(&store)
        .await
        .unwrap();
}

/// A barrier on a store that counts its forced group commits, with a one-phase or saga
/// YES written unforced if `unforced_one_phase_yes`.
fn open_counting_forced(
    dir: &std::path::Path,
    unforced_one_phase_yes: bool,
) -> (Barrier, Arc<AtomicUsize>) {
    let forced = Arc::new(AtomicUsize::new(0));
    let counter = forced.clone();
    let options = StoreOptions {
        group_observer: Some(Arc::new(
            move |group: treaty_sdk::durable::GroupCommitted| {
                if group.sync_seconds.is_some() {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
            },
        )),
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir, options).unwrap();
    let barrier = Barrier::new(Arc::new(store)).with_unforced_one_phase_yes(unforced_one_phase_yes);
    (barrier, forced)
}

/// By default a one-phase or saga YES is durable before the user's commit runs: an
/// effect the commit makes elsewhere is undone by a later Abort or Compensate even if
/// the participant crashed while committing.
#[tokio::test]
async fn by_default_a_one_phase_yes_is_forced_before_the_commit_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, forced) = open_counting_forced(dir.path(), false);
    let b = branch("b");
    let before = forced.load(Ordering::SeqCst);
    barrier
        .commit(&CommitFails, &b, BranchMode::OnePhase, b"", COORDINATOR)
        .await
        .unwrap_err();
    assert_eq!(
        forced.load(Ordering::SeqCst) - before,
        1,
        "the YES was forced before the commit ran (and failed)"
    );
    let p = Counting::default();
    let before = forced.load(Ordering::SeqCst);
    barrier
        .commit(&p, &branch("c"), BranchMode::SagaStep, b"yes", COORDINATOR)
        .await
        .unwrap();
    assert_eq!(
        forced.load(Ordering::SeqCst) - before,
        2,
        "YES, then commit"
    );
}

#[tokio::test]
async fn opted_in_a_one_phase_commit_or_saga_step_waits_for_one_forced_write_a_two_phase_vote_for_its_own()
 {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, forced) = open_counting_forced(dir.path(), true);
    let p = Counting::default();
    for (id, mode) in [
        ("one", BranchMode::OnePhase),
        ("step", BranchMode::SagaStep),
    ] {
        let before = forced.load(Ordering::SeqCst);
        let answer = barrier
            .commit(&p, &branch(id), mode, b"yes", COORDINATOR)
            .await
            .unwrap();
        assert_eq!(answer, CommitAnswer::Committed);
        assert_eq!(forced.load(Ordering::SeqCst) - before, 1, "{mode:?}");
    }
    let two = branch("two");
    let before = forced.load(Ordering::SeqCst);
    barrier
        .prepare(&p, &two, b"yes", COORDINATOR)
        .await
        .unwrap();
    assert_eq!(forced.load(Ordering::SeqCst) - before, 1, "the YES vote");
    barrier
        .commit(&p, &two, BranchMode::TwoPhase, b"", COORDINATOR)
        .await
        .unwrap();
    assert_eq!(forced.load(Ordering::SeqCst) - before, 2, "the commit");
    drop(barrier);
    let reopened = open(dir.path());
    for id in ["one", "step", "two"] {
        let record = reopened.record(&branch(id)).unwrap().unwrap();
        assert_eq!(record.status, BranchStatus::Committed, "{id}");
    }
}

/// Votes YES; its commit fails.
#[derive(Debug)]
struct CommitFails;

impl Participant for CommitFails {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Err(ParticipantError::new("commit failed"))
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_prepare_that_finds_the_unforced_yes_of_a_failed_one_phase_commit_forces_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let (barrier, forced) = open_counting_forced(dir.path(), true);
    let b = branch("b");
    let before = forced.load(Ordering::SeqCst);
    barrier
        .commit(&CommitFails, &b, BranchMode::OnePhase, b"", COORDINATOR)
        .await
        .unwrap_err();
    assert_eq!(
        barrier.record(&b).unwrap().unwrap().status,
        BranchStatus::Prepared
    );
    assert_eq!(forced.load(Ordering::SeqCst), before, "nothing was forced");
    let vote = barrier
        .prepare(&CommitFails, &b, b"", COORDINATOR)
        .await
        .unwrap();
    assert_eq!(vote, Vote::Yes);
    assert_eq!(
        forced.load(Ordering::SeqCst) - before,
        1,
        "the YES is forced before it is heard"
    );
}

/// A two-phase commit's phase-2 record (commit or abort) is durable before it is
/// answered, but waits for the next forced write (the next transaction's YES) to share
/// its sync; a one-phase commit, whose answer the initiator waits for, does not wait.
#[tokio::test]
async fn a_phase_two_record_shares_the_next_yes_votes_sync_a_one_phase_commit_does_not_wait() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        patient_sync_wait: treaty_sdk::durable::MAX_GROUP_COMMIT_HOLD,
        ..StoreOptions::default()
    };
    let barrier = Arc::new(Barrier::new(Arc::new(
        DurableStore::open(dir.path(), options).unwrap(),
    )));
    let syncs = barrier.store().durability_counters();
    let p = Arc::new(Counting::default());
    let patience = Duration::from_secs(30);
    // Answers somebody waits for are not held back: a one-phase commit, a saga step and
    // its compensation, and the abort of a one-phase branch whose commit failed.
    for (id, mode) in [
        ("one", BranchMode::OnePhase),
        ("step", BranchMode::SagaStep),
    ] {
        let answer = tokio::time::timeout(
            patience,
            barrier.commit(&*p, &branch(id), mode, b"yes", COORDINATOR),
        )
        .await
        .unwrap_or_else(|_| panic!("{mode:?} held back"))
        .unwrap();
        assert_eq!(answer, CommitAnswer::Committed);
    }
    tokio::time::timeout(patience, barrier.compensate(&*p, &branch("step"), b""))
        .await
        .expect("a compensation held back")
        .unwrap();
    let failed_one_phase = branch("one-failed");
    barrier
        .commit(
            &CommitFails,
            &failed_one_phase,
            BranchMode::OnePhase,
            b"",
            COORDINATOR,
        )
        .await
        .unwrap_err();
    let answer = tokio::time::timeout(patience, barrier.abort(&*p, &failed_one_phase))
        .await
        .expect("the abort of a prepared one-phase branch held back")
        .unwrap();
    assert_eq!(answer, AbortAnswer::Aborted);
    for id in ["committed", "aborted"] {
        barrier
            .prepare(&*p, &branch(id), b"yes", COORDINATOR)
            .await
            .unwrap();
    }
    let before = syncs.syncs();
    let phase_two = {
        let (barrier, p) = (barrier.clone(), p.clone());
        tokio::spawn(async move {
            let (committed, aborted) = (branch("committed"), branch("aborted"));
            let commit = barrier.commit(&*p, &committed, BranchMode::TwoPhase, b"", COORDINATOR);
            let abort = barrier.abort(&*p, &aborted);
            tokio::join!(commit, abort)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!phase_two.is_finished(), "answered before any sync");
    assert_eq!(syncs.syncs(), before);
    let vote = tokio::time::timeout(
        patience,
        barrier.prepare(&*p, &branch("next"), b"yes", COORDINATOR),
    )
    .await
    .expect("the next YES is not held back")
    .unwrap();
    assert_eq!(vote, Vote::Yes);
    let (commit, abort) = tokio::time::timeout(patience, phase_two)
        .await
        .expect("phase 2 answered with the next YES's sync")
        .unwrap();
    assert_eq!(commit.unwrap(), CommitAnswer::Committed);
    assert_eq!(abort.unwrap(), AbortAnswer::Aborted);
    assert_eq!(
        syncs.syncs(),
        before + 1,
        "one sync for the YES and both records"
    );
    drop(barrier);
    let reopened = open(dir.path());
    let status = |id| reopened.record(&branch(id)).unwrap().unwrap().status;
    assert_eq!(status("committed"), BranchStatus::Committed);
    assert!(matches!(status("aborted"), BranchStatus::Aborted { .. }));
}
