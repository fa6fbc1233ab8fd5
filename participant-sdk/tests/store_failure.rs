//! A failed durable write fails its waiters and every write after it: nothing is
//! acknowledged once the store cannot promise durability. (Its own test binary: the
//! failpoint registry is process-wide.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::durable::{Durability, DurableStore, StoreError, WriteBatch};

fn batch(key: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.insert(key.to_vec(), b"v".to_vec());
    batch
}

#[tokio::test]
async fn after_a_failed_sync_the_store_refuses_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), Default::default()).unwrap();
    store
        .write(batch(b"before"), Durability::Forced)
        .await
        .unwrap();

    fail::cfg("durable::sync", "return").unwrap();
    let failed = store.write(batch(b"during"), Durability::Forced).await;
    fail::remove("durable::sync");
    assert!(matches!(failed, Err(StoreError::Failed(_))), "{failed:?}");
    assert!(store.failure().is_some());

    // Failed for good, lazy writes included, even though syncing would work again.
    for durability in [Durability::Forced, Durability::Lazy] {
        let later = store.write(batch(b"after"), durability).await;
        assert!(matches!(later, Err(StoreError::Failed(_))), "{later:?}");
    }
    assert!(store.db().get(b"after").unwrap().is_none());
    assert!(store.close().is_err());
}
