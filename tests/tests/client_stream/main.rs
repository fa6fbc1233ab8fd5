//! The client's calls on the coordinator's `Calls` stream: answered exactly as the unary
//! calls are (outcomes, field errors, machine-readable details), authenticated for every
//! call, and never holding up the daemon's stop. Real gRPC on 127.0.0.1, real sled
//! directories, and a real daemon process for the token reload.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::Code;
use tonic_types::StatusExt;
use treaty_proto::v1 as pb;
use treaty_sdk::client::{
    BeginOptions, BranchSpec, ClientError, ClientOptions, Outcome, SagaStep, SubmitOptions,
    TransactionState, Transport, TreatyClient,
};
use treaty_tests::harness::{
    Coordinator, PATIENCE, ParticipantServer, coordinator_config, eventually,
};
use treaty_tests::silent_link::SilentLink;

mod on_a_stand_in;
mod stand_in;

const ALICE_TOKEN: &str = "alice-token-0123456789";
const BOB_TOKEN: &str = "bob-token-0123456789ab";

/// An id no coordinator has seen (a well-formed UUID).
const UNKNOWN_ID: &str = "01a24ce0-0000-7000-8000-000000000000";

async fn connect_as(endpoint: &str, token: Option<&str>) -> TreatyClient {
    let options = ClientOptions {
        tls: None,
        token: token.map(str::to_string),
        ..Default::default()
    };
    TreatyClient::connect_with(endpoint, &options)
        .await
        .unwrap()
}

/// Runs the same calls through `client` and returns what each gave, in a form that can
/// be compared between a client on the stream and one that is unary only.
async fn what_the_calls_give(client: &TreatyClient, endpoint: &str, tag: &str) -> Vec<String> {
    let yes = |id: &str| BranchSpec::new(id, endpoint, "yes");
    let mut seen = Vec::new();

    let (_, outcome) = client
        .run_two_phase(vec![yes("a"), yes("b")], BeginOptions::default())
        .await
        .unwrap();
    seen.push(format!("run_two_phase: {outcome:?}"));
    let (_, outcome) = client
        .run_two_phase(
            vec![yes("a"), BranchSpec::new("b", endpoint, "no")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    seen.push(format!("run_two_phase with a NO: {outcome:?}"));

    let id = client
        .begin(BeginOptions::default(), vec![yes("a")])
        .await
        .unwrap();
    client.enlist(&id, yes("b")).await.unwrap();
    seen.push(format!(
        "begin, enlist, commit: {:?}",
        client.commit(&id).await
    ));
    seen.push(format!("commit again: {:?}", client.commit(&id).await));

    let id = client
        .begin(BeginOptions::default(), vec![yes("a")])
        .await
        .unwrap();
    client.abort(&id, "changed my mind").await.unwrap();
    let state = client.get(&id).await.unwrap().unwrap().state;
    seen.push(format!(
        "abort: {:?}",
        pb::TransactionState::try_from(state).unwrap()
    ));

    // Errors: the code, the message naming the field, and the machine-readable detail.
    let error = client.commit(UNKNOWN_ID).await.unwrap_err();
    seen.push(format!(
        "unknown: {:?} {:?}",
        error.code(),
        error.unknown_transaction()
    ));
    let error = client
        .run_two_phase(Vec::new(), BeginOptions::default())
        .await
        .unwrap_err();
    let ClientError::Status(status) = &error else {
        panic!("not a status: {error:?}");
    };
    seen.push(format!(
        "no branches: {:?} {}",
        status.code(),
        status.message().split(':').next().unwrap()
    ));
    let error = client
        .enlist(&id, BranchSpec::new("bad/id", endpoint, "yes"))
        .await
        .unwrap_err();
    let ClientError::Status(status) = &error else {
        panic!("not a status: {error:?}");
    };
    seen.push(format!(
        "bad branch id: {:?} {}",
        status.code(),
        status.message().split(':').next().unwrap()
    ));

    // Sagas submitted to wait for their outcome: one completes, one is compensated.
    for script in ["yes", "no"] {
        let saga = client
            .submit_saga(
                vec![
                    SagaStep::new("s1", endpoint, "yes"),
                    SagaStep::new("s2", endpoint, script).after(["s1"]),
                ],
                SubmitOptions {
                    wait_for_outcome: true,
                    ..SubmitOptions::default()
                },
            )
            .await
            .unwrap();
        seen.push(format!(
            "submit and wait, {script}: {:?}",
            pb::TransactionState::try_from(saga.transaction.state).unwrap()
        ));
    }

    // A saga submitted without waiting, then cancelled.
    let submitted = client
        .submit_saga(
            vec![SagaStep::new("s", endpoint, "yes")],
            SubmitOptions {
                idempotency_key: Some(format!("key-{tag}")),
                ..SubmitOptions::default()
            },
        )
        .await
        .unwrap();
    seen.push(format!("submit: created {}", submitted.created));
    let (_, saga) = client
        .cancel_saga(&submitted.transaction_id, "test")
        .await
        .unwrap();
    seen.push(format!(
        "cancel: same saga {}",
        saga.transaction_id == submitted.transaction_id
    ));
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_calls_on_the_stream_are_answered_as_unary_calls_are() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = TreatyClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    assert_eq!(client.transport(), Transport::NoStreamOpen);

    let on_the_stream = what_the_calls_give(&client, &participant.endpoint, "stream").await;
    assert_eq!(
        client.transport(),
        Transport::Stream,
        "the coordinator serves the stream"
    );
    let unary = client.unary_only();
    assert_eq!(unary.transport(), Transport::Unary);
    let unary_calls = what_the_calls_give(&unary, &participant.endpoint, "unary").await;
    assert_eq!(on_the_stream, unary_calls);
    // What they gave, so that "the same" cannot mean "the same failure".
    assert_eq!(
        on_the_stream,
        vec![
            "run_two_phase: Committed".to_string(),
            "run_two_phase with a NO: Aborted { reason: \"branch b voted NO: scripted NO\" }"
                .to_string(),
            "begin, enlist, commit: Ok(Committed)".to_string(),
            "commit again: Ok(Committed)".to_string(),
            "abort: Aborted".to_string(),
            format!("unknown: Some(InvalidArgument) Some(\"{UNKNOWN_ID}\")"),
            "no branches: InvalidArgument branches".to_string(),
            "bad branch id: InvalidArgument branch.branch_id".to_string(),
            "submit and wait, yes: Completed".to_string(),
            "submit and wait, no: Compensated".to_string(),
            "submit: created true".to_string(),
            "cancel: same saga true".to_string(),
        ]
    );

    // Many calls at once share the one stream.
    let runs = (0..32).map(|i| {
        let client = client.clone();
        let endpoint = participant.endpoint.clone();
        async move {
            let branches = vec![BranchSpec::new(format!("b{i}"), &endpoint, "yes")];
            client
                .run_two_phase(branches, BeginOptions::default())
                .await
        }
    });
    for result in futures::future::join_all(runs).await {
        assert_eq!(result.unwrap().1, Outcome::Committed);
    }
    assert_eq!(client.transport(), Transport::Stream);

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_the_stream_without_its_call_is_refused_under_its_number() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let calls = futures::stream::iter([
        pb::TransactionCall {
            call_id: 7,
            ..Default::default()
        },
        pb::TransactionCall {
            call_id: 8,
            call: Some(pb::transaction_call::Call::Commit(pb::CommitRequest {
                transaction_id: "not-an-id".into(),
            })),
            ..Default::default()
        },
        // A submit that would wait, checked before anything is submitted.
        pb::TransactionCall {
            call_id: 9,
            call: Some(pb::transaction_call::Call::SubmitSaga(
                pb::SubmitSagaRequest {
                    steps: vec![pb::SagaStep {
                        step_id: "s".into(),
                        endpoint: "not an endpoint".into(),
                        ..Default::default()
                    }],
                    wait_for_outcome: true,
                    ..Default::default()
                },
            )),
            ..Default::default()
        },
        // The withdrawal of a call the stream never had: not answered.
        pb::TransactionCall {
            call_id: 10,
            call: Some(pb::transaction_call::Call::Withdraw(pb::WithdrawCall {})),
            ..Default::default()
        },
    ]);
    let mut answers = raw.calls(calls).await.unwrap().into_inner();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let answer = tokio::time::timeout(Duration::from_secs(30), answers.next())
            .await
            .expect("an answer")
            .expect("the stream is open")
            .unwrap();
        let Some(pb::transaction_answer::Answer::Error(error)) = answer.answer else {
            panic!("not an error: {answer:?}");
        };
        assert_eq!(error.code, Code::InvalidArgument as i32);
        seen.push((
            answer.call_id,
            error.message.split(':').next().unwrap().to_string(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (7, "call".to_string()),
            (8, "transaction_id".to_string()),
            (9, "steps[0].endpoint".to_string())
        ]
    );
    // The stream ended after the three answers: the withdrawal got none.
    let end = tokio::time::timeout(Duration::from_secs(30), answers.next())
        .await
        .expect("the stream ends");
    assert!(end.is_none(), "an answer to a withdrawal: {end:?}");
    let (page, _) = TreatyClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap()
        .list(&[], 10, "")
        .await
        .unwrap();
    assert!(page.is_empty(), "a refused call created something");
    coordinator.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_the_stream_are_authenticated_and_checked_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice {ALICE_TOKEN}\nbob {BOB_TOKEN}\n")).unwrap();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.auth_tokens = Some(tokens);
    let coordinator = Coordinator::start_with(config).await;
    let branches = || vec![BranchSpec::new("a", &participant.endpoint, "yes")];

    // Refused at the stream's start: the call hears UNAUTHENTICATED, as unary.
    let stranger = connect_as(&coordinator.endpoint, Some("alice-token-0123456780")).await;
    let error = stranger
        .run_two_phase(branches(), BeginOptions::default())
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::Unauthenticated), "{error}");
    assert!(participant.participant.calls().is_empty());

    let alice = connect_as(&coordinator.endpoint, Some(ALICE_TOKEN)).await;
    let bob = connect_as(&coordinator.endpoint, Some(BOB_TOKEN)).await;
    let id = alice
        .begin(BeginOptions::default(), branches())
        .await
        .unwrap();
    bob.begin(BeginOptions::default(), branches())
        .await
        .unwrap();
    assert_eq!(alice.transport(), Transport::Stream);
    assert_eq!(bob.transport(), Transport::Stream);
    // Each call is checked against its principal, on a stream as unary.
    let error = bob.commit(&id).await.unwrap_err();
    assert_eq!(error.code(), Some(Code::PermissionDenied), "{error}");
    let error = bob.abort(&id, "not mine").await.unwrap_err();
    assert_eq!(error.code(), Some(Code::PermissionDenied), "{error}");
    assert_eq!(alice.commit(&id).await.unwrap(), Outcome::Committed);

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_on_a_stream_opened_with_it_and_the_daemon_still_stops() {
    use treaty_tests::process::start_treaty_with;
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice {ALICE_TOKEN}\nbob {BOB_TOKEN}\n")).unwrap();
    let tokens_path = tokens.to_string_lossy().into_owned();
    let mut daemon = start_treaty_with(
        &dir.path().join("coordinator"),
        "127.0.0.1:0",
        // A stream holding the stop up would be waited for this long.
        &[
            "--auth-tokens",
            &tokens_path,
            "--shutdown-grace-ms",
            "600000",
        ],
        &[],
    )
    .await;
    let endpoint = format!("http://127.0.0.1:{}", daemon.address.port());
    let alice = connect_as(&endpoint, Some(ALICE_TOKEN)).await;
    let branches = || vec![BranchSpec::new("a", &participant.endpoint, "yes")];
    let (_, outcome) = alice
        .run_two_phase(branches(), BeginOptions::default())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    assert_eq!(alice.transport(), Transport::Stream);

    std::fs::write(&tokens, format!("bob {BOB_TOKEN}\n")).unwrap();
    daemon.hang_up();
    let alice_refused = || {
        let alice = alice.clone();
        let branches = branches();
        async move {
            let error = alice
                .run_two_phase(branches, BeginOptions::default())
                .await
                .err()?;
            (error.code() == Some(Code::Unauthenticated)).then_some(())
        }
    };
    eventually(
        "the removed token is refused on the open stream",
        alice_refused,
    )
    .await;
    assert_eq!(
        alice.transport(),
        Transport::Stream,
        "refused call by call, on the stream opened with the token"
    );

    // The stream stays open until the daemon stops; it does not hold the stop up.
    daemon.terminate();
    let status = daemon
        .wait_exit(treaty_tests::harness::PATIENCE)
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_out_of_reach_is_unavailable_on_the_stream_as_unary() {
    // Port 1: nothing listens there, and no other test binds it.
    let client = TreatyClient::connect_lazy("http://127.0.0.1:1").unwrap();
    let branches = || vec![BranchSpec::new("a", "http://127.0.0.1:1", "yes")];
    for client in [client.clone(), client.unary_only()] {
        let error = client
            .run_two_phase(branches(), BeginOptions::default())
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(Code::Unavailable), "{error}");
    }
}

/// A call whose connection goes silent while it waits (the coordinator's host lost
/// power, or a middlebox dropped the flow: nothing closes it) fails UNAVAILABLE once the
/// client's pings go unanswered for `keepalive_timeout_ms`; it waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_connection_goes_silent_fails_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let direct = coordinator.client().await;
    let options = ClientOptions {
        keepalive_interval_ms: 300,
        keepalive_timeout_ms: 1_000,
        ..Default::default()
    };
    // On the stream, then unary.
    for (begun, unary) in [(1, false), (2, true)] {
        let link = SilentLink::start(&coordinator.endpoint).await;
        let mut linked = TreatyClient::connect_with(&link.endpoint, &options)
            .await
            .unwrap();
        if unary {
            linked = linked.unary_only();
        }
        // The prepare takes 1.5 s, so the answer comes after the link went silent.
        let branches = vec![BranchSpec::new("slow", &participant.endpoint, "slow:1500")];
        let started = Instant::now();
        let running = tokio::spawn(async move {
            linked
                .run_two_phase(branches, BeginOptions::default())
                .await
        });
        eventually("the transaction is begun", || async {
            let (listed, _) = direct.list(&[], 100, "").await.unwrap();
            (listed.len() >= begun).then_some(())
        })
        .await;
        link.go_silent();
        let error = tokio::time::timeout(PATIENCE, running)
            .await
            .expect("the call fails instead of waiting for ever")
            .unwrap()
            .unwrap_err();
        assert_eq!(
            error.code(),
            Some(Code::Unavailable),
            "unary {unary}: {error}"
        );
        assert!(started.elapsed() < PATIENCE, "{:?}", started.elapsed());
    }
    // A watch whose connection goes silent ends UNAVAILABLE too (tonic said UNKNOWN).
    let active = direct
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("x", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    let link = SilentLink::start(&coordinator.endpoint).await;
    let linked = TreatyClient::connect_with(&link.endpoint, &options)
        .await
        .unwrap();
    let watch = linked
        .watch(&active)
        .await
        .unwrap()
        .expect("a known transaction");
    let mut watch = std::pin::pin!(watch);
    use futures::StreamExt;
    let first = tokio::time::timeout(PATIENCE, watch.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    link.go_silent();
    let ended = tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("the watch ends instead of waiting for ever");
    let Some(Err(error)) = ended else {
        panic!("the watch ended without an error: {ended:?}");
    };
    assert_eq!(error.code(), Some(Code::Unavailable), "{error}");
    direct.abort(&active, "the test is over").await.unwrap();
    // The coordinator went on without its callers.
    let (listed, _) = direct.list(&[], 100, "").await.unwrap();
    assert_eq!(listed.len(), 3);
    for transaction in listed.iter().filter(|t| t.transaction_id != active) {
        let finished = direct
            .wait_until_finished(&transaction.transaction_id, PATIENCE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(finished.state, TransactionState::Committed as i32);
    }
    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// Keepalive settings outside 1 ms..=1 h are refused, naming the field, before any
/// connection is tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_settings_out_of_range_are_refused_by_name() {
    for (options, field) in [
        (
            ClientOptions {
                keepalive_interval_ms: 0,
                ..Default::default()
            },
            "keepalive_interval_ms",
        ),
        (
            ClientOptions {
                keepalive_timeout_ms: 3_600_001,
                ..Default::default()
            },
            "keepalive_timeout_ms",
        ),
    ] {
        let error = TreatyClient::connect_lazy_with("http://127.0.0.1:1", &options).unwrap_err();
        assert!(error.to_string().contains(field), "{error}");
    }
}
