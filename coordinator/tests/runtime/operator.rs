//! An operator's verbs on a final transaction that is only in the log: each is written
//! there durably, counted once, and two at once act as one after the other.

use treaty_coordinator::engine::twopc::{OperatorCommand, OperatorRequest, Refusal};
use treaty_coordinator::model::{BranchState, Resolution};
use treaty_coordinator::runtime::{RuntimeError, RuntimeTasks};

use super::*;

/// An operator's resolve of a heuristic branch of a commit found only in the log (final
/// records are not loaded at start) is written there and counted among the heuristic
/// outcomes once durable, as a resolve in memory is, even when the operator's call went
/// away while the write waited for the disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_in_the_log_alone_is_counted_as_a_heuristic_outcome() {
    let gate = Arc::new(Semaphore::new(0));
    let log = Arc::new(GatedLog::new(gate.clone()));
    let (runtime, tasks, record) = started_with_a_logged_heuristic(&log, &gate).await;
    assert_eq!(heuristic_outcomes(&runtime).await, "0");

    let request = resolve_as_commit("ops");
    let caller = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.operate(record.id, request).await }
    });
    log.wait_for_writes(2).await;
    // The caller goes away while the write waits; it is not counted before it is durable.
    caller.abort();
    assert!(caller.await.is_err(), "the call was still waiting");
    assert_eq!(heuristic_outcomes(&runtime).await, "0");
    gate.add_permits(1);
    let started = Instant::now();
    while heuristic_outcomes(&runtime).await != "1" {
        assert!(started.elapsed() < Duration::from_secs(30), "never counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let logged = log.get(&record.id).unwrap().unwrap();
    assert!(logged.branches[0].resolution.is_some(), "{logged:?}");
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
}

/// Two operators resolve the same heuristic branch of a commit found only in the log,
/// the second while the first's write is queued and not yet readable (as in the durable
/// store, whose logger applies a batch later): the first is written and counted, the
/// second is refused, having read the record as the first left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resolves_of_one_branch_in_the_log_at_once_are_one_resolve() {
    let gate = Arc::new(Semaphore::new(0));
    let log = Arc::new(GatedLog::applied_at_gate(gate.clone()));
    let (runtime, tasks, record) = started_with_a_logged_heuristic(&log, &gate).await;

    let first = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.operate(record.id, resolve_as_commit("first")).await }
    });
    log.wait_for_writes(2).await;
    let second = tokio::spawn({
        let runtime = runtime.clone();
        async move {
            runtime
                .operate(record.id, resolve_as_commit("second"))
                .await
        }
    });
    // Unserialised, the second reads the record without the first's resolution and
    // writes too; give it the time to (bounded), then let every write through.
    let started = Instant::now();
    while log.writes.lock().unwrap().len() < 3 && started.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.add_permits(2);
    let first = first.await.unwrap().expect("the first resolve is written");
    let second = second.await.unwrap();
    assert!(
        matches!(
            second,
            Err(RuntimeError::Refused(Refusal::NothingToResolve { .. }))
        ),
        "the second resolve found nothing left to resolve: {second:?}"
    );
    let logged = log.get(&record.id).unwrap().unwrap();
    assert_eq!(logged, first);
    let resolution = logged.branches[0].resolution.as_ref().unwrap();
    assert_eq!(resolution.by, "first");
    assert_eq!(heuristic_outcomes(&runtime).await, "1");
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
}

/// An operator forgets a final transaction found only in the log while another resolves
/// its heuristic branch: the resolve, reading the record while the forget is queued,
/// must not write it back. The transaction stays forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_does_not_bring_back_a_transaction_being_forgotten() {
    let gate = Arc::new(Semaphore::new(0));
    let log = Arc::new(GatedLog::applied_at_gate(gate.clone()));
    let (runtime, tasks, record) = started_with_a_logged_heuristic(&log, &gate).await;

    let forget = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.forget(record.id).await }
    });
    let started = Instant::now();
    while log.forgets.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resolve = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.operate(record.id, resolve_as_commit("ops")).await }
    });
    let started = Instant::now();
    while log.writes.lock().unwrap().len() < 2 && started.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gate.add_permits(2);
    forget.await.unwrap().expect("the forget is written");
    let resolved = resolve.await.unwrap();
    assert!(
        matches!(resolved, Err(RuntimeError::UnknownTransaction(id)) if id == record.id),
        "the resolve came after the forget: {resolved:?}"
    );
    assert_eq!(log.get(&record.id).unwrap(), None, "forgotten for good");
    assert_eq!(heuristic_outcomes(&runtime).await, "0");
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
}

/// A commit that ended a while ago, whose only branch answered ABORTED to COMMIT: it is
/// written to `log` (one permit of `gate` is added for it) before the runtime starts, so
/// it is only in the log.
async fn started_with_a_logged_heuristic(
    log: &Arc<GatedLog>,
    gate: &Semaphore,
) -> (Runtime, RuntimeTasks, TxnRecord) {
    let mut record = two_phase_record(
        TxnState::Committed,
        &[(
            "a",
            "http://127.0.0.1:1",
            BranchState::Committed,
            Vec::new(),
        )],
    );
    record.ended_unix_ms = Some(record.created_unix_ms + 100);
    record.branches[0].heuristic = Some("answered ABORTED to COMMIT".into());
    gate.add_permits(1);
    log.write(&record, Durability::Forced).await.unwrap();
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let (runtime, tasks, report) = Runtime::start(log.clone(), config(), fatal).unwrap();
    assert_eq!(report.resumed, 0, "a final record stays in the log");
    (runtime, tasks, record)
}

/// An operator's statement that branch `a` committed, made by `by`.
fn resolve_as_commit(by: &str) -> OperatorRequest {
    OperatorRequest {
        command: OperatorCommand::Resolve {
            branch_id: "a".into(),
            outcome: Resolution::Commit,
        },
        by: by.into(),
        reason: "repaired by hand".into(),
    }
}

/// A participant that breaks the protocol the way heuristic outcomes come about: it votes
/// NO for branch "a" and YES for the others, and answers the abort of branch "b"
/// ALREADY_COMMITTED (it committed on its own). Unary calls only.
struct CommitsOnItsOwn;

#[tonic::async_trait]
impl treaty_proto::v1::participant_server::Participant for CommitsOnItsOwn {
    async fn prepare(
        &self,
        request: tonic::Request<treaty_proto::v1::PrepareBranchRequest>,
    ) -> Result<tonic::Response<treaty_proto::v1::PrepareBranchResponse>, tonic::Status> {
        use treaty_proto::v1::Vote;
        let vote = if request.get_ref().branch_id == "a" {
            Vote::No
        } else {
            Vote::Yes
        };
        Ok(tonic::Response::new(
            treaty_proto::v1::PrepareBranchResponse {
                vote: vote as i32,
                reason: "no".into(),
            },
        ))
    }
    async fn commit(
        &self,
        _: tonic::Request<treaty_proto::v1::CommitBranchRequest>,
    ) -> Result<tonic::Response<treaty_proto::v1::CommitBranchResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            treaty_proto::v1::CommitBranchResponse {
                result: treaty_proto::v1::CommitResult::Committed as i32,
                reason: String::new(),
            },
        ))
    }
    async fn abort(
        &self,
        request: tonic::Request<treaty_proto::v1::AbortBranchRequest>,
    ) -> Result<tonic::Response<treaty_proto::v1::AbortBranchResponse>, tonic::Status> {
        use treaty_proto::v1::AbortResult;
        let result = if request.get_ref().branch_id == "b" {
            AbortResult::AlreadyCommitted
        } else {
            AbortResult::Aborted
        };
        Ok(tonic::Response::new(
            treaty_proto::v1::AbortBranchResponse {
                result: result as i32,
            },
        ))
    }
    async fn compensate(
        &self,
        _: tonic::Request<treaty_proto::v1::CompensateBranchRequest>,
    ) -> Result<tonic::Response<treaty_proto::v1::CompensateBranchResponse>, tonic::Status> {
        Ok(tonic::Response::new(
            treaty_proto::v1::CompensateBranchResponse {
                result: treaty_proto::v1::CompensateResult::Compensated as i32,
            },
        ))
    }
    type CallsStream = treaty_sdk::call_stream::CallAnswers;
    async fn calls(
        &self,
        _: tonic::Request<tonic::Streaming<treaty_proto::v1::CallRequest>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("unary calls only"))
    }
}

/// An abort decided the classic way (no intent: nothing of it is in the log but its
/// history) whose branch "b" answered ALREADY_COMMITTED: an operator's resolve of that
/// branch is answered only once it is durable, as a resolve of a logged decision is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolve_of_an_abort_not_logged_is_answered_once_durable() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                treaty_proto::v1::participant_server::ParticipantServer::new(CommitsOnItsOwn),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let gate = Arc::new(Semaphore::new(0));
    let log = Arc::new(GatedLog::new(gate.clone()));
    let (fatal, _fatal) = mpsc::unbounded_channel();
    let config = RuntimeConfig {
        parallel_commit: false,
        ..config()
    };
    let (runtime, tasks, _) = Runtime::start(log.clone(), config, fatal).unwrap();
    let id = begin_two_branches(&runtime, &endpoint).await;
    // Branch "a" votes NO: decided abort, delivered to "b" at once or a moment later.
    let decided = runtime.commit(id).await.unwrap();
    assert!(
        matches!(decided.state, TxnState::Aborting | TxnState::Aborted),
        "{decided:?}"
    );
    let started = Instant::now();
    let ended = loop {
        let record = runtime.get(id).await.unwrap().unwrap();
        if record.state == TxnState::Aborted && record.branches[1].heuristic.is_some() {
            break record;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{record:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(ended.branches[1].resolution, None, "{ended:?}");
    assert!(
        log.writes
            .lock()
            .unwrap()
            .iter()
            .all(|(_, durability)| *durability == Durability::Lazy),
        "an abort without an intent forces nothing"
    );

    // The participant's answer is counted already; the operator's statement adds one.
    let counted_before: u64 = heuristic_outcomes(&runtime).await.parse().unwrap();
    let request = OperatorRequest {
        command: OperatorCommand::Resolve {
            branch_id: "b".into(),
            outcome: Resolution::Abort,
        },
        by: "ops".into(),
        reason: "undone by hand".into(),
    };
    let caller = tokio::spawn({
        let runtime = runtime.clone();
        async move { runtime.operate(id, request).await }
    });
    let started = Instant::now();
    while !log
        .writes
        .lock()
        .unwrap()
        .contains(&(TxnState::Aborted, Durability::Forced))
    {
        assert!(started.elapsed() < Duration::from_secs(30), "never forced");
        assert!(!caller.is_finished(), "answered before any forced write");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Held at the gate: not answered, not counted.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !caller.is_finished(),
        "answered before the write was durable"
    );
    assert_eq!(
        heuristic_outcomes(&runtime).await,
        counted_before.to_string()
    );
    gate.add_permits(1);
    let resolved = tokio::time::timeout(Duration::from_secs(30), caller)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(resolved.branches[1].resolution.is_some(), "{resolved:?}");
    assert_eq!(
        heuristic_outcomes(&runtime).await,
        (counted_before + 1).to_string()
    );
    let logged = log.get(&id).unwrap().unwrap();
    assert!(logged.branches[1].resolution.is_some(), "{logged:?}");
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
    server.abort();
}
