//! Tests of the durable store: writes and their order, group commit and its hold,
//! removal and opening. Patient and lazy writes are in `patient_tests.rs`, the
//! high-water mark and sled's files in `file_tests.rs`, the compaction in
//! `compaction_tests.rs`; the helpers they share are here.

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
        // Counted queued in the same order, and never applied before it is queued.
        let progress = store.write_progress();
        assert_eq!(progress.queued(), u64::from(i) + 1);
        assert!(progress.applied() <= progress.queued());
    }
    for ticket in tickets {
        ticket.await.unwrap();
    }
    let last = store.db().get(b"counter").unwrap().unwrap();
    assert_eq!(last.as_ref(), &199u32.to_be_bytes());
    assert_eq!(store.write_progress().applied(), 200);
}

/// Options whose group observer adds up the sync times it is told of.
pub(super) fn observing_sync_times(options: StoreOptions) -> (StoreOptions, Arc<Mutex<f64>>) {
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

pub(super) fn one_key(key: &[u8]) -> WriteBatch {
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
pub(super) async fn acknowledged(ticket: WriteTicket, what: &str) {
    tokio::time::timeout(PATIENCE, ticket)
        .await
        .unwrap_or_else(|_| panic!("not acknowledged in time: {what}"))
        .unwrap();
}

/// Fails if `ticket` resolves within 300 ms: it must still wait for its sync.
pub(super) async fn still_waiting(ticket: &mut WriteTicket, what: &str) {
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

/// Lazy writes after a forced group do not keep the load going: a forced write more than
/// a hold after the last forced group is not held, however many lazy groups came since
/// (each of them once restarted the idle spell, so that write waited out the hold).
#[tokio::test]
async fn lazy_writes_do_not_keep_a_hold_going() {
    let hold = std::time::Duration::from_secs(4);
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        group_commit_hold: hold,
        group_commit_hold_after_writes: 1,
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    acknowledged(
        store.write(one_key(b"forced"), Durability::Forced),
        "a write after no load is not held",
    )
    .await;
    // Lazy writes, each its own group, for longer than the hold.
    let lazy_until = std::time::Instant::now() + hold + std::time::Duration::from_millis(500);
    let mut lazy = 0u32;
    while std::time::Instant::now() < lazy_until {
        acknowledged(
            store.write(one_key(&lazy.to_be_bytes()), Durability::Lazy),
            "a lazy write",
        )
        .await;
        lazy += 1;
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(lazy >= 10, "{lazy} lazy writes");
    // Held, it would wait out the whole hold: no other forced write comes.
    let after = store.write(one_key(b"after"), Durability::Forced);
    tokio::time::timeout(hold - std::time::Duration::from_secs(1), after)
        .await
        .expect("a forced write after lazy writes alone was held")
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
