//! Sagas: what is shown while their writes are in flight, an operator's resolution
//! answered once durable, the last steps' progress written with the final state, and
//! watchers.

use super::*;

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
