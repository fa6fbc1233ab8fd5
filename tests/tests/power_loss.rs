//! Power loss: at random acknowledged writes, build what a power cut would leave of the
//! store's directory — only what was synced (files and blobs created or written since
//! their last sync removed, emptied or cut short; the log cut to its last synced length)
//! — reopen it, and check every acknowledged record, forced or patient (made durable by
//! a later forced write's sync or by its own). For record sizes of 1, 8, 16 and
//! 48 KiB (sled writes blob files from ~7.5 KiB on), for the SDK's store (the
//! participants' barrier) and for the coordinator's decision log.
//!
//! Not a timed test: each case is a fixed number of writes. `TREATY_POWER_SEED` replays.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use treaty_coordinator::log::{DecisionLog, SledLog};
use treaty_coordinator::model::{TxnId, TxnState};
use treaty_sdk::durable::{Durability, DurableStore, StoreOptions, WriteBatch};
use treaty_tests::harness::bare_record;
use treaty_tests::power_cut::DiskModel;

const RECORD_SIZES_KIB: [usize; 4] = [1, 8, 16, 48];
/// Forced writes per case; keys are reused, so nodes are rewritten as they would be.
const WRITES: usize = 48;
const KEYS: usize = 20;
/// Power cuts per case, at random acknowledged writes.
const CUTS: usize = 4;
/// Lazy writes applied (and pushed to the files by sled's own flush) after each cut
/// point and before the cut: what the power cut must be free to lose.
const UNSYNCED_WRITES: usize = 3;

fn seed() -> u64 {
    std::env::var("TREATY_POWER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

fn cut_points(rng: &mut StdRng) -> Vec<usize> {
    let mut points: Vec<usize> = (0..CUTS).map(|_| rng.random_range(1..=WRITES)).collect();
    points.sort_unstable();
    points.dedup();
    points
}

fn filled(i: usize, size: usize) -> Vec<u8> {
    let mut value = format!("write {i}:").into_bytes();
    value.resize(size, b'a' + (i % 26) as u8);
    value
}

fn observed(model: &DiskModel) -> StoreOptions {
    StoreOptions {
        sync_observer: Some(model.observer()),
        ..StoreOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_store_keeps_every_acknowledged_write_through_a_power_cut() {
    let seed = seed();
    println!("TREATY_POWER_SEED={seed}");
    let mut blob_files = 0;
    for size_kib in RECORD_SIZES_KIB {
        let mut rng = StdRng::seed_from_u64(seed ^ size_kib as u64);
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("store");
        let model = DiskModel::new();
        let store = DurableStore::open(&live, observed(&model)).unwrap();
        let points = cut_points(&mut rng);
        let mut acknowledged = BTreeMap::new();
        // Patient writes waiting for a later forced write's sync, in call order.
        let mut waiting = Vec::new();
        for i in 1..=WRITES {
            let key = format!("rec/{:02}", rng.random_range(0..KEYS)).into_bytes();
            let value = filled(i, size_kib * 1024);
            let mut batch = WriteBatch::new();
            batch.insert(key.clone(), value.clone());
            let durability = if rng.random_bool(0.3) {
                Durability::Patient
            } else {
                Durability::Forced
            };
            waiting.push((store.write(batch, durability), key, value));
            let cut_here = points.contains(&i);
            if durability == Durability::Patient && !cut_here && i < WRITES {
                continue;
            }
            // A patient write at a cut point gets a sync of its own after its wait.
            for (ticket, key, value) in waiting.drain(..) {
                ticket.await.unwrap();
                acknowledged.insert(key, value);
            }
            if !cut_here {
                continue;
            }
            for j in 0..UNSYNCED_WRITES {
                let mut batch = WriteBatch::new();
                batch.insert(format!("lazy/{i}/{j}"), filled(i + j, size_kib * 1024));
                store.write(batch, Durability::Lazy).await.unwrap();
            }
            store.db().flush().unwrap();
            let image = dir.path().join(format!("cut-{i}"));
            let cut = model.cut(&live, &image, &mut rng);
            blob_files += std::fs::read_dir(live.join("blobs")).map_or(0, |d| d.count());
            let reopened =
                DurableStore::open(&image, StoreOptions::default()).unwrap_or_else(|e| {
                    panic!("seed {seed}, {size_kib} KiB, cut at write {i}: {e}; cut: {cut:?}")
                });
            for (key, value) in &acknowledged {
                let read = reopened.db().get(key).unwrap();
                assert!(
                    read.as_deref() == Some(value.as_slice()),
                    "seed {seed}, {size_kib} KiB, cut at write {i}: acknowledged {} is {}; cut: {cut:?}",
                    String::from_utf8_lossy(key),
                    if read.is_some() {
                        "different"
                    } else {
                        "missing"
                    },
                );
            }
            reopened.close().unwrap();
        }
        store.close().unwrap();
    }
    // The larger sizes must have exercised sled's blob files, or the test proves little.
    assert!(blob_files > 0, "no blob file was ever written");
}

fn open_log(dir: &Path, options: StoreOptions) -> SledLog {
    SledLog::open_with(dir, options).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_log_keeps_every_acknowledged_decision_through_a_power_cut() {
    let seed = seed();
    println!("TREATY_POWER_SEED={seed}");
    for size_kib in RECORD_SIZES_KIB {
        let mut rng = StdRng::seed_from_u64(seed ^ ((size_kib as u64) << 8));
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("log");
        let model = DiskModel::new();
        let log = open_log(&live, observed(&model));
        let points = cut_points(&mut rng);
        let ids: Vec<TxnId> = (0..KEYS)
            .map(|k| TxnId::generate(1_700_000_000_000 + k as u64))
            .collect();
        let mut acknowledged: BTreeMap<TxnId, TxnState> = BTreeMap::new();
        for i in 1..=WRITES {
            let id = ids[rng.random_range(0..KEYS)];
            // A commit decision first, its end later: the records the log really holds.
            let state = match acknowledged.get(&id) {
                None => TxnState::Committing,
                Some(_) => TxnState::Committed,
            };
            let record = bare_record(id, state, size_kib * 1024 - 200);
            log.write(&record, Durability::Forced).await.unwrap();
            acknowledged.insert(id, state);
            if !points.contains(&i) {
                continue;
            }
            let lazy = TxnId::generate(1_800_000_000_000 + i as u64);
            let record = bare_record(lazy, TxnState::Aborted, size_kib * 1024);
            log.write(&record, Durability::Lazy).await.unwrap();
            log.store().db().flush().unwrap();
            let image = dir.path().join(format!("cut-{i}"));
            let cut = model.cut(&live, &image, &mut rng);
            let reopened = open_log(&image, StoreOptions::default());
            for (id, state) in &acknowledged {
                let read = reopened.get(id).unwrap().map(|r| r.state);
                assert_eq!(
                    read,
                    Some(*state),
                    "seed {seed}, {size_kib} KiB, cut at write {i}: decision of {id}; cut: {cut:?}"
                );
            }
            reopened.close().unwrap();
        }
        log.close().unwrap();
    }
}

/// Compaction copies the store into a new generation and switches to it by renaming a
/// pointer file: a power cut just after a switch (with the old generation still on disk,
/// as a reader holds it) or after later writes must lose nothing acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_store_keeps_every_acknowledged_write_through_a_power_cut() {
    let seed = seed();
    println!("TREATY_POWER_SEED={seed}");
    for size_kib in [1, 16] {
        let mut rng = StdRng::seed_from_u64(seed ^ ((size_kib as u64) << 16));
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("store");
        let model = DiskModel::new();
        let store = DurableStore::open(&live, observed(&model)).unwrap();
        let compact_at = [WRITES / 3, 2 * WRITES / 3];
        let mut points = cut_points(&mut rng);
        points.extend(compact_at);
        let mut acknowledged = BTreeMap::new();
        for i in 1..=WRITES {
            let key = format!("rec/{:02}", rng.random_range(0..KEYS)).into_bytes();
            let value = filled(i, size_kib * 1024);
            let mut batch = WriteBatch::new();
            batch.insert(key.clone(), value.clone());
            // Removals too, so that the copy has less to carry than the original.
            let removed = format!("rec/{:02}", rng.random_range(0..KEYS)).into_bytes();
            if removed != key {
                batch.remove(removed.clone());
                acknowledged.remove(&removed);
            }
            store.write(batch, Durability::Forced).await.unwrap();
            acknowledged.insert(key, value);
            let compacted = compact_at.contains(&i);
            // Held through the cut, so that the image has both generations.
            let held = compacted.then(|| store.db());
            if compacted {
                store.compact().await.unwrap();
            }
            if !points.contains(&i) {
                continue;
            }
            let mut batch = WriteBatch::new();
            batch.insert(format!("lazy/{i}"), filled(i, size_kib * 1024));
            store.write(batch, Durability::Lazy).await.unwrap();
            store.db().flush().unwrap();
            let image = dir.path().join(format!("cut-{i}"));
            let cut = model.cut(&live, &image, &mut rng);
            let reopened =
                DurableStore::open(&image, StoreOptions::default()).unwrap_or_else(|e| {
                    panic!("seed {seed}, {size_kib} KiB, cut at write {i}: {e}; cut: {cut:?}")
                });
            let read = treaty_tests::power_cut::contents(&reopened);
            for (key, value) in &acknowledged {
                assert!(
                    read.get(key) == Some(value),
                    "seed {seed}, {size_kib} KiB, cut at write {i}: acknowledged {} lost; cut: {cut:?}",
                    String::from_utf8_lossy(key),
                );
            }
            reopened.close().unwrap();
            if let Some(held) = held {
                // Let the old generation go, and wait until it is deleted: the next cut
                // copies the directory, which must not change meanwhile.
                drop(held);
                let old = if i == compact_at[0] {
                    live.join(treaty_sdk::durable::LOG_FILE_NAME)
                } else {
                    live.join("gen-1")
                };
                let mut waited = 0;
                while old.exists() && waited < 400 {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    waited += 1;
                }
                assert!(!old.exists(), "the replaced generation was never deleted");
            }
        }
        assert_eq!(
            std::fs::read_to_string(live.join(treaty_sdk::durable::POINTER_FILE)).unwrap(),
            "gen-2\n"
        );
        store.close().unwrap();
    }
}
