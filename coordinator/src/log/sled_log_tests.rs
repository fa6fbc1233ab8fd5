//! Tests of the sled decision log: the conformance suite every log passes, and what only
//! its layout can show (records kept below sled's blob threshold, the unfinished index
//! and the final count, compaction, damaged records), in real directories; and the
//! record's encoding and older formats.

use super::super::suite::{self, LogHarness};
use super::*;

struct SledHarness {
    dir: tempfile::TempDir,
}

impl LogHarness for SledHarness {
    fn open(&mut self) -> Arc<dyn DecisionLog> {
        Arc::new(SledLog::open(self.dir.path()).unwrap())
    }

    fn reopen(&mut self, previous: Arc<dyn DecisionLog>) -> Arc<dyn DecisionLog> {
        previous.close().unwrap();
        // sled releases its file lock when the last handle is dropped.
        assert_eq!(
            Arc::strong_count(&previous),
            1,
            "the test still holds the log"
        );
        drop(previous);
        self.open()
    }
}

fn harness() -> SledHarness {
    SledHarness {
        dir: tempfile::tempdir().unwrap(),
    }
}

suite::decision_log_suite!(harness);

#[tokio::test]
async fn records_are_kept_below_the_blob_threshold_by_trimming_history() {
    use crate::model::{AttemptLog, BranchRecord, BranchState, Operation, TxnState};
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let mut record = suite::record(1_700_000_000_000, TxnState::Committing);
    record.branches = (0..32)
        .map(|i| {
            let mut history = AttemptLog::default();
            for attempt in 0..16 {
                let call = history.start(Operation::Commit, attempt);
                history.finish(call, &[Operation::Commit], "e".repeat(1024), attempt + 1);
            }
            BranchRecord {
                id: format!("branch-{i}"),
                endpoint: format!("http://participant-{i}.example:7000"),
                payload: Vec::new(),
                state: BranchState::Prepared,
                attempts: 16,
                compensation_attempts: 0,
                last_error: Some("x".repeat(1024)),
                history,
                heuristic: None,
                resolution: None,
                awaits_operator: false,
            }
        })
        .collect();
    assert!(encode(&record).len() > 400 * 1024);
    log.write(&record, Durability::Forced).await.unwrap();
    let stored = log
        .store
        .db()
        .get(key(RECORD, &record.id))
        .unwrap()
        .unwrap();
    assert!(stored.len() <= MAX_RECORD_BYTES, "{}", stored.len());
    let read = log.get(&record.id).unwrap().unwrap();
    // The protocol's fields are intact; only history went.
    assert_eq!(read.state, record.state);
    assert_eq!(read.branches.len(), 32);
    assert!(
        read.branches
            .iter()
            .all(|b| b.state == BranchState::Prepared)
    );
}

/// Opens a log at `dir` that adds up the records (keys written or removed) of its
/// group commits in `records`.
fn counting_log(dir: &Path, records: &Arc<std::sync::atomic::AtomicUsize>) -> SledLog {
    let records = records.clone();
    let observer: treaty_sdk::durable::GroupObserver = Arc::new(move |group| {
        records.fetch_add(group.records, std::sync::atomic::Ordering::SeqCst);
    });
    let options = StoreOptions {
        group_observer: Some(observer),
        ..StoreOptions::default()
    };
    SledLog::open_with(dir, options).unwrap()
}

#[tokio::test]
async fn an_unfinished_record_is_written_without_an_index_and_found_by_recovery() {
    use crate::model::TxnState;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let records = Arc::new(AtomicUsize::new(0));
    let log = counting_log(dir.path(), &records);
    let mut saga = suite::record(1_700_000_000_000, TxnState::Running);
    saga.kind = crate::model::TxnKind::Saga;
    saga.idempotency_key = Some("order-17".into());
    let mut written = Vec::new();
    for _ in 0..3 {
        log.write(&saga, Durability::Forced).await.unwrap();
        written.push(records.swap(0, SeqCst));
    }
    // The record and `k/`, each time.
    assert_eq!(written, [2, 2, 2]);

    // Reopened: recovery finds it among the records, and its key finds it.
    drop(log);
    let log = counting_log(dir.path(), &records);
    let unfinished: Vec<TxnId> = log.unfinished().unwrap().iter().map(|r| r.id).collect();
    assert_eq!(unfinished, [saga.id]);
    assert_eq!(log.find_by_key("order-17").unwrap(), Some(saga.id));
    log.write(&saga, Durability::Forced).await.unwrap();
    assert_eq!(records.swap(0, SeqCst), 2);

    // Final: the record, its `h/` entry (held: it has a key) and `k/`.
    saga.state = TxnState::Completed;
    saga.ended_unix_ms = Some(1_700_000_000_100);
    log.write(&saga, Durability::Forced).await.unwrap();
    assert_eq!(records.swap(0, SeqCst), 3);
    assert!(log.unfinished().unwrap().is_empty());
    assert_eq!(log.find_by_key("order-17").unwrap(), Some(saga.id));
}

#[tokio::test]
async fn a_key_removed_by_the_forget_of_an_earlier_saga_is_written_again() {
    use crate::model::TxnState;
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let mut earlier = suite::record(1_700_000_000_000, TxnState::Completed);
    earlier.idempotency_key = Some("order-17".into());
    log.write(&earlier, Durability::Forced).await.unwrap();
    // The earlier saga left the log (retention) and a new one took its key; an
    // operator's forget of the earlier one, read before, lands after that.
    let mut later = suite::record(1_700_000_000_100, TxnState::Running);
    later.idempotency_key = Some("order-17".into());
    log.write(&later, Durability::Forced).await.unwrap();
    log.forget(&earlier).await.unwrap();
    assert_eq!(log.find_by_key("order-17").unwrap(), None);
    // The new saga's next write puts its key back.
    log.write(&later, Durability::Forced).await.unwrap();
    assert_eq!(log.find_by_key("order-17").unwrap(), Some(later.id));
}

#[tokio::test]
async fn a_compacted_log_holds_the_same_records_and_indexes() {
    use crate::model::TxnState;
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let states = [
        TxnState::Committing,
        TxnState::Committed,
        TxnState::Compensating,
    ];
    for i in 0..3_000u64 {
        let mut record = suite::record(1_700_000_000_000 + i, states[i as usize % 3]);
        record.ended_unix_ms = record.state.is_final().then_some(1_700_000_000_000 + i);
        record.idempotency_key = (i % 10 == 0).then(|| format!("key-{i}"));
        log.write(&record, Durability::Lazy).await.unwrap();
    }
    let purged = log.purge_ended_before(1_700_000_001_500, 10_000).unwrap();
    assert_eq!(purged, 500);
    let everything = |log: &SledLog| log.scan(None, 10_000).unwrap();
    let before = everything(&log);
    let unfinished = log.unfinished().unwrap();
    assert_eq!(before.len(), 2_500);
    let report = log.store().compact().await.unwrap();
    assert_eq!(report.generation, 1);
    let same = |log: &SledLog| {
        assert_eq!(everything(log), before);
        assert_eq!(log.unfinished().unwrap(), unfinished);
        assert!(log.find_by_key("key-2990").unwrap().is_some());
    };
    same(&log);
    log.close().unwrap();
    drop(log);
    let log = SledLog::open(dir.path()).unwrap();
    same(&log);
    // Retention still finds what ended, oldest first: i in 1501..2000, i % 3 == 1.
    assert_eq!(
        log.purge_ended_before(1_700_000_002_000, 10_000).unwrap(),
        167
    );
}

#[tokio::test]
async fn a_final_record_written_twice_at_once_is_counted_once() {
    use crate::model::TxnState;
    let mut harness = harness();
    let log = harness.open();
    let mut done = suite::record(1_700_000_000_000, TxnState::Committed);
    done.ended_unix_ms = Some(1_700_000_000_100);
    // As an operator's resolve that ends a logged 2PC does (its lazy end record,
    // then the resolve's forced write): both issued before either is applied.
    let first = log.write(&done, Durability::Lazy);
    let second = log.write(&done, Durability::Forced);
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(log.finished_count(), 1);
    // Once applied, written again.
    log.write(&done, Durability::Lazy).await.unwrap();
    assert_eq!(log.finished_count(), 1);
    assert_eq!(log.purge_finished_beyond(0, 10).unwrap(), 1);
    assert_eq!(log.finished_count(), 0);
    // Written again after its purge: counted again.
    log.write(&done, Durability::Lazy).await.unwrap();
    assert_eq!(log.finished_count(), 1);
    let log = harness.reopen(log);
    assert_eq!(log.finished_count(), 1, "counted exactly at open");
}

#[tokio::test]
async fn a_record_written_unfinished_then_final_is_counted_once() {
    use crate::model::TxnState;
    let mut harness = harness();
    let log = harness.open();
    // A 2PC's decision, then its end: the end's `e/` entry is counted without a read
    // of the store (the record was unfinished in this process).
    let deciding = suite::record(1_700_000_000_000, TxnState::Committing);
    log.write(&deciding, Durability::Forced).await.unwrap();
    let mut done = deciding.clone();
    done.state = TxnState::Committed;
    done.ended_unix_ms = Some(1_700_000_000_100);
    log.write(&done, Durability::Lazy).await.unwrap();
    assert_eq!(log.finished_count(), 1);
    assert!(log.unfinished().unwrap().is_empty());
    // Written final again: found among the keys counted lately, not counted twice.
    log.write(&done, Durability::Forced).await.unwrap();
    assert_eq!(log.finished_count(), 1);
    let log = harness.reopen(log);
    assert_eq!(log.finished_count(), 1, "counted exactly at open");
}

#[tokio::test]
async fn a_count_left_high_by_a_forget_comes_down_when_the_entries_run_out() {
    use crate::model::TxnState;
    let mut harness = harness();
    let log = harness.open();
    let mut records = Vec::new();
    for i in 0..3 {
        let mut done = suite::record(1_700_000_000_000 + i, TxnState::Committed);
        done.ended_unix_ms = Some(1_700_000_000_100 + i);
        log.write(&done, Durability::Forced).await.unwrap();
        records.push(done);
    }
    log.forget(&records[2]).await.unwrap();
    assert_eq!(log.finished_count(), 3, "a forgotten record stays counted");
    // A purge given no room (a retention purge took the whole batch) changes nothing.
    assert_eq!(log.purge_finished_beyond(1, 0).unwrap(), 0);
    assert_eq!(log.finished_count(), 3);
    // Keep 1: deletes the two oldest (one early, for the forgotten one), and the
    // count, high, stays above what is left until the entries run out.
    assert_eq!(log.purge_finished_beyond(1, 10).unwrap(), 2);
    assert_eq!(log.finished_count(), 1);
    assert_eq!(log.purge_finished_beyond(0, 10).unwrap(), 0);
    assert_eq!(
        log.finished_count(),
        0,
        "nothing left, and nothing written since"
    );
}

/// Writes `batch` into the log at `dir` as it is, as an earlier version wrote its
/// keys, and closes it.
async fn written_as_before(dir: &Path, batch: WriteBatch) {
    let earlier = SledLog::open(dir).unwrap();
    earlier
        .store()
        .write(batch, Durability::Forced)
        .await
        .unwrap();
    earlier.close().unwrap();
}

#[tokio::test]
async fn a_held_record_indexed_before_there_were_held_entries_is_kept_by_the_count() {
    use crate::model::TxnState;
    let dir = tempfile::tempdir().unwrap();
    let mut saga = suite::record(1_700_000_000_000, TxnState::Completed);
    saga.idempotency_key = Some("order-1".into());
    saga.ended_unix_ms = Some(1_700_000_000_100);
    // As an earlier version wrote it: under `e/`.
    let mut batch = WriteBatch::new();
    batch.insert(key(RECORD, &saga.id), encode(&saga));
    batch.insert(ended_key(ENDED, 1_700_000_000_100, &saga.id), Vec::new());
    batch.insert(idempotency_key("order-1"), saga.id.as_bytes().to_vec());
    written_as_before(dir.path(), batch).await;
    let sled_log = SledLog::open(dir.path()).unwrap();
    assert_eq!(sled_log.finished_count(), 1);
    assert_eq!(sled_log.purge_finished_beyond(0, 10).unwrap(), 0);
    assert_eq!(sled_log.finished_count(), 0);
    assert_eq!(sled_log.find_by_key("order-1").unwrap(), Some(saga.id));
    // Now under `h/`: the retention purges it.
    assert_eq!(
        sled_log.purge_ended_before(1_700_000_001_000, 10).unwrap(),
        1
    );
    assert_eq!(sled_log.find_by_key("order-1").unwrap(), None);
}

#[tokio::test]
async fn an_older_versions_index_of_unfinished_records_is_removed_at_open() {
    use crate::model::TxnState;
    let dir = tempfile::tempdir().unwrap();
    let deciding = suite::record(1_700_000_000_000, TxnState::Committing);
    let mut done = suite::record(1_700_000_000_001, TxnState::Committed);
    done.ended_unix_ms = Some(1_700_000_000_100);
    // As an older version wrote them: `u/` beside the unfinished record, and a
    // stray one beside a final record (every `u/` entry goes, whatever its record).
    let mut batch = WriteBatch::new();
    for record in [&deciding, &done] {
        batch.insert(key(RECORD, &record.id), encode(record));
        batch.insert(key(OLD_UNFINISHED, &record.id), Vec::new());
    }
    written_as_before(dir.path(), batch).await;
    let log = SledLog::open(dir.path()).unwrap();
    assert_eq!(log.unfinished().unwrap(), vec![deciding]);
    // The open waited for the removal to be applied.
    assert_eq!(log.store().db().scan_prefix([OLD_UNFINISHED]).count(), 0);
}

#[test]
fn a_corrupt_record_is_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let id = TxnId::generate(1_700_000_000_000);
    let mut batch = WriteBatch::new();
    batch.insert(key(RECORD, &id), vec![FORMAT_VERSION, 0xff, 0xff]);
    futures::executor::block_on(log.store.write(batch, Durability::Forced)).unwrap();
    assert!(matches!(log.unfinished(), Err(LogError::Corrupt { .. })));
    assert!(matches!(log.get(&id), Err(LogError::Corrupt { .. })));
}

/// A record with an owner, and on its branch a heuristic answer and an operator's
/// resolution with `outcome`.
fn noted(state: TxnState, outcome: crate::model::Resolution, reason: &str) -> TxnRecord {
    let mut record = suite::record(1_700_000_000_000, state);
    record.owner = Some("alice".into());
    record.branches[0].heuristic = Some("answered Aborted to a commit".into());
    record.branches[0].resolution = Some(OperatorResolution {
        outcome,
        by: "ops".into(),
        at_unix_ms: 1_700_000_000_500,
        reason: reason.into(),
    });
    record
}

/// Format 3 as it was defined: the record, its owner and a `Vec<BranchNotes>`, each
/// as postcard writes it on its own, one after another.
fn encoded_in_three_parts(record: &TxnRecord) -> Vec<u8> {
    let notes: Vec<BranchNotes> = record
        .branches
        .iter()
        .map(|b| (b.heuristic.clone(), b.resolution.clone()))
        .collect();
    let mut bytes = vec![FORMAT_WITHOUT_PAYLOADS];
    bytes.extend(postcard::to_allocvec(record).unwrap());
    bytes.extend(postcard::to_allocvec(&record.owner).unwrap());
    bytes.extend(postcard::to_allocvec(&notes).unwrap());
    bytes
}

/// Format 4 as it is defined: format 3's parts, then a `Vec<Vec<u8>>` of payloads;
/// format 3 for a record without payloads.
fn encoded_in_parts(record: &TxnRecord) -> Vec<u8> {
    let mut bytes = encoded_in_three_parts(record);
    if record.branches.iter().all(|b| b.payload.is_empty()) {
        return bytes;
    }
    bytes[0] = FORMAT_VERSION;
    let payloads: Vec<Vec<u8>> = record.branches.iter().map(|b| b.payload.clone()).collect();
    bytes.extend(postcard::to_allocvec(&payloads).unwrap());
    bytes
}

/// The same bytes as format 4's four parts (format 3's three without payloads), and
/// the record back from them: with and without an owner, branches, notes or
/// payloads, a saga's definition, and at every length from well below the buffer's
/// first size to well above it.
#[test]
fn a_record_is_encoded_as_its_parts_one_after_another() {
    use crate::model::{Resolution, SagaDefinition, TxnState};
    let check = |record: &TxnRecord| {
        let encoded = encode(record);
        assert_eq!(encoded, encoded_in_parts(record));
        assert_eq!(&decode(b"k", &encoded).unwrap(), record);
        encoded.len()
    };
    let plain = suite::record(1_700_000_000_000, TxnState::Compensating);
    check(&plain);
    assert_eq!(encode(&plain)[0], FORMAT_WITHOUT_PAYLOADS);
    let no_branches = TxnRecord {
        branches: Vec::new(),
        ..plain
    };
    check(&no_branches);
    let mut record = noted(TxnState::Compensating, Resolution::Abort, "undone by hand");
    let mut second = record.branches[0].clone();
    second.id = "shipping".into();
    second.heuristic = None;
    second.resolution = None;
    record.branches.push(second);
    record.saga = Some(Arc::new(SagaDefinition {
        steps: Vec::new(),
        stuck_after_attempts: 3,
    }));
    record.idempotency_key = Some("order-17".into());
    record.branches[0].payload = b"reserve 2 units".to_vec();
    let mut lengths = Vec::new();
    for error_bytes in 0..=2 * ENCODE_CAPACITY_BYTES {
        record.branches[1].last_error = Some("x".repeat(error_bytes));
        lengths.push(check(&record));
    }
    assert!(lengths[0] < ENCODE_CAPACITY_BYTES && lengths.contains(&ENCODE_CAPACITY_BYTES));
    assert!(lengths.iter().any(|&n| n > 2 * ENCODE_CAPACITY_BYTES));
}

#[test]
fn owners_and_branch_notes_round_trip_and_older_formats_still_decode() {
    use crate::model::{Resolution, TxnState};
    let record = noted(
        TxnState::Committing,
        Resolution::Commit,
        "re-applied by hand",
    );
    let key = key(RECORD, &record.id);
    assert_eq!(decode(&key, &encode(&record)).unwrap(), record);
    // Version 3: no payloads (the record's is empty, as every one then was).
    let v3 = encoded_in_three_parts(&record);
    assert_eq!(decode(&key, &v3).unwrap(), record);
    let mut with_payload = record.clone();
    with_payload.branches[0].payload = vec![7; 300];
    let intent = encode(&with_payload);
    assert_eq!(intent[0], FORMAT_VERSION);
    assert_eq!(decode(&key, &intent).unwrap(), with_payload);
    // Version 2: the record and its owner, no branch notes.
    let mut v2 = vec![FORMAT_WITHOUT_BRANCH_NOTES];
    v2.extend(postcard::to_allocvec(&record).unwrap());
    v2.extend(postcard::to_allocvec(&record.owner).unwrap());
    let decoded = decode(&key, &v2).unwrap();
    assert_eq!(decoded.owner.as_deref(), Some("alice"));
    assert_eq!(decoded.branches[0].resolution, None);
    // A record written before owners existed: the record alone, version 1.
    let mut old = vec![FORMAT_WITHOUT_OWNER];
    old.extend(postcard::to_allocvec(&record).unwrap());
    let decoded = decode(&key, &old).unwrap();
    assert_eq!(decoded.owner, None);
    assert_eq!(decoded.state, record.state);
    // Recovery tells an unfinished record by its first fields, in every format.
    for bytes in [encode(&record), v3, v2, old] {
        assert!(!is_final(&key, &bytes).unwrap());
    }
    let mut done = record.clone();
    done.state = TxnState::Committed;
    assert!(is_final(&key, &encode(&done)).unwrap());
    assert!(matches!(
        is_final(&key, &[FORMAT_VERSION, 0xff]),
        Err(LogError::Corrupt { .. })
    ));
    assert!(matches!(
        is_final(&key, &[9]),
        Err(LogError::Corrupt { .. })
    ));
    // A record cut short is damage, not a record without owner or notes.
    let mut cut = encode(&record);
    cut.truncate(cut.len() - 3);
    assert!(matches!(decode(&key, &cut), Err(LogError::Corrupt { .. })));
}

/// A list reads the log within a byte budget: 2,000 records of up to 96 KiB were read
/// whole by each call. It stops before the budget is passed (the first record always
/// read) and says whether records may be left after the last one read.
#[tokio::test]
async fn a_bounded_scan_stops_at_its_bytes_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = SledLog::open(dir.path()).unwrap();
    let mut written = Vec::new();
    for i in 0..5 {
        let mut r = suite::record(1_700_000_000_000 + i * 1000, TxnState::Committing);
        r.branches[0].payload = vec![7; 10 * 1024];
        log.write(&r, Durability::Forced).await.unwrap();
        written.push(r);
    }
    written.sort_by_key(|r| r.id);
    let (all, stopped_early) = log.scan_bounded(None, 5, usize::MAX).unwrap();
    assert_eq!((all.len(), stopped_early), (5, false));
    let (limited, stopped_early) = log.scan_bounded(None, 4, usize::MAX).unwrap();
    assert_eq!((limited.len(), stopped_early), (4, true));
    // Each record takes a little over 10 KiB: 25 KiB holds two.
    let (two, stopped_early) = log.scan_bounded(None, 100, 25 * 1024).unwrap();
    assert_eq!(two, written[..2].to_vec());
    assert!(stopped_early);
    let (rest, stopped_early) = log.scan_bounded(Some(two[1].id), 100, 1 << 20).unwrap();
    assert_eq!(rest, written[2..].to_vec());
    assert!(!stopped_early);
    // A budget below one record still reads one.
    let (one, stopped_early) = log.scan_bounded(None, 100, 1).unwrap();
    assert_eq!((one.len(), stopped_early), (1, true));
}
