//! The runtime against logs that misbehave in time: a decision write that is visible
//! before it is durable (as on sled), and callers that give up half-way.

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

/// Like sled: a write is readable at once, but a forced write only returns when the
/// test opens the gate. Each write's state and durability are noted. Made with
/// [`GatedLog::failing_lazy_writes`], it is like sled when the disk goes away behind a
/// queued write: a lazy write is applied, its future never resolves, and the log
/// reports the failure through `failed`.
#[derive(Debug)]
struct GatedLog {
    inner: MemoryLog,
    gate: Arc<Semaphore>,
    writes: std::sync::Mutex<Vec<(TxnState, Durability)>>,
    lazy_failure: Option<tokio::sync::watch::Sender<Option<String>>>,
}

impl GatedLog {
    fn new(gate: Arc<Semaphore>) -> Self {
        Self {
            inner: MemoryLog::new(),
            gate,
            writes: Default::default(),
            lazy_failure: None,
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
    use treaty_coordinator::model::{BranchRecord, TxnKind};

    let created = now_unix_ms() - 5_000;
    let record = TxnRecord {
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
    };
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

fn config() -> RuntimeConfig {
    RuntimeConfig {
        advertise_endpoint: "http://127.0.0.1:1".into(),
        ..RuntimeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_being_written_is_shown_nowhere_as_committing() {
    let participant = AlwaysYesServed::start().await;
    let endpoint = participant.endpoint.clone();

    let gate = Arc::new(Semaphore::new(0));
    let log = Arc::new(GatedLog::new(gate.clone()));
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log.clone(), config(), fatal).unwrap();
    let id = begin_two_branches(&runtime, &endpoint).await;
    let committing = {
        let runtime = runtime.clone();
        tokio::spawn(async move { runtime.commit(id).await })
    };
    let started = Instant::now();
    while log.get(&id).unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the decision was never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Written and readable in the log, but not yet durable: nobody may see a commit.
    assert_eq!(
        runtime.get(id).await.unwrap().unwrap().state,
        TxnState::Preparing
    );
    assert_eq!(runtime.outcome(id).await.unwrap(), Decision::Pending);
    let listed = runtime
        .list(
            &ListFilter {
                states: vec![TxnState::Committing],
                ..ListFilter::default()
            },
            None,
            100,
        )
        .await
        .unwrap();
    assert!(listed.transactions.is_empty(), "{listed:?}");
    let listed = runtime
        .list(&ListFilter::default(), None, 100)
        .await
        .unwrap();
    assert_eq!(listed.transactions.len(), 1);
    assert_eq!(listed.transactions[0].state, TxnState::Preparing);
    assert!(!committing.is_finished());

    gate.add_permits(1);
    let decided = committing.await.unwrap().unwrap();
    assert!(decided.state.is_commit());
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begins_abandoned_by_their_callers_do_not_leak_admission() {
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let config = RuntimeConfig {
        shards: 1,
        ..config()
    };
    let (runtime, tasks, _) = Runtime::start(Arc::new(MemoryLog::new()), config, fatal).unwrap();
    for _ in 0..1_100 {
        // A client that gives up: the handler's future is dropped after one poll.
        let begin = runtime.begin(BeginParams {
            deadline_unix_ms: now_unix_ms() + 300,
            prepare_timeout_ms: 1_000,
            branches: Vec::new(),
            owner: None,
            trace: None,
        });
        let _ = begin.now_or_never();
    }
    // Some of them were created all the same (the shard got the message)...
    let started = Instant::now();
    let created = loop {
        let listed = runtime
            .list(&ListFilter::default(), None, 1_000)
            .await
            .unwrap()
            .transactions
            .len();
        if listed > 0 {
            break listed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no transaction was created"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // ...and every one reaches its deadline and aborts: the count of transactions in
    // progress must come back to zero.
    let started = Instant::now();
    while runtime.active_transactions() != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{} transactions still counted as in progress",
            runtime.active_transactions()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let aborted = runtime
        .list(
            &ListFilter {
                states: vec![TxnState::Aborted],
                ..ListFilter::default()
            },
            None,
            1_000,
        )
        .await
        .unwrap();
    assert!(
        aborted.transactions.len() >= created,
        "{} < {created}",
        aborted.transactions.len()
    );
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_is_shown_only_once_its_definition_is_durable() {
    use treaty_coordinator::model::{RetryPolicy, SagaDefinition, StepDefinition};
    use treaty_coordinator::runtime::SagaParams;

    let gate = Arc::new(Semaphore::new(0));
    let log = Arc::new(GatedLog::new(gate.clone()));
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log.clone(), config(), fatal).unwrap();
    let params = SagaParams {
        definition: SagaDefinition {
            steps: vec![StepDefinition {
                id: "only".into(),
                endpoint: "http://127.0.0.1:1".into(),
                payload: Vec::new(),
                compensation: Vec::new(),
                timeout_ms: 100,
                retry: RetryPolicy {
                    max_attempts: 1,
                    initial_backoff_ms: 10,
                    max_backoff_ms: 10,
                },
                after: Vec::new(),
                requested: Default::default(),
            }],
            stuck_after_attempts: 3,
        },
        idempotency_key: Some("k".into()),
        owner: None,
        trace: None,
        deadline_unix_ms: None,
        refused_if_new: None,
    };
    let submitting = {
        let runtime = runtime.clone();
        tokio::spawn(async move { runtime.submit_saga(params).await })
    };
    let started = Instant::now();
    let written = loop {
        let scanned = log.scan(None, 10).unwrap();
        if let Some(record) = scanned.into_iter().next() {
            break record;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the definition was never written"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Written (readable in the log) but not durable: shown nowhere.
    assert!(
        runtime
            .list(&ListFilter::default(), None, 10)
            .await
            .unwrap()
            .transactions
            .is_empty()
    );
    assert_eq!(runtime.get(written.id).await.unwrap(), None);
    assert!(runtime.watch(written.id).await.unwrap().is_none());
    assert_eq!(
        runtime.outcome(written.id).await.unwrap(),
        Decision::Pending
    );
    assert!(!submitting.is_finished());

    gate.add_permits(100);
    let submitted = submitting.await.unwrap().unwrap();
    assert_eq!(submitted.id, written.id);
    assert!(runtime.get(written.id).await.unwrap().is_some());
    assert_eq!(
        runtime
            .list(&ListFilter::default(), None, 10)
            .await
            .unwrap()
            .transactions
            .len(),
        1
    );
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_participant_is_called_about_a_transaction_past_the_delivery_horizon() {
    use treaty_coordinator::model::BranchState;

    // A commit decision older than the horizon, found in the log at start. Its
    // participant listens (a call would be answered), yet no call may be made.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (record, _log, runtime, tasks) = resume_logged_two_phase(
        TxnState::Committing,
        &[("late", &endpoint, BranchState::Prepared, Vec::new())],
        1_000,
    )
    .await;
    let started = Instant::now();
    loop {
        let shown = runtime.get(record.id).await.unwrap().unwrap();
        let branch = &shown.branches[0];
        if branch.attempts >= 4 {
            let error = branch.last_error.as_deref().unwrap_or("");
            assert!(error.contains("delivery horizon"), "{error}");
            assert_eq!(
                shown.state,
                TxnState::Committing,
                "still waits for an operator"
            );
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{shown:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing connected to the participant's port.
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "a connection was made");
    runtime.shutdown(tasks, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_intent_is_not_aborted_by_a_participant_past_its_retention() {
    use treaty_coordinator::engine::twopc::{OperatorCommand, OperatorRequest};
    use treaty_coordinator::model::{BranchState, Resolution};

    // A participant whose barrier retention (1 s) is shorter than the coordinator's
    // delivery horizon, against the documented rule. The coordinator finds an intent
    // (PREPARING) of a transaction created 5 s ago and asks both branches again. The
    // participant has no record of either: it cannot tell "never prepared" from
    // "committed, and the record collected", so a NO would be a guess, and with parallel
    // commit a NO here could turn a commit the caller heard into an abort.
    let participant = AlwaysYesServed::start_with(treaty_sdk::ServeOptions {
        barrier_gc: treaty_sdk::barrier_gc::BarrierGcOptions {
            retention_ms: 1_000,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let endpoint = participant.endpoint.as_str();
    let (record, log, runtime, tasks) = resume_logged_two_phase(
        TxnState::Preparing,
        &["a", "b"].map(|id| (id, endpoint, BranchState::Preparing, b"payload".to_vec())),
        7 * 24 * 3_600_000,
    )
    .await;
    let started = Instant::now();
    loop {
        let shown = runtime.get(record.id).await.unwrap().unwrap();
        assert_eq!(
            shown.state,
            TxnState::Preparing,
            "the votes decide, and none may be guessed: {shown:?}"
        );
        // Each branch asked again a few times, its last answer the participant's
        // refusal (not a slow call's timeout on a loaded machine).
        let refused = |b: &treaty_coordinator::model::BranchRecord| {
            b.attempts >= 3
                && b.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("retention"))
        };
        if shown.branches.iter().all(refused) {
            assert!(shown.stuck, "an operator must state the votes: {shown:?}");
            // Operators see it: in doubt since it began, and stuck.
            let health = runtime.health().await.unwrap();
            assert_eq!(health.in_doubt, 1, "{health:?}");
            assert_eq!(health.oldest_in_doubt_unix_ms, Some(record.created_unix_ms));
            assert_eq!(health.stuck_two_phase_commits, 1, "{health:?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{shown:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The operator, who knows "a" committed, states its YES: in the log before the
    // answer, so that a crash now does not lose it.
    let request = OperatorRequest {
        command: OperatorCommand::Resolve {
            branch_id: "a".into(),
            outcome: Resolution::Commit,
        },
        by: "ops".into(),
        reason: "a committed before its record was collected".into(),
    };
    runtime.operate(record.id, request).await.unwrap();
    let logged = log.get(&record.id).unwrap().unwrap();
    assert_eq!(logged.state, TxnState::Preparing);
    assert_eq!(logged.branches[0].state, BranchState::Prepared);
    assert!(logged.branches[0].resolution.is_some(), "{logged:?}");
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_hears_of_a_resolution_only_once_it_is_durable() {
    use treaty_coordinator::engine::twopc::{OperatorCommand, OperatorRequest, Refusal};
    use treaty_coordinator::model::{BranchState, Resolution};
    use treaty_coordinator::model::{RetryPolicy, StepDefinition};
    use treaty_coordinator::runtime::RuntimeError;

    let gate = Arc::new(Semaphore::new(1)); // the definition's write
    let log = Arc::new(GatedLog::new(gate.clone()));
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log.clone(), config(), fatal).unwrap();
    // Nothing listens at port 9: the step keeps failing until an operator steps in.
    let step = |id: &str, after: Vec<usize>| StepDefinition {
        id: id.into(),
        endpoint: "http://127.0.0.1:9".into(),
        payload: Vec::new(),
        compensation: Vec::new(),
        timeout_ms: 100,
        retry: RetryPolicy {
            max_attempts: 100,
            initial_backoff_ms: 10,
            max_backoff_ms: 20,
        },
        after,
        requested: Default::default(),
    };
    let submitted = runtime
        .submit_saga(saga_of(vec![
            step("charged-by-hand", vec![]),
            step("next", vec![0]),
        ]))
        .await
        .unwrap();
    let id = submitted.id;
    // Paused first, so that nothing more is sent for the step; the statement is refused
    // while a call for it is in flight.
    let pause = OperatorRequest {
        command: OperatorCommand::Pause,
        by: "ops".into(),
        reason: String::new(),
    };
    runtime.operate(id, pause).await.unwrap();
    let resolving = {
        let runtime = runtime.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                let request = OperatorRequest {
                    command: OperatorCommand::Resolve {
                        branch_id: "charged-by-hand".into(),
                        outcome: Resolution::Commit,
                    },
                    by: "ops".into(),
                    reason: "charged by hand".into(),
                };
                match runtime.operate(id, request).await {
                    Err(RuntimeError::Refused(Refusal::CallInFlight(_)))
                        if started.elapsed() < Duration::from_secs(30) =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    result => return result,
                }
            }
        })
    };
    // The resolution is taken (the saga moves on) but not durable: no answer yet.
    let started = Instant::now();
    loop {
        let shown = runtime.get(id).await.unwrap().unwrap();
        if shown.branches[0].state == BranchState::Committed {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{shown:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !resolving.is_finished(),
        "answered before the write was durable"
    );
    gate.add_permits(1);
    let record = tokio::time::timeout(Duration::from_secs(30), resolving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(record.branches[0].resolution.is_some());
    // What the log holds now: the step committed, by the operator.
    let logged = log.get(&id).unwrap().unwrap();
    assert_eq!(logged.branches[0].state, BranchState::Committed);
    assert!(logged.branches[0].resolution.is_some());
    gate.add_permits(1_000);
    runtime.shutdown(tasks, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_writes_its_last_steps_progress_only_with_its_final_state() {
    use treaty_coordinator::model::{BranchState, RetryPolicy, StepDefinition};

    let participant = AlwaysYesServed::start().await;
    let endpoint = participant.endpoint.clone();
    // The gate stays open.
    let log = Arc::new(GatedLog::new(Arc::new(Semaphore::new(
        Semaphore::MAX_PERMITS,
    ))));
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log.clone(), config(), fatal).unwrap();
    // Two steps, the second after the first: one answer alone, then the last one.
    let step = |id: &str, after: Vec<usize>| StepDefinition {
        id: id.into(),
        endpoint: endpoint.clone(),
        payload: Vec::new(),
        compensation: Vec::new(),
        timeout_ms: 10_000,
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 10,
            max_backoff_ms: 10,
        },
        after,
        requested: Default::default(),
    };
    let params = saga_of(vec![step("reserve", Vec::new()), step("charge", vec![0])]);
    let submitted = runtime.submit_saga(params).await.unwrap();
    let mut updates = submitted.updates;
    tokio::time::timeout(
        Duration::from_secs(30),
        updates.wait_for(|record| record.state.is_final()),
    )
    .await
    .expect("the saga did not finish in time")
    .unwrap();
    let state = updates.borrow().state;
    assert_eq!(state, TxnState::Completed);

    // The definition (forced), the first step's progress (lazy), then the final state
    // (forced), which carries the last step's progress: not a lazy write of it first.
    let writes = log.writes.lock().unwrap().clone();
    let durabilities: Vec<Durability> = writes.iter().map(|(_, d)| *d).collect();
    assert_eq!(
        durabilities,
        [Durability::Forced, Durability::Lazy, Durability::Forced],
        "{writes:?}"
    );
    assert_eq!(writes[2].0, TxnState::Completed);
    // And the final record holds the last step's progress.
    let logged = log.get(&submitted.id).unwrap().unwrap();
    let steps: Vec<BranchState> = logged.branches.iter().map(|b| b.state).collect();
    assert_eq!(steps, [BranchState::Committed, BranchState::Committed]);
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_write_that_fails_once_queued_is_fatal() {
    let participant = AlwaysYesServed::start().await;
    let log = Arc::new(GatedLog::failing_lazy_writes());
    let (fatal, mut fatal_reports) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log, config(), fatal).unwrap();
    let id = begin_two_branches(&runtime, &participant.endpoint).await;
    // The decision is forced and succeeds; the end record, once both acknowledged, is
    // lazy, and its write fails after it was queued.
    assert!(runtime.commit(id).await.unwrap().state.is_commit());
    let report = tokio::time::timeout(Duration::from_secs(30), fatal_reports.recv())
        .await
        .expect("a failed lazy write was never reported")
        .unwrap();
    assert!(report.contains("the disk went away"), "{report}");
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_starts_from_the_saga_as_it_is_even_between_transitions() {
    use treaty_coordinator::model::{BranchState, RetryPolicy, StepDefinition};

    let participant = AlwaysYesServed::start().await;
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(Arc::new(MemoryLog::new()), config(), fatal).unwrap();
    // The first step commits; the second's participant is unreachable, so the saga
    // stays running, retrying it, with no transition after the first step's answer.
    let step = |id: &str, endpoint: &str, after: Vec<usize>| StepDefinition {
        id: id.into(),
        endpoint: endpoint.into(),
        payload: Vec::new(),
        compensation: Vec::new(),
        timeout_ms: 1_000,
        retry: RetryPolicy {
            max_attempts: 100_000,
            initial_backoff_ms: 50,
            max_backoff_ms: 50,
        },
        after,
        requested: Default::default(),
    };
    let submitted = runtime
        .submit_saga(saga_of(vec![
            step("reserve", &participant.endpoint, Vec::new()),
            step("charge", "http://127.0.0.1:9", vec![0]),
        ]))
        .await
        .unwrap();
    let id = submitted.id;
    let transitions_at_submit = submitted.updates.borrow().transitions.len();
    let started = Instant::now();
    loop {
        let shown = runtime.get(id).await.unwrap().unwrap();
        if shown.branches[0].state == BranchState::Committed && shown.branches[1].attempts >= 2 {
            assert_eq!(shown.state, TxnState::Running);
            assert_eq!(shown.transitions.len(), transitions_at_submit, "{shown:?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{shown:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A watcher that comes now starts from the step's progress, not from the record
    // as of the last transition.
    let watched = runtime.watch(id).await.unwrap().unwrap();
    let current = watched.borrow().clone();
    assert_eq!(
        current.branches[0].state,
        BranchState::Committed,
        "{current:?}"
    );
    assert!(current.branches[1].attempts >= 2, "{current:?}");

    runtime.shutdown(tasks, Duration::from_secs(5)).await;
    participant.stop().await;
}
