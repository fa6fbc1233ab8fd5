//! The `Calls` stream of a participant served by the SDK, over real gRPC on loopback and a
//! real sled directory: each call on it is answered as its unary call would be, under its
//! own number; credentials are the stream's; a stopping server ends the stream.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::{CoordinatorTrust, ServeError, ServeOptions};
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

const PATIENCE: Duration = Duration::from_secs(30);

/// Votes NO for the payload "no", else YES (after 300 ms, telling `slow_started`, for
/// "slow"); counts every run of user code.
#[derive(Debug)]
struct Counting {
    runs: AtomicUsize,
    slow_started: tokio::sync::Notify,
    /// A permit per "gated" prepare begun.
    gated_started: tokio::sync::Semaphore,
    /// A "gated" prepare waits for a permit of this one, which the test gives.
    gate: tokio::sync::Semaphore,
    /// Gated prepares run to their end so far.
    gated_finished: AtomicUsize,
    /// `gated_finished` as each ungated prepare began.
    gated_finished_before: std::sync::Mutex<Vec<usize>>,
}

impl Default for Counting {
    fn default() -> Self {
        Self {
            runs: AtomicUsize::new(0),
            slow_started: tokio::sync::Notify::new(),
            gated_started: tokio::sync::Semaphore::new(0),
            gate: tokio::sync::Semaphore::new(0),
            gated_finished: AtomicUsize::new(0),
            gated_finished_before: std::sync::Mutex::default(),
        }
    }
}

impl Participant for Counting {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, ParticipantError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if payload == b"slow" {
            self.slow_started.notify_one();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if payload == b"gated" {
            self.gated_started.add_permits(1);
            self.gate.acquire().await.unwrap().forget();
            self.gated_finished.fetch_add(1, Ordering::SeqCst);
        } else {
            let finished = self.gated_finished.load(Ordering::SeqCst);
            self.gated_finished_before.lock().unwrap().push(finished);
        }
        Ok(if payload == b"no" {
            Vote::no("refused")
        } else {
            Vote::Yes
        })
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Served {
    endpoint: String,
    participant: Arc<Counting>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), ServeError>>,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }

    async fn start(options: ServeOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let participant = Arc::new(Counting::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(treaty_sdk::serve(
            participant.clone(),
            store,
            listener,
            options,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            endpoint,
            participant,
            stop,
            server,
            _dir: dir,
        }
    }
}

/// One open `Calls` stream: its sending side and its answers.
struct Stream {
    calls: tokio::sync::mpsc::Sender<pb::CallRequest>,
    answers: tonic::Streaming<pb::CallAnswer>,
}

impl Stream {
    async fn open(endpoint: &str, token: Option<&str>) -> Result<Self, tonic::Status> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self::open_on(channel, token).await
    }

    /// A stream on `channel`'s connection.
    async fn open_on(
        channel: tonic::transport::Channel,
        token: Option<&str>,
    ) -> Result<Self, tonic::Status> {
        let mut client = ParticipantClient::new(channel);
        let (calls, queued) = tokio::sync::mpsc::channel(64);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(queued));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let answers = client.calls(request).await?.into_inner();
        Ok(Self { calls, answers })
    }

    /// Sends `calls` at once and returns their answers by number.
    async fn call_all(
        &mut self,
        calls: Vec<(u64, Option<pb::call_request::Call>)>,
    ) -> HashMap<u64, pb::call_answer::Answer> {
        let count = calls.len();
        for (call_id, call) in calls {
            let request = pb::CallRequest {
                call_id,
                call,
                ..Default::default()
            };
            self.calls.send(request).await.unwrap();
        }
        let mut answers = HashMap::new();
        while answers.len() < count {
            let answer = tokio::time::timeout(PATIENCE, self.answers.message())
                .await
                .expect("every call is answered in time")
                .unwrap()
                .expect("the stream stays open");
            let previous = answers.insert(answer.call_id, answer.answer.unwrap());
            assert!(previous.is_none(), "one answer per call");
        }
        answers
    }
}

fn prepare(branch: &str, payload: &[u8], coordinator: &str) -> Option<pb::call_request::Call> {
    Some(pb::call_request::Call::Prepare(pb::PrepareBranchRequest {
        transaction_id: "s-1".into(),
        branch_id: branch.into(),
        payload: payload.to_vec(),
        coordinator_endpoint: coordinator.into(),
    }))
}

fn commit(branch: &str, mode: pb::CommitMode) -> Option<pb::call_request::Call> {
    Some(pb::call_request::Call::Commit(pb::CommitBranchRequest {
        transaction_id: "s-1".into(),
        branch_id: branch.into(),
        mode: mode as i32,
        payload: Vec::new(),
        coordinator_endpoint: String::new(),
    }))
}

fn vote(answer: &pb::call_answer::Answer) -> pb::Vote {
    match answer {
        pb::call_answer::Answer::Prepare(response) => pb::Vote::try_from(response.vote).unwrap(),
        other => panic!("not a prepare's answer: {other:?}"),
    }
}

fn error(answer: &pb::call_answer::Answer) -> (tonic::Code, &str) {
    match answer {
        pb::call_answer::Answer::Error(error) => (error.code.into(), error.message.as_str()),
        other => panic!("not an error: {other:?}"),
    }
}

#[tokio::test]
async fn each_call_on_a_stream_is_answered_as_its_unary_call_under_its_number() {
    let served = Served::start(ServeOptions::default()).await;
    let mut stream = Stream::open(&served.endpoint, None).await.unwrap();

    let answers = stream
        .call_all(vec![
            (1, prepare("yes", b"", "")),
            (2, prepare("no", b"no", "")),
            (3, prepare("no/slashes", b"", "")),
            (4, None),
            (5, prepare("bad-endpoint", b"", "not an endpoint")),
        ])
        .await;
    assert_eq!(vote(&answers[&1]), pb::Vote::Yes);
    assert_eq!(vote(&answers[&2]), pb::Vote::No);
    let (code, message) = error(&answers[&3]);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("branch_id"), "{message}");
    let (code, message) = error(&answers[&4]);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.starts_with("call:"), "{message}");
    let (code, message) = error(&answers[&5]);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("coordinator_endpoint"), "{message}");
    assert_eq!(
        served.participant.runs.load(Ordering::SeqCst),
        2,
        "bad calls reach no user code"
    );

    // Phase 2, a repeat answered from the record, the null abort and compensation.
    let answers = stream
        .call_all(vec![
            (6, commit("yes", pb::CommitMode::TwoPhase)),
            (
                7,
                Some(pb::call_request::Call::Abort(pb::AbortBranchRequest {
                    transaction_id: "s-1".into(),
                    branch_id: "never-prepared".into(),
                })),
            ),
            (
                8,
                Some(pb::call_request::Call::Compensate(
                    pb::CompensateBranchRequest {
                        transaction_id: "s-1".into(),
                        branch_id: "never-run".into(),
                        payload: Vec::new(),
                    },
                )),
            ),
        ])
        .await;
    match &answers[&6] {
        pb::call_answer::Answer::Commit(response) => {
            assert_eq!(response.result, pb::CommitResult::Committed as i32)
        }
        other => panic!("{other:?}"),
    }
    match &answers[&7] {
        pb::call_answer::Answer::Abort(response) => {
            assert_eq!(response.result, pb::AbortResult::Aborted as i32)
        }
        other => panic!("{other:?}"),
    }
    match &answers[&8] {
        pb::call_answer::Answer::Compensate(response) => {
            assert_eq!(response.result, pb::CompensateResult::Compensated as i32)
        }
        other => panic!("{other:?}"),
    }
    let answers = stream
        .call_all(vec![(9, commit("yes", pb::CommitMode::TwoPhase))])
        .await;
    assert!(matches!(
        &answers[&9],
        pb::call_answer::Answer::Commit(r) if r.result == pb::CommitResult::Committed as i32
    ));
    assert_eq!(
        served.participant.runs.load(Ordering::SeqCst),
        3,
        "one commit ran; the repeat and the null abort and compensation ran no user code"
    );

    // The unary call sees what the stream's calls recorded.
    let mut client = ParticipantClient::connect(served.endpoint.clone())
        .await
        .unwrap();
    let late = client
        .prepare(pb::PrepareBranchRequest {
            transaction_id: "s-1".into(),
            branch_id: "never-prepared".into(),
            payload: Vec::new(),
            coordinator_endpoint: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        late.vote,
        pb::Vote::No as i32,
        "a Prepare after the null abort"
    );

    served.stop.send(()).unwrap();
    served.server.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_stream_presents_the_credentials_of_its_start_for_every_call() {
    let trust = CoordinatorTrust::default()
        .token("stream-secret-123")
        .endpoint("http://127.0.0.1:7420");
    let served = Served::start(ServeOptions {
        trust,
        ..ServeOptions::default()
    })
    .await;

    for token in [None, Some("wrong")] {
        let refused = Stream::open(&served.endpoint, token).await.err();
        let refused = refused.expect("a stream without the token is refused at its start");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }

    let mut stream = Stream::open(&served.endpoint, Some("stream-secret-123"))
        .await
        .unwrap();
    let answers = stream
        .call_all(vec![
            (1, prepare("trusted", b"", "http://127.0.0.1:7420")),
            (2, prepare("elsewhere", b"", "http://127.0.0.1:7421")),
        ])
        .await;
    assert_eq!(vote(&answers[&1]), pb::Vote::Yes);
    let (code, message) = error(&answers[&2]);
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert_eq!(served.participant.runs.load(Ordering::SeqCst), 1);
    served.stop().await;
}

#[tokio::test]
async fn a_stopping_server_answers_the_calls_it_read_and_ends_the_stream() {
    let served = Served::start(ServeOptions {
        // Far longer than the test waits: the stream must not be what ends the wait.
        shutdown_grace_ms: 600_000,
        ..ServeOptions::default()
    })
    .await;
    let mut stream = Stream::open(&served.endpoint, None).await.unwrap();
    let answers = stream.call_all(vec![(1, prepare("before", b"", ""))]).await;
    assert_eq!(vote(&answers[&1]), pb::Vote::Yes);

    // A call in flight when the server starts to stop.
    stream
        .calls
        .send(pb::CallRequest {
            call_id: 2,
            call: prepare("in-flight", b"slow", ""),
            ..Default::default()
        })
        .await
        .unwrap();
    let participant = served.participant.clone();
    tokio::time::timeout(PATIENCE, participant.slow_started.notified())
        .await
        .expect("the slow prepare starts");
    served.stop().await;

    let answer = tokio::time::timeout(PATIENCE, stream.answers.message())
        .await
        .expect("the call read before the stop is answered")
        .unwrap()
        .expect("an answer before the end");
    assert_eq!(answer.call_id, 2);
    assert_eq!(vote(&answer.answer.unwrap()), pb::Vote::Yes);
    let end = tokio::time::timeout(PATIENCE, stream.answers.message())
        .await
        .expect("the stream ends");
    assert!(matches!(end, Ok(None)), "the stream ends cleanly: {end:?}");
}

#[tokio::test]
async fn the_streams_of_one_connection_share_its_places() {
    let served = Served::start(ServeOptions {
        max_concurrent_requests: 2,
        ..ServeOptions::default()
    })
    .await;
    let channel = tonic::transport::Endpoint::from_shared(served.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let participant = served.participant.clone();
    let mut first = Stream::open_on(channel.clone(), None).await.unwrap();
    let mut second = Stream::open_on(channel, None).await.unwrap();
    // Two calls on the first stream, held at the gate, take both places of the
    // connection (the idle second stream holds none)...
    for (call_id, branch) in [(1, "gated-1"), (2, "gated-2")] {
        let request = pb::CallRequest {
            call_id,
            call: prepare(branch, b"gated", ""),
            ..Default::default()
        };
        first.calls.send(request).await.unwrap();
    }
    tokio::time::timeout(PATIENCE, participant.gated_started.acquire_many(2))
        .await
        .expect("both gated prepares begin")
        .unwrap()
        .forget();
    // ...so a call on the second stream begins only once one of them has ended.
    let request = pb::CallRequest {
        call_id: 3,
        call: prepare("ungated", b"", ""),
        ..Default::default()
    };
    second.calls.send(request).await.unwrap();
    // Time for it to begin if it had a place (it has none): a slow machine can only make
    // this test miss a wrong bound, never fail a right one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    participant.gate.add_permits(1);
    let answer = tokio::time::timeout(PATIENCE, second.answers.message())
        .await
        .expect("the second stream's call is answered")
        .unwrap()
        .expect("the stream stays open");
    assert_eq!(vote(&answer.answer.unwrap()), pb::Vote::Yes);
    assert_eq!(
        *participant.gated_finished_before.lock().unwrap(),
        vec![1],
        "the second stream's call began before a place was free"
    );
    participant.gate.add_permits(1);
    for _ in 0..2 {
        let answer = tokio::time::timeout(PATIENCE, first.answers.message())
            .await
            .expect("the gated calls are answered")
            .unwrap()
            .expect("the stream stays open");
        assert_eq!(vote(&answer.answer.unwrap()), pb::Vote::Yes);
    }
    served.stop().await;
}

#[tokio::test]
async fn a_withdrawn_call_gives_its_place_back_while_its_operation_runs_on() {
    let served = Served::start(ServeOptions {
        max_concurrent_requests: 2,
        ..ServeOptions::default()
    })
    .await;
    let participant = served.participant.clone();
    let mut stream = Stream::open(&served.endpoint, None).await.unwrap();
    // Two calls held at the gate take both places of the connection, as calls stuck in
    // user code (or behind a branch's lock) would...
    for (call_id, branch) in [(1, "gated-1"), (2, "gated-2")] {
        let request = pb::CallRequest {
            call_id,
            call: prepare(branch, b"gated", ""),
            ..Default::default()
        };
        stream.calls.send(request).await.unwrap();
    }
    tokio::time::timeout(PATIENCE, participant.gated_started.acquire_many(2))
        .await
        .expect("both gated prepares begin")
        .unwrap()
        .forget();
    // ...until their caller gives up on them: each is answered CANCELLED.
    for call_id in [1, 2] {
        let withdrawal = pb::CallRequest {
            call_id,
            call: Some(pb::call_request::Call::Withdraw(pb::WithdrawCall {})),
            ..Default::default()
        };
        stream.calls.send(withdrawal).await.unwrap();
    }
    let mut cancelled = Vec::new();
    for _ in 0..2 {
        let answer = tokio::time::timeout(PATIENCE, stream.answers.message())
            .await
            .expect("a withdrawn call is answered")
            .unwrap()
            .expect("the stream stays open");
        let Some(pb::call_answer::Answer::Error(error)) = answer.answer else {
            panic!("a withdrawn call answered {answer:?}");
        };
        assert_eq!(error.code, tonic::Code::Cancelled as i32, "{error:?}");
        cancelled.push(answer.call_id);
    }
    cancelled.sort_unstable();
    assert_eq!(cancelled, vec![1, 2]);
    // Their places are free again, with the gated prepares still running: a call for
    // another branch on the same stream is answered.
    let answers = stream
        .call_all(vec![(3, prepare("ungated", b"", ""))])
        .await;
    assert_eq!(vote(&answers[&3]), pb::Vote::Yes);
    assert_eq!(participant.gated_finished.load(Ordering::SeqCst), 0);
    // The withdrawn operations run to their end and are recorded: repeats are answered
    // from the records, without running user code again.
    participant.gate.add_permits(2);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while participant.gated_finished.load(Ordering::SeqCst) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the withdrawn prepares ran to their end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let runs = participant.runs.load(Ordering::SeqCst);
    let answers = stream
        .call_all(vec![
            (4, prepare("gated-1", b"gated", "")),
            (5, prepare("gated-2", b"gated", "")),
        ])
        .await;
    assert_eq!(vote(&answers[&4]), pb::Vote::Yes);
    assert_eq!(vote(&answers[&5]), pb::Vote::Yes);
    assert_eq!(participant.runs.load(Ordering::SeqCst), runs);
    served.stop().await;
}

/// A service whose every method panics, serving the stream through them until
/// `stopping` turns true.
#[derive(Clone)]
struct Panicking {
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

#[tonic::async_trait]
impl pb::participant_server::Participant for Panicking {
    async fn prepare(
        &self,
        _: tonic::Request<pb::PrepareBranchRequest>,
    ) -> Result<tonic::Response<pb::PrepareBranchResponse>, tonic::Status> {
        panic!("the test's handler panics");
    }
    async fn commit(
        &self,
        _: tonic::Request<pb::CommitBranchRequest>,
    ) -> Result<tonic::Response<pb::CommitBranchResponse>, tonic::Status> {
        panic!("the test's handler panics");
    }
    async fn abort(
        &self,
        _: tonic::Request<pb::AbortBranchRequest>,
    ) -> Result<tonic::Response<pb::AbortBranchResponse>, tonic::Status> {
        panic!("the test's handler panics");
    }
    async fn compensate(
        &self,
        _: tonic::Request<pb::CompensateBranchRequest>,
    ) -> Result<tonic::Response<pb::CompensateBranchResponse>, tonic::Status> {
        panic!("the test's handler panics");
    }
    type CallsStream = treaty_sdk::call_stream::CallAnswers;
    async fn calls(
        &self,
        request: tonic::Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        let stopping = self.stopping.subscribe();
        Ok(treaty_sdk::call_stream::serve(
            self.clone(),
            request,
            stopping,
            4,
        ))
    }
}

#[tokio::test]
async fn a_call_whose_handler_panics_is_answered_internal_and_the_stream_goes_on() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let panicking = Panicking {
        stopping: Arc::new(tokio::sync::watch::channel(false).0),
    };
    let stopping = panicking.stopping.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::participant_server::ParticipantServer::new(panicking))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            ),
    );
    let mut stream = Stream::open(&endpoint, None).await.unwrap();
    for round in 0..2u64 {
        let answers = stream
            .call_all(vec![
                (2 * round, prepare("a", b"", "")),
                (2 * round + 1, commit("a", pb::CommitMode::TwoPhase)),
            ])
            .await;
        for call_id in [2 * round, 2 * round + 1] {
            assert_eq!(
                error(&answers[&call_id]),
                (tonic::Code::Internal, "the call's handler panicked")
            );
        }
    }
    drop(stream);
    stopping.send_replace(true);
    stop.send(()).unwrap();
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}
