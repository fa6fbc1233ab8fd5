//! The server's side of a calls stream: many calls over one long-lived bidirectional
//! stream, each numbered by its caller and answered under that number. A participant
//! serves its prepare / commit / abort / compensate calls so (see
//! docs/PARTICIPANT-PROTOCOL.md, "Calls over one stream"), and the coordinator its
//! `Coordinator.Calls`, both through [`serve_calls`].
//!
//! Each call on the stream is answered exactly as its unary call would be: it is made
//! into the unary request, with the stream's metadata (credentials) and extensions (the
//! peer's identity) and its own trace context, and goes through the same method, so
//! the checks of credentials and of every field are the unary call's. Invariants:
//! - at most `max_in_flight` calls are being answered at once on one connection, all of
//!   its streams together (a stream that does not come through
//!   [`server_builder`](crate::connections::server_builder)'s connections: per stream);
//!   a stream reads its next call and then waits for a place, so an idle stream holds
//!   none;
//! - every call read is answered on the stream: by its method, or INTERNAL if the
//!   method panicked;
//! - once the caller has gone (it dropped the stream, or its connection broke), the
//!   calls it left are dropped as unary calls are when their caller goes: a participant's
//!   operations still run to their end, as they do unary;
//! - once the server is stopping, no further call is read: the stream ends when the
//!   calls read so far are answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Extensions, Request, Response, Status, Streaming};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::Participant as ParticipantRpc;

use crate::connections::ConnectionInfo;
use crate::trace::{TRACEPARENT, TRACESTATE};

/// The answers of one stream, in the order they are ready.
pub type Answers<A> = Pin<Box<dyn futures::Stream<Item = Result<A, Status>> + Send + 'static>>;

/// The answers of one participant's `Calls` stream.
pub type CallAnswers = Answers<pb::CallAnswer>;

/// What the calls of one stream share: the stream's metadata (credentials) and
/// extensions (the peer's identity).
#[derive(Debug, Clone)]
pub struct StreamContext {
    metadata: Arc<MetadataMap>,
    extensions: Arc<Extensions>,
}

impl StreamContext {
    /// `message` as the unary request it stands for: the stream's metadata and
    /// extensions, with this call's trace context in place of any the stream carried.
    pub fn request<T>(&self, traceparent: &str, tracestate: &str, message: T) -> Request<T> {
        Request::from_parts(
            call_metadata(&self.metadata, traceparent, tracestate),
            Extensions::clone(&self.extensions),
            message,
        )
    }
}

/// The messages of one kind of calls stream, as its server sees them.
pub trait CallMessages: 'static {
    /// A call as it comes.
    type Call: Send + 'static;
    /// What an answer carries when the call did not fail (its `oneof`).
    type Answered: Send + 'static;
    /// An answer as it goes.
    type Answer: Send + 'static;
    /// The number the caller gave `call`.
    fn call_id(call: &Self::Call) -> u64;
    /// The answer to call `call_id`: what it gave, or its status as a `CallError`.
    fn answer(call_id: u64, answered: Result<Self::Answered, Status>) -> Self::Answer;
}

/// The messages of `Participant.Calls`.
#[derive(Debug)]
pub struct ParticipantCalls;

impl CallMessages for ParticipantCalls {
    type Call = pb::CallRequest;
    type Answered = pb::call_answer::Answer;
    type Answer = pb::CallAnswer;

    fn call_id(call: &pb::CallRequest) -> u64 {
        call.call_id
    }

    fn answer(call_id: u64, answered: Result<Self::Answered, Status>) -> pb::CallAnswer {
        pb::CallAnswer {
            call_id,
            answer: Some(
                answered
                    .unwrap_or_else(|status| pb::call_answer::Answer::Error(call_error(&status))),
            ),
        }
    }
}

/// Serves one `Calls` stream with `service`'s unary methods, at most `max_in_flight`
/// calls at once. `stopping` must turn true when the server stops: no further call is
/// read then, and the stream ends once those read are answered (a graceful shutdown
/// waits for every stream to end). A service that wraps another calls this with itself,
/// so that the calls on the stream go through its own methods.
pub fn serve<T>(
    service: T,
    request: Request<Streaming<pb::CallRequest>>,
    stopping: watch::Receiver<bool>,
    max_in_flight: usize,
) -> Response<CallAnswers>
where
    T: ParticipantRpc + Clone,
{
    serve_calls::<ParticipantCalls, _, _>(request, stopping, max_in_flight, move |stream, call| {
        let service = service.clone();
        async move { answer(&service, &stream, call).await }
    })
}

/// Serves one stream of calls of any service: reads each call, has `answer` answer it
/// (with what the unary call gives: its response's place in the answer, or its status)
/// in a task of its own, and sends the answers in the order they are ready (see the
/// module's invariants for the bounds, the caller's going and the server's stop).
pub fn serve_calls<M, F, Fut>(
    request: Request<Streaming<M::Call>>,
    mut stopping: watch::Receiver<bool>,
    max_in_flight: usize,
    answer: F,
) -> Response<Answers<M::Answer>>
where
    M: CallMessages,
    F: Fn(StreamContext, M::Call) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<M::Answered, Status>> + Send + 'static,
{
    let max_in_flight = max_in_flight.max(1);
    let (metadata, extensions, mut calls) = request.into_parts();
    let in_flight = match extensions.get::<ConnectionInfo>() {
        Some(connection) => connection.stream_call_places(max_in_flight),
        None => Arc::new(Semaphore::new(max_in_flight)),
    };
    let stream = StreamContext {
        metadata: Arc::new(metadata),
        extensions: Arc::new(extensions),
    };
    let (answers, answered) = mpsc::channel(max_in_flight);
    tokio::spawn(async move {
        loop {
            // Read first, then wait for a place: an idle stream holds none of its
            // connection's places.
            let next = tokio::select! {
                biased;
                () = stopped(&mut stopping) => return,
                next = calls.message() => next,
            };
            // The caller ended its side, or the stream broke: the calls read so far are
            // still answered (their tasks hold the sender).
            let call = match next {
                Ok(Some(call)) => call,
                Ok(None) => return,
                // The caller ended it (an idle stream is ended so).
                Err(status) if status.code() == tonic::Code::Cancelled => {
                    tracing::debug!(status_message = %status.message(), "a call stream was cancelled by its caller");
                    return;
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), status_message = %status.message(), "a call stream broke; no further call is read from it");
                    return;
                }
            };
            // A call read is answered, even once the server is stopping: its place comes
            // when one of the calls being answered is.
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let call_id = M::call_id(&call);
            let answers = answers.clone();
            let answering = std::panic::AssertUnwindSafe(answer(stream.clone(), call));
            tokio::spawn(async move {
                let answer = tokio::select! {
                    answer = answering.catch_unwind() => M::answer(
                        call_id,
                        answer.unwrap_or_else(|_| {
                            Err(Status::internal("the call's handler panicked"))
                        }),
                    ),
                    // The caller has gone: its call is dropped, as a unary call's is.
                    () = answers.closed() => return,
                };
                // A send fails only when the caller has gone: nobody to tell.
                let _ = answers.send(Ok(answer)).await;
                drop(permit);
            });
        }
    });
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        answered,
    )))
}

/// Resolves once `stopping` is true, or its sender is gone (the server with it).
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

/// A call's status as it travels on a stream: code, message and details.
pub fn call_error(status: &Status) -> pb::CallError {
    pb::CallError {
        code: status.code() as i32,
        message: status.message().to_string(),
        details: status.details().to_vec(),
    }
}

/// The status a [`pb::CallError`] from `server` stands for (an error that claims OK is
/// INTERNAL).
pub fn status_of(error: pb::CallError, server: &str) -> Status {
    if error.code == tonic::Code::Ok as i32 {
        return Status::internal(format!("{server} answered an error with code OK"));
    }
    Status::with_details(error.code.into(), error.message, error.details.into())
}

/// What one call of the stream gives: its unary method's response, or its status.
async fn answer<T: ParticipantRpc>(
    service: &T,
    stream: &StreamContext,
    call: pb::CallRequest,
) -> Result<pb::call_answer::Answer, Status> {
    use pb::call_answer::Answer;
    use pb::call_request::Call;
    let (traceparent, tracestate) = (call.traceparent.as_str(), call.tracestate.as_str());
    match call.call {
        Some(Call::Prepare(message)) => service
            .prepare(stream.request(traceparent, tracestate, message))
            .await
            .map(|r| Answer::Prepare(r.into_inner())),
        Some(Call::Commit(message)) => service
            .commit(stream.request(traceparent, tracestate, message))
            .await
            .map(|r| Answer::Commit(r.into_inner())),
        Some(Call::Abort(message)) => service
            .abort(stream.request(traceparent, tracestate, message))
            .await
            .map(|r| Answer::Abort(r.into_inner())),
        Some(Call::Compensate(message)) => service
            .compensate(stream.request(traceparent, tracestate, message))
            .await
            .map(|r| Answer::Compensate(r.into_inner())),
        None => Err(Status::invalid_argument(
            "call: one of prepare, commit, abort or compensate is required",
        )),
    }
}

/// The stream's metadata with this call's trace context in place of any the stream
/// carried (a value that cannot be metadata is left out: tracing never fails a call).
fn call_metadata(stream: &MetadataMap, traceparent: &str, tracestate: &str) -> MetadataMap {
    let mut metadata = stream.clone();
    metadata.remove(TRACEPARENT);
    metadata.remove(TRACESTATE);
    for (key, value) in [(TRACEPARENT, traceparent), (TRACESTATE, tracestate)] {
        if value.is_empty() {
            continue;
        }
        if let Ok(value) = MetadataValue::try_from(value) {
            metadata.insert(key, value);
        }
    }
    metadata
}
