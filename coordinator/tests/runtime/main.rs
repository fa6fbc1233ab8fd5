//! The runtime against logs that misbehave in time: a decision write that is visible
//! before it is durable (as on sled), and callers that give up half-way. This file holds
//! the logs and participants the tests use; the tests are in `two_phase.rs` and
//! `sagas.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use tokio::sync::{Semaphore, mpsc};
use treaty_coordinator::engine::twopc::BranchSpec;
use treaty_coordinator::log::{DecisionLog, Durability, LogError, LogWrite, MemoryLog};
use treaty_coordinator::model::{TxnId, TxnRecord, TxnState, UnixMs};
use treaty_coordinator::runtime::{
    BeginParams, Decision, ListFilter, Runtime, RuntimeConfig, now_unix_ms,
};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

mod operator;
mod sagas;
mod two_phase;

/// Like sled: a write is readable at once, but a forced write only returns when the
/// test opens the gate. Each write's state and durability are noted. Made with
/// [`GatedLog::failing_lazy_writes`], it is like sled when the disk goes away behind a
/// queued write: a lazy write is applied, its future never resolves, and the log
/// reports the failure through `failed`. Made with [`GatedLog::applied_at_gate`], it is
/// like the durable store whose logger applies a queued batch later: a forced write or a
/// forget is readable only once it passes the gate.
#[derive(Debug)]
struct GatedLog {
    inner: Arc<MemoryLog>,
    gate: Arc<Semaphore>,
    writes: std::sync::Mutex<Vec<(TxnState, Durability)>>,
    lazy_failure: Option<tokio::sync::watch::Sender<Option<String>>>,
    applied_at_gate: bool,
    /// Forgets asked of the log.
    forgets: std::sync::atomic::AtomicUsize,
}

impl GatedLog {
    fn new(gate: Arc<Semaphore>) -> Self {
        Self {
            inner: Arc::new(MemoryLog::new()),
            gate,
            writes: Default::default(),
            lazy_failure: None,
            applied_at_gate: false,
            forgets: Default::default(),
        }
    }

    /// Forced writes and forgets are applied only once they pass `gate`.
    fn applied_at_gate(gate: Arc<Semaphore>) -> Self {
        Self {
            applied_at_gate: true,
            ..Self::new(gate)
        }
    }

    /// Waits, bounded, until `count` writes have been asked of the log.
    async fn wait_for_writes(&self, count: usize) {
        let started = Instant::now();
        while self.writes.lock().unwrap().len() < count {
            assert!(started.elapsed() < Duration::from_secs(30), "never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Forced writes pass; every lazy write fails once queued.
    fn failing_lazy_writes() -> Self {
        Self {
            lazy_failure: Some(tokio::sync::watch::channel(None).0),
            ..Self::new(Arc::new(Semaphore::new(Semaphore::MAX_PERMITS)))
        }
    }
}

impl DecisionLog for GatedLog {
    fn write(&self, record: &TxnRecord, durability: Durability) -> LogWrite {
        self.writes.lock().unwrap().push((record.state, durability));
        if self.applied_at_gate && durability == Durability::Forced {
            let (gate, inner, record) = (self.gate.clone(), self.inner.clone(), record.clone());
            return Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                inner.write(&record, durability).await
            });
        }
        let written = self.inner.write(record, durability);
        if let (Some(failure), Durability::Lazy) = (&self.lazy_failure, durability) {
            failure.send_replace(Some("the disk went away".into()));
            return Box::pin(std::future::pending());
        }
        let gate = self.gate.clone();
        Box::pin(async move {
            if durability == Durability::Forced {
                gate.acquire().await.unwrap().forget();
            }
            written.await
        })
    }
    fn failed(&self) -> treaty_coordinator::log::LogFailed {
        let Some(failure) = &self.lazy_failure else {
            return Box::pin(std::future::pending());
        };
        let mut failure = failure.subscribe();
        Box::pin(async move {
            let reason = match failure.wait_for(Option::is_some).await {
                Ok(reason) => reason.clone(),
                Err(_) => None,
            };
            match reason {
                Some(reason) => reason,
                None => std::future::pending().await,
            }
        })
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
    fn purge_ended_before(&self, cutoff: UnixMs, max: usize) -> Result<usize, LogError> {
        self.inner.purge_ended_before(cutoff, max)
    }
    fn finished_count(&self) -> u64 {
        self.inner.finished_count()
    }
    fn purge_finished_beyond(&self, keep: u64, max: usize) -> Result<usize, LogError> {
        self.inner.purge_finished_beyond(keep, max)
    }
    fn forget(&self, record: &TxnRecord) -> LogWrite {
        self.forgets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.applied_at_gate {
            let (gate, inner, record) = (self.gate.clone(), self.inner.clone(), record.clone());
            return Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                inner.forget(&record).await
            });
        }
        self.inner.forget(record)
    }
    fn close(&self) -> Result<(), LogError> {
        self.inner.close()
    }
}

#[derive(Debug)]
struct AlwaysYes;

impl Participant for AlwaysYes {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// An [`AlwaysYes`] participant served on 127.0.0.1 with its own store.
struct AlwaysYesServed {
    endpoint: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), treaty_sdk::ServeError>>,
    _dir: tempfile::TempDir,
}

impl AlwaysYesServed {
    async fn start() -> Self {
        Self::start_with(Default::default()).await
    }

    async fn start_with(options: treaty_sdk::ServeOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(treaty_sdk::serve(
            Arc::new(AlwaysYes),
            store,
            listener,
            options,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            endpoint,
            stop,
            task,
            _dir: dir,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// A saga of `steps`, with no key, owner or deadline.
fn saga_of(
    steps: Vec<treaty_coordinator::model::StepDefinition>,
) -> treaty_coordinator::runtime::SagaParams {
    treaty_coordinator::runtime::SagaParams {
        definition: treaty_coordinator::model::SagaDefinition {
            steps,
            stuck_after_attempts: 3,
        },
        idempotency_key: None,
        owner: None,
        trace: None,
        deadline_unix_ms: None,
        refused_if_new: None,
    }
}

/// Begins a two-phase commit with branches "a" and "b", both at `endpoint`.
async fn begin_two_branches(runtime: &Runtime, endpoint: &str) -> TxnId {
    let branches = ["a", "b"]
        .map(|id| BranchSpec {
            id: id.into(),
            endpoint: endpoint.into(),
            payload: Vec::new(),
        })
        .to_vec();
    runtime
        .begin(BeginParams {
            deadline_unix_ms: now_unix_ms() + 60_000,
            prepare_timeout_ms: 10_000,
            branches,
            owner: None,
            trace: None,
        })
        .await
        .unwrap()
}

/// Starts a runtime on a log holding one two-phase record in `state`, created 5 s ago
/// (so older than a short horizon or retention), with `branches` (id, endpoint, state,
/// payload), retrying every 10–20 ms; checks that it was resumed.
async fn resume_logged_two_phase(
    state: TxnState,
    branches: &[(&str, &str, treaty_coordinator::model::BranchState, Vec<u8>)],
    delivery_horizon_ms: u64,
) -> (
    TxnRecord,
    Arc<MemoryLog>,
    Runtime,
    treaty_coordinator::runtime::RuntimeTasks,
) {
    let record = two_phase_record(state, branches);
    let log = Arc::new(MemoryLog::new());
    log.write(&record, Durability::Forced).await.unwrap();
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let config = RuntimeConfig {
        delivery_horizon_ms,
        retry_backoff_initial_ms: 10,
        retry_backoff_max_ms: 20,
        ..config()
    };
    let (runtime, tasks, report) = Runtime::start(log.clone(), config, fatal).unwrap();
    assert_eq!(report.resumed, 1);
    (record, log, runtime, tasks)
}

/// A two-phase record in `state`, created 5 s ago, with `branches` (id, endpoint, state,
/// payload).
fn two_phase_record(
    state: TxnState,
    branches: &[(&str, &str, treaty_coordinator::model::BranchState, Vec<u8>)],
) -> TxnRecord {
    use treaty_coordinator::model::{BranchRecord, TxnKind};

    let created = now_unix_ms() - 5_000;
    TxnRecord {
        id: TxnId::generate(created),
        kind: TxnKind::TwoPhase,
        state,
        created_unix_ms: created,
        deadline_unix_ms: created + 1_000,
        prepare_timeout_ms: 1_000,
        reason: None,
        branches: branches
            .iter()
            .map(|(id, endpoint, state, payload)| BranchRecord {
                id: (*id).into(),
                endpoint: (*endpoint).into(),
                payload: payload.clone(),
                state: *state,
                attempts: 1,
                compensation_attempts: 0,
                last_error: None,
                history: Default::default(),
                heuristic: None,
                resolution: None,
                awaits_operator: false,
            })
            .collect(),
        transitions: Vec::new(),
        ended_unix_ms: None,
        idempotency_key: None,
        stuck: false,
        saga: None,
        owner: None,
        paused: false,
    }
}

fn config() -> RuntimeConfig {
    RuntimeConfig {
        advertise_endpoint: "http://127.0.0.1:1".into(),
        ..RuntimeConfig::default()
    }
}

/// `treaty_heuristic_outcomes_total` as the runtime's metrics show it now.
async fn heuristic_outcomes(runtime: &Runtime) -> String {
    let text = runtime
        .metrics()
        .encode(runtime.health().await.unwrap(), now_unix_ms())
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix("treaty_heuristic_outcomes_total "))
        .unwrap_or_else(|| panic!("no heuristic outcomes in {text}"))
        .trim()
        .to_owned()
}
