//! Tests of the durable store: writes and their order, group commit and its hold,
//! patient and lazy writes, the high-water mark and sled's files. The compaction's are
//! in `compaction_tests.rs`; the helpers both use are here.

use super::*;

pub(super) fn open(dir: &Path) -> DurableStore {
    DurableStore::open(dir, StoreOptions::default()).unwrap()
}

#[tokio::test]
async fn forced_write_is_readable_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let mut batch = WriteBatch::new();
        batch.insert(b"k1".to_vec(), b"v1".to_vec());
        store.write(batch, Durability::Forced).await.unwrap();
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.db().get(b"k1").unwrap().as_deref(), Some(&b"v1"[..]));
}

#[tokio::test]
async fn writes_apply_in_call_order_within_and_across_groups() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut tickets = Vec::new();
    for i in 0..200u32 {
        let mut batch = WriteBatch::new();
        batch.insert(b"counter".to_vec(), i.to_be_bytes().to_vec());
        let durability = if i % 7 == 0 {
            Durability::Forced
        } else {
            Durability::Lazy
        };
        tickets.push(store.write(batch, durability));
    }
    for ticket in tickets {
        ticket.await.unwrap();
    }
    let last = store.db().get(b"counter").unwrap().unwrap();
    assert_eq!(last.as_ref(), &199u32.to_be_bytes());
}

/// Options whose group observer adds up the sync times it is told of.
fn observing_sync_times(options: StoreOptions) -> (StoreOptions, Arc<Mutex<f64>>) {
    let seconds = Arc::new(Mutex::new(0.0));
    let sum = seconds.clone();
    let observer: GroupObserver = Arc::new(move |group: GroupCommitted| {
        *sum.lock().unwrap() += group.sync_seconds.unwrap_or(0.0);
    });
    let options = StoreOptions {
        group_observer: Some(observer),
        ..options
    };
    (options, seconds)
}

#[tokio::test]
async fn forced_groups_their_records_and_sync_time_are_counted_lazy_ones_not() {
    let dir = tempfile::tempdir().unwrap();
    let (options, observed) = observing_sync_times(StoreOptions::default());
    let store = DurableStore::open(dir.path(), options).unwrap();
    let counters = store.durability_counters();
    let mut lazy = WriteBatch::new();
    lazy.insert(b"lazy".to_vec(), b"1".to_vec());
    store.write(lazy, Durability::Lazy).await.unwrap();
    assert_eq!((counters.syncs(), counters.forced_records()), (0, 0));
    assert_eq!(counters.sync_seconds(), 0.0);
    let mut forced = WriteBatch::new();
    forced.insert(b"a".to_vec(), b"1".to_vec());
    forced.insert(b"b".to_vec(), b"2".to_vec());
    store.write(forced, Durability::Forced).await.unwrap();
    assert_eq!((counters.syncs(), counters.forced_records()), (1, 2));
    // The time counted is the sync's, as the group's observer is told it.
    let seconds = counters.sync_seconds();
    assert!(seconds > 0.0);
    assert!(
        (seconds - *observed.lock().unwrap()).abs() < 1e-6,
        "{seconds}"
    );
}

fn one_key(key: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.insert(key.to_vec(), b"1".to_vec());
    batch
}

/// Holds a forced write for up to a minute (the longest hold) once the previous
/// forced group had `after_writes` forced writes: long enough that only company, a
/// full group or a close ends a hold within the tests' patience.
fn holding_a_minute(after_writes: usize, max_batch_records: usize) -> StoreOptions {
    StoreOptions {
        group_commit_hold: MAX_GROUP_COMMIT_HOLD,
        group_commit_hold_after_writes: after_writes,
        max_batch_records,
        ..StoreOptions::default()
    }
}

const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for `ticket` (failing with `what` if it takes longer than the tests'
/// patience) and for the write to have succeeded.
async fn acknowledged(ticket: WriteTicket, what: &str) {
    tokio::time::timeout(PATIENCE, ticket)
        .await
        .unwrap_or_else(|_| panic!("not acknowledged in time: {what}"))
        .unwrap();
}

/// Fails if `ticket` resolves within 300 ms: it must still wait for its sync.
async fn still_waiting(ticket: &mut WriteTicket, what: &str) {
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), ticket).await;
    assert!(early.is_err(), "acknowledged too early: {what}");
}

#[tokio::test]
async fn under_load_a_forced_write_waits_to_share_its_sync_with_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), holding_a_minute(1, 2)).unwrap();
    let counters = store.durability_counters();
    // No forced group before it: not held.
    acknowledged(
        store.write(one_key(b"first"), Durability::Forced),
        "a write after no load is not held",
    )
    .await;
    let mut held = store.write(one_key(b"held"), Durability::Forced);
    still_waiting(&mut held, "a held write before its company came").await;
    assert_eq!(counters.syncs(), 1);
    // The second write fills the group (max_batch_records 2): one sync for both.
    let company = store.write(one_key(b"company"), Durability::Forced);
    acknowledged(held, "the held write").await;
    acknowledged(company, "its company").await;
    assert_eq!((counters.syncs(), counters.forced_records()), (2, 3));
}

#[tokio::test]
async fn with_more_holds_a_forced_write_waits_longer_after_a_larger_group() {
    let hold = std::time::Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        group_commit_hold: hold,
        group_commit_hold_after_writes: 1,
        group_commit_max_holds: 4,
        max_batch_records: 3,
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    let counters = store.durability_counters();
    acknowledged(
        store.write(one_key(b"first"), Durability::Forced),
        "a write after no load is not held",
    )
    .await;
    // Held one hold after a group of one, until three fill the group.
    let group: Vec<_> = [&b"a"[..], b"b", b"c"]
        .into_iter()
        .map(|key| store.write(one_key(key), Durability::Forced))
        .collect();
    for ticket in group {
        acknowledged(ticket, "a full group").await;
    }
    assert_eq!((counters.syncs(), counters.forced_records()), (2, 4));
    // After a group of three: three holds, so still waiting after one.
    let mut held = store.write(one_key(b"held"), Durability::Forced);
    tokio::time::sleep(hold).await;
    still_waiting(&mut held, "a write held after a group of three").await;
    let company: Vec<_> = [&b"d"[..], b"e"]
        .into_iter()
        .map(|key| store.write(one_key(key), Durability::Forced))
        .collect();
    acknowledged(held, "the held write").await;
    for ticket in company {
        acknowledged(ticket, "its company").await;
    }
    assert_eq!((counters.syncs(), counters.forced_records()), (3, 7));
}

#[test]
fn the_hold_grows_with_the_last_group_up_to_its_cap() {
    let hold = std::time::Duration::from_micros(500);
    let cases = [
        (0, None),
        (7, None),
        (8, Some(hold)),
        (15, Some(hold)),
        (16, Some(hold * 2)),
        (31, Some(hold * 3)),
        (32, Some(hold * 4)),
        (10_000, Some(hold * 4)),
    ];
    for (last_forced_writes, expected) in cases {
        assert_eq!(
            logger::hold_after(hold, 8, 4, last_forced_writes),
            expected,
            "after a group of {last_forced_writes}"
        );
    }
    // One hold by default, however large the group.
    let default_holds = DEFAULT_GROUP_COMMIT_MAX_HOLDS;
    assert_eq!(
        logger::hold_after(hold, 8, default_holds, 10_000),
        Some(hold)
    );
    assert_eq!(logger::hold_after(hold, 0, 4, 0), Some(hold));
    assert_eq!(
        logger::hold_after(std::time::Duration::ZERO, 8, 4, 100),
        None
    );
    assert_eq!(
        logger::hold_after(MAX_GROUP_COMMIT_HOLD, 1, 4, 4),
        Some(MAX_GROUP_COMMIT_HOLD)
    );
}

#[tokio::test]
async fn an_idle_spell_longer_than_the_hold_ends_the_load_across_timed_wake_ups() {
    // The idle spell runs from the last group, not from the logger's last wake-up:
    // the mark's sync (due a second after the mark was last synced, at open) wakes
    // the logger inside it. The observer shows that wake-up came.
    let hold = std::time::Duration::from_secs(4);
    let dir = tempfile::tempdir().unwrap();
    let mark_synced_at = Arc::new(Mutex::new(Vec::new()));
    let noted = mark_synced_at.clone();
    let options = StoreOptions {
        group_commit_hold: hold,
        group_commit_hold_after_writes: 1,
        sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
            if paths
                .iter()
                .any(|p| p.path.ends_with(high_water::FILE_NAME))
            {
                noted.lock().unwrap().push(std::time::Instant::now());
            }
        })),
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    acknowledged(
        store.write(one_key(b"first"), Durability::Forced),
        "a write after no load is not held",
    )
    .await;
    let acknowledged_at = std::time::Instant::now();
    tokio::time::sleep(hold + std::time::Duration::from_millis(500)).await;
    let woken = mark_synced_at.lock().unwrap().iter().any(|at| {
        at.checked_duration_since(acknowledged_at)
            .is_some_and(|after| after >= std::time::Duration::from_millis(100))
    });
    assert!(
        woken,
        "no timed wake-up (the mark's sync) inside the idle spell"
    );
    // Held, it would wait out the whole hold: nothing else comes.
    let after_idle = store.write(one_key(b"after idle"), Durability::Forced);
    tokio::time::timeout(hold - std::time::Duration::from_secs(1), after_idle)
        .await
        .expect("a forced write after an idle spell longer than the hold was held")
        .unwrap();
}

#[tokio::test]
async fn a_lone_writer_is_never_held() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), holding_a_minute(2, 4096)).unwrap();
    for key in [&b"a"[..], b"b", b"c"] {
        acknowledged(
            store.write(one_key(key), Durability::Forced),
            "one write at a time is not held",
        )
        .await;
    }
    assert_eq!(store.durability_counters().syncs(), 3);
}

#[tokio::test]
async fn lazy_writes_in_a_forced_group_do_not_count_as_load() {
    let dir = tempfile::tempdir().unwrap();
    let store = DurableStore::open(dir.path(), holding_a_minute(2, 4096)).unwrap();
    let mut tickets: Vec<_> = (0..7u8)
        .map(|i| store.write(one_key(&[b'l', i]), Durability::Lazy))
        .collect();
    tickets.push(store.write(one_key(b"forced"), Durability::Forced));
    for ticket in tickets {
        acknowledged(ticket, "a write of the group").await;
    }
    acknowledged(
        store.write(one_key(b"next"), Durability::Forced),
        "one forced write per group is no load",
    )
    .await;
}

#[tokio::test]
async fn a_group_full_by_its_bytes_is_not_held() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        max_batch_bytes: 1024,
        ..holding_a_minute(1, 4096)
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    store
        .write(one_key(b"first"), Durability::Forced)
        .await
        .unwrap();
    let mut full = WriteBatch::new();
    full.insert(b"full".to_vec(), vec![7; 1024]);
    acknowledged(
        store.write(full, Durability::Forced),
        "a full group has nobody to wait for",
    )
    .await;
}

#[tokio::test]
async fn close_ends_a_hold_and_makes_the_held_write_durable() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = DurableStore::open(dir.path(), holding_a_minute(1, 4096)).unwrap();
        store
            .write(one_key(b"first"), Durability::Forced)
            .await
            .unwrap();
        let mut held = store.write(one_key(b"held"), Durability::Forced);
        still_waiting(&mut held, "a held write with nobody to share its sync").await;
        store.close().unwrap();
        acknowledged(held, "the held write, at close").await;
    }
    let store = open(dir.path());
    assert!(store.db().get(b"held").unwrap().is_some());
}

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

#[tokio::test]
async fn remove_deletes_and_close_rejects_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut batch = WriteBatch::new();
    batch.insert(b"a".to_vec(), b"1".to_vec());
    batch.remove(b"a".to_vec());
    store.write(batch, Durability::Forced).await.unwrap();
    assert!(store.db().get(b"a").unwrap().is_none());
    store.close().unwrap();
    let mut batch = WriteBatch::new();
    batch.insert(b"b".to_vec(), b"2".to_vec());
    assert_eq!(
        store.write(batch, Durability::Forced).await,
        Err(StoreError::Closed)
    );
}

#[test]
fn opening_waits_briefly_for_a_handle_being_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path());
    let path = dir.path().to_path_buf();
    let letting_go = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(first);
    });
    // Held for 300 ms, then released: the second open waits for it.
    let second = DurableStore::open(&path, StoreOptions::default());
    letting_go.join().unwrap();
    assert!(second.is_ok(), "{:?}", second.err());
}

pub(super) fn insert_batch(range: std::ops::Range<u32>, value: &[u8]) -> WriteBatch {
    let mut batch = WriteBatch::new();
    for i in range {
        batch.insert(format!("k{i:06}").into_bytes(), value.to_vec());
    }
    batch
}

pub(super) fn contents(store: &DurableStore) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    store
        .db()
        .iter()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            (key.to_vec(), value.to_vec())
        })
        .collect()
}

/// Polls `condition` every 50 ms for up to 20 s.
pub(super) fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..400 {
        if condition() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("gave up after 20 s waiting for: {what}");
}

/// The mark is written with each forced group (what a kill -9 leaves holds the last
/// one) but synced on its own only within a second, not once per group.
#[tokio::test]
async fn the_mark_is_noted_with_each_forced_group_and_synced_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mark_syncs = Arc::new(Mutex::new(0usize));
    let counted = mark_syncs.clone();
    let options = StoreOptions {
        sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
            let mark = paths
                .iter()
                .filter(|synced| synced.path.ends_with(high_water::FILE_NAME));
            *counted.lock().unwrap() += mark.count();
        })),
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    let at_open = *mark_syncs.lock().unwrap();
    for i in 0..5u32 {
        let ticket = store.write(insert_batch(i..i + 1, b"v"), Durability::Forced);
        ticket.await.unwrap();
    }
    assert_eq!(high_water::read(dir.path()).unwrap(), Mark::At(5));
    wait_for("the mark's own sync", || {
        *mark_syncs.lock().unwrap() > at_open
    });
    // One sync per forced group would be five (a slow machine may take two).
    assert!(
        *mark_syncs.lock().unwrap() < at_open + 5,
        "the mark was synced with every forced group"
    );
    store.close().unwrap();
}

/// sled's flusher fsyncs its log on its own (every 500 ms), so after a power cut the
/// log may hold lazy groups whose blob files were never synced by a forced group;
/// sled skips such a record and reads on. Each group's new files are synced before
/// the next group is written, so a log that survived holds its groups whole.
#[tokio::test]
async fn a_lazy_groups_blob_files_are_synced_before_the_next_group() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let synced = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let noted = synced.clone();
    let options = StoreOptions {
        sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
            let mut noted = noted.lock().unwrap();
            noted.extend(paths.iter().map(|synced| synced.path.clone()));
        })),
        ..StoreOptions::default()
    };
    let store = DurableStore::open(&live, options).unwrap();
    for i in 0..12u32 {
        let value = vec![b'a' + (i % 26) as u8; 40 * 1024];
        let ticket = store.write(insert_batch(i % 4..i % 4 + 1, &value), Durability::Lazy);
        ticket.await.unwrap();
    }
    let ticket = store.write(insert_batch(100..101, b"small"), Durability::Lazy);
    ticket.await.unwrap();
    let expected = contents(&store);
    // As sled's flusher would: the log as written reaches the disk.
    store.db().flush().unwrap();
    let copy = dir.path().join("copy");
    copy_tree(&live, &copy);
    let synced = synced.lock().unwrap().clone();
    store.close().unwrap();
    let mut lost = 0;
    for entry in std::fs::read_dir(copy.join("blobs")).unwrap() {
        let entry = entry.unwrap();
        if !synced.contains(&live.join("blobs").join(entry.file_name())) {
            std::fs::remove_file(entry.path()).unwrap();
            lost += 1;
        }
    }
    let reopened = DurableStore::open(&copy, StoreOptions::default()).unwrap();
    assert_eq!(
        contents(&reopened),
        expected,
        "{lost} blob files were never synced"
    );
}

/// sled writes its buffers without syncing them (third_party/sled/TREATY-PATCHES.md),
/// so it syncs what it wrote wherever it relies on it being on disk: before it
/// overwrites a freed segment, removes replaced blob files, or opens a segment whose
/// header vouches for what came before, and at open before it snapshots what it
/// recovered. Rewriting a few large values over and over makes it do each: a leaf
/// of them is a blob, replaced whenever sled consolidates it, and the log reuses
/// its segments. (It checks that each kind of sync happened, not when: the order
/// rests on third_party/sled/TREATY-PATCHES.md.)
#[tokio::test]
async fn sled_syncs_what_it_wrote_before_it_relies_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let value_bytes = 40 * 1024;
    let rounds = 240u32;
    for i in 0..rounds {
        let value = vec![b'a' + (i % 26) as u8; value_bytes];
        let ticket = store.write(insert_batch(i % 4..i % 4 + 1, &value), Durability::Lazy);
        ticket.await.unwrap();
    }
    let ticket = store.write(insert_batch(100..101, b"small"), Durability::Forced);
    ticket.await.unwrap();
    let expected = contents(&store);
    let written_bytes = u64::from(rounds) * value_bytes as u64;
    let log_bytes = log_file_bytes(dir.path());
    assert!(
        log_bytes < written_bytes,
        "the log ({log_bytes} bytes) should reuse its segments for {written_bytes} bytes of \
         rewritten values"
    );
    let syncs = store.db().order_syncs();
    assert!(syncs.segment_reused > 0, "{syncs:?}");
    assert!(syncs.segment_header > 0, "{syncs:?}");
    assert!(syncs.blobs_removed > 0, "{syncs:?}");
    store.close().unwrap();
    drop(store);
    let reopened = open(dir.path());
    assert_eq!(reopened.db().order_syncs().recovered, 1);
    assert_eq!(contents(&reopened), expected);
}

/// sled's default segment size, which the store keeps.
const SLED_SEGMENT_BYTES: u64 = 512 * 1024;

fn log_file_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG_FILE_NAME)).unwrap().len()
}

/// The vendored sled fills a segment it adds at the log's end when it adds it
/// (third_party/sled/TREATY-PATCHES.md), so a forced write's `fdatasync` flushes
/// data into blocks the file already has rather than committing a new length each
/// time: a new log grows by whole segments.
#[tokio::test]
async fn the_log_grows_by_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let value = vec![b'v'; 900];
    let mut lengths = std::collections::BTreeSet::new();
    for i in 0..1_500u32 {
        let ticket = store.write(insert_batch(i..i + 1, &value), Durability::Forced);
        ticket.await.unwrap();
        // sled's flusher thread may be filling the next segment right now, and a
        // reader sees the file grow page by page during that write: look again.
        let mut bytes = log_file_bytes(dir.path());
        for _ in 0..100 {
            if bytes % SLED_SEGMENT_BYTES == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            bytes = log_file_bytes(dir.path());
        }
        lengths.insert(bytes);
    }
    assert!(
        lengths.len() > 2,
        "the writes should span several segments: {lengths:?}"
    );
    let unaligned: Vec<u64> = lengths
        .iter()
        .copied()
        .filter(|bytes| bytes % SLED_SEGMENT_BYTES != 0)
        .collect();
    assert!(
        unaligned.is_empty(),
        "log lengths that are not whole segments: {unaligned:?}"
    );
}

/// A kill -9 between the fill of a new segment and its first write leaves a segment
/// of zeros at the log's end. sled reads zeros as a corrupted message, as in any
/// unwritten part of a segment, and a segment without a valid header as free: the
/// open recovers every record and the store keeps writing.
#[tokio::test]
async fn a_segment_of_zeros_at_the_end_of_the_log_is_recovered_as_free() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(insert_batch(0..300, &[b'a'; 300]), Durability::Forced)
        .await
        .unwrap();
    let expected = contents(&store);
    store.close().unwrap();
    drop(store);
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(LOG_FILE_NAME))
        .unwrap();
    let length = log.metadata().unwrap().len();
    log.set_len(length.next_multiple_of(SLED_SEGMENT_BYTES) + SLED_SEGMENT_BYTES)
        .unwrap();
    log.sync_all().unwrap();
    drop(log);

    let reopened = open(dir.path());
    assert_eq!(contents(&reopened), expected);
    reopened
        .write(insert_batch(300..600, &[b'b'; 300]), Durability::Forced)
        .await
        .unwrap();
    let expected = contents(&reopened);
    assert_eq!(expected.len(), 600);
    reopened.close().unwrap();
    drop(reopened);
    assert_eq!(contents(&open(dir.path())), expected);
}

pub(super) fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn unfinished_snapshot_files_are_removed_before_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let leftover = dir.path().join("snap.00000000000000FF.generating");
    std::fs::write(&leftover, b"partial").unwrap();
    let store = open(dir.path());
    assert!(!leftover.exists());
    store.close().unwrap();
}
