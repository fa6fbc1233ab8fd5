//! A failed durable write fails its waiters and every write after it, and a participant
//! whose store failed stops: nothing is acknowledged, and no user code runs, once the
//! store cannot promise durability. A failed compaction leaves the store as it was, and
//! does not keep the next one from coming. (Its own test binary: the failpoint registry
//! is process-wide; the tests here take turns.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use treaty_sdk::barrier::{Barrier, BranchMode};
use treaty_sdk::durable::{
    CompactionPolicy, CompactionReport, Durability, DurableStore, POINTER_FILE, StoreError,
    StoreOptions, WriteBatch,
};
use treaty_sdk::{BranchContext, Participant, ParticipantError, ServeError, Vote};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn batch(key: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.insert(key.to_vec(), b"v".to_vec());
    batch
}

/// Makes the next durable sync of any store in this process fail.
async fn fail_next_sync(store: &DurableStore) {
    fail::cfg("durable::sync", "return").unwrap();
    let failed = store.write(batch(b"during"), Durability::Forced).await;
    fail::remove("durable::sync");
    assert!(matches!(failed, Err(StoreError::Failed(_))), "{failed:?}");
}

#[derive(Debug, Default)]
struct Counting {
    calls: AtomicUsize,
}

impl Participant for Counting {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn after_a_failed_sync_the_store_refuses_everything() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), Default::default()).unwrap();
    store
        .write(batch(b"before"), Durability::Forced)
        .await
        .unwrap();
    fail_next_sync(&store).await;
    assert!(store.failure().is_some());

    // Failed for good, lazy writes included, even though syncing would work again.
    for durability in [Durability::Forced, Durability::Patient, Durability::Lazy] {
        let later = store.write(batch(b"after"), durability).await;
        assert!(matches!(later, Err(StoreError::Failed(_))), "{later:?}");
    }
    assert!(store.db().get(b"after").unwrap().is_none());
    assert!(store.close().is_err());
}

#[tokio::test]
async fn the_barrier_runs_no_user_code_on_a_failed_store() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let barrier = Barrier::new(store.clone());
    let participant = Counting::default();
    let branch = BranchContext::new("t", "b");
    // A YES whose record could not be made durable: the vote is not acknowledged...
    fail::cfg("durable::sync", "return").unwrap();
    let vote = barrier.prepare(&participant, &branch, b"", "").await;
    fail::remove("durable::sync");
    assert!(vote.is_err(), "{vote:?}");
    assert_eq!(participant.calls.load(Ordering::SeqCst), 1);
    // ...and the record it left visible is never acted on or answered from.
    assert!(
        barrier
            .prepare(&participant, &branch, b"", "")
            .await
            .is_err()
    );
    let commit = barrier
        .commit(&participant, &branch, BranchMode::TwoPhase, &[], "")
        .await;
    assert!(commit.is_err(), "{commit:?}");
    assert!(barrier.abort(&participant, &branch).await.is_err());
    assert!(barrier.in_doubt(10).is_err());
    assert_eq!(participant.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_participant_whose_store_fails_stops_serving() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let serving = tokio::spawn(treaty_sdk::serve(
        Arc::new(Counting::default()),
        store.clone(),
        listener,
        Default::default(),
        std::future::pending(),
    ));
    fail_next_sync(&store).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), serving)
        .await
        .expect("serve stops by itself")
        .unwrap();
    assert!(
        matches!(ended, Err(ServeError::Store(StoreError::Failed(_)))),
        "{ended:?}"
    );
}

#[tokio::test]
async fn a_patient_write_waiting_for_a_sync_that_fails_is_failed_too() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let options = treaty_sdk::durable::StoreOptions {
        patient_sync_wait: treaty_sdk::durable::MAX_GROUP_COMMIT_HOLD,
        ..Default::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    let mut patient = store.write(batch(b"patient"), Durability::Patient);
    let early = tokio::time::timeout(Duration::from_millis(300), &mut patient).await;
    assert!(early.is_err(), "acknowledged before any sync");
    fail_next_sync(&store).await;
    let answer = tokio::time::timeout(Duration::from_secs(30), patient)
        .await
        .expect("answered once the sync failed");
    assert!(matches!(answer, Err(StoreError::Failed(_))), "{answer:?}");
}

/// Polls (at most 20 s) until `condition` holds.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..400 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("gave up after 20 s waiting for: {what}");
}

#[tokio::test]
async fn an_abandoned_compaction_gives_back_the_removals_it_started_from() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let options = StoreOptions {
        compaction: Some(CompactionPolicy {
            min_bytes: 1,
            growth_factor: 1,
            min_removed_records: 2,
            check_interval_ms: 50,
            retry_after_failure_ms: 500,
        }),
        compaction_observer: Some({
            let heard = heard.clone();
            Arc::new(move |result: &Result<CompactionReport, String>| {
                heard.lock().unwrap().push(result.clone());
            })
        }),
        ..StoreOptions::default()
    };
    // A store that already holds removed records (written without a policy), so that
    // its first removals under the policy are not taken as its base instead.
    let store = DurableStore::open(dir.path(), Default::default()).unwrap();
    let mut records = WriteBatch::new();
    for i in 0..2_000 {
        records.insert(format!("k{i:06}").into_bytes(), vec![1u8; 100]);
    }
    store.write(records, Durability::Forced).await.unwrap();
    let remove = |key: &str| {
        let mut removal = WriteBatch::new();
        removal.remove(key.as_bytes().to_vec());
        removal
    };
    store
        .write(remove("k001999"), Durability::Forced)
        .await
        .unwrap();
    store.close().unwrap();
    drop(store);

    // The two removals the policy asks for; the first copy step then fails.
    fail::cfg("durable::compaction_copy", "1*return").unwrap();
    let store = DurableStore::open(dir.path(), options).unwrap();
    for key in ["k000000", "k000001"] {
        store.write(remove(key), Durability::Forced).await.unwrap();
    }
    wait_for("the compaction to be abandoned", || {
        !heard.lock().unwrap().is_empty()
    })
    .await;
    fail::remove("durable::compaction_copy");
    assert!(
        !dir.path().join(POINTER_FILE).exists(),
        "the store is unchanged"
    );
    assert_eq!(store.db().iter().count(), 1_997);

    // No removal since: the two it started from count again, and once the pause is
    // over the next look compacts.
    wait_for("a compaction after the abandoned one", || {
        heard.lock().unwrap().len() == 2
    })
    .await;
    let heard = heard.lock().unwrap().clone();
    let abandoned = heard[0].as_ref().unwrap_err();
    assert!(abandoned.contains("injected copy failure"), "{abandoned}");
    let switched = heard[1].as_ref().unwrap();
    assert_eq!(switched.records, 1_997, "{switched:?}");
    assert!(dir.path().join(POINTER_FILE).exists());
    assert_eq!(store.db().iter().count(), 1_997);
}
