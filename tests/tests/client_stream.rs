//! The client's calls on the coordinator's `Calls` stream: answered exactly as the unary
//! calls are (outcomes, field errors, machine-readable details), authenticated for every
//! call, and never holding up the daemon's stop. Real gRPC on 127.0.0.1, real sled
//! directories, and a real daemon process for the token reload.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::Code;
use tonic_types::StatusExt;
use treaty_proto::v1 as pb;
use treaty_sdk::client::{
    BeginOptions, BranchSpec, ClientError, ClientOptions, Outcome, SagaStep, SubmitOptions,
    Transport, TreatyClient,
};
use treaty_tests::harness::{Coordinator, ParticipantServer, coordinator_config, eventually};

const ALICE_TOKEN: &str = "alice-token-0123456789";
const BOB_TOKEN: &str = "bob-token-0123456789ab";

/// An id no coordinator has seen (a well-formed UUID).
const UNKNOWN_ID: &str = "01a24ce0-0000-7000-8000-000000000000";

async fn connect_as(endpoint: &str, token: Option<&str>) -> TreatyClient {
    let options = ClientOptions {
        tls: None,
        token: token.map(str::to_string),
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

/// A stand-in coordinator that runs a Begin with `commit` (as committed, under an id that
/// says how the call came) and answers everything else UNIMPLEMENTED: with `stream`, it
/// serves Begin on the `Calls` stream only; without, unary only (a coordinator from
/// before `Calls`). A SubmitSaga that waits is answered unary, and on the stream as
/// `waits` says, under an id that says how it came; withdrawals on its stream go
/// unanswered. With `hanging`, its stream is served
/// by the SDK's machinery instead (4 places) and every call on it hangs, counted in
/// `hanging`.
#[derive(Clone)]
struct StandIn {
    stream: bool,
    waits: WaitsOnStream,
    hanging: Option<Arc<Hanging>>,
    /// Waiting SubmitSagas that came on the stream.
    waits_on_stream: Arc<AtomicUsize>,
    /// Never turns true: the stand-in's streams end with their caller.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

/// How a stand-in answers a SubmitSaga that waits, on its stream.
#[derive(Clone, Copy, Debug)]
enum WaitsOnStream {
    Served,
    /// Refused as a coordinator whose waits are all taken refuses it.
    AllTaken,
    /// Refused as a coordinator from before such waits refused it.
    RefusedAsBefore,
    /// Never answered: each holds one of the connection's waits.
    Held,
    /// Answered with an error that is not a refusal of the wait.
    Failed,
    /// Not answered: the stream breaks instead.
    Broken,
}

impl StandIn {
    fn new(stream: bool, waits: WaitsOnStream, hanging: Option<Arc<Hanging>>) -> Self {
        Self {
            stream,
            waits,
            hanging,
            waits_on_stream: Arc::default(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// A stand-in whose stream calls all hang, served: what hangs, its endpoint, its stop.
    async fn hanging() -> (Arc<Hanging>, String, impl AsyncFnOnce()) {
        let hanging = Arc::new(Hanging::default());
        let (endpoint, stop) = Self::new(true, WaitsOnStream::Served, Some(hanging.clone()))
            .serve()
            .await;
        (hanging, endpoint, stop)
    }

    /// Serves it on a port of its own until the returned stop is called.
    async fn serve(self) -> (String, impl AsyncFnOnce()) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::coordinator_server::CoordinatorServer::new(self))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        let stop = async move || {
            stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(60), server)
                .await
                .expect("the server stops")
                .unwrap()
                .unwrap();
        };
        (endpoint, stop)
    }
}

/// The calls a stand-in's stream left hanging: begun in all, and hanging now.
#[derive(Default)]
struct Hanging {
    started: AtomicUsize,
    live: AtomicUsize,
}

impl Hanging {
    /// Waits until `started` calls have begun and `live` of them hang.
    async fn until(self: &Arc<Self>, what: &str, started: usize, live: usize) {
        eventually(what, || {
            let hanging = self.clone();
            async move {
                let now = (
                    hanging.started.load(Ordering::SeqCst),
                    hanging.live.load(Ordering::SeqCst),
                );
                (now == (started, live)).then_some(())
            }
        })
        .await;
    }
}

/// Counts a hanging call until it is dropped.
struct Hangs(Arc<Hanging>);

impl Drop for Hangs {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn submitted(transaction_id: &str) -> pb::SubmitSagaResponse {
    pb::SubmitSagaResponse {
        transaction_id: transaction_id.into(),
        created: true,
        transaction: Some(pb::Transaction::default()),
    }
}

fn unimplemented<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented("not in this coordinator"))
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for StandIn {
    async fn begin(
        &self,
        request: tonic::Request<pb::BeginRequest>,
    ) -> Result<tonic::Response<pb::BeginResponse>, tonic::Status> {
        if self.stream {
            return unimplemented();
        }
        assert!(request.into_inner().commit);
        Ok(tonic::Response::new(committed("unary")))
    }
    async fn enlist(
        &self,
        _: tonic::Request<pb::EnlistRequest>,
    ) -> Result<tonic::Response<pb::EnlistResponse>, tonic::Status> {
        unimplemented()
    }
    async fn commit(
        &self,
        _: tonic::Request<pb::CommitRequest>,
    ) -> Result<tonic::Response<pb::CommitResponse>, tonic::Status> {
        unimplemented()
    }
    async fn abort(
        &self,
        _: tonic::Request<pb::AbortRequest>,
    ) -> Result<tonic::Response<pb::AbortResponse>, tonic::Status> {
        unimplemented()
    }
    async fn get_transaction(
        &self,
        _: tonic::Request<pb::GetTransactionRequest>,
    ) -> Result<tonic::Response<pb::GetTransactionResponse>, tonic::Status> {
        unimplemented()
    }
    async fn list_transactions(
        &self,
        _: tonic::Request<pb::ListTransactionsRequest>,
    ) -> Result<tonic::Response<pb::ListTransactionsResponse>, tonic::Status> {
        unimplemented()
    }
    type WatchTransactionStream =
        futures::stream::Empty<Result<pb::WatchTransactionResponse, tonic::Status>>;
    async fn watch_transaction(
        &self,
        _: tonic::Request<pb::WatchTransactionRequest>,
    ) -> Result<tonic::Response<Self::WatchTransactionStream>, tonic::Status> {
        unimplemented()
    }
    async fn get_outcome(
        &self,
        _: tonic::Request<pb::GetOutcomeRequest>,
    ) -> Result<tonic::Response<pb::GetOutcomeResponse>, tonic::Status> {
        unimplemented()
    }
    async fn submit_saga(
        &self,
        request: tonic::Request<pb::SubmitSagaRequest>,
    ) -> Result<tonic::Response<pb::SubmitSagaResponse>, tonic::Status> {
        assert!(request.into_inner().wait_for_outcome);
        Ok(tonic::Response::new(submitted("unary")))
    }
    async fn cancel_saga(
        &self,
        _: tonic::Request<pb::CancelSagaRequest>,
    ) -> Result<tonic::Response<pb::CancelSagaResponse>, tonic::Status> {
        unimplemented()
    }
    type CallsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::TransactionAnswer, tonic::Status>> + Send>,
    >;
    async fn calls(
        &self,
        request: tonic::Request<tonic::Streaming<pb::TransactionCall>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        use futures::StreamExt;
        if !self.stream {
            return unimplemented();
        }
        if let Some(hanging) = self.hanging.clone() {
            let stopping = self.stopping.subscribe();
            return Ok(treaty_sdk::call_stream::serve_calls::<
                treaty_sdk::call_stream::TransactionCalls,
                _,
                _,
            >(request, stopping, 4, move |_, _, _| {
                hanging.started.fetch_add(1, Ordering::SeqCst);
                hanging.live.fetch_add(1, Ordering::SeqCst);
                let hangs = Hangs(hanging.clone());
                async move {
                    let _hangs = hangs;
                    std::future::pending::<()>().await;
                    unreachable!("a pending future ended")
                }
            }));
        }
        let waits = self.waits;
        let waits_on_stream = self.waits_on_stream.clone();
        let answers = request.into_inner().filter_map(move |call| {
            futures::future::ready(answer_on_stream(call, waits, &waits_on_stream))
        });
        Ok(tonic::Response::new(Box::pin(answers)))
    }
}

/// The stand-in's answer to one call on its stream, if it answers it.
fn answer_on_stream(
    call: Result<pb::TransactionCall, tonic::Status>,
    waits: WaitsOnStream,
    waits_on_stream: &AtomicUsize,
) -> Option<Result<pb::TransactionAnswer, tonic::Status>> {
    use pb::transaction_answer::Answer;
    use pb::transaction_call::Call;
    let call = match call {
        Ok(call) => call,
        Err(status) => return Some(Err(status)),
    };
    let answer = match call.call {
        Some(Call::Begin(begin)) => {
            assert!(begin.commit);
            Answer::Begin(committed("stream"))
        }
        Some(Call::SubmitSaga(submit)) => {
            assert!(submit.wait_for_outcome);
            waits_on_stream.fetch_add(1, Ordering::SeqCst);
            match waits {
                WaitsOnStream::Served => Answer::SubmitSaga(submitted("stream")),
                WaitsOnStream::Held => return None,
                WaitsOnStream::Failed => Answer::Error(treaty_sdk::call_stream::call_error(
                    &tonic::Status::failed_precondition("the stand-in fails it"),
                )),
                WaitsOnStream::Broken => {
                    return Some(Err(tonic::Status::internal("the stand-in breaks it")));
                }
                WaitsOnStream::AllTaken => {
                    use treaty_proto::error_info::{DOMAIN, STREAM_WAITS_TAKEN};
                    Answer::Error(treaty_sdk::call_stream::call_error(
                        &tonic::Status::with_error_details(
                            Code::ResourceExhausted,
                            "every wait is taken",
                            tonic_types::ErrorDetails::with_error_info(
                                STREAM_WAITS_TAKEN,
                                DOMAIN,
                                [],
                            ),
                        ),
                    ))
                }
                // What the coordinator answered from 3f62934 to b4d6f73.
                WaitsOnStream::RefusedAsBefore => Answer::Error(
                    treaty_sdk::call_stream::call_error(&tonic::Status::invalid_argument(
                        "wait_for_outcome: not on the Calls stream: submit unary to wait \
                             for the outcome",
                    )),
                ),
            }
        }
        // Withdrawals of held waits are not answered.
        Some(Call::Withdraw(_)) => return None,
        _ => {
            return Some(Err(tonic::Status::unimplemented(
                "only Begin and SubmitSaga",
            )));
        }
    };
    Some(Ok(pb::TransactionAnswer {
        call_id: call.call_id,
        answer: Some(answer),
    }))
}

fn committed(transaction_id: &str) -> pb::BeginResponse {
    pb::BeginResponse {
        transaction_id: transaction_id.into(),
        outcome: pb::Outcome::Committed as i32,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_calls_on_the_stream_where_it_is_served_and_unary_where_not() {
    for (stream, waits, came, waited, transport) in [
        (
            true,
            WaitsOnStream::Served,
            "stream",
            "stream",
            Transport::Stream,
        ),
        (
            true,
            WaitsOnStream::AllTaken,
            "stream",
            "unary",
            Transport::Stream,
        ),
        (
            true,
            WaitsOnStream::RefusedAsBefore,
            "stream",
            "unary",
            Transport::Stream,
        ),
        (
            false,
            WaitsOnStream::Served,
            "unary",
            "unary",
            Transport::Unary,
        ),
    ] {
        let (endpoint, stop) = StandIn::new(stream, waits, None).serve().await;
        let client = TreatyClient::connect(endpoint).await.unwrap();
        let branches = || vec![BranchSpec::new("a", "http://127.0.0.1:1", "yes")];
        for _ in 0..3 {
            let (id, outcome) = client
                .run_two_phase(branches(), BeginOptions::default())
                .await
                .unwrap();
            assert_eq!((id.as_str(), outcome), (came, Outcome::Committed));
            assert_eq!(client.transport(), transport);
            // A submit that waits goes on the stream too, unless the coordinator refuses
            // it there (every wait taken, or a coordinator from before): then it goes
            // again, unary.
            let saga = submit_to_wait(&client).await.unwrap();
            assert_eq!(saga.transaction_id, waited);
            assert_eq!(client.transport(), transport);
        }
        drop(client);
        stop().await;
    }
}

/// Submits a one-step saga to wait for its outcome (a stand-in answers it at once or
/// never, as its `WaitsOnStream` says).
async fn submit_to_wait(
    client: &TreatyClient,
) -> Result<treaty_sdk::client::SubmittedSaga, ClientError> {
    client
        .submit_saga(
            vec![SagaStep::new("s", "http://127.0.0.1:1", "yes")],
            SubmitOptions {
                wait_for_outcome: true,
                ..SubmitOptions::default()
            },
        )
        .await
}

/// A client has no more waiting submits on the stream than the coordinator keeps waits
/// for per connection: the next goes unary at once, rather than after a refusal on the
/// stream, and a wait given up frees its place for the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_coordinators_waits_a_waiting_submit_goes_unary_at_once() {
    const WAITS: usize = treaty_sdk::connections::MAX_CONCURRENT_STREAMS as usize;
    let stand_in = StandIn::new(true, WaitsOnStream::Held, None);
    let waits_on_stream = stand_in.waits_on_stream.clone();
    let (endpoint, stop) = stand_in.serve().await;
    let client = TreatyClient::connect(endpoint).await.unwrap();
    let waiting_submit = || {
        let client = client.clone();
        async move { submit_to_wait(&client).await }
    };
    let on_stream = |count: usize| {
        let waits_on_stream = waits_on_stream.clone();
        async move { (waits_on_stream.load(Ordering::SeqCst) == count).then_some(()) }
    };
    let mut held: Vec<_> = (0..WAITS).map(|_| tokio::spawn(waiting_submit())).collect();
    eventually("every wait held on the stream", || on_stream(WAITS)).await;
    let saga = tokio::time::timeout(Duration::from_secs(30), waiting_submit())
        .await
        .expect("the submit past the waits was answered (it went on the stream and was held)")
        .unwrap();
    assert_eq!(saga.transaction_id, "unary");
    assert_eq!(waits_on_stream.load(Ordering::SeqCst), WAITS);
    // One held submit given up: the next takes its place on the stream.
    let given_up = held.pop().unwrap();
    given_up.abort();
    assert!(given_up.await.unwrap_err().is_cancelled());
    held.push(tokio::spawn(waiting_submit()));
    eventually("the next wait on the stream", || on_stream(WAITS + 1)).await;
    for task in held {
        task.abort();
    }
    drop(client);
    stop().await;
}

/// A waiting submit whose wait on the stream ends without its saga's outcome (an
/// error answer, a broken stream) gives its wait back: more of them, one after
/// another, than the client holds waits for all still go on the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_ends_in_an_error_or_a_broken_stream_is_given_back() {
    const WAITS: usize = treaty_sdk::connections::MAX_CONCURRENT_STREAMS as usize;
    for (waits, code) in [
        (WaitsOnStream::Failed, Code::FailedPrecondition),
        (WaitsOnStream::Broken, Code::Unavailable),
    ] {
        let stand_in = StandIn::new(true, waits, None);
        let waits_on_stream = stand_in.waits_on_stream.clone();
        let (endpoint, stop) = stand_in.serve().await;
        let client = TreatyClient::connect(endpoint).await.unwrap();
        for submit in 1..=WAITS + 1 {
            let answer = tokio::time::timeout(Duration::from_secs(30), submit_to_wait(&client))
                .await
                .expect("answered in time");
            match answer {
                Err(error) => assert_eq!(error.code(), Some(code), "{waits:?}, submit {submit}"),
                Ok(saga) => panic!(
                    "{waits:?}: submit {submit} went unary ({}): a wait was not given back",
                    saga.transaction_id
                ),
            }
            assert_eq!(waits_on_stream.load(Ordering::SeqCst), submit, "{waits:?}");
        }
        drop(client);
        stop().await;
    }
}

/// The coordinator keeps 256 waits per connection for SubmitSagas that wait on the
/// stream, apart from the 256 places of calls being answered: a wait holds no place,
/// the 257th wait is refused before anything is submitted, and a withdrawn wait is
/// cancelled and frees its wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_on_the_stream_hold_no_place_are_bounded_and_are_withdrawn() {
    use futures::StreamExt;
    use pb::transaction_answer::Answer;
    use pb::transaction_call::Call;
    const WAITS: u64 = treaty_sdk::connections::MAX_CONCURRENT_STREAMS as u64;
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let (calls, requests) = tokio::sync::mpsc::channel(2 * WAITS as usize);
    let mut answers = raw
        .calls(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let mut next_answer = async || {
        tokio::time::timeout(Duration::from_secs(60), answers.next())
            .await
            .expect("an answer in time")
            .expect("the stream is open")
            .unwrap()
    };
    let call = |call_id: u64, call: Call| pb::TransactionCall {
        call_id,
        call: Some(call),
        ..Default::default()
    };
    let waiting_submit = |key: &str, endpoint: &str| {
        Call::SubmitSaga(pb::SubmitSagaRequest {
            idempotency_key: key.to_string(),
            steps: vec![pb::SagaStep {
                step_id: "s".into(),
                endpoint: endpoint.to_string(),
                ..Default::default()
            }],
            wait_for_outcome: true,
            ..Default::default()
        })
    };

    // Sagas that never end: nothing listens on port 1, and compensations are retried
    // without end. Each waits for its outcome.
    for call_id in 1..=WAITS {
        calls
            .send(call(
                call_id,
                waiting_submit(&format!("stuck-{call_id}"), "http://127.0.0.1:1"),
            ))
            .await
            .unwrap();
    }
    let sagas = || async {
        let (page, _) = client.list(&[], 1000, "").await.unwrap();
        page.len() as u64
    };
    eventually("every stuck saga is submitted", || async {
        (sagas().await == WAITS).then_some(())
    })
    .await;

    // Every wait is taken, yet a call is answered: the waits hold no place.
    calls
        .send(call(
            1000,
            Call::Begin(pb::BeginRequest {
                branches: vec![pb::BranchSpec {
                    branch_id: "a".into(),
                    endpoint: participant.endpoint.clone(),
                    payload: b"yes".to_vec(),
                }],
                commit: true,
                ..Default::default()
            }),
        ))
        .await
        .unwrap();
    let answer = next_answer().await;
    assert_eq!(answer.call_id, 1000);
    let Some(Answer::Begin(begun)) = answer.answer else {
        panic!("not a Begin's answer: {answer:?}");
    };
    assert_eq!(begun.outcome, pb::Outcome::Committed as i32);

    // One wait more is refused, machine-readably, and submits nothing.
    calls
        .send(call(
            1001,
            waiting_submit("one-too-many", &participant.endpoint),
        ))
        .await
        .unwrap();
    let answer = next_answer().await;
    assert_eq!(answer.call_id, 1001);
    let Some(Answer::Error(error)) = answer.answer else {
        panic!("not refused: {answer:?}");
    };
    let status = treaty_sdk::call_stream::status_of(error, "the coordinator");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(
        (info.domain.as_str(), info.reason.as_str()),
        (
            treaty_proto::error_info::DOMAIN,
            treaty_proto::error_info::STREAM_WAITS_TAKEN
        )
    );
    assert_eq!(sagas().await, WAITS + 1, "the stuck sagas and the 2PC only");
    // A malformed one is refused for what it is: the checks come before the wait.
    calls
        .send(call(1003, waiting_submit("malformed", "not an endpoint")))
        .await
        .unwrap();
    let answer = next_answer().await;
    assert_eq!(answer.call_id, 1003);
    let Some(Answer::Error(error)) = answer.answer else {
        panic!("not refused: {answer:?}");
    };
    assert_eq!(error.code, Code::InvalidArgument as i32, "{error:?}");
    assert!(error.message.starts_with("steps[0].endpoint"), "{error:?}");

    // Withdrawn, each wait is answered CANCELLED and frees its wait.
    for call_id in 1..=WAITS {
        calls
            .send(call(call_id, Call::Withdraw(pb::WithdrawCall {})))
            .await
            .unwrap();
    }
    let mut cancelled = Vec::new();
    for _ in 1..=WAITS {
        let answer = next_answer().await;
        let Some(Answer::Error(error)) = &answer.answer else {
            panic!("not cancelled: {answer:?}");
        };
        assert_eq!(error.code, Code::Cancelled as i32, "{error:?}");
        cancelled.push(answer.call_id);
    }
    cancelled.sort_unstable();
    assert_eq!(cancelled, (1..=WAITS).collect::<Vec<_>>());
    calls
        .send(call(1002, waiting_submit("after", &participant.endpoint)))
        .await
        .unwrap();
    let answer = next_answer().await;
    assert_eq!(answer.call_id, 1002);
    let Some(Answer::SubmitSaga(saga)) = answer.answer else {
        panic!("not a submit's answer: {answer:?}");
    };
    assert_eq!(
        saga.transaction.unwrap().state,
        pb::TransactionState::Completed as i32
    );

    drop(calls);
    coordinator.stop().await.unwrap();
    participant.stop().await;
}

/// A caller that stops waiting for a call on the stream withdraws it: the server drops
/// the call, as it drops a unary call whose caller went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_caller_stops_waiting_is_withdrawn() {
    let (hanging, endpoint, stop) = StandIn::hanging().await;
    let client = TreatyClient::connect(endpoint).await.unwrap();
    let call = || {
        let caller = client.clone();
        tokio::spawn(async move { caller.begin(BeginOptions::default(), Vec::new()).await })
    };
    // More rounds than the stand-in's 4 places: a call left hanging would hold one.
    for round in 1..=6 {
        let waiting = call();
        hanging
            .until(&format!("round {round}: the call hangs"), round, 1)
            .await;
        waiting.abort();
        hanging
            .until(&format!("round {round}: the call is dropped"), round, 0)
            .await;
        assert_eq!(client.transport(), Transport::Stream);
    }

    // With every place taken, a call waits for one; a withdrawal is still read.
    let mut waiting: Vec<_> = (0..4).map(|_| call()).collect();
    hanging.until("four calls hang", 10, 4).await;
    let fifth = call();
    // Time for the fifth to be read: a slow machine can only make this test miss a
    // withdrawal read while every place is taken, never fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    waiting.remove(0).abort();
    hanging
        .until("the withdrawn call's place goes to the fifth", 11, 4)
        .await;
    for task in waiting.into_iter().chain([fifth]) {
        task.abort();
    }
    hanging.until("every call is dropped", 11, 0).await;
    drop(client);
    stop().await;
}

/// On the stream itself, with every place taken: a call withdrawn while it waits for a
/// place, or while it is read ahead behind one, is answered CANCELLED and never begins,
/// and a withdrawal read behind calls that wait frees the place of the call it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_withdrawn_while_it_waits_for_a_place_is_answered_cancelled() {
    use futures::StreamExt;
    use pb::transaction_call::Call;
    let (hanging, endpoint, stop) = StandIn::hanging().await;
    let mut raw = pb::coordinator_client::CoordinatorClient::connect(endpoint)
        .await
        .unwrap();
    let (calls, requests) = tokio::sync::mpsc::channel(16);
    let mut answers = raw
        .calls(tokio_stream::wrappers::ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    let send = async |call_id: u64, call: Call| {
        let message = pb::TransactionCall {
            call_id,
            call: Some(call),
            ..Default::default()
        };
        calls.send(message).await.unwrap();
    };
    let begin = || Call::Begin(pb::BeginRequest::default());
    let withdraw = || Call::Withdraw(pb::WithdrawCall {});
    let mut cancelled = async || {
        let answer = tokio::time::timeout(Duration::from_secs(60), answers.next())
            .await
            .expect("an answer in time")
            .expect("the stream is open")
            .unwrap();
        let Some(pb::transaction_answer::Answer::Error(error)) = &answer.answer else {
            panic!("not an error: {answer:?}");
        };
        assert_eq!(error.code, Code::Cancelled as i32, "{error:?}");
        answer.call_id
    };
    // The stand-in's four places taken.
    for call_id in 1..=4 {
        send(call_id, begin()).await;
    }
    hanging.until("four calls hang", 4, 4).await;
    // The fifth waits for a place; withdrawn, it is answered and never begins.
    send(5, begin()).await;
    send(5, withdraw()).await;
    assert_eq!(cancelled().await, 5);
    // The sixth waits, the seventh and eighth are read behind it: withdrawn, the seventh
    // is answered and never begins; the withdrawal of the first, behind them, frees its
    // place, which goes to the sixth.
    for call_id in 6..=8 {
        send(call_id, begin()).await;
    }
    send(7, withdraw()).await;
    assert_eq!(cancelled().await, 7);
    send(1, withdraw()).await;
    assert_eq!(cancelled().await, 1);
    hanging
        .until("the sixth takes the first's place", 5, 4)
        .await;
    // The eighth, next in line, is withdrawn while it waits in turn.
    send(8, withdraw()).await;
    assert_eq!(cancelled().await, 8);
    send(2, withdraw()).await;
    assert_eq!(cancelled().await, 2);
    hanging.until("the second's place stays free", 5, 3).await;
    drop(calls);
    drop(answers);
    hanging.until("every call is dropped", 5, 0).await;
    stop().await;
}
