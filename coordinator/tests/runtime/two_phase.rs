//! Two-phase commits: what is shown while a decision is written, callers that give up,
//! the delivery horizon, a recovered intent, and a lazy write that fails.

use super::*;

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
    assert_eq!(
        heuristic_outcomes(&runtime).await,
        "1",
        "an operator's statement"
    );
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
