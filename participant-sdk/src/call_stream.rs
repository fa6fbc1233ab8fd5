//! The server's side of a calls stream: many calls over one long-lived bidirectional
//! stream, each numbered by its caller and answered under that number. A participant
//! serves its prepare / commit / abort / compensate calls so (see
//! docs/PARTICIPANT-PROTOCOL.md, "Calls over one stream"), and the coordinator its
//! `Coordinator.Calls` with [`serve_calls`].
//!
//! Each call on the stream is answered exactly as its unary call would be: it is made
//! into the unary request, with the stream's metadata (credentials) and extensions (the
//! peer's identity) and its own trace context, and goes through the same method, so
//! the trust check, the checks of every field, the barrier and the metrics are the
//! unary call's. Invariants:
//! - at most `max_in_flight` calls of one stream (the server's
//!   `max_concurrent_requests`) are being answered at once; the next call is not read
//!   until one of them is answered;
//! - every call read is answered on the stream, unless the caller has gone (then the
//!   operation still runs to its end, as for a unary call whose caller gave up);
//! - once the server is stopping, no further call is read: the stream ends when the
//!   calls read so far are answered.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, watch};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Extensions, Request, Response, Status, Streaming};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::Participant as ParticipantRpc;

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
    serve_calls(request, stopping, max_in_flight, move |stream, call| {
        let service = service.clone();
        async move { answer(&service, &stream, call).await }
    })
}

/// Serves one stream of calls of any service: reads each call, has `answer` answer it
/// in a task of its own, and sends the answers in the order they are ready; at most
/// `max_in_flight` calls are being answered at once, and the next call is not read
/// until one of them is. Once `stopping` is true no further call is read, and the
/// stream ends when those read are answered.
pub fn serve_calls<C, A, F, Fut>(
    request: Request<Streaming<C>>,
    mut stopping: watch::Receiver<bool>,
    max_in_flight: usize,
    answer: F,
) -> Response<Answers<A>>
where
    C: Send + 'static,
    A: Send + 'static,
    F: Fn(StreamContext, C) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = A> + Send + 'static,
{
    let max_in_flight = max_in_flight.max(1);
    let (metadata, extensions, mut calls) = request.into_parts();
    let stream = StreamContext {
        metadata: Arc::new(metadata),
        extensions: Arc::new(extensions),
    };
    let (answers, answered) = mpsc::channel(max_in_flight);
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let next = tokio::select! {
                next = calls.message() => next,
                () = stopped(&mut stopping) => return,
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
            let answers = answers.clone();
            let answering = answer(stream.clone(), call);
            tokio::spawn(async move {
                let answer = answering.await;
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

/// The status a [`pb::CallError`] stands for (an error that claims OK is INTERNAL).
pub fn status_of(error: pb::CallError) -> Status {
    if error.code == tonic::Code::Ok as i32 {
        return Status::internal("the server answered an error with code OK");
    }
    Status::with_details(error.code.into(), error.message, error.details.into())
}

/// The answer to one call of the stream: its unary method's, or its status as an error.
async fn answer<T: ParticipantRpc>(
    service: &T,
    stream: &StreamContext,
    call: pb::CallRequest,
) -> pb::CallAnswer {
    use pb::call_answer::Answer;
    use pb::call_request::Call;
    let call_id = call.call_id;
    let (traceparent, tracestate) = (call.traceparent.as_str(), call.tracestate.as_str());
    let answer = match call.call {
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
    };
    pb::CallAnswer {
        call_id,
        answer: Some(answer.unwrap_or_else(|status| Answer::Error(call_error(&status)))),
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
