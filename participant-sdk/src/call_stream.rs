//! The participant's side of the `Calls` stream: many prepare / commit / abort /
//! compensate calls over one long-lived bidirectional stream (see
//! docs/PARTICIPANT-PROTOCOL.md, "Calls over one stream").
//!
//! Each call on the stream is answered exactly as its unary call would be: it is made
//! into the unary request, with the stream's metadata (credentials) and extensions (the
//! peer's identity) and its own trace context, and goes through the same trait method,
//! so the trust check, the checks of every field, the barrier and the metrics are the
//! unary call's. Invariants:
//! - at most `max_in_flight` calls of one stream (the server's
//!   `max_concurrent_requests`) are being answered at once; the next call is not read
//!   until one of them is answered;
//! - every call read is answered on the stream, unless the caller has gone (then the
//!   operation still runs to its end, as for a unary call whose caller gave up);
//! - once the server is stopping, no further call is read: the stream ends when the
//!   calls read so far are answered.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, watch};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Extensions, Request, Response, Status, Streaming};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::Participant as ParticipantRpc;

use crate::trace::{TRACEPARENT, TRACESTATE};

/// The answers of one stream, in the order they are ready.
pub type CallAnswers =
    Pin<Box<dyn futures::Stream<Item = Result<pb::CallAnswer, Status>> + Send + 'static>>;

/// Serves one `Calls` stream with `service`'s unary methods, at most `max_in_flight`
/// calls at once. `stopping` must turn true when the server stops: no further call is
/// read then, and the stream ends once those read are answered (a graceful shutdown
/// waits for every stream to end). A service that wraps another calls this with itself,
/// so that the calls on the stream go through its own methods.
pub fn serve<T>(
    service: T,
    request: Request<Streaming<pb::CallRequest>>,
    mut stopping: watch::Receiver<bool>,
    max_in_flight: usize,
) -> Response<CallAnswers>
where
    T: ParticipantRpc + Clone,
{
    let max_in_flight = max_in_flight.max(1);
    let (metadata, extensions, mut calls) = request.into_parts();
    let metadata = Arc::new(metadata);
    let extensions = Arc::new(extensions);
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
                // The caller ended it (the coordinator ends an idle stream so).
                Err(status) if status.code() == tonic::Code::Cancelled => {
                    tracing::debug!(status_message = %status.message(), "a call stream was cancelled by its caller");
                    return;
                }
                Err(status) => {
                    tracing::warn!(code = ?status.code(), status_message = %status.message(), "a call stream broke; no further call is read from it");
                    return;
                }
            };
            let service = service.clone();
            let answers = answers.clone();
            let (metadata, extensions) = (metadata.clone(), extensions.clone());
            tokio::spawn(async move {
                let answer = answer(&service, &metadata, &extensions, call).await;
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

/// The answer to one call of the stream: its unary method's, or its status as an error.
async fn answer<T: ParticipantRpc>(
    service: &T,
    metadata: &MetadataMap,
    extensions: &Extensions,
    call: pb::CallRequest,
) -> pb::CallAnswer {
    use pb::call_answer::Answer;
    use pb::call_request::Call;
    let call_id = call.call_id;
    let metadata = call_metadata(metadata, &call.traceparent, &call.tracestate);
    let extensions = extensions.clone();
    let answer = match call.call {
        Some(Call::Prepare(message)) => service
            .prepare(Request::from_parts(metadata, extensions, message))
            .await
            .map(|r| Answer::Prepare(r.into_inner())),
        Some(Call::Commit(message)) => service
            .commit(Request::from_parts(metadata, extensions, message))
            .await
            .map(|r| Answer::Commit(r.into_inner())),
        Some(Call::Abort(message)) => service
            .abort(Request::from_parts(metadata, extensions, message))
            .await
            .map(|r| Answer::Abort(r.into_inner())),
        Some(Call::Compensate(message)) => service
            .compensate(Request::from_parts(metadata, extensions, message))
            .await
            .map(|r| Answer::Compensate(r.into_inner())),
        None => Err(Status::invalid_argument(
            "call: one of prepare, commit, abort or compensate is required",
        )),
    };
    pb::CallAnswer {
        call_id,
        answer: Some(answer.unwrap_or_else(|status| {
            Answer::Error(pb::CallError {
                code: status.code() as i32,
                message: status.message().to_string(),
            })
        })),
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
