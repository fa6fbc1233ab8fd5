//! The coordinator's side of a participant's `Calls` stream: one long-lived stream per
//! endpoint carries its prepare / commit / abort / compensate calls, each numbered and
//! matched with its answer (docs/PARTICIPANT-PROTOCOL.md, "Calls over one stream"). A
//! call on a stream costs a fraction of a unary call's CPU at both ends
//! (docs/PERFORMANCE.md, "A call made unary or on a stream").
//!
//! The stream is opened without waiting for the participant's response headers (a
//! gRPC server may send them only with its first answer): calls are sent at once, and
//! until the participant has shown that it serves the stream, each caller keeps a copy
//! of its request.
//!
//! Invariants:
//! - a call sent on a stream gets exactly one outcome: its answer; a failure without an
//!   answer when the stream ends first; or, when the participant refuses the stream
//!   with UNIMPLEMENTED (it read none of it), its request back to be sent unary;
//! - a caller that gives up (its deadline) takes its call out of the waiting ones;
//! - a call that was never sent (its stream ended first) is sent on a new stream, once;
//! - a stream that ended is never used again: the next call opens another. A stream
//!   with no call sent and none waiting for [`CLOSE_IDLE_AFTER`] (twice that at most,
//!   as it is checked every such period) is ended, so that an
//!   endpoint no longer called holds no connection at the participant;
//! - after UNIMPLEMENTED, calls to the participant are unary for this peer's life; after
//!   any other failure to open the stream, unary for [`REOPEN_AFTER`], so that a
//!   participant that cannot be reached fails its calls as it would unary, without a
//!   stream tried before each.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use treaty_proto::v1 as pb;
use treaty_sdk::trace::TraceContext;

use super::Client;

/// Requests queued for a stream's sending side, at most; a call waits for room.
const MAX_QUEUED_CALLS: usize = 1024;

/// How long calls go unary after a stream could not be opened.
pub(super) const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// A stream with no call sent and none waiting for this long is ended.
pub(super) const CLOSE_IDLE_AFTER: Duration = Duration::from_secs(60);

/// A request that can travel on the stream, and its answer's place there.
pub(super) trait StreamedCall: Sized + Clone {
    type Response;
    fn into_call(self) -> pb::call_request::Call;
    /// The request back from its place on the stream, if `call` is of this kind.
    fn from_call(call: pb::call_request::Call) -> Option<Self>;
    /// The response, if `answer` is one of this call's kind.
    fn from_answer(answer: pb::call_answer::Answer) -> Option<Self::Response>;
}

macro_rules! streamed_call {
    ($request:ty, $response:ty, $variant:ident) => {
        impl StreamedCall for $request {
            type Response = $response;
            fn into_call(self) -> pb::call_request::Call {
                pb::call_request::Call::$variant(self)
            }
            fn from_call(call: pb::call_request::Call) -> Option<Self> {
                match call {
                    pb::call_request::Call::$variant(request) => Some(request),
                    _ => None,
                }
            }
            fn from_answer(answer: pb::call_answer::Answer) -> Option<$response> {
                match answer {
                    pb::call_answer::Answer::$variant(response) => Some(response),
                    _ => None,
                }
            }
        }
    };
}

streamed_call!(pb::PrepareBranchRequest, pb::PrepareBranchResponse, Prepare);
streamed_call!(pb::CommitBranchRequest, pb::CommitBranchResponse, Commit);
streamed_call!(pb::AbortBranchRequest, pb::AbortBranchResponse, Abort);
streamed_call!(
    pb::CompensateBranchRequest,
    pb::CompensateBranchResponse,
    Compensate
);

/// One endpoint's stream, opened on first use.
#[derive(Debug)]
pub(super) struct CallStream {
    state: Mutex<State>,
    /// A stream with no call sent and none waiting for this long is ended
    /// ([`CLOSE_IDLE_AFTER`] but in tests).
    close_idle_after: Duration,
}

impl Default for CallStream {
    fn default() -> Self {
        Self::closing_idle_after(CLOSE_IDLE_AFTER)
    }
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Closed,
    Open(Arc<OpenStream>),
    /// Opening failed at this time: calls go unary until [`REOPEN_AFTER`] has passed.
    FailedAt(Instant),
    /// The participant serves unary calls only.
    Unsupported,
}

#[derive(Debug)]
struct OpenStream {
    requests: mpsc::Sender<pb::CallRequest>,
    shared: Arc<Shared>,
}

/// What the callers and the task delivering the answers share.
#[derive(Debug, Default)]
struct Shared {
    next_call_id: AtomicU64,
    waiting: Mutex<Waiting>,
}

/// The calls sent and not yet answered, and how the stream stands.
#[derive(Debug, Default)]
struct Waiting {
    calls: HashMap<u64, oneshot::Sender<Outcome>>,
    /// The participant's response headers came: it serves the stream.
    confirmed: bool,
    ended: Option<Ended>,
}

#[derive(Debug, Clone, Copy)]
enum Ended {
    /// The participant answered the stream's start UNIMPLEMENTED.
    Unsupported,
    /// The stream's start failed otherwise, at this time.
    NotOpened(Instant),
    /// It ended or broke after it was opened, or was idle.
    Over,
}

/// What a caller on the stream hears.
#[derive(Debug)]
enum Outcome {
    Answered(Result<pb::call_answer::Answer, tonic::Status>),
    /// The participant read none of the stream: send the call unary.
    Unary,
}

/// Takes a call out of the waiting ones when its caller stops waiting.
struct StopWaiting<'a> {
    shared: &'a Shared,
    call_id: u64,
}

impl Drop for StopWaiting<'_> {
    fn drop(&mut self) {
        lock(&self.shared.waiting).calls.remove(&self.call_id);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A failure without an answer, made so that it reads as one (it has a source: see
/// `answered_by_participant`).
fn no_answer(message: impl Into<String>) -> tonic::Status {
    tonic::Status::from_error(Box::new(std::io::Error::other(message.into())))
}

impl CallStream {
    pub(super) fn closing_idle_after(close_idle_after: Duration) -> Self {
        Self {
            state: Mutex::default(),
            close_idle_after,
        }
    }

    /// Sends `request` on the stream and waits for its outcome; `Err(request)` if the
    /// call is to be made unary (no stream can be used, or the participant refused it).
    pub(super) async fn call<T: StreamedCall>(
        &self,
        client: &Client,
        mut request: T,
        trace: Option<&TraceContext>,
    ) -> Result<Result<T::Response, tonic::Status>, T> {
        // A stream found ended before the call went out is replaced once.
        for _ in 0..2 {
            let Some(stream) = self.open(client) else {
                return Err(request);
            };
            let call_id = stream.shared.next_call_id.fetch_add(1, Ordering::Relaxed);
            let (answered, answer) = oneshot::channel();
            let confirmed = {
                let mut waiting = lock(&stream.shared.waiting);
                if waiting.ended.is_some() {
                    continue;
                }
                waiting.calls.insert(call_id, answered);
                waiting.confirmed
            };
            let _stop_waiting = StopWaiting {
                shared: &stream.shared,
                call_id,
            };
            // Until the participant has shown it serves the stream, it may refuse the
            // whole stream, and the call then goes unary.
            let kept = (!confirmed).then(|| request.clone());
            let message = pb::CallRequest {
                call_id,
                traceparent: trace
                    .map(|t| t.traceparent().to_string())
                    .unwrap_or_default(),
                tracestate: trace
                    .and_then(|t| t.tracestate())
                    .unwrap_or_default()
                    .to_string(),
                call: Some(request.into_call()),
            };
            if let Err(unsent) = stream.requests.send(message).await {
                match unsent.0.call.and_then(T::from_call) {
                    Some(unsent) => {
                        request = unsent;
                        continue;
                    }
                    None => return Ok(Err(no_answer("the call stream ended"))),
                }
            }
            let answer = match answer.await {
                Ok(Outcome::Answered(answer)) => answer,
                Ok(Outcome::Unary) => match kept {
                    Some(request) => return Err(request),
                    None => Err(no_answer("the call stream was refused")),
                },
                Err(_) => Err(no_answer("the call stream ended")),
            };
            return Ok(answer.and_then(|answer| {
                T::from_answer(answer).ok_or_else(|| {
                    tonic::Status::internal("the participant answered a call with another kind")
                })
            }));
        }
        Ok(Err(no_answer(
            "the call stream ended before the call was sent",
        )))
    }

    /// The open stream, opened now if there is none; `None`: go unary.
    fn open(&self, client: &Client) -> Option<Arc<OpenStream>> {
        let mut state = lock(&self.state);
        match state.settled() {
            Transport::Stream => {
                if let State::Open(stream) = &*state {
                    return Some(stream.clone());
                }
            }
            Transport::Unary => return None,
            Transport::NoStreamOpen => {}
        }
        let (requests, queued) = mpsc::channel(MAX_QUEUED_CALLS);
        let shared = Arc::new(Shared::default());
        let mut client = client.clone();
        let opening = async move {
            client
                .calls(tonic::Request::new(
                    tokio_stream::wrappers::ReceiverStream::new(queued),
                ))
                .await
        };
        tokio::spawn(deliver(opening, shared.clone(), self.close_idle_after));
        let stream = Arc::new(OpenStream { requests, shared });
        *state = State::Open(stream.clone());
        Some(stream)
    }

    /// How calls travel now.
    pub(super) fn transport(&self) -> Transport {
        lock(&self.state).settled()
    }
}

impl State {
    /// Takes in how an open stream ended (its delivering task records that), and says
    /// how the next call travels.
    fn settled(&mut self) -> Transport {
        if let State::Open(stream) = self {
            let ended = lock(&stream.shared.waiting).ended;
            *self = match ended {
                None => return Transport::Stream,
                Some(Ended::Unsupported) => State::Unsupported,
                Some(Ended::NotOpened(at)) => State::FailedAt(at),
                Some(Ended::Over) => State::Closed,
            };
        }
        match self {
            State::Unsupported => Transport::Unary,
            State::FailedAt(at) if at.elapsed() < REOPEN_AFTER => Transport::Unary,
            _ => Transport::NoStreamOpen,
        }
    }
}

/// How calls to an endpoint travel now (`treaty endpoints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// On its open `Calls` stream.
    Stream,
    /// Unary: the participant serves no stream, streams are off, or one could not be
    /// opened lately.
    Unary,
    /// No stream is open: the next call opens one.
    NoStreamOpen,
}

/// Opens the stream, then hands each answer to its caller until the stream ends, breaks
/// or is idle; then gives every call still waiting its outcome (nobody will answer it
/// on this stream).
async fn deliver<F>(opening: F, shared: Arc<Shared>, close_idle_after: Duration)
where
    F: std::future::Future<
            Output = Result<tonic::Response<tonic::Streaming<pb::CallAnswer>>, tonic::Status>,
        >,
{
    let mut answers = match opening.await {
        Ok(response) => {
            lock(&shared.waiting).confirmed = true;
            response.into_inner()
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            tracing::info!(status_message = %status.message(), "participant serves unary calls only");
            end(&shared, Ended::Unsupported, || Outcome::Unary);
            return;
        }
        Err(status) => {
            tracing::debug!(code = ?status.code(), status_message = %status.message(), "call stream not opened; calling unary for a while");
            // The participant's own refusal (credentials) is every call's answer, as it
            // would be unary; a transport failure is no answer.
            let refused = std::error::Error::source(&status).is_none();
            let reason = format!("the call stream was not opened: {}", status.message());
            end(&shared, Ended::NotOpened(Instant::now()), || {
                Outcome::Answered(Err(if refused {
                    status.clone()
                } else {
                    no_answer(reason.clone())
                }))
            });
            return;
        }
    };
    let mut idle_check = tokio::time::interval_at(
        tokio::time::Instant::now() + close_idle_after,
        close_idle_after,
    );
    let mut sent_at_last_check = shared.next_call_id.load(Ordering::Relaxed);
    let reason = loop {
        tokio::select! {
            answer = answers.message() => match answer {
                Ok(Some(answer)) => hand_over(&shared, answer),
                Ok(None) => break "the call stream ended".to_string(),
                Err(status) => break format!("the call stream failed: {}", status.message()),
            },
            _ = idle_check.tick() => {
                let sent = shared.next_call_id.load(Ordering::Relaxed);
                let mut waiting = lock(&shared.waiting);
                if sent == sent_at_last_check && waiting.calls.is_empty() {
                    // Under the lock: a call registering now finds it ended and opens
                    // another. Dropping `answers` resets the stream at the participant.
                    waiting.ended = Some(Ended::Over);
                    return;
                }
                sent_at_last_check = sent;
            }
        }
    };
    end(&shared, Ended::Over, || {
        Outcome::Answered(Err(no_answer(reason.clone())))
    });
}

/// Gives `answer` to the call waiting for it, if its caller still waits.
fn hand_over(shared: &Shared, answer: pb::CallAnswer) {
    let Some(caller) = lock(&shared.waiting).calls.remove(&answer.call_id) else {
        return;
    };
    let outcome = match answer.answer {
        Some(pb::call_answer::Answer::Error(error)) if error.code == tonic::Code::Ok as i32 => Err(
            tonic::Status::internal("the participant answered an error with code OK"),
        ),
        Some(pb::call_answer::Answer::Error(error)) => {
            Err(tonic::Status::new(error.code.into(), error.message))
        }
        Some(answer) => Ok(answer),
        None => Err(tonic::Status::internal(
            "the participant sent an empty answer",
        )),
    };
    let _ = caller.send(Outcome::Answered(outcome));
}

/// Marks the stream ended and gives each call still waiting `outcome()`.
fn end(shared: &Shared, ended: Ended, outcome: impl Fn() -> Outcome) {
    let callers = {
        let mut waiting = lock(&shared.waiting);
        waiting.ended = Some(ended);
        std::mem::take(&mut waiting.calls)
    };
    for (_, caller) in callers {
        let _ = caller.send(outcome());
    }
}
