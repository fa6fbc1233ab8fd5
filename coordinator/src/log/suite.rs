//! The one test suite every [`DecisionLog`] implementation must pass, reopen included.
//! Each implementation instantiates it with `decision_log_suite!(make_harness)`.

use std::sync::Arc;

use super::{DecisionLog, Durability, held_for_retention};
use crate::model::{
    BranchRecord, BranchState, OperatorResolution, Resolution, Transition, TxnId, TxnKind,
    TxnRecord, TxnState, UnixMs,
};

/// Opens the log under test, and reopens its storage as a restarted coordinator would.
pub trait LogHarness {
    fn open(&mut self) -> Arc<dyn DecisionLog>;

    /// Closes and drops `previous` (the caller's last handle), then opens the same storage.
    fn reopen(&mut self, previous: Arc<dyn DecisionLog>) -> Arc<dyn DecisionLog>;
}

const T0: UnixMs = 1_700_000_000_000;

pub fn record(created: UnixMs, state: TxnState) -> TxnRecord {
    TxnRecord {
        id: TxnId::generate(created),
        kind: TxnKind::TwoPhase,
        state,
        created_unix_ms: created,
        deadline_unix_ms: created + 60_000,
        prepare_timeout_ms: 5_000,
        reason: None,
        branches: vec![BranchRecord {
            id: "payment".into(),
            endpoint: "http://127.0.0.1:7001".into(),
            payload: Vec::new(),
            state: BranchState::Prepared,
            attempts: 1,
            compensation_attempts: 0,
            last_error: None,
            history: Default::default(),
            heuristic: None,
            resolution: None,
            awaits_operator: false,
        }],
        transitions: vec![Transition {
            state,
            at_unix_ms: created,
            reason: String::new(),
        }],
        ended_unix_ms: state.is_final().then_some(created + 10),
        idempotency_key: None,
        stuck: false,
        saga: None,
        owner: None,
        paused: false,
    }
}

fn ended(mut record: TxnRecord, at: UnixMs) -> TxnRecord {
    record.state = TxnState::Committed;
    record.ended_unix_ms = Some(at);
    record.branches[0].state = BranchState::Committed;
    record
}

pub async fn forced_write_survives_reopen(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let decision = record(T0, TxnState::Committing);
    log.write(&decision, Durability::Forced).await.unwrap();
    assert_eq!(log.get(&decision.id).unwrap(), Some(decision.clone()));

    let log = harness.reopen(log);
    assert_eq!(log.get(&decision.id).unwrap(), Some(decision.clone()));
    assert_eq!(log.unfinished().unwrap(), vec![decision]);
}

pub async fn lazy_end_replaces_the_decision_and_leaves_unfinished(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let decision = record(T0, TxnState::Committing);
    let other = record(T0 + 1, TxnState::Committing);
    log.write(&decision, Durability::Forced).await.unwrap();
    log.write(&other, Durability::Forced).await.unwrap();
    let end = ended(decision.clone(), T0 + 50);
    // Issued in order; the lazy end must land after the forced decision.
    let first = log.write(&decision, Durability::Forced);
    let second = log.write(&end, Durability::Lazy);
    second.await.unwrap();
    first.await.unwrap();

    let log = harness.reopen(log);
    assert_eq!(log.get(&decision.id).unwrap(), Some(end));
    assert_eq!(log.unfinished().unwrap(), vec![other]);
}

pub async fn unknown_ids_are_absent(harness: &mut dyn LogHarness) {
    let log = harness.open();
    assert_eq!(log.get(&TxnId::generate(T0)).unwrap(), None);
    assert!(log.unfinished().unwrap().is_empty());
    assert!(log.scan(None, 10).unwrap().is_empty());
}

pub async fn scan_pages_in_id_order(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let mut written = Vec::new();
    for i in (0..7).rev() {
        let r = record(T0 + i * 1000, TxnState::Committing);
        log.write(&r, Durability::Forced).await.unwrap();
        written.push(r);
    }
    written.sort_by_key(|r| r.id);
    let log = harness.reopen(log);
    let first = log.scan(None, 3).unwrap();
    assert_eq!(first, written[..3].to_vec());
    let second = log.scan(Some(first[2].id), 3).unwrap();
    assert_eq!(second, written[3..6].to_vec());
    let last = log.scan(Some(second[2].id), 3).unwrap();
    assert_eq!(last, written[6..].to_vec());
    assert!(log.scan(Some(last[0].id), 3).unwrap().is_empty());
}

pub async fn purge_removes_only_old_final_records(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let old_a = ended(record(T0, TxnState::Committing), T0 + 100);
    let old_b = ended(record(T0 + 1, TxnState::Committing), T0 + 200);
    let recent = ended(record(T0 + 2, TxnState::Committing), T0 + 10_000);
    let unfinished = record(T0 + 3, TxnState::Committing);
    for r in [&old_a, &old_b, &recent, &unfinished] {
        log.write(r, Durability::Forced).await.unwrap();
    }
    assert_eq!(log.purge_ended_before(T0 + 5_000, 1).unwrap(), 1);
    assert_eq!(log.get(&old_a.id).unwrap(), None);
    assert!(log.get(&old_b.id).unwrap().is_some());
    assert_eq!(log.purge_ended_before(T0 + 5_000, 10).unwrap(), 1);
    assert_eq!(log.purge_ended_before(T0 + 5_000, 10).unwrap(), 0);

    let log = harness.reopen(log);
    assert_eq!(log.get(&old_b.id).unwrap(), None);
    assert_eq!(log.get(&recent.id).unwrap(), Some(recent));
    assert_eq!(log.unfinished().unwrap(), vec![unfinished]);
}

pub async fn purge_by_count_keeps_the_newest_final_records(harness: &mut dyn LogHarness) {
    let log = harness.open();
    // Ids in one order, ends in the reverse one: the oldest end goes first.
    let finished: Vec<TxnRecord> = (0..6)
        .map(|i| ended(record(T0 + i, TxnState::Committing), T0 + 10_000 - i * 100))
        .collect();
    let unfinished = record(T0 + 10, TxnState::Committing);
    for r in finished.iter().chain([&unfinished]) {
        log.write(r, Durability::Forced).await.unwrap();
    }
    // Written again once applied: still one final record.
    log.write(&finished[0], Durability::Lazy).await.unwrap();
    assert_eq!(log.finished_count(), 6);
    assert_eq!(log.purge_finished_beyond(4, 1).unwrap(), 1);
    assert_eq!(log.get(&finished[5].id).unwrap(), None);
    assert_eq!(log.purge_finished_beyond(4, 10).unwrap(), 1);
    assert_eq!(log.get(&finished[4].id).unwrap(), None);
    assert_eq!(log.purge_finished_beyond(4, 10).unwrap(), 0);
    assert_eq!(log.finished_count(), 4);

    let log = harness.reopen(log);
    assert_eq!(log.finished_count(), 4);
    for r in &finished[..4] {
        assert_eq!(log.get(&r.id).unwrap().as_ref(), Some(r));
    }
    assert_eq!(log.unfinished().unwrap(), vec![unfinished]);
    assert_eq!(log.purge_finished_beyond(0, 10).unwrap(), 4);
    assert_eq!(log.finished_count(), 0);
    assert_eq!(log.scan(None, 10).unwrap().len(), 1);
}

pub async fn purge_by_count_leaves_what_someone_may_still_ask_for(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let mut keyed = ended(record(T0, TxnState::Running), T0 + 100);
    keyed.kind = TxnKind::Saga;
    keyed.state = TxnState::Completed;
    keyed.idempotency_key = Some("order-9".into());
    let mut resolved = ended(record(T0 + 1, TxnState::Committing), T0 + 200);
    resolved.branches[0].resolution = Some(OperatorResolution {
        outcome: Resolution::Commit,
        by: "ops".into(),
        at_unix_ms: T0 + 150,
        reason: "applied by hand".into(),
    });
    let mut heuristic = ended(record(T0 + 3, TxnState::Committing), T0 + 250);
    heuristic.branches[0].heuristic = Some("rolled back on its own".into());
    let plain = ended(record(T0 + 2, TxnState::Committing), T0 + 300);
    for r in [&keyed, &resolved, &heuristic, &plain] {
        log.write(r, Durability::Forced).await.unwrap();
    }
    assert!(
        [&keyed, &resolved, &heuristic]
            .iter()
            .all(|r| held_for_retention(r))
    );
    assert_eq!(log.finished_count(), 1, "held records are not counted");
    assert_eq!(log.purge_finished_beyond(0, 10).unwrap(), 1);
    assert_eq!(log.get(&plain.id).unwrap(), None);
    let log = harness.reopen(log);
    assert_eq!(log.finished_count(), 0);
    assert_eq!(log.get(&resolved.id).unwrap(), Some(resolved));
    assert_eq!(log.get(&heuristic.id).unwrap(), Some(heuristic));
    assert_eq!(log.find_by_key("order-9").unwrap(), Some(keyed.id));
    // The retention still ends them.
    assert_eq!(log.purge_ended_before(T0 + 1_000, 10).unwrap(), 3);
    assert_eq!(log.find_by_key("order-9").unwrap(), None);
    assert!(log.scan(None, 10).unwrap().is_empty());
}

pub async fn concurrent_forced_writes_are_all_durable(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let records: Vec<_> = (0..200)
        .map(|i| record(T0 + i, TxnState::Committing))
        .collect();
    let mut tasks = Vec::new();
    for r in records.clone() {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.write(&r, Durability::Forced).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let log = harness.reopen(log);
    let mut expected = records;
    expected.sort_by_key(|r| r.id);
    assert_eq!(log.unfinished().unwrap(), expected);
}

pub async fn idempotency_keys_find_their_saga_until_purged(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let mut saga = record(T0, TxnState::Running);
    saga.kind = TxnKind::Saga;
    saga.idempotency_key = Some("order-42".into());
    log.write(&saga, Durability::Forced).await.unwrap();
    assert_eq!(log.find_by_key("order-42").unwrap(), Some(saga.id));
    assert_eq!(log.find_by_key("order-43").unwrap(), None);

    let log = harness.reopen(log);
    assert_eq!(log.find_by_key("order-42").unwrap(), Some(saga.id));
    let mut done = saga.clone();
    done.state = TxnState::Completed;
    done.ended_unix_ms = Some(T0 + 100);
    log.write(&done, Durability::Forced).await.unwrap();
    assert_eq!(log.purge_ended_before(T0 + 1_000, 10).unwrap(), 1);
    assert_eq!(log.find_by_key("order-42").unwrap(), None);
}

pub async fn forget_removes_a_record_and_its_key_for_good(harness: &mut dyn LogHarness) {
    let log = harness.open();
    let mut saga = ended(record(T0, TxnState::Running), T0 + 100);
    saga.kind = TxnKind::Saga;
    saga.state = TxnState::Completed;
    saga.idempotency_key = Some("order-7".into());
    let other = ended(record(T0 + 1, TxnState::Committing), T0 + 100);
    for r in [&saga, &other] {
        log.write(r, Durability::Forced).await.unwrap();
    }
    log.forget(&saga).await.unwrap();
    // Forgetting what is not there is done already.
    log.forget(&saga).await.unwrap();
    let log = harness.reopen(log);
    assert_eq!(log.get(&saga.id).unwrap(), None);
    assert_eq!(log.find_by_key("order-7").unwrap(), None);
    assert_eq!(log.get(&other.id).unwrap(), Some(other.clone()));
    assert_eq!(log.finished_count(), 1);
    // Its retention entry went with it: only the other one is purged.
    assert_eq!(log.purge_ended_before(T0 + 1_000, 10).unwrap(), 1);
    assert_eq!(log.finished_count(), 0);
}

pub async fn writes_after_close_are_refused(harness: &mut dyn LogHarness) {
    let log = harness.open();
    log.close().unwrap();
    assert!(
        log.write(&record(T0, TxnState::Committing), Durability::Forced)
            .await
            .is_err()
    );
}

/// Instantiates every case of the suite for one implementation.
macro_rules! decision_log_suite {
    ($harness:expr) => {
        mod suite_cases {
            use super::*;
            use $crate::log::suite;

            #[tokio::test]
            async fn forced_write_survives_reopen() {
                suite::forced_write_survives_reopen(&mut $harness()).await;
            }

            #[tokio::test]
            async fn lazy_end_replaces_the_decision_and_leaves_unfinished() {
                suite::lazy_end_replaces_the_decision_and_leaves_unfinished(&mut $harness()).await;
            }

            #[tokio::test]
            async fn unknown_ids_are_absent() {
                suite::unknown_ids_are_absent(&mut $harness()).await;
            }

            #[tokio::test]
            async fn scan_pages_in_id_order() {
                suite::scan_pages_in_id_order(&mut $harness()).await;
            }

            #[tokio::test]
            async fn purge_removes_only_old_final_records() {
                suite::purge_removes_only_old_final_records(&mut $harness()).await;
            }

            #[tokio::test]
            async fn purge_by_count_keeps_the_newest_final_records() {
                suite::purge_by_count_keeps_the_newest_final_records(&mut $harness()).await;
            }

            #[tokio::test]
            async fn purge_by_count_leaves_what_someone_may_still_ask_for() {
                suite::purge_by_count_leaves_what_someone_may_still_ask_for(&mut $harness()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_forced_writes_are_all_durable() {
                suite::concurrent_forced_writes_are_all_durable(&mut $harness()).await;
            }

            #[tokio::test]
            async fn idempotency_keys_find_their_saga_until_purged() {
                suite::idempotency_keys_find_their_saga_until_purged(&mut $harness()).await;
            }

            #[tokio::test]
            async fn forget_removes_a_record_and_its_key_for_good() {
                suite::forget_removes_a_record_and_its_key_for_good(&mut $harness()).await;
            }

            #[tokio::test]
            async fn writes_after_close_are_refused() {
                suite::writes_after_close_are_refused(&mut $harness()).await;
            }
        }
    };
}
pub(crate) use decision_log_suite;
