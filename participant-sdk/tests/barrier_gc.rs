//! The barrier's retention, against real sled directories and real gRPC: records of final
//! branches are collected once their transaction is old, branches in doubt never are
//! (and still commit later), and a late call for a collected branch runs no user code
//! and is answered only with what is true.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::barrier::{Barrier, BarrierError, BranchMode, BranchStatus, CommitAnswer};
use treaty_sdk::barrier_gc::{BarrierCollector, BarrierGcOptions};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::ServeOptions;
use treaty_sdk::transaction_age::first_transaction_id_at;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

const COORDINATOR: &str = "http://127.0.0.1:7420";
const RETENTION_MS: u64 = 200;

/// Counts calls into user code; votes by payload ("no" → NO, "ro" → READ_ONLY).
#[derive(Debug, Default)]
struct Counting {
    calls: AtomicUsize,
}

impl Counting {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Participant for Counting {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(match payload {
            b"no" => Vote::no("refused"),
            b"ro" => Vote::ReadOnly,
            _ => Vote::Yes,
        })
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The `n`th UUIDv7 created at `unix_ms`.
fn txn_id(unix_ms: u64, n: u64) -> String {
    let first = first_transaction_id_at(unix_ms);
    format!("{}{n:012x}", &first[..24])
}

/// How far ahead of now the "young" transactions of a test are created, so that they
/// stay young while the test sets them up, however loaded the machine.
const AHEAD_MS: u64 = 2_000;

async fn sleep_until_past_retention(created_unix_ms: u64) {
    let until = created_unix_ms + RETENTION_MS + 50;
    let wait = until.saturating_sub(now_unix_ms());
    tokio::time::sleep(Duration::from_millis(wait)).await;
}

fn options() -> BarrierGcOptions {
    BarrierGcOptions {
        retention_ms: RETENTION_MS,
        interval_ms: 50,
        max_records_per_round: 3,
        round_pause_ms: 0,
    }
}

fn open(dir: &std::path::Path) -> Arc<Barrier> {
    let store = Arc::new(DurableStore::open(dir, Default::default()).unwrap());
    Arc::new(Barrier::new(store).with_retention_ms(RETENTION_MS))
}

/// Runs rounds until a pass is done (bounded).
async fn collect_a_pass(collector: &mut BarrierCollector) -> usize {
    let mut collected = 0;
    for _ in 0..100 {
        let report = collector.round().await.unwrap();
        assert!(report.examined <= 3, "{report:?}");
        collected += report.collected;
        if report.pass_done {
            return collected;
        }
    }
    panic!("a pass over a handful of records did not end");
}

#[tokio::test]
async fn final_records_are_collected_and_branches_in_doubt_stay_and_still_commit() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    // Ids from a coordinator whose clock is ahead: young for a while on a loaded machine.
    let created = now_unix_ms() + AHEAD_MS;
    let branch = |n: u64| BranchContext::new(txn_id(created, n), "b");
    // One branch in each final state, of transactions created now.
    barrier
        .prepare(&p, &branch(1), b"yes", COORDINATOR)
        .await
        .unwrap();
    let committed = barrier
        .commit(&p, &branch(1), BranchMode::TwoPhase, &[], COORDINATOR)
        .await
        .unwrap();
    assert_eq!(committed, CommitAnswer::Committed);
    barrier
        .prepare(&p, &branch(2), b"yes", COORDINATOR)
        .await
        .unwrap();
    barrier.abort(&p, &branch(2)).await.unwrap();
    barrier.abort(&p, &branch(3)).await.unwrap(); // a null abort
    barrier
        .prepare(&p, &branch(4), b"no", COORDINATOR)
        .await
        .unwrap();
    barrier
        .prepare(&p, &branch(5), b"ro", COORDINATOR)
        .await
        .unwrap();
    for n in [6, 7] {
        barrier
            .commit(&p, &branch(n), BranchMode::SagaStep, b"do", COORDINATOR)
            .await
            .unwrap();
    }
    barrier.compensate(&p, &branch(7), b"undo").await.unwrap();
    barrier.compensate(&p, &branch(8), b"undo").await.unwrap(); // a null compensation
    barrier
        .commit(&p, &branch(9), BranchMode::OnePhase, b"do", COORDINATOR)
        .await
        .unwrap();
    // In doubt: voted YES, no outcome yet.
    barrier
        .prepare(&p, &branch(10), b"yes", COORDINATOR)
        .await
        .unwrap();
    // An id with no age: kept whatever its state.
    let ageless = BranchContext::new("t-ageless", "b");
    barrier.abort(&p, &ageless).await.unwrap();

    // Young: nothing is collected.
    let mut collector = BarrierCollector::new(barrier.clone(), options()).unwrap();
    assert_eq!(collect_a_pass(&mut collector).await, 0);

    sleep_until_past_retention(created).await;
    assert_eq!(collect_a_pass(&mut collector).await, 9);
    for n in 1..=9 {
        assert_eq!(barrier.record(&branch(n)).unwrap(), None, "branch {n}");
    }
    assert_eq!(
        barrier.record(&branch(10)).unwrap().unwrap().status,
        BranchStatus::Prepared
    );
    assert!(barrier.record(&ageless).unwrap().is_some());
    assert_eq!(barrier.in_doubt(10).unwrap().len(), 1);
    // A second pass finds nothing more, and the branch in doubt commits at last.
    assert_eq!(collect_a_pass(&mut collector).await, 0);
    let calls = p.calls();
    let late_commit = barrier
        .commit(&p, &branch(10), BranchMode::TwoPhase, &[], COORDINATOR)
        .await
        .unwrap();
    assert_eq!(late_commit, CommitAnswer::Committed);
    assert_eq!(p.calls(), calls + 1);
    assert!(barrier.in_doubt(10).unwrap().is_empty());
}

#[tokio::test]
async fn calls_for_an_old_transaction_without_a_record_run_no_user_code() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Counting::default();
    let old = BranchContext::new(txn_id(now_unix_ms() - 10 * RETENTION_MS, 1), "b");

    // Not even NO: the branch may have voted YES and committed.
    let vote = barrier.prepare(&p, &old, b"yes", COORDINATOR).await;
    assert!(
        matches!(vote, Err(BarrierError::PastRetention { .. })),
        "{vote:?}"
    );
    for mode in [
        BranchMode::TwoPhase,
        BranchMode::OnePhase,
        BranchMode::SagaStep,
    ] {
        let answer = barrier.commit(&p, &old, mode, b"do", COORDINATOR).await;
        assert!(
            matches!(answer, Err(BarrierError::PastRetention { .. })),
            "{mode:?}: {answer:?}"
        );
    }
    let aborted = barrier.abort(&p, &old).await;
    assert!(matches!(aborted, Err(BarrierError::PastRetention { .. })));
    let compensated = barrier.compensate(&p, &old, b"undo").await;
    assert!(matches!(
        compensated,
        Err(BarrierError::PastRetention { .. })
    ));
    assert_eq!(p.calls(), 0);
    assert_eq!(barrier.record(&old).unwrap(), None, "nothing recorded");

    // An old transaction that still has its record is answered from it as always.
    let created = now_unix_ms() + AHEAD_MS;
    let kept = BranchContext::new(txn_id(created, 2), "b");
    barrier
        .prepare(&p, &kept, b"yes", COORDINATOR)
        .await
        .unwrap();
    sleep_until_past_retention(created).await;
    assert_eq!(
        barrier
            .commit(&p, &kept, BranchMode::TwoPhase, &[], COORDINATOR)
            .await
            .unwrap(),
        CommitAnswer::Committed
    );
    assert_eq!(p.calls(), 2);
}

/// A participant served over gRPC with a short retention: its collector empties the
/// barrier of old final records on its own, and a late call is refused over the wire.
#[tokio::test]
async fn a_served_participant_collects_and_refuses_late_calls_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let participant = Arc::new(Counting::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServeOptions {
        barrier_gc: options(),
        ..ServeOptions::default()
    };
    let server = tokio::spawn(treaty_sdk::serve(
        participant.clone(),
        store.clone(),
        listener,
        options,
        async {
            let _ = stopped.await;
        },
    ));
    let mut client = ParticipantClient::connect(endpoint).await.unwrap();
    let created = now_unix_ms() + AHEAD_MS;
    let txn = txn_id(created, 7);
    for branch in ["a", "b", "c", "d", "e"] {
        let answer = client
            .commit(pb::CommitBranchRequest {
                transaction_id: txn.clone(),
                branch_id: branch.into(),
                mode: pb::CommitMode::SagaStep as i32,
                payload: b"do".to_vec(),
                coordinator_endpoint: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.result, pb::CommitResult::Committed as i32);
    }
    let records = || store.db().scan_prefix(b"b/").count();
    assert_eq!(records(), 5);
    sleep_until_past_retention(created).await;
    let started = Instant::now();
    while records() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "records not collected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let calls = participant.calls();
    // "a" committed: a NO would be false.
    let vote = client
        .prepare(pb::PrepareBranchRequest {
            transaction_id: txn.clone(),
            branch_id: "a".into(),
            payload: b"yes".to_vec(),
            coordinator_endpoint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(vote.code(), tonic::Code::FailedPrecondition, "{vote:?}");
    let step = client
        .commit(pb::CommitBranchRequest {
            transaction_id: txn.clone(),
            branch_id: "a".into(),
            mode: pb::CommitMode::SagaStep as i32,
            payload: b"do".to_vec(),
            coordinator_endpoint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(step.code(), tonic::Code::FailedPrecondition, "{step:?}");
    let undo = client
        .compensate(pb::CompensateBranchRequest {
            transaction_id: txn,
            branch_id: "a".into(),
            payload: b"undo".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(undo.code(), tonic::Code::FailedPrecondition, "{undo:?}");
    assert_eq!(participant.calls(), calls);
    assert_eq!(records(), 0);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn options_are_checked_field_by_field() {
    assert!(BarrierGcOptions::default().validate().is_ok());
    let zero = BarrierGcOptions {
        retention_ms: 0,
        ..BarrierGcOptions::default()
    };
    assert!(
        zero.validate()
            .unwrap_err()
            .starts_with("barrier_gc.retention_ms")
    );
    let huge = BarrierGcOptions {
        max_records_per_round: 1_000_000,
        ..BarrierGcOptions::default()
    };
    assert!(
        huge.validate()
            .unwrap_err()
            .starts_with("barrier_gc.max_records_per_round")
    );
    // A collector is not made with them either.
    let dir = tempfile::tempdir().unwrap();
    let refused = BarrierCollector::new(open(dir.path()), huge).unwrap_err();
    assert!(
        refused.starts_with("barrier_gc.max_records_per_round"),
        "{refused}"
    );
}

/// Compensates only once let go; everything else does nothing.
#[derive(Debug, Default)]
struct HeldCompensation {
    let_go: tokio::sync::Notify,
}

impl Participant for HeldCompensation {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.let_go.notified().await;
        Ok(())
    }
}

/// A collection passes over a branch busy with user code that does not end (a committed
/// saga step is final, so collectable, yet its compensation runs under the branch's
/// lock): it waited for the lock, so no round ended and nothing more was collected, and
/// `serve`, which waits for the collector, never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_passes_over_a_branch_held_by_user_code() {
    let dir = tempfile::tempdir().unwrap();
    let barrier = open(dir.path());
    let p = Arc::new(HeldCompensation::default());
    let created = now_unix_ms() + AHEAD_MS;
    let (step, done) = (
        BranchContext::new(txn_id(created, 1), "b"),
        BranchContext::new(txn_id(created, 2), "b"),
    );
    for branch in [&step, &done] {
        barrier
            .commit(&*p, branch, BranchMode::SagaStep, b"do", COORDINATOR)
            .await
            .unwrap();
    }
    let compensating = {
        let (barrier, p, step) = (barrier.clone(), p.clone(), step.clone());
        tokio::spawn(async move { barrier.compensate(&*p, &step, b"undo").await })
    };
    sleep_until_past_retention(created).await;

    let mut collector = BarrierCollector::new(barrier.clone(), options()).unwrap();
    let collected = tokio::time::timeout(Duration::from_secs(30), collect_a_pass(&mut collector))
        .await
        .expect("a pass ends while a branch's user code does not");
    assert_eq!(collected, 1, "the branch not busy");
    assert_eq!(barrier.record(&done).unwrap(), None);
    // The compensation ends, and the step's record was left to it; a later pass takes it.
    p.let_go.notify_one();
    tokio::time::timeout(Duration::from_secs(30), compensating)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        barrier.record(&step).unwrap().unwrap().status,
        BranchStatus::Compensated { after_commit: true }
    );
    assert_eq!(collect_a_pass(&mut collector).await, 1);
}
