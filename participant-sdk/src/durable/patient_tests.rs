//! Tests of the durable store's patient and lazy writes: applied at once, acknowledged
//! with the next forced sync or when their wait is over, and written out while the store
//! is idle.

use super::tests::*;
use super::*;

/// A patient write waits up to a minute for a forced write to share its sync.
fn patient_a_minute() -> StoreOptions {
    StoreOptions {
        patient_sync_wait: MAX_GROUP_COMMIT_HOLD,
        ..StoreOptions::default()
    }
}

#[tokio::test]
async fn a_patient_write_is_applied_at_once_and_acknowledged_with_the_next_forced_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
    let counters = store.durability_counters();
    let mut patient = store.write(one_key(b"patient"), Durability::Patient);
    still_waiting(&mut patient, "a patient write with nothing after it").await;
    assert!(store.db().get(b"patient").unwrap().is_some(), "not applied");
    assert_eq!(counters.syncs(), 0);
    // A lazy write after it is applied and answered without a sync.
    acknowledged(
        store.write(one_key(b"lazy"), Durability::Lazy),
        "a lazy write behind a patient one",
    )
    .await;
    still_waiting(&mut patient, "after a lazy write").await;
    let forced = store.write(one_key(b"forced"), Durability::Forced);
    acknowledged(forced, "the forced write").await;
    acknowledged(patient, "the patient write, by the forced sync").await;
    assert_eq!((counters.syncs(), counters.forced_records()), (1, 2));
}

/// Writes three values of `durability`, one at a time, and checks that each is in
/// sled's log file within 200 ms while the store is idle, without a sync. Looked
/// for soon after each write, three times: sled's own flusher (every 500 ms) would
/// have to run in each of the three short windows to stand in for the write-behind.
async fn written_out_while_idle(
    store: &DurableStore,
    dir: &std::path::Path,
    durability: Durability,
) -> Vec<WriteTicket> {
    let in_log = |value: &[u8]| {
        let log = std::fs::read(dir.join(LOG_FILE_NAME)).unwrap();
        log.windows(value.len()).any(|window| window == value)
    };
    let mut tickets = Vec::new();
    for round in 0..3 {
        let value = format!("{durability:?} value {round} 5c1f0e").into_bytes();
        let mut batch = WriteBatch::new();
        batch.insert(format!("idle/{round}").into_bytes(), value.clone());
        tickets.push(store.write(batch, durability));
        let mut written = false;
        for _ in 0..200 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            if in_log(&value) {
                written = true;
                break;
            }
        }
        assert!(
            written,
            "{durability:?} write {round} is not in the log file while idle"
        );
    }
    assert_eq!(
        store.durability_counters().syncs(),
        0,
        "written, not synced"
    );
    tickets
}

#[tokio::test]
async fn a_patient_write_is_written_out_while_the_store_is_idle_before_its_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
    let mut tickets = written_out_while_idle(&store, dir.path(), Durability::Patient).await;
    still_waiting(&mut tickets[0], "written out is not durable").await;
    store.close().unwrap();
    for ticket in tickets {
        acknowledged(ticket, "a patient write, at close").await;
    }
}

#[tokio::test]
async fn a_lazy_write_is_written_out_while_the_store_is_idle() {
    // So that the next forced group does not first write the lazy write's page.
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), StoreOptions::default()).unwrap();
    let tickets = written_out_while_idle(&store, dir.path(), Durability::Lazy).await;
    for ticket in tickets {
        acknowledged(ticket, "a lazy write").await;
    }
    store.close().unwrap();
}

#[tokio::test]
async fn a_patient_write_alone_is_synced_once_its_wait_is_over_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (options, observed) = observing_sync_times(StoreOptions {
            patient_sync_wait: std::time::Duration::from_millis(20),
            ..StoreOptions::default()
        });
        let store = DurableStore::open(dir.path(), options).unwrap();
        let counters = store.durability_counters();
        acknowledged(
            store.write(one_key(b"patient"), Durability::Patient),
            "a patient write past its wait",
        )
        .await;
        assert_eq!((counters.syncs(), counters.forced_records()), (1, 1));
        // A patient sync's time is counted as a forced group's is.
        let seconds = counters.sync_seconds();
        assert!(seconds > 0.0);
        assert!(
            (seconds - *observed.lock().unwrap()).abs() < 1e-6,
            "{seconds}"
        );
        // Acknowledged groups are numbered: the mark names it, so losing it is damage.
        let summary = store.verify().unwrap();
        assert_eq!((summary.forced_groups, summary.acknowledged_groups), (1, 1));
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert!(store.db().get(b"patient").unwrap().is_some());
}

#[tokio::test]
async fn a_patient_write_is_synced_on_time_while_lazy_writes_keep_the_logger_busy() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        patient_sync_wait: std::time::Duration::from_millis(20),
        // One write per group: the queue below keeps the logger busy for a while.
        max_batch_records: 1,
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    let patient = store.write(one_key(b"patient"), Durability::Patient);
    let lazy: Vec<_> = (0..20_000u32)
        .map(|i| store.write(one_key(&i.to_be_bytes()), Durability::Lazy))
        .collect();
    acknowledged(patient, "the patient write, while lazy writes are queued").await;
    let unanswered = lazy
        .into_iter()
        .map(|mut ticket| futures::FutureExt::now_or_never(&mut ticket).is_none())
        .filter(|&waiting| waiting)
        .count();
    assert!(
        unanswered > 0,
        "the patient write waited until the queue of lazy writes was empty"
    );
}

#[tokio::test]
async fn close_syncs_the_patient_writes_waiting() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
        let mut patient = store.write(one_key(b"patient"), Durability::Patient);
        still_waiting(&mut patient, "before the close").await;
        store.close().unwrap();
        acknowledged(patient, "the patient write, at close").await;
    }
    let store = open(dir.path());
    assert!(store.db().get(b"patient").unwrap().is_some());
    let summary = store.verify().unwrap();
    assert_eq!((summary.forced_groups, summary.acknowledged_groups), (1, 1));
}

#[tokio::test]
async fn without_a_wait_a_patient_write_is_synced_as_a_forced_one() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        patient_sync_wait: std::time::Duration::ZERO,
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    acknowledged(
        store.write(one_key(b"patient"), Durability::Patient),
        "a patient write that may not wait",
    )
    .await;
    assert_eq!(store.durability_counters().syncs(), 1);
}

#[tokio::test]
async fn a_compaction_syncs_the_patient_writes_waiting_before_it_switches() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
        let mut patient = store.write(one_key(b"patient"), Durability::Patient);
        still_waiting(&mut patient, "before the compaction").await;
        store.compact().await.unwrap();
        acknowledged(patient, "the patient write, at the switch").await;
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert!(store.db().get(b"patient").unwrap().is_some());
    let summary = store.verify().unwrap();
    assert_eq!(summary.forced_groups, summary.acknowledged_groups);
}
