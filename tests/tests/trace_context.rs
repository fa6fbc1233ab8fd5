//! W3C trace context end to end: the `traceparent` an initiator sends with Begin or
//! SubmitSaga reaches every participant call of the transaction (prepare, commit,
//! retries, saga steps, compensations) with the same trace id and a fresh span id; an
//! invalid or missing one starts a new trace. And the daemon's log formats: JSON lines
//! that parse and carry the ids of their spans, text without colour codes in a file, no
//! `info` line per transaction.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::HashSet;
use std::time::Duration;

use treaty_proto::v1 as pb;
use treaty_sdk::TreatyClient;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome, SagaStep, SubmitOptions};
use treaty_sdk::trace::TraceContext;
use treaty_tests::harness::{Coordinator, PATIENCE, ParticipantServer};
use treaty_tests::process::{exit_status, start_treaty, start_treaty_with_env};
use treaty_tests::scripted::{Call, Op};

/// The example of the W3C specification.
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACESTATE: &str = "congo=t61rcWkgMzE";

fn initiator_trace() -> TraceContext {
    TraceContext::parse(TRACEPARENT, Some(TRACESTATE)).unwrap()
}

/// The calls of one transaction that reached the participant's code.
fn calls_of(participant: &ParticipantServer, transaction_id: &str) -> Vec<Call> {
    participant
        .participant
        .calls()
        .into_iter()
        .filter(|c| c.transaction_id == transaction_id)
        .collect()
}

/// Checks that every call carries `trace_id` (and the initiator's trace state) with a
/// span id that is not the initiator's; returns the span ids, call by call.
fn span_ids(calls: &[Call], trace_id: &str, tracestate: Option<&str>) -> Vec<String> {
    calls
        .iter()
        .map(|call| {
            let trace = call
                .trace
                .as_ref()
                .unwrap_or_else(|| panic!("{call:?} carried no trace"));
            assert_eq!(trace.trace_id_hex(), trace_id, "{call:?}");
            assert_eq!(trace.tracestate(), tracestate, "{call:?}");
            let span_id = trace.traceparent().parent_id_hex();
            assert_ne!(
                span_id, "00f067aa0ba902b7",
                "{call:?} reused the initiator's span"
            );
            span_id
        })
        .collect()
}

/// [`span_ids`], each call having come in a gRPC call of its own: a span id each.
fn assert_one_trace(calls: &[Call], trace_id: &str, tracestate: Option<&str>) {
    let ids = span_ids(calls, trace_id, tracestate);
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a span id used twice: {calls:?}");
}

/// Runs a 2PC of branches `a` and `b` at `endpoint` through `client` to its end (both
/// vote YES, so it commits); returns its id.
async fn commit_two_branches(client: &TreatyClient, endpoint: &str) -> String {
    let (id, outcome) = client
        .run_two_phase(
            vec![
                BranchSpec::new("a", endpoint, "yes"),
                BranchSpec::new("b", endpoint, "yes"),
            ],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    client.wait_until_finished(&id, PATIENCE).await.unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_sent_with_begin_reaches_prepare_and_commit_and_their_retries() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    // The first phase-2 commit fails: its retry must carry the trace too.
    participant.participant.fail_next_commits(1);
    let client = coordinator.client().await.with_trace(initiator_trace());
    let id = commit_two_branches(&client, &participant.endpoint).await;

    let calls = calls_of(&participant, &id);
    for branch in ["a", "b"] {
        assert_eq!(
            participant.participant.ops(&id, branch),
            [Op::Prepare, Op::Commit],
            "{calls:?}"
        );
    }
    assert_one_trace(&calls, TRACE_ID, Some(TRACESTATE));

    // The same from a client whose calls are unary: the trace travels as metadata.
    let id = commit_two_branches(&client.unary_only(), &participant.endpoint).await;
    let calls = calls_of(&participant, &id);
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_one_trace(&calls, TRACE_ID, Some(TRACESTATE));

    // Begun with the trace and committed in a call of its own that sends none: the
    // calls still carry the trace of Begin.
    let id = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("a", &participant.endpoint, "yes"),
                BranchSpec::new("b", &participant.endpoint, "yes"),
            ],
        )
        .await
        .unwrap();
    let untraced = coordinator.client().await;
    assert_eq!(untraced.commit(&id).await.unwrap(), Outcome::Committed);
    untraced.wait_until_finished(&id, PATIENCE).await.unwrap();
    let calls = calls_of(&participant, &id);
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert_one_trace(&calls, TRACE_ID, Some(TRACESTATE));
    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sagas_steps_and_compensations_carry_the_submitters_trace() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await.with_trace(initiator_trace());
    let submitted = client
        .submit_saga(
            vec![
                SagaStep::new("reserve", &participant.endpoint, "yes").compensation("undo"),
                SagaStep::new("charge", &participant.endpoint, "no").after(["reserve"]),
            ],
            SubmitOptions {
                wait_for_outcome: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    assert_eq!(
        participant.participant.ops(&id, "reserve"),
        [Op::Prepare, Op::Commit, Op::Compensate]
    );
    assert_eq!(participant.participant.ops(&id, "charge"), [Op::Prepare]);
    // A step arrives as one gRPC call (user code sees prepare + commit): one span id.
    let calls = calls_of(&participant, &id);
    let ids = span_ids(&calls, TRACE_ID, Some(TRACESTATE));
    let span_of = |branch: &str, op: Op| {
        let at = calls
            .iter()
            .position(|c| c.branch_id == branch && c.op == op)
            .unwrap();
        ids[at].clone()
    };
    let step = span_of("reserve", Op::Prepare);
    assert_eq!(span_of("reserve", Op::Commit), step);
    let compensation = span_of("reserve", Op::Compensate);
    let rejected = span_of("charge", Op::Prepare);
    assert_eq!(
        HashSet::from([&step, &compensation, &rejected]).len(),
        3,
        "{calls:?}"
    );
    coordinator.stop().await.unwrap();
    participant.stop().await;
}

/// Begins and commits in one call (through the raw gRPC API, to send any metadata at all)
/// a transaction of two branches on `endpoint`, with `traceparent` if given.
async fn begin_with_raw_traceparent(
    coordinator: &Coordinator,
    endpoint: &str,
    traceparent: Option<&str>,
) -> String {
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::BeginRequest {
        deadline_unix_ms: 0,
        prepare_timeout_ms: 0,
        branches: ["a", "b"]
            .map(|b| BranchSpec::new(b, endpoint, "yes").into())
            .to_vec(),
        commit: true,
    });
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
        request
            .metadata_mut()
            .insert("tracestate", TRACESTATE.parse().unwrap());
    }
    let begun = raw.begin(request).await.unwrap().into_inner();
    assert_eq!(begun.outcome(), pb::Outcome::Committed, "{begun:?}");
    let id = begun.transaction_id;
    let client = coordinator.client().await;
    // Committing again answers the same outcome.
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);
    client.wait_until_finished(&id, PATIENCE).await.unwrap();
    id
}

/// The one trace id every call of `transaction_id` carried.
fn trace_id_of(participant: &ParticipantServer, transaction_id: &str) -> String {
    let calls = calls_of(participant, transaction_id);
    assert_eq!(calls.len(), 4, "{calls:?}");
    let trace_id = calls[0].trace.as_ref().unwrap().trace_id_hex();
    assert_one_trace(&calls, &trace_id, None);
    trace_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_missing_traceparent_starts_a_new_trace_per_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let endpoint = participant.endpoint.clone();
    let invalid = [
        // All-zero trace id, all-zero parent id, unknown version, upper-case hex.
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "not a traceparent",
    ];
    let mut trace_ids = HashSet::new();
    for traceparent in invalid.map(Some).into_iter().chain([None]) {
        let id = begin_with_raw_traceparent(&coordinator, &endpoint, traceparent).await;
        // A new trace (its tracestate dropped with the invalid parent), one per transaction.
        let trace_id = trace_id_of(&participant, &id);
        assert_ne!(trace_id, TRACE_ID, "{traceparent:?}");
        assert_ne!(trace_id, "0".repeat(32));
        assert!(trace_ids.insert(trace_id), "{traceparent:?} reused a trace");
    }
    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_ids_of_their_spans() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let data_dir = dir.path().join("coordinator");
    let mut coordinator = start_treaty_with_env(
        &data_dir,
        "127.0.0.1:0",
        &[("TREATY_LOG_FORMAT", "json"), ("TREATY_LOG", "info")],
    )
    .await;
    let client = TreatyClient::connect(coordinator.endpoint())
        .await
        .unwrap()
        .with_trace(initiator_trace());
    // Committed: nothing about it may be logged at info.
    let (committed, outcome) = client
        .run_two_phase(
            vec![
                BranchSpec::new("a", &participant.endpoint, "yes"),
                BranchSpec::new("b", &participant.endpoint, "yes"),
            ],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    client
        .wait_until_finished(&committed, PATIENCE)
        .await
        .unwrap();
    // Aborted because a branch is unreachable: a warning, in the prepare call's span.
    let (aborted, outcome) = client
        .run_two_phase(
            vec![
                BranchSpec::new("a", &participant.endpoint, "yes"),
                BranchSpec::new("gone", "http://127.0.0.1:1", "yes"),
            ],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert!(!outcome.is_committed());
    coordinator.terminate();
    assert!(exit_status(&mut coordinator).await.success());

    let log = std::fs::read_to_string(&coordinator.log_file).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(value.is_object(), "{line}");
            assert!(value["level"].is_string(), "{line}");
            assert!(value["fields"].is_object(), "{line}");
            value
        })
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "coordinator serving"),
        "{log}"
    );
    let unreachable = lines
        .iter()
        .find(|l| l["fields"]["message"] == "participant unreachable")
        .unwrap_or_else(|| panic!("no warning about the unreachable branch:\n{log}"));
    assert_eq!(unreachable["level"], "WARN");
    assert_eq!(unreachable["span"]["name"], "call");
    assert_eq!(unreachable["span"]["branch_id"], "gone");
    assert_eq!(unreachable["span"]["op"], "prepare");
    assert_eq!(unreachable["span"]["trace_id"], TRACE_ID);
    let spans = unreachable["spans"].as_array().unwrap();
    assert!(
        spans
            .iter()
            .any(|s| s["name"] == "txn" && s["txn_id"] == aborted.as_str()),
        "{unreachable}"
    );
    for line in lines.iter().filter(|l| l["level"] == "INFO") {
        let text = line.to_string();
        assert!(
            !text.contains(&committed) && !text.contains(&aborted),
            "a transaction logged at info: {text}"
        );
    }
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_written_to_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator = start_treaty(&dir.path().join("coordinator"), "127.0.0.1:0", None).await;
    coordinator.terminate();
    assert!(exit_status(&mut coordinator).await.success());
    // Give the last lines a moment to reach the file.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let log = std::fs::read_to_string(&coordinator.log_file).unwrap();
    assert!(log.contains("coordinator serving"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a log file:\n{log}"
    );
}
