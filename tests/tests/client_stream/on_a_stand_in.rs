//! The client against a stand-in coordinator: it calls on the stream where the stream
//! is served and unary where not, gives waits back when the stream refuses or breaks
//! them, and withdraws calls whose caller stops waiting.

use super::stand_in::{StandIn, WaitsOnStream};
use super::*;

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
