//! Tests of the store's compaction: what it keeps and gives back, writes and readers
//! during it, the policy (removals, the base) and crashes around the switch.

use super::tests::{contents, copy_tree, insert_batch, open, wait_for};
use super::*;

#[tokio::test]
async fn compaction_keeps_the_live_records_and_gives_back_the_space() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let value = vec![7u8; 200];
    for start in (0..20_000).step_by(2_000) {
        let batch = insert_batch(start..start + 2_000, &value);
        store.write(batch, Durability::Forced).await.unwrap();
    }
    let mut removals = WriteBatch::new();
    for i in (0..20_000).filter(|i| i % 20 != 0) {
        removals.remove(format!("k{i:06}").into_bytes());
    }
    store.write(removals, Durability::Forced).await.unwrap();
    let before = contents(&store);
    assert_eq!(before.len(), 1_000);
    let report = store.compact().await.unwrap();
    assert_eq!(report.generation, 1);
    assert_eq!(report.records, 1_000);
    assert!(
        report.bytes_after < report.bytes_before,
        "{report:?}: the copy is not smaller"
    );
    assert_eq!(contents(&store), before);
    assert_eq!(
        std::fs::read_to_string(dir.path().join(POINTER_FILE)).unwrap(),
        "gen-1\n"
    );
    // The old generation (the directory's own files) goes once sled let go of it.
    wait_for("the replaced generation is deleted", || {
        !dir.path().join(LOG_FILE_NAME).exists()
    });
    assert!(dir.path().join("gen-1").join(LOG_FILE_NAME).is_file());
    // Written after the switch, durable in the new generation.
    store
        .write(insert_batch(50_000..50_010, b"after"), Durability::Forced)
        .await
        .unwrap();
    let expected = contents(&store);
    store.close().unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(contents(&store), expected);
    let summary = store.verify().unwrap();
    assert_eq!(summary.records, 1_010);
    assert_eq!(summary.forced_groups, summary.acknowledged_groups);
    // The policy grows from the compacted size, also after a restart.
    assert_eq!(
        compaction::baseline_bytes(&store.generation().meta),
        report.bytes_after
    );
    // A second compaction replaces generation 1 with 2.
    assert_eq!(store.compact().await.unwrap().generation, 2);
    wait_for("generation 1 is deleted", || {
        !dir.path().join("gen-1").exists()
    });
    assert_eq!(contents(&store), expected);
}

#[tokio::test]
async fn the_compaction_observer_hears_compactions_that_ended_not_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
    let options = StoreOptions {
        compaction_observer: Some({
            let heard = heard.clone();
            Arc::new(move |result: &Result<CompactionReport, String>| {
                heard.lock().unwrap().push(result.clone());
            })
        }),
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    store
        .write(insert_batch(0..100, b"value"), Durability::Forced)
        .await
        .unwrap();
    let report = store.compact().await.unwrap();
    assert_eq!(report.records, 100);
    assert_eq!(*heard.lock().unwrap(), vec![Ok(report)]);
    // A tree written around the store: compaction refuses to start, and says why to
    // its caller; no compaction ended.
    store.db().open_tree("written around the store").unwrap();
    let refused = store.compact().await.unwrap_err();
    assert!(refused.contains("sled trees"), "{refused}");
    assert_eq!(*heard.lock().unwrap(), vec![Ok(report)]);
}

#[tokio::test]
async fn writes_during_compaction_reach_the_new_generation_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let mut expected = std::collections::BTreeMap::new();
    // Several copy steps' worth of records.
    let records = (COPY_CHUNK_RECORDS * 5) as u32;
    store
        .write(insert_batch(0..records, b"v0"), Durability::Forced)
        .await
        .unwrap();
    for i in 0..records {
        expected.insert(format!("k{i:06}").into_bytes(), b"v0".to_vec());
    }
    let compacting = {
        let store = store.clone();
        tokio::spawn(async move { store.compact().await })
    };
    // Overwrites, removals and new keys all over the key space, behind and ahead of
    // the copy, until the compaction is done (bounded: at most 2,000 rounds).
    let mut round = 0u32;
    while !compacting.is_finished() && round < 2_000 {
        let key = |i: u32| format!("k{:06}", i % (records + 500)).into_bytes();
        let mut batch = WriteBatch::new();
        let overwritten = key(round.wrapping_mul(7_919));
        let removed = key(round.wrapping_mul(104_729) + 13);
        let value = format!("v{round}").into_bytes();
        batch.insert(overwritten.clone(), value.clone());
        batch.remove(removed.clone());
        expected.insert(overwritten, value);
        expected.remove(&removed);
        // Patient writes too: synced by a forced group or by their own numbered
        // sync, whose number the rebuild must mirror.
        let durability = match round % 3 {
            0 => Durability::Forced,
            1 => Durability::Patient,
            _ => Durability::Lazy,
        };
        store.write(batch, durability).await.unwrap();
        round += 1;
    }
    let report = compacting.await.unwrap().unwrap();
    assert!(round > 0, "no write went in during the compaction");
    assert_eq!(report.generation, 1);
    assert_eq!(contents(&store), expected, "after {round} rounds of writes");
    store.close().unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(contents(&store), expected, "after reopening");
    let summary = store.verify().unwrap();
    assert_eq!(summary.forced_groups, summary.acknowledged_groups);
}

/// A record and its mark as the barrier writes them: `in_doubt` sets the mark and
/// says so in the value, which is what the seed below reads.
fn marked_record(key: &str, in_doubt: bool) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.insert(key.as_bytes().to_vec(), vec![u8::from(in_doubt)]);
    if in_doubt {
        batch.mark(key.as_bytes().to_vec());
    } else {
        batch.unmark(key.as_bytes().to_vec());
    }
    batch
}

/// The keys whose records `db` holds in doubt.
fn read_in_doubt(db: &sled::Db) -> Result<std::collections::BTreeSet<Vec<u8>>, StoreError> {
    let mut keys = std::collections::BTreeSet::new();
    for entry in db.iter() {
        let (key, value) = entry.map_err(|e| StoreError::Read(e.to_string()))?;
        if value.as_ref() == [1] {
            keys.insert(key.to_vec());
        }
    }
    Ok(keys)
}

#[test]
fn a_compaction_switch_while_the_first_listing_reads_loses_no_mark() {
    use futures::executor::block_on;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for (key, in_doubt) in [("a", true), ("b", true), ("c", false)] {
        block_on(store.write(marked_record(key, in_doubt), Durability::Forced)).unwrap();
    }
    let listed = store
        .marked(None, 10, |db| {
            // While the records are read, the logger goes on: a branch marked, then
            // the switch to a new generation, then a branch settled and another
            // marked that only the new generation holds.
            block_on(store.write(marked_record("x", true), Durability::Forced)).unwrap();
            block_on(store.compact()).unwrap();
            block_on(store.write(marked_record("b", false), Durability::Forced)).unwrap();
            block_on(store.write(marked_record("y", true), Durability::Forced)).unwrap();
            // The database read is the one current when the seed began: the
            // interleaving happened as intended.
            assert!(dir.path().join(POINTER_FILE).exists(), "no switch");
            assert_eq!(db.get(b"y").unwrap(), None);
            assert_eq!(db.get(b"b").unwrap().as_deref(), Some(&[1u8][..]));
            read_in_doubt(db)
        })
        .unwrap();
    let expected: Vec<Vec<u8>> = ["a", "x", "y"].map(|k| k.as_bytes().to_vec()).into();
    assert_eq!(listed, expected);
    // The new generation's records, read afresh after a reopen, agree.
    store.close().unwrap();
    drop(store);
    let reopened = open(dir.path());
    assert_eq!(reopened.marked(None, 10, read_in_doubt).unwrap(), expected);
}

/// Writes ten records and compacts the store while a reader holds the generation it
/// starts from; returns that reader's handle.
async fn compacted_while_a_reader_holds_the_old(store: &DurableStore) -> DbRef {
    store
        .write(insert_batch(0..10, b"v"), Durability::Forced)
        .await
        .unwrap();
    let held = store.db();
    store.compact().await.unwrap();
    held
}

#[tokio::test]
async fn a_reader_keeps_the_old_generation_until_it_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let held = compacted_while_a_reader_holds_the_old(&store).await;
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        dir.path().join(LOG_FILE_NAME).exists(),
        "deleted under a reader"
    );
    assert_eq!(held.get(b"k000003").unwrap().as_deref(), Some(&b"v"[..]));
    drop(held);
    wait_for("the replaced generation is deleted", || {
        !dir.path().join(LOG_FILE_NAME).exists()
    });
}

fn compacting_at_any_size(min_removed_records: u64) -> StoreOptions {
    StoreOptions {
        compaction: Some(CompactionPolicy {
            min_bytes: 1,
            growth_factor: 1,
            min_removed_records,
            check_interval_ms: 50,
            retry_after_failure_ms: 500,
        }),
        ..StoreOptions::default()
    }
}

/// Polls (at most 20 s) until the store has switched to a compacted generation.
fn wait_for_a_compaction(dir: &Path) {
    wait_for("a compaction", || dir.join(POINTER_FILE).exists());
}

/// Removes one record.
async fn remove_one(store: &DurableStore, key: &[u8]) {
    let mut removal = WriteBatch::new();
    removal.remove(key.to_vec());
    store.write(removal, Durability::Forced).await.unwrap();
}

/// Asserts that no compaction starts in 2 s: about 40 of the policy's looks at
/// `compacting_at_any_size`'s interval, each of which would compact on size alone.
async fn no_compaction_starts(dir: &Path, why: &str) {
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(!a_compaction_started(dir), "{why}");
}

#[tokio::test]
async fn the_store_compacts_itself_when_it_has_grown() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), compacting_at_any_size(0)).unwrap();
    store
        .write(insert_batch(0..5_000, &[1u8; 100]), Durability::Forced)
        .await
        .unwrap();
    wait_for_a_compaction(dir.path());
    assert_eq!(contents(&store).len(), 5_000);
}

/// Whether a compaction has started: its generation's directory is made first.
fn a_compaction_started(dir: &Path) -> bool {
    generations::dir_of(dir, 1).exists()
}

#[tokio::test]
async fn a_store_holding_removed_records_compacts_only_after_the_removals_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    // A removal with no policy, so that the store's size is not taken as a base at
    // its first removals under the policy below: it holds removed records already.
    let store = open(dir.path());
    store
        .write(insert_batch(0..5_000, &[1u8; 100]), Durability::Forced)
        .await
        .unwrap();
    remove_one(&store, b"k004999").await;
    store.close().unwrap();
    drop(store);
    let store = DurableStore::open(dir.path(), compacting_at_any_size(2)).unwrap();
    remove_one(&store, b"k000000").await;
    no_compaction_starts(
        dir.path(),
        "compacted after one removal of the two the policy asks for",
    )
    .await;
    remove_one(&store, b"k000001").await;
    wait_for_a_compaction(dir.path());
    assert_eq!(contents(&store).len(), 4_997);
}

#[tokio::test]
async fn a_store_created_empty_and_reopened_before_its_first_removal_takes_a_base() {
    let dir = tempfile::tempdir().unwrap();
    let crashed = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), compacting_at_any_size(1)).unwrap();
    store
        .write(insert_batch(0..5_000, &[1u8; 100]), Durability::Forced)
        .await
        .unwrap();
    // Its files as a crash now would leave them: not closed.
    copy_tree(dir.path(), crashed.path());
    drop(store);
    let store = DurableStore::open(crashed.path(), compacting_at_any_size(1)).unwrap();
    remove_one(&store, b"k000000").await;
    wait_for("a base taken", || {
        compaction::baseline_bytes(&store.generation().meta) > 0
    });
    no_compaction_starts(
        crashed.path(),
        "compacted at its first removal after a reopen",
    )
    .await;
    assert_eq!(contents(&store).len(), 4_999);
}

#[tokio::test]
async fn a_store_created_empty_takes_its_size_at_its_first_removal_as_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), compacting_at_any_size(1)).unwrap();
    let mut one_removal = insert_batch(0..5_000, &[1u8; 100]);
    one_removal.remove(b"k000000".to_vec());
    store.write(one_removal, Durability::Forced).await.unwrap();
    wait_for("a base taken", || {
        compaction::baseline_bytes(&store.generation().meta) > 0
    });
    let base = compaction::baseline_bytes(&store.generation().meta);
    let awaited = store.generation().meta.contains_key(BASE_AWAITED_KEY);
    assert!(
        !awaited.unwrap(),
        "still marked as awaiting the base it has"
    );
    // Many more of the policy's looks: the store is at its base, not past twice it.
    no_compaction_starts(dir.path(), "compacted at its first removal").await;
    // Opened again, it keeps the base: no compaction before twice it either.
    store.close().unwrap();
    drop(store);
    let store = DurableStore::open(dir.path(), compacting_at_any_size(1)).unwrap();
    assert_eq!(compaction::baseline_bytes(&store.generation().meta), base);
    remove_one(&store, b"k000001").await;
    no_compaction_starts(dir.path(), "compacted below twice its base after a reopen").await;
    // Past twice the base (the least growth factor).
    let mut written = 5_000;
    while store.size_on_disk_bytes().unwrap() <= 2 * base && written < 200_000 {
        store
            .write(
                insert_batch(written..written + 5_000, &[1u8; 100]),
                Durability::Forced,
            )
            .await
            .unwrap();
        written += 5_000;
    }
    assert!(store.size_on_disk_bytes().unwrap() > 2 * base);
    wait_for_a_compaction(dir.path());
    assert_eq!(contents(&store).len(), written as usize - 2);
}

#[test]
fn an_unfinished_rebuild_is_removed_and_the_old_generation_opened() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    futures::executor::block_on(store.write(insert_batch(0..10, b"v"), Durability::Forced))
        .unwrap();
    store.close().unwrap();
    drop(store);
    // What a crash in the middle of a copy leaves: a generation nobody names.
    let unfinished = dir.path().join("gen-1");
    std::fs::create_dir(&unfinished).unwrap();
    std::fs::write(unfinished.join(LOG_FILE_NAME), b"half a database").unwrap();
    let store = open(dir.path());
    assert_eq!(contents(&store).len(), 10);
    assert!(!unfinished.exists());
}

#[tokio::test]
async fn a_switch_survives_a_crash_before_the_old_generation_is_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let held = compacted_while_a_reader_holds_the_old(&store).await;
    // The disk as a crash now would leave it: both generations and the pointer.
    copy_tree(dir.path(), copy.path());
    drop(held);
    let reopened = open(copy.path());
    assert_eq!(contents(&reopened).len(), 10);
    assert!(
        !copy.path().join(LOG_FILE_NAME).exists(),
        "old generation kept"
    );
    drop(reopened);
    // Without its pointer the compacted store is damage, not a new empty store.
    std::fs::remove_file(copy.path().join(POINTER_FILE)).unwrap();
    assert!(matches!(
        DurableStore::open(copy.path(), StoreOptions::default()),
        Err(StoreError::Damaged { .. })
    ));
}
