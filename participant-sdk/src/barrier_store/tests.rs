//! Tests of the SDK's own store as a barrier store: branch keys, the branches in doubt
//! rebuilt from the records after a reopen or by the count at start, damaged records,
//! and the first listing during writes.

use super::conformance::encoded_record;
use super::*;
use crate::barrier::{BranchMode, BranchStatus};
use crate::durable::StoreOptions;

fn key(transaction_id: &str) -> BranchKey {
    BranchKey {
        transaction_id: transaction_id.into(),
        branch_id: "b".into(),
    }
}

#[test]
fn branch_keys_name_their_branch_and_a_record_key_parses_back() {
    let branch = BranchKey {
        transaction_id: "0193a1b2-txn".into(),
        branch_id: "payment-1".into(),
    };
    let bytes = record_key(&branch);
    assert_eq!(bytes, b"b/0193a1b2-txn/payment-1");
    assert_eq!(parse_key(&bytes, RECORD_PREFIX).ok(), Some(branch));
    assert_eq!(branch_key_bytes("", "t", "b"), b"t/b");
}

fn record(mode: BranchMode, status: BranchStatus) -> Vec<u8> {
    encoded_record(mode, status, &[])
}

fn open(dir: &std::path::Path) -> DurableStore {
    DurableStore::open(dir, StoreOptions::default()).unwrap()
}

/// Writes each record (of branch "b" of the named transaction) as given, forced.
async fn write_records(
    store: &DurableStore,
    records: impl IntoIterator<Item = (&'static str, Vec<u8>)>,
) {
    let mut batch = WriteBatch::new();
    for (txn, bytes) in records {
        batch.insert(record_key(&key(txn)), bytes);
    }
    store.write(batch, Durability::Forced).await.unwrap();
}

#[tokio::test]
async fn after_a_reopen_the_branches_in_doubt_are_read_from_their_records_and_old_marks_go() {
    let dir = tempfile::tempdir().unwrap();
    {
        // Written as a version that kept its marks on disk did, with a stray mark
        // beside a committed record: the records decide, not the marks.
        let store = open(dir.path());
        let mut batch = WriteBatch::new();
        let cases = [
            (
                "two-phase-yes",
                BranchMode::TwoPhase,
                BranchStatus::Prepared,
                true,
            ),
            (
                "one-phase-yes",
                BranchMode::OnePhase,
                BranchStatus::Prepared,
                true,
            ),
            (
                "saga-step-yes",
                BranchMode::SagaStep,
                BranchStatus::Prepared,
                false,
            ),
            (
                "committed",
                BranchMode::TwoPhase,
                BranchStatus::Committed,
                true,
            ),
        ];
        for (txn, mode, status, old_mark) in cases {
            batch.insert(record_key(&key(txn)), record(mode, status));
            if old_mark {
                batch.insert(format!("{OLD_IN_DOUBT_PREFIX}{txn}/b"), Vec::new());
            }
        }
        store.write(batch, Durability::Forced).await.unwrap();
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(
        store.in_doubt(None, 10).unwrap(),
        [key("one-phase-yes"), key("two-phase-yes")]
    );
    // The old marks' removal is queued before this write, so it is applied first.
    store
        .write(WriteBatch::new(), Durability::Forced)
        .await
        .unwrap();
    assert_eq!(store.db().scan_prefix(OLD_IN_DOUBT_PREFIX).count(), 0);
    // From then on the marks change with the writes.
    store
        .save(BarrierWrite {
            key: key("two-phase-yes"),
            record: record(BranchMode::TwoPhase, BranchStatus::Committed),
            in_doubt: false,
        })
        .await
        .unwrap();
    assert_eq!(store.in_doubt(None, 10).unwrap(), [key("one-phase-yes")]);
}

#[tokio::test]
async fn a_damaged_record_fails_the_listing_instead_of_hiding_a_branch_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write_records(&store, [("unreadable", b"\x07garbage".to_vec())]).await;
    let error = store.in_doubt(None, 10).unwrap_err();
    assert!(error.to_string().contains("unreadable"), "{error}");
}

#[tokio::test]
async fn counting_the_records_at_start_seeds_the_branches_in_doubt_in_the_same_pass() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path());
        let records = [
            (
                "two-phase-yes",
                BranchMode::TwoPhase,
                BranchStatus::Prepared,
            ),
            ("committed", BranchMode::TwoPhase, BranchStatus::Committed),
            (
                "saga-step-yes",
                BranchMode::SagaStep,
                BranchStatus::Prepared,
            ),
        ];
        let records = records.map(|(txn, mode, status)| (txn, record(mode, status)));
        write_records(&store, records).await;
        store.close().unwrap();
    }
    let store = open(dir.path());
    assert_eq!(store.count_records().unwrap(), 3);
    let listed = store
        .marked(None, 10, |_| panic!("the records were read a second time"))
        .unwrap();
    assert_eq!(listed, [record_key(&key("two-phase-yes"))]);
    // Once the marks are seeded, a count reads the records on its own.
    assert_eq!(store.count_records().unwrap(), 3);
}

#[tokio::test]
async fn a_record_that_cannot_be_decoded_is_still_counted_and_fails_the_listings() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    write_records(
        &store,
        [
            ("unreadable", b"\x07garbage".to_vec()),
            (
                "committed",
                record(BranchMode::TwoPhase, BranchStatus::Committed),
            ),
        ],
    )
    .await;
    assert_eq!(store.count_records().unwrap(), 2);
    let error = store.in_doubt(None, 10).unwrap_err();
    assert!(error.to_string().contains("unreadable"), "{error}");
}

/// The seed reads a record's mode and status only: damage after them is found when
/// the branch is listed, and only a branch in doubt is.
#[tokio::test]
async fn a_record_damaged_after_its_status_is_skipped_if_settled_and_named_apart_if_in_doubt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let cut_short = |status| {
        let mut bytes = encoded_record(BranchMode::TwoPhase, status, &[7; 64]);
        bytes.truncate(bytes.len() - 10);
        bytes
    };
    write_records(
        &store,
        [
            ("settled", cut_short(BranchStatus::Committed)),
            ("in-doubt", cut_short(BranchStatus::Prepared)),
            (
                "whole",
                encoded_record(BranchMode::TwoPhase, BranchStatus::Prepared, &[7; 64]),
            ),
        ],
    )
    .await;
    assert_eq!(store.count_records().unwrap(), 3);
    assert_eq!(
        store.in_doubt(None, 10).unwrap(),
        [key("in-doubt"), key("whole")]
    );
    let barrier = crate::barrier::Barrier::new(store.clone());
    let error = barrier.in_doubt(10).unwrap_err();
    assert!(error.to_string().contains("in-doubt"), "{error}");
    // The resolver's page names it and goes on: the branch in doubt beside it, read in
    // full, is listed to be asked about.
    let page = barrier.in_doubt_page(None, 10).unwrap();
    let listed: Vec<&str> = page
        .branches
        .iter()
        .map(|b| b.branch.transaction_id.as_str())
        .collect();
    assert_eq!(listed, ["whole"]);
    assert_eq!(page.unreadable.len(), 1);
    assert_eq!(page.unreadable[0].0.transaction_id, "in-doubt");
    assert!(page.next.is_none());
}

/// The first listing reads the records while writes go on; whenever it happens,
/// the set afterwards is exactly the branches whose last write left them in doubt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_listing_during_writes_ends_with_exactly_the_branches_in_doubt() {
    const WRITERS: usize = 4;
    const BRANCHES: usize = 100;
    for round in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = store.clone();
                tokio::spawn(async move {
                    for branch in 0..BRANCHES {
                        let key = key(&format!("w{writer}-{branch}"));
                        let write = |status: BranchStatus| BarrierWrite {
                            key: key.clone(),
                            in_doubt: status == BranchStatus::Prepared,
                            record: record(BranchMode::TwoPhase, status),
                        };
                        store.save(write(BranchStatus::Prepared)).await.unwrap();
                        if branch % 2 == 0 {
                            store.save(write(BranchStatus::Committed)).await.unwrap();
                        }
                    }
                })
            })
            .collect();
        // The first listing lands somewhere different in each round.
        tokio::time::sleep(std::time::Duration::from_millis(round * 3)).await;
        store.in_doubt(None, usize::MAX).unwrap();
        for writer in writers {
            writer.await.unwrap();
        }
        let mut expected: Vec<BranchKey> = (0..WRITERS)
            .flat_map(|writer| {
                (1..BRANCHES)
                    .step_by(2)
                    .map(move |branch| key(&format!("w{writer}-{branch}")))
            })
            .collect();
        expected.sort();
        let listed = store.in_doubt(None, usize::MAX).unwrap();
        let mut sorted = listed.clone();
        sorted.sort();
        assert_eq!(listed, sorted, "round {round}: listed in one order");
        assert_eq!(listed, expected, "round {round}");
    }
}

/// The resolver counts a branch in doubt whose record cannot be read in its gauges, and
/// its age from the transaction's id (its prepare time is in the record), so that
/// neither the count nor an age alert reads "nothing in doubt" past it.
#[tokio::test]
async fn a_branch_in_doubt_whose_record_cannot_be_read_is_in_the_resolvers_gauges() {
    use crate::in_doubt::{InDoubtOptions, InDoubtResolver};

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let created = crate::barrier::now_unix_ms() - 60_000;
    let damaged = BranchKey {
        transaction_id: crate::transaction_age::first_transaction_id_at(created),
        branch_id: "b".into(),
    };
    let mut bytes = encoded_record(BranchMode::TwoPhase, BranchStatus::Prepared, &[7; 64]);
    bytes.truncate(bytes.len() - 10);
    let mut batch = WriteBatch::new();
    batch.insert(record_key(&damaged), bytes);
    store.write(batch, Durability::Forced).await.unwrap();
    let barrier = Arc::new(crate::barrier::Barrier::new(store));
    let options = InDoubtOptions {
        ask_after_ms: 0,
        ..InDoubtOptions::default()
    };
    let mut resolver = InDoubtResolver::new(
        Arc::new(crate::barrier::tests::Yes),
        barrier.clone(),
        options,
    )
    .unwrap();
    let (_stop, mut stopped) = tokio::sync::watch::channel(false);
    resolver.round(&mut stopped).await;
    let text = barrier.metrics().encode().unwrap();
    assert!(
        text.contains("treaty_participant_branches_in_doubt 1\n"),
        "{text}"
    );
    let age: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("treaty_participant_in_doubt_oldest_age_seconds "))
        .unwrap_or_else(|| panic!("no oldest age in {text}"))
        .parse()
        .unwrap();
    assert!(age >= 59.0, "{age}");
}
