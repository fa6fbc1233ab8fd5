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
