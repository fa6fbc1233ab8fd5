//! Tests of the runtime as a whole: recovery's refusals, shard routing of ids and
//! idempotency keys, the memory allowance, and unknown transactions presumed aborted.

use super::*;
use crate::log::{Durability, MemoryLog};
use crate::model::{TxnKind, TxnRecord};

fn record(state: TxnState) -> TxnRecord {
    TxnRecord {
        id: TxnId::generate(now_unix_ms()),
        kind: TxnKind::TwoPhase,
        state,
        created_unix_ms: 0,
        deadline_unix_ms: 0,
        prepare_timeout_ms: 0,
        reason: None,
        branches: Vec::new(),
        transitions: Vec::new(),
        ended_unix_ms: None,
        idempotency_key: None,
        stuck: false,
        saga: None,
        owner: None,
        paused: false,
    }
}

#[tokio::test]
async fn refuses_to_start_on_an_unfinished_record_that_cannot_be_resumed() {
    let log = Arc::new(MemoryLog::new());
    log.write(&record(TxnState::Active), Durability::Forced)
        .await
        .unwrap();
    let (fatal, _) = mpsc::unbounded_channel();
    let started = Runtime::start(log, RuntimeConfig::default(), fatal);
    assert!(matches!(started, Err(LogError::Corrupt { .. })));
}

/// The most shards the config accepts.
const MAX_SHARDS: usize = 1024;

#[test]
fn ids_are_minted_in_the_wanted_shard_for_every_shard_count() {
    for shards in 1..=MAX_SHARDS {
        for target in [0, shards / 2, shards - 1] {
            let id = in_shard(TxnId::generate(now_unix_ms()), target, shards);
            assert_eq!(shard_of(&id, shards), target, "{shards} shards");
            // Still a well-formed UUIDv7.
            let uuid = uuid::Uuid::from_bytes(*id.as_bytes());
            assert_eq!(uuid.get_version_num(), 7);
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
        }
    }
    // The top of the 56-bit range wraps down instead of overflowing.
    let mut top = [0xff; 16];
    top[6] = 0x7f;
    top[8] = 0xbf;
    let id = in_shard(TxnId::from_bytes(top), 0, 1000);
    assert_eq!(shard_of(&id, 1000), 0);
}

#[test]
fn every_shard_is_used_for_every_shard_count() {
    for shards in 1..=MAX_SHARDS {
        let mut used = vec![false; shards];
        // 16 draws per shard leave one unused with odds of about e^-16 each.
        for _ in 0..shards * 16 {
            used[shard_of(&TxnId::generate(now_unix_ms()), shards)] = true;
        }
        let unused = used.iter().filter(|u| !**u).count();
        assert!(
            unused == 0 || (shards > 64 && unused <= 1),
            "{shards}: {unused} unused"
        );
    }
}

#[test]
fn idempotency_keys_spread_over_every_shard_and_stay_put() {
    // Fixed: the same key maps to the same shard in every build.
    // CRC-32 (IEEE) of "order-42" is 0x57f706de, as any implementation computes it.
    assert_eq!(shard_of_key("order-42", 1024), 0x57f7_06de % 1024);
    for shards in [1, 2, 3, 7, 64, 128, 1000, MAX_SHARDS] {
        let mut used = vec![false; shards];
        for i in 0..shards * 32 {
            used[shard_of_key(&format!("order-{i}"), shards)] = true;
        }
        assert!(used.iter().all(|u| *u), "{shards} shards");
    }
}

/// Polls `health` (every 50 ms, for at most 10 s) until `done` holds for it.
async fn health_until(runtime: &Runtime, done: impl Fn(&Health) -> bool) -> Health {
    for _ in 0..200 {
        let health = runtime.health().await.unwrap();
        if done(&health) {
            return health;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    runtime.health().await.unwrap()
}

#[tokio::test]
async fn a_lowered_allowance_drops_finished_transactions_without_new_ones() {
    let (fatal, _) = mpsc::unbounded_channel();
    let config = RuntimeConfig::default();
    let allowance = config.retained_allowance.clone();
    let governor = memory::Governor::new(1 << 30, config.max_retained_bytes, allowance);
    let (runtime, tasks, _) =
        Runtime::start(Arc::new(MemoryLog::new()), config.clone(), fatal).unwrap();
    let mut ids = Vec::new();
    for _ in 0..40 {
        let id = runtime
            .begin(BeginParams {
                deadline_unix_ms: now_unix_ms() + 60_000,
                prepare_timeout_ms: 5_000,
                branches: Vec::new(),
                owner: None,
                trace: None,
            })
            .await
            .unwrap();
        runtime.abort(id, "test".into()).await.unwrap();
        ids.push(id);
    }
    let kept = health_until(&runtime, |h| h.retained_transactions == 40).await;
    assert_eq!(kept.retained_transactions, 40, "all within the share");

    // A resident set far over the budget's ceiling: the allowance falls to nothing,
    // and each shard's next housekeeping drops all but its latest.
    let mut governor = governor;
    assert_eq!(governor.observe(4 << 30, Some(usize::MAX)), 0);
    let left = health_until(&runtime, |h| {
        h.retained_transactions <= config.shards as u64
    })
    .await;
    assert!(
        left.retained_transactions <= config.shards as u64,
        "{} kept after the fall",
        left.retained_transactions
    );
    // Left memory, not the log: each one still answers.
    for id in ids {
        let record = runtime.get(id).await.unwrap().expect("in the log");
        assert_eq!(record.state, TxnState::Aborted);
    }
    runtime.shutdown(tasks, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn unknown_transactions_are_presumed_aborted() {
    let (fatal, _) = mpsc::unbounded_channel();
    let (runtime, tasks, report) =
        Runtime::start(Arc::new(MemoryLog::new()), RuntimeConfig::default(), fatal).unwrap();
    assert_eq!(report.resumed, 0);
    let unknown = TxnId::generate(now_unix_ms());
    assert_eq!(runtime.outcome(unknown).await, Ok(Decision::Abort));
    assert_eq!(runtime.get(unknown).await, Ok(None));
    assert_eq!(
        runtime.commit(unknown).await.map(|_| ()),
        Err(RuntimeError::UnknownTransaction(unknown))
    );
    runtime.shutdown(tasks, Duration::from_secs(1)).await;
}

/// Enlist, Commit and Abort refuse a saga whether or not it is still in memory: one
/// that left it (here, final in the log at the start) was answered from its record as
/// if it were a two-phase commit.
#[tokio::test]
async fn a_saga_that_left_memory_is_refused_by_two_phase_calls() {
    let log = Arc::new(MemoryLog::new());
    let mut saga = record(TxnState::Completed);
    saga.kind = TxnKind::Saga;
    saga.ended_unix_ms = Some(now_unix_ms());
    let id = saga.id;
    log.write(&saga, Durability::Forced).await.unwrap();
    let (fatal, _) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log, RuntimeConfig::default(), fatal).unwrap();
    let refused = Err(RuntimeError::NotTwoPhase(id));
    assert_eq!(runtime.commit(id).await.map(|_| ()), refused);
    assert_eq!(runtime.abort(id, "test".into()).await, refused);
    let branch = BranchSpec {
        id: "b".into(),
        endpoint: "http://127.0.0.1:1".into(),
        payload: Vec::new(),
    };
    assert_eq!(runtime.enlist(id, branch).await, refused);
    // Reading it is still answered from the log.
    assert!(runtime.get(id).await.unwrap().is_some());
    runtime.shutdown(tasks, Duration::from_secs(1)).await;
}

/// A log that applies each write at once, except while holding: then lazy writes, and
/// any write after one, wait in order until `release` (a forced one's future with it).
/// It counts writes issued and applied as `SledLog` does.
#[derive(Debug, Default)]
struct HeldLog {
    inner: MemoryLog,
    /// While holding: each write held back, and for a forced one who waits for it.
    held: std::sync::Mutex<Option<Vec<HeldWrite>>>,
    issued: std::sync::atomic::AtomicU64,
    applied: std::sync::atomic::AtomicU64,
}

type HeldWrite = (TxnRecord, Option<oneshot::Sender<()>>);

impl HeldLog {
    fn hold(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    fn release(&self) {
        let held = self.held.lock().unwrap().take().unwrap_or_default();
        for (record, forced) in held {
            self.apply(&record);
            if let Some(done) = forced {
                let _ = done.send(());
            }
        }
    }

    fn apply(&self, record: &TxnRecord) {
        use futures::FutureExt;
        let written = self.inner.write(record, Durability::Lazy).now_or_never();
        assert!(matches!(written, Some(Ok(()))), "{written:?}");
        self.applied
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl DecisionLog for HeldLog {
    fn write(&self, record: &TxnRecord, durability: Durability) -> crate::log::LogWrite {
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(held) = self
            .held
            .lock()
            .unwrap()
            .as_mut()
            .filter(|held| durability == Durability::Lazy || !held.is_empty())
        {
            if durability == Durability::Lazy {
                held.push((record.clone(), None));
                return Box::pin(std::future::ready(Ok(())));
            }
            let (done, durable) = oneshot::channel();
            held.push((record.clone(), Some(done)));
            return Box::pin(
                async move { durable.await.map_err(|_| crate::log::LogError::Closed) },
            );
        }
        self.apply(record);
        Box::pin(std::future::ready(Ok(())))
    }
    fn writes_queued(&self) -> u64 {
        self.issued.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn writes_applied(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn get(&self, id: &TxnId) -> Result<Option<TxnRecord>, LogError> {
        self.inner.get(id)
    }
    fn find_by_key(&self, key: &str) -> Result<Option<TxnId>, LogError> {
        self.inner.find_by_key(key)
    }
    fn unfinished(&self) -> Result<Vec<TxnRecord>, LogError> {
        self.inner.unfinished()
    }
    fn scan(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnRecord>, LogError> {
        self.inner.scan(after, limit)
    }
    fn purge_ended_before(&self, cutoff_unix_ms: UnixMs, max: usize) -> Result<usize, LogError> {
        self.inner.purge_ended_before(cutoff_unix_ms, max)
    }
    fn finished_count(&self) -> u64 {
        self.inner.finished_count()
    }
    fn purge_finished_beyond(&self, keep: u64, max: usize) -> Result<usize, LogError> {
        self.inner.purge_finished_beyond(keep, max)
    }
    fn forget(&self, record: &TxnRecord) -> crate::log::LogWrite {
        self.inner.forget(record)
    }
    fn close(&self) -> Result<(), LogError> {
        self.inner.close()
    }
}

/// A parallel commit writes its decision and its end lazily. It leaves memory (here at
/// once: no memory retention) only once the log has them: read back from the log
/// before, it showed only its intent, and a repeated Commit or GetOutcome answered
/// ABORTED after COMMITTED had been said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_leaves_memory_only_once_the_log_has_its_end() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let participant =
        crate::participants::tests::Served::start(listener, Duration::ZERO, false).await;
    let log = Arc::new(HeldLog::default());
    let config = RuntimeConfig {
        memory_retention_ms: 0,
        ..RuntimeConfig::default()
    };
    let (fatal, _) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log.clone(), config, fatal).unwrap();
    let branch = |id: &str| BranchSpec {
        id: id.into(),
        endpoint: endpoint.clone(),
        payload: Vec::new(),
    };
    let id = runtime
        .begin(BeginParams {
            deadline_unix_ms: now_unix_ms() + 120_000,
            prepare_timeout_ms: 60_000,
            branches: vec![branch("a"), branch("b")],
            owner: None,
            trace: None,
        })
        .await
        .unwrap();
    // The intent, forced, is written at once; the lazy decision and end wait.
    log.hold();
    let decided = tokio::time::timeout(Duration::from_secs(30), runtime.commit(id))
        .await
        .expect("decided within 30 s")
        .unwrap();
    assert!(decided.state.is_commit(), "{:?}", decided.state);
    let state = || async { runtime.get(id).await.unwrap().map(|record| record.state) };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while state().await != Some(TxnState::Committed) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            state().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Ended, with its last records held back, over three housekeeping rounds (one a
    // second) that would have dropped it.
    for _ in 0..30 {
        assert_eq!(state().await, Some(TxnState::Committed));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log.release();
    let left = health_until(&runtime, |h| h.retained_transactions == 0).await;
    assert_eq!(
        left.retained_transactions, 0,
        "it left memory once released"
    );
    assert_eq!(state().await, Some(TxnState::Committed), "from the log");
    runtime.shutdown(tasks, Duration::from_secs(1)).await;
    participant.stop().await;
}
