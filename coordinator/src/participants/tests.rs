//! Tests of talking to participants: the channel cache, calls on a stream or unary
//! (served over real gRPC on loopback), streams that end or are refused, and the retry
//! backoff.

use super::*;
use rand::SeedableRng;

#[tokio::test]
async fn a_full_cache_forgets_no_endpoint_a_call_still_holds() {
    let participants = Participants::new(String::new(), 64, Duration::from_secs(1));
    let endpoint = |i: usize| format!("http://127.0.0.1:{}", 10_000 + i);
    for i in 0..MAX_CACHED_ENDPOINTS {
        participants.peer(&endpoint(i)).unwrap();
    }
    // A call has its peer and waits for a permit; a new endpoint fills the cache.
    let held = participants.peer(&endpoint(0)).unwrap();
    participants.peer(&endpoint(MAX_CACHED_ENDPOINTS)).unwrap();
    let again = participants.peer(&endpoint(0)).unwrap();
    assert!(
        Arc::ptr_eq(&held.health, &again.health),
        "the held endpoint got a second circuit"
    );
    // Idle endpoints nobody holds were forgotten.
    let cached = participants.peers.lock().unwrap().len();
    assert!(cached <= 3, "{cached} endpoints still cached");
    drop(again);

    // After a TLS reload the cache holds a new peer sharing the held one's circuit:
    // the held call still keeps that circuit from being forgotten.
    participants.reload_tls(None);
    let renewed = participants.peer(&endpoint(0)).unwrap();
    assert!(Arc::ptr_eq(&held.health, &renewed.health));
    drop(renewed);
    for i in 1..=MAX_CACHED_ENDPOINTS {
        participants
            .peer(&endpoint(MAX_CACHED_ENDPOINTS + i))
            .unwrap();
    }
    let after_reload = participants.peer(&endpoint(0)).unwrap();
    assert!(
        Arc::ptr_eq(&held.health, &after_reload.health),
        "the held endpoint got a second circuit after a TLS reload"
    );
}

/// Votes YES after `delay`, telling `started` when a prepare begins; commits.
#[derive(Debug, Default)]
struct Slow {
    delay: Duration,
    started: Arc<tokio::sync::Notify>,
}

impl treaty_sdk::Participant for Slow {
    async fn prepare(
        &self,
        _: &treaty_sdk::BranchContext,
        _: &[u8],
    ) -> Result<treaty_sdk::Vote, treaty_sdk::ParticipantError> {
        self.started.notify_one();
        tokio::time::sleep(self.delay).await;
        Ok(treaty_sdk::Vote::Yes)
    }
    async fn commit(
        &self,
        _: &treaty_sdk::BranchContext,
        _: &[u8],
    ) -> Result<(), treaty_sdk::ParticipantError> {
        Ok(())
    }
    async fn abort(
        &self,
        _: &treaty_sdk::BranchContext,
        _: &[u8],
    ) -> Result<(), treaty_sdk::ParticipantError> {
        Ok(())
    }
    async fn compensate(
        &self,
        _: &treaty_sdk::BranchContext,
        _: &[u8],
    ) -> Result<(), treaty_sdk::ParticipantError> {
        Ok(())
    }
}

/// The SDK's participant, serving unary calls only, as one written from the unary
/// methods alone does.
struct UnaryOnly(treaty_sdk::ParticipantService<Slow>);

#[tonic::async_trait]
impl pb::participant_server::Participant for UnaryOnly {
    async fn prepare(
        &self,
        request: tonic::Request<pb::PrepareBranchRequest>,
    ) -> Result<tonic::Response<pb::PrepareBranchResponse>, tonic::Status> {
        self.0.prepare(request).await
    }
    async fn commit(
        &self,
        request: tonic::Request<pb::CommitBranchRequest>,
    ) -> Result<tonic::Response<pb::CommitBranchResponse>, tonic::Status> {
        self.0.commit(request).await
    }
    async fn abort(
        &self,
        request: tonic::Request<pb::AbortBranchRequest>,
    ) -> Result<tonic::Response<pb::AbortBranchResponse>, tonic::Status> {
        self.0.abort(request).await
    }
    async fn compensate(
        &self,
        request: tonic::Request<pb::CompensateBranchRequest>,
    ) -> Result<tonic::Response<pb::CompensateBranchResponse>, tonic::Status> {
        self.0.compensate(request).await
    }
    type CallsStream = treaty_sdk::call_stream::CallAnswers;
    async fn calls(
        &self,
        _: tonic::Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("unary calls only"))
    }
}

/// A participant served by the SDK at `listener` until `stop` is sent.
pub(crate) struct Served {
    /// Told when a prepare begins.
    started: Arc<tokio::sync::Notify>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Served {
    pub(crate) async fn start(
        listener: tokio::net::TcpListener,
        delay: Duration,
        streams: bool,
    ) -> Self {
        Self::start_with(listener, delay, streams, Default::default()).await
    }

    async fn start_with(
        listener: tokio::net::TcpListener,
        delay: Duration,
        streams: bool,
        options: treaty_sdk::server::ServeOptions,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            treaty_sdk::durable::DurableStore::open(dir.path(), Default::default()).unwrap(),
        );
        let started = Arc::new(tokio::sync::Notify::new());
        let participant = Arc::new(Slow {
            delay,
            started: started.clone(),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = if streams {
            tokio::spawn(async move {
                treaty_sdk::serve(participant, store, listener, options, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            })
        } else {
            let barrier = Arc::new(treaty_sdk::barrier::Barrier::new(store));
            let service = UnaryOnly(treaty_sdk::ParticipantService::new(participant, barrier));
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(pb::participant_server::ParticipantServer::new(service))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            })
        };
        Self {
            started,
            stop,
            server,
            _dir: dir,
        }
    }

    pub(crate) async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.server)
            .await
            .expect("the participant stops")
            .unwrap();
    }
}

fn branch_call(endpoint: &str, branch_id: &str) -> Call {
    Call {
        endpoint: endpoint.to_string(),
        transaction_id: "stream-test".into(),
        branch_id: branch_id.into(),
        timeout: Duration::from_secs(30),
        trace: None,
    }
}

fn stream_state(participants: &Participants, endpoint: &str) -> &'static str {
    let peer = participants.peer(endpoint).unwrap();
    let listed = participants
        .endpoints()
        .into_iter()
        .find(|status| status.endpoint == endpoint)
        .unwrap();
    let transport = peer.transport();
    assert_eq!(listed.transport, transport, "what operators see");
    match (&peer.stream, transport) {
        (None, Transport::Unary) => "off",
        (Some(_), Transport::Stream) => "open",
        (Some(_), Transport::Unary) => "unary",
        (Some(_), Transport::NoStreamOpen) => "none open",
        (None, other) => panic!("no stream kept, yet {other:?}"),
    }
}

async fn loopback() -> (tokio::net::TcpListener, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    (listener, endpoint)
}

#[tokio::test]
async fn calls_go_on_a_stream_where_the_participant_serves_one_and_unary_elsewhere() {
    let (listener, streaming) = loopback().await;
    let with_stream = Served::start(listener, Duration::ZERO, true).await;
    let (listener, unary) = loopback().await;
    let unary_only = Served::start(listener, Duration::ZERO, false).await;
    let participants = Participants::new(String::new(), 64, Duration::from_secs(5));
    let off = Participants::new(String::new(), 64, Duration::from_secs(5)).with_call_streams(false);

    for (participants, endpoint, expected) in [
        (&participants, &streaming, "open"),
        (&participants, &unary, "unary"),
        (&off, &streaming, "off"),
    ] {
        for branch in ["a", "b"] {
            let call = branch_call(endpoint, branch);
            assert_eq!(participants.prepare(&call, Vec::new()).await, Ok(Vote::Yes));
            let committed = participants
                .commit(&call, pb::CommitMode::TwoPhase, Vec::new())
                .await;
            assert_eq!(committed, Ok(Answer::Committed));
        }
        assert_eq!(stream_state(participants, endpoint), expected, "{endpoint}");
    }
    let call = branch_call(&streaming, "never-prepared");
    assert_eq!(participants.abort(&call).await, Ok(Answer::Aborted));
    assert_eq!(participants.compensate(&call, Vec::new()).await, Ok(()));
    with_stream.stop().await;
    unary_only.stop().await;
}

#[tokio::test]
async fn a_participant_that_stops_answers_the_calls_on_its_stream_and_a_new_stream_follows() {
    let (listener, endpoint) = loopback().await;
    let address = listener.local_addr().unwrap();
    let served = Served::start(listener, Duration::from_millis(300), true).await;
    let participants = Participants::new(String::new(), 64, Duration::from_secs(5));
    let call = branch_call(&endpoint, "before");
    assert_eq!(participants.prepare(&call, Vec::new()).await, Ok(Vote::Yes));
    assert_eq!(stream_state(&participants, &endpoint), "open");
    // The first prepare's start was told with nobody waiting: take that notice.
    served.started.notified().await;

    // A call in flight when the participant stops is still answered on the stream.
    let in_flight = {
        let participants = participants.clone();
        let call = branch_call(&endpoint, "in-flight");
        tokio::spawn(async move { participants.prepare(&call, Vec::new()).await })
    };
    tokio::time::timeout(Duration::from_secs(30), served.started.notified())
        .await
        .expect("the prepare reaches the participant");
    served.stop().await;
    assert_eq!(in_flight.await.unwrap(), Ok(Vote::Yes));

    // Nobody listens: the call fails as unreachable, whatever way it went.
    let failed = participants
        .prepare(&branch_call(&endpoint, "while-down"), Vec::new())
        .await
        .unwrap_err();
    assert_eq!(failed.message, UNREACHABLE);

    // Back on the same address: calls are answered, and a new stream opens.
    let listener = tokio::net::TcpListener::bind(address).await.unwrap();
    let served = Served::start(listener, Duration::ZERO, true).await;
    let mut state = "";
    for attempt in 0..100 {
        let call = branch_call(&endpoint, &format!("after-{attempt}"));
        assert_eq!(participants.prepare(&call, Vec::new()).await, Ok(Vote::Yes));
        state = stream_state(&participants, &endpoint);
        if state == "open" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(state, "open");
    served.stop().await;
}

#[tokio::test]
async fn a_call_whose_caller_gave_up_leaves_the_stream_to_the_others() {
    let (listener, endpoint) = loopback().await;
    let served = Served::start(listener, Duration::from_millis(500), true).await;
    let participants = Participants::new(String::new(), 64, Duration::from_secs(5));
    assert_eq!(
        participants
            .prepare(&branch_call(&endpoint, "first"), Vec::new())
            .await,
        Ok(Vote::Yes)
    );

    let impatient = Call {
        timeout: Duration::from_millis(50),
        ..branch_call(&endpoint, "impatient")
    };
    let failed = participants
        .prepare(&impatient, Vec::new())
        .await
        .unwrap_err();
    assert!(
        failed.message.contains("did not answer within"),
        "{failed:?}"
    );

    // Its answer comes later and goes to nobody; the stream serves the next calls.
    for branch in ["after-1", "after-2"] {
        let call = branch_call(&endpoint, branch);
        assert_eq!(participants.prepare(&call, Vec::new()).await, Ok(Vote::Yes));
    }
    assert_eq!(stream_state(&participants, &endpoint), "open");
    served.stop().await;
}

/// Serves the stream only: answers every call on it with `answer`, and tells `ended`
/// when the coordinator's side of a stream ends.
struct StreamOnly {
    answer: pb::call_answer::Answer,
    ended: Arc<tokio::sync::Notify>,
}

impl StreamOnly {
    /// Served at `listener` until [`StreamOnlyServed::stop`].
    fn serve(self, listener: tokio::net::TcpListener) -> StreamOnlyServed {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::participant_server::ParticipantServer::new(self))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                }),
        );
        StreamOnlyServed { stop, server }
    }
}

struct StreamOnlyServed {
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl StreamOnlyServed {
    /// Stops it gracefully: it ends once every stream to it has ended.
    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(60), self.server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for StreamOnly {
    async fn prepare(
        &self,
        _: tonic::Request<pb::PrepareBranchRequest>,
    ) -> Result<tonic::Response<pb::PrepareBranchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stream only"))
    }
    async fn commit(
        &self,
        _: tonic::Request<pb::CommitBranchRequest>,
    ) -> Result<tonic::Response<pb::CommitBranchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stream only"))
    }
    async fn abort(
        &self,
        _: tonic::Request<pb::AbortBranchRequest>,
    ) -> Result<tonic::Response<pb::AbortBranchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stream only"))
    }
    async fn compensate(
        &self,
        _: tonic::Request<pb::CompensateBranchRequest>,
    ) -> Result<tonic::Response<pb::CompensateBranchResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("stream only"))
    }
    type CallsStream = treaty_sdk::call_stream::CallAnswers;
    async fn calls(
        &self,
        request: tonic::Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        let (answer, ended) = (self.answer.clone(), self.ended.clone());
        let mut calls = request.into_inner();
        let (answers, answered) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            // Until the coordinator's side ends or breaks.
            while let Ok(Some(call)) = calls.message().await {
                let answer = pb::CallAnswer {
                    call_id: call.call_id,
                    answer: Some(answer.clone()),
                };
                if answers.send(Ok(answer)).await.is_err() {
                    break;
                }
            }
            ended.notify_one();
        });
        Ok(tonic::Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(answered),
        )))
    }
}

#[tokio::test]
async fn an_answer_of_another_kind_is_an_error_from_the_participant() {
    let (listener, endpoint) = loopback().await;
    let wrong_kind = StreamOnly {
        answer: pb::call_answer::Answer::Abort(pb::AbortBranchResponse {
            result: pb::AbortResult::Aborted as i32,
        }),
        ended: Arc::default(),
    };
    let served = wrong_kind.serve(listener);
    let participants = Participants::new(String::new(), 64, Duration::from_secs(5));
    let failed = participants
        .prepare(&branch_call(&endpoint, "a"), Vec::new())
        .await
        .unwrap_err();
    assert_eq!(
        failed.message,
        "participant answered Internal: the participant answered a call with another kind"
    );
    assert_eq!(stream_state(&participants, &endpoint), "open");
    // Its stream ends when the coordinator's side does: with the peer.
    drop(participants);
    served.stop().await;
}

#[tokio::test]
async fn an_idle_stream_ends_at_the_participant_without_another_call() {
    let (listener, endpoint) = loopback().await;
    let ended = Arc::new(tokio::sync::Notify::new());
    let yes = StreamOnly {
        answer: pb::call_answer::Answer::Prepare(pb::PrepareBranchResponse {
            vote: pb::Vote::Yes as i32,
            reason: String::new(),
        }),
        ended: ended.clone(),
    };
    let served = yes.serve(listener);
    let mut participants = Participants::new(String::new(), 64, Duration::from_secs(5));
    participants.stream_idle_close = Duration::from_millis(100);
    let call = branch_call(&endpoint, "a");
    assert_eq!(participants.prepare(&call, Vec::new()).await, Ok(Vote::Yes));
    // Nothing asks how calls travel: the idle check alone ends the stream.
    tokio::time::timeout(Duration::from_secs(60), ended.notified())
        .await
        .expect("the participant sees the idle stream end");
    served.stop().await;
}

#[tokio::test]
async fn an_idle_stream_is_ended_and_the_next_call_opens_another() {
    let (listener, endpoint) = loopback().await;
    let served = Served::start(listener, Duration::ZERO, true).await;
    let mut participants = Participants::new(String::new(), 64, Duration::from_secs(5));
    participants.stream_idle_close = Duration::from_millis(100);
    let call = branch_call(&endpoint, "a");
    assert_eq!(participants.prepare(&call, Vec::new()).await, Ok(Vote::Yes));
    assert_eq!(stream_state(&participants, &endpoint), "open");

    let mut state = "open";
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        state = stream_state(&participants, &endpoint);
        if state != "open" {
            break;
        }
    }
    assert_eq!(state, "none open", "the idle stream was ended");
    let committed = participants
        .commit(&call, pb::CommitMode::TwoPhase, Vec::new())
        .await;
    assert_eq!(committed, Ok(Answer::Committed));
    assert_eq!(stream_state(&participants, &endpoint), "open");
    served.stop().await;
}

#[tokio::test]
async fn a_stream_refused_for_its_credentials_is_each_calls_answer_as_unary() {
    let (listener, endpoint) = loopback().await;
    let options = treaty_sdk::server::ServeOptions {
        trust: treaty_sdk::server::CoordinatorTrust::default().token("right-token-0123456"),
        ..Default::default()
    };
    let served = Served::start_with(listener, Duration::ZERO, true, options).await;
    let wrong = Credentials::bearer(treaty_sdk::auth::BearerToken::new("wrong").unwrap());
    let participants =
        Participants::new(String::new(), 64, Duration::from_secs(5)).with_security(None, wrong);
    // The first call goes on the stream, which is refused; the next ones unary.
    for branch in ["first", "second"] {
        let failed = participants
            .prepare(&branch_call(&endpoint, branch), Vec::new())
            .await
            .unwrap_err();
        assert!(
            failed
                .message
                .starts_with("participant answered Unauthenticated"),
            "{branch}: {failed:?}"
        );
    }
    assert_eq!(stream_state(&participants, &endpoint), "unary");
    served.stop().await;
}

#[test]
fn backoff_grows_exponentially_then_stays_capped_with_jitter() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for attempt in 1..=40 {
        let cap = (100u64 << (attempt - 1).min(32)).min(10_000);
        for _ in 0..20 {
            let delay = retry_delay(attempt, 100, 10_000, &mut rng).as_millis() as u64;
            assert!(
                delay >= cap / 2 && delay <= cap,
                "attempt {attempt}: {delay}"
            );
        }
    }
    assert!(retry_delay(u32::MAX, 100, 10_000, &mut rng) <= Duration::from_secs(10));
}

/// A prepare on the stream that outlives the coordinator's deadline is withdrawn, and the
/// participant gives its place back at once, as for a unary call whose caller went: with
/// one place, the next call begins while the first one's work is still running.
#[tokio::test]
async fn a_call_past_its_deadline_is_withdrawn_and_frees_its_place_on_the_stream() {
    let (listener, endpoint) = loopback().await;
    let served = Served::start_with(
        listener,
        Duration::from_secs(120),
        true,
        treaty_sdk::server::ServeOptions {
            max_concurrent_requests: 1,
            ..Default::default()
        },
    )
    .await;
    let participants = Participants::new(String::new(), 64, Duration::from_secs(5));
    // Long enough for the prepare to begin on a loaded machine before it is withdrawn.
    let late = Call {
        timeout: Duration::from_secs(5),
        ..branch_call(&endpoint, "late")
    };
    assert!(participants.prepare(&late, Vec::new()).await.is_err());
    assert_eq!(stream_state(&participants, &endpoint), "open");
    tokio::time::timeout(Duration::from_secs(30), served.started.notified())
        .await
        .expect("the first prepare began");
    // The first prepare sleeps for two minutes: the second begins only if the first's
    // place was given back.
    let next = {
        let participants = participants.clone();
        let call = branch_call(&endpoint, "next");
        tokio::spawn(async move { participants.prepare(&call, Vec::new()).await })
    };
    tokio::time::timeout(Duration::from_secs(60), served.started.notified())
        .await
        .expect("the next prepare began while the withdrawn one ran on");
    next.abort();
    // Not stopped: its prepares sleep on; the test's runtime ends them.
    drop(served);
}

/// A call that waits for a permit past its deadline fails as a timeout, without going
/// out: with the endpoint's one permit held by a prepare that runs for two minutes, a
/// second call with a 2 s deadline ends in about that, not when the first one's ends
/// (the engine takes a call open past its deadline for lost and sends it again, so one
/// still queued then would go out twice).
#[tokio::test]
async fn a_call_that_waits_for_a_permit_past_its_deadline_fails_as_a_timeout() {
    let (listener, endpoint) = loopback().await;
    let served = Served::start(listener, Duration::from_secs(120), true).await;
    // A quarter of 4: one permit per endpoint.
    let participants = Participants::new(String::new(), 4, Duration::from_secs(5));
    let holding = {
        let participants = participants.clone();
        let call = Call {
            timeout: Duration::from_secs(300),
            ..branch_call(&endpoint, "holding")
        };
        tokio::spawn(async move { participants.prepare(&call, Vec::new()).await })
    };
    tokio::time::timeout(Duration::from_secs(30), served.started.notified())
        .await
        .expect("the first prepare began");
    let queued = Call {
        timeout: Duration::from_secs(2),
        ..branch_call(&endpoint, "queued")
    };
    let failure = tokio::time::timeout(
        Duration::from_secs(60),
        participants.prepare(&queued, Vec::new()),
    )
    .await
    .expect("the queued call ended at its deadline, not after the held one")
    .unwrap_err();
    assert!(
        failure.message.contains("not sent within 2000 ms"),
        "{}",
        failure.message
    );
    assert!(!failure.permanent);
    // Never sent: the participant began no second prepare.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), served.started.notified())
            .await
            .is_err(),
        "the queued prepare reached the participant"
    );
    holding.abort();
    drop(served);
}

/// A call that spent more than half its deadline waiting for a permit, and then timed
/// out, is not held against the participant's circuit: it had too little of its time.
/// One that waited nothing and timed out is.
#[tokio::test]
async fn a_call_that_waited_most_of_its_deadline_for_a_permit_is_not_held_against_the_circuit() {
    let (listener, endpoint) = loopback().await;
    let served = Served::start(listener, Duration::from_secs(120), true).await;
    // A quarter of 4: one permit per endpoint.
    let participants = Participants::new(String::new(), 4, Duration::from_secs(5));
    let failures = |participants: &Participants| {
        participants
            .endpoints()
            .into_iter()
            .find(|status| status.endpoint == endpoint)
            .map(|status| status.failures_in_a_row)
    };
    // Holds the one permit for 4.5 s, then times out itself: one failure.
    let holding = {
        let participants = participants.clone();
        let call = Call {
            timeout: Duration::from_millis(4_500),
            ..branch_call(&endpoint, "holding")
        };
        tokio::spawn(async move { participants.prepare(&call, Vec::new()).await })
    };
    tokio::time::timeout(Duration::from_secs(30), served.started.notified())
        .await
        .expect("the first prepare began");
    // Waits about 4.5 s of its 6 for the permit (more than half, even on a machine slow
    // to start the first call), is sent, and times out 1.5 s later.
    let late = Call {
        timeout: Duration::from_secs(6),
        ..branch_call(&endpoint, "late")
    };
    let failure = participants.prepare(&late, Vec::new()).await.unwrap_err();
    assert!(
        failure.message.contains("waiting for a place"),
        "{}",
        failure.message
    );
    assert!(holding.await.unwrap().is_err());
    assert_eq!(
        failures(&participants),
        Some(1),
        "only the held call counted"
    );
    drop(served);
}
