//! The caller's side of a calls stream: one long-lived stream per server carries many
//! calls, each numbered and matched with its answer (the server's side is
//! [`call_stream`](crate::call_stream)). The coordinator calls its participants so
//! (docs/PARTICIPANT-PROTOCOL.md, "Calls over one stream"), and [`TreatyClient`]
//! (crate::client::TreatyClient) its coordinator. A call on a stream costs a fraction of
//! a unary call's CPU at both ends (docs/PERFORMANCE.md, "A call made unary or on a
//! stream").
//!
//! The stream is opened without waiting for the server's response headers (a gRPC
//! server may send them only with its first answer): calls are sent at once, and until
//! the server has shown that it serves the stream, each caller keeps a copy of its
//! request.
//!
//! Invariants:
//! - a call sent on a stream gets exactly one outcome: its answer; a failure without an
//!   answer when the stream ends first; or, when the server refuses the stream with
//!   UNIMPLEMENTED (it read none of it), its request back to be sent unary;
//! - a caller that gives up (its deadline) takes its call out of the waiting ones and,
//!   where the protocol has withdrawals ([`CallsProtocol::withdrawal`]) and the call
//!   was sent, sends its withdrawal, so that the server stops answering it as it stops a
//!   unary call whose caller went;
//! - a call that was never sent (its stream ended first) is sent on a new stream, once;
//! - a stream that ended is never used again: the next call opens another. A stream
//!   with no call sent and none waiting for [`CLOSE_IDLE_AFTER`] (twice that at most,
//!   as it is checked every such period) is ended, so that a server no longer called
//!   holds no connection open for it;
//! - after UNIMPLEMENTED, calls to the server are unary for this [`CallStream`]'s life;
//!   after any other failure to open the stream, unary for [`REOPEN_AFTER`], so that a
//!   server that cannot be reached fails its calls as it would unary, without a stream
//!   tried before each.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::trace::TraceContext;

/// Requests queued for a stream's sending side, at most; a call waits for room.
const MAX_QUEUED_CALLS: usize = 1024;

/// How long calls go unary after a stream could not be opened.
pub const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// A stream with no call sent and none waiting for this long is ended.
pub const CLOSE_IDLE_AFTER: Duration = Duration::from_secs(60);

/// The messages of one kind of calls stream, as its caller sees them.
pub trait CallsProtocol: 'static {
    /// Who serves the stream, as errors name it ("the participant").
    const SERVER: &'static str;
    /// A call as it is sent: numbered, with its trace context.
    type Request: Send + 'static;
    /// An answer as it comes.
    type Answer: Send + 'static;
    /// What a request carries (its `oneof`).
    type Call: Send + 'static;
    /// What an answer carries (its `oneof`), other than an error.
    type Answered: Send + 'static;

    fn request(call_id: u64, trace: Option<&TraceContext>, call: Self::Call) -> Self::Request;
    /// What `request` carries, if anything.
    fn call_of(request: Self::Request) -> Option<Self::Call>;
    /// The number of the call `answer` answers, and what it says.
    fn answered(answer: Self::Answer) -> (u64, Result<Self::Answered, Status>);
    /// The withdrawal of call `call_id`, if the protocol has withdrawals.
    fn withdrawal(_call_id: u64) -> Option<Self::Request> {
        None
    }
}

/// A unary request that can travel on a stream of protocol `P`, and its answer's place
/// there.
pub trait StreamedCall<P: CallsProtocol>: Sized + Clone {
    type Response;
    fn into_call(self) -> P::Call;
    /// The request back from its place on the stream, if `call` is of this kind.
    fn from_call(call: P::Call) -> Option<Self>;
    /// The response, if `answer` is one of this call's kind.
    fn from_answer(answer: P::Answered) -> Option<Self::Response>;
}

/// Implements [`CallsProtocol`] for `$protocol`, whose calls travel as `$request`
/// messages (fields `call_id`, `traceparent`, `tracestate`, `call`) and are answered by
/// `$answer` messages (fields `call_id`, `answer`, whose `Error` is a `CallError`);
/// `$server` names the server in the errors the caller makes of its answers. With
/// `withdraw = $withdraw`, a call is withdrawn by a request of the same number that
/// carries `$withdraw` as its call.
#[macro_export]
macro_rules! calls_protocol {
    ($protocol:ty, $($request:ident)::+, $($answer:ident)::+, $($call:ident)::+, $($answered:ident)::+, $server:literal $(, withdraw = $withdraw:expr)?) => {
        impl $crate::call_stream_client::CallsProtocol for $protocol {
            const SERVER: &'static str = $server;
            type Request = $($request)::+;
            type Answer = $($answer)::+;
            type Call = $($call)::+;
            type Answered = $($answered)::+;

            fn request(
                call_id: u64,
                trace: Option<&$crate::trace::TraceContext>,
                call: Self::Call,
            ) -> Self::Request {
                let (traceparent, tracestate) = $crate::call_stream_client::trace_fields(trace);
                $($request)::+ {
                    call_id,
                    traceparent,
                    tracestate,
                    call: Some(call),
                }
            }

            fn call_of(request: Self::Request) -> Option<Self::Call> {
                request.call
            }

            fn answered(answer: Self::Answer) -> (u64, Result<Self::Answered, tonic::Status>) {
                let outcome = match answer.answer {
                    Some($($answered)::+::Error(error)) => {
                        Err($crate::call_stream::status_of(error, $server))
                    }
                    Some(answer) => Ok(answer),
                    None => Err(tonic::Status::internal(concat!(
                        $server,
                        " sent an empty answer"
                    ))),
                };
                (answer.call_id, outcome)
            }

            $(
                fn withdrawal(call_id: u64) -> Option<Self::Request> {
                    Some(Self::request(call_id, None, $withdraw))
                }
            )?
        }
    };
}

/// Implements [`StreamedCall`] for a request whose place in both `oneof`s is `$variant`.
#[macro_export]
macro_rules! streamed_call {
    ($protocol:ty, $($call:ident)::+, $($answered:ident)::+, $request:ty, $response:ty, $variant:ident) => {
        impl $crate::call_stream_client::StreamedCall<$protocol> for $request {
            type Response = $response;
            fn into_call(self) -> $($call)::+ {
                $($call)::+::$variant(self)
            }
            fn from_call(call: $($call)::+) -> Option<Self> {
                match call {
                    $($call)::+::$variant(request) => Some(request),
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
            fn from_answer(answer: $($answered)::+) -> Option<$response> {
                match answer {
                    $($answered)::+::$variant(response) => Some(response),
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        }
    };
}

/// One server's stream, opened on first use.
pub struct CallStream<P: CallsProtocol> {
    state: Mutex<State<P>>,
    /// A stream with no call sent and none waiting for this long is ended
    /// ([`CLOSE_IDLE_AFTER`] but in tests).
    close_idle_after: Duration,
}

impl<P: CallsProtocol> std::fmt::Debug for CallStream<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("transport", &self.transport())
            .field("close_idle_after", &self.close_idle_after)
            .finish()
    }
}

impl<P: CallsProtocol> Default for CallStream<P> {
    fn default() -> Self {
        Self::closing_idle_after(CLOSE_IDLE_AFTER)
    }
}

enum State<P: CallsProtocol> {
    Closed,
    Open(Arc<OpenStream<P>>),
    /// Opening failed at this time: calls go unary until [`REOPEN_AFTER`] has passed.
    FailedAt(Instant),
    /// The server serves unary calls only.
    Unsupported,
}

struct OpenStream<P: CallsProtocol> {
    shared: Arc<Shared<P>>,
}

impl<P: CallsProtocol> Drop for OpenStream<P> {
    /// Nobody can send on it any more: the server sees its end once the calls being
    /// sent are out.
    fn drop(&mut self) {
        lock(&self.shared.waiting).requests = None;
    }
}

/// What the callers and the task delivering the answers share.
struct Shared<P: CallsProtocol> {
    next_call_id: AtomicU64,
    waiting: Mutex<Waiting<P>>,
}

/// The calls sent and not yet answered, and how the stream stands.
struct Waiting<P: CallsProtocol> {
    /// Where calls are sent; taken out when the stream ends, so that the server sees
    /// its end (the sending side ends once no caller holds a copy).
    requests: Option<mpsc::Sender<P::Request>>,
    calls: HashMap<u64, oneshot::Sender<Outcome<P>>>,
    /// The server's response headers came: it serves the stream.
    confirmed: bool,
    ended: Option<Ended>,
}

#[derive(Debug, Clone, Copy)]
enum Ended {
    /// The server answered the stream's start UNIMPLEMENTED.
    Unsupported,
    /// The stream's start failed otherwise, at this time.
    NotOpened(Instant),
    /// It ended or broke after it was opened, or was idle.
    Over,
}

/// What a caller on the stream hears.
enum Outcome<P: CallsProtocol> {
    Answered(Result<P::Answered, Status>),
    /// The server read none of the stream: send the call unary.
    Unary,
}

/// Takes a call out of the waiting ones when its caller stops waiting, and withdraws it
/// if it was sent and not answered.
struct StopWaiting<'a, P: CallsProtocol> {
    shared: &'a Shared<P>,
    call_id: u64,
    sent: bool,
}

impl<P: CallsProtocol> Drop for StopWaiting<'_, P> {
    fn drop(&mut self) {
        let mut waiting = lock(&self.shared.waiting);
        let unanswered = waiting.calls.remove(&self.call_id).is_some();
        if !(self.sent && unanswered) {
            return;
        }
        let (Some(requests), Some(withdrawal)) =
            (waiting.requests.clone(), P::withdrawal(self.call_id))
        else {
            return;
        };
        drop(waiting);
        if let Err(mpsc::error::TrySendError::Full(withdrawal)) = requests.try_send(withdrawal) {
            // Behind a full queue: sent when there is room, if a runtime is there to.
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        let _ = requests.send(withdrawal).await;
                    });
                }
                Err(_) => tracing::warn!(
                    call_id = self.call_id,
                    "a call's withdrawal was not sent (its stream's queue is full, and no \
                     runtime is there to send it later): the server answers the call in full"
                ),
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// `trace` as a call's `traceparent` and `tracestate` fields (empty if none).
pub fn trace_fields(trace: Option<&TraceContext>) -> (String, String) {
    match trace {
        Some(trace) => (
            trace.traceparent().to_string(),
            trace.tracestate().unwrap_or_default().to_string(),
        ),
        None => (String::new(), String::new()),
    }
}

/// A failure without an answer: UNAVAILABLE, as a unary call that could not reach its
/// server is, and made so that it reads as no answer: it has a source, as a transport
/// error of a unary call has (a status the server sent has none).
pub fn no_answer(message: impl Into<String>) -> Status {
    let message = message.into();
    let mut status = Status::unavailable(message.clone());
    status.set_source(Arc::new(std::io::Error::other(message)));
    status
}

impl<P: CallsProtocol> CallStream<P> {
    pub fn closing_idle_after(close_idle_after: Duration) -> Self {
        Self {
            state: Mutex::new(State::Closed),
            close_idle_after,
        }
    }

    /// Sends `request` on the stream and waits for its outcome; `Err(request)` if the
    /// call is to be made unary (no stream can be used, or the server refused it).
    /// `open` opens a stream from the requests to send on it; it is called only when no
    /// stream is open.
    pub async fn call<T, O, Fut>(
        &self,
        open: O,
        mut request: T,
        trace: Option<&TraceContext>,
    ) -> Result<Result<T::Response, Status>, T>
    where
        T: StreamedCall<P>,
        O: Fn(ReceiverStream<P::Request>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<tonic::Streaming<P::Answer>>, Status>>
            + Send
            + 'static,
    {
        // A stream found ended before the call went out is replaced once.
        for _ in 0..2 {
            let Some(stream) = self.open(&open) else {
                return Err(request);
            };
            let call_id = stream.shared.next_call_id.fetch_add(1, Ordering::Relaxed);
            let (answered, answer) = oneshot::channel();
            let (requests, confirmed) = {
                let mut waiting = lock(&stream.shared.waiting);
                let Some(requests) = waiting.requests.clone() else {
                    continue;
                };
                waiting.calls.insert(call_id, answered);
                (requests, waiting.confirmed)
            };
            let mut stop_waiting = StopWaiting {
                shared: &stream.shared,
                call_id,
                sent: false,
            };
            // Until the server has shown it serves the stream, it may refuse the whole
            // stream, and the call then goes unary.
            let kept = (!confirmed).then(|| request.clone());
            let message = P::request(call_id, trace, request.into_call());
            let sent = requests.send(message).await;
            drop(requests);
            stop_waiting.sent = sent.is_ok();
            if let Err(unsent) = sent {
                // Nothing more can go out on it: the next attempt opens another (its
                // delivering task still gives the calls sent on it their outcomes).
                let mut waiting = lock(&stream.shared.waiting);
                waiting.ended.get_or_insert(Ended::Over);
                waiting.requests = None;
                drop(waiting);
                match P::call_of(unsent.0).and_then(T::from_call) {
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
                    Status::internal(format!("{} answered a call with another kind", P::SERVER))
                })
            }));
        }
        Ok(Err(no_answer(
            "the call stream ended before the call was sent",
        )))
    }

    /// The open stream, opened now with `open` if there is none; `None`: go unary.
    fn open<O, Fut>(&self, open: &O) -> Option<Arc<OpenStream<P>>>
    where
        O: Fn(ReceiverStream<P::Request>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<tonic::Streaming<P::Answer>>, Status>>
            + Send
            + 'static,
    {
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
        let shared = Arc::new(Shared {
            next_call_id: AtomicU64::new(0),
            waiting: Mutex::new(Waiting {
                requests: Some(requests),
                calls: HashMap::new(),
                confirmed: false,
                ended: None,
            }),
        });
        let opening = open(ReceiverStream::new(queued));
        tokio::spawn(deliver(opening, shared.clone(), self.close_idle_after));
        let stream = Arc::new(OpenStream { shared });
        *state = State::Open(stream.clone());
        Some(stream)
    }

    /// How calls travel now.
    pub fn transport(&self) -> Transport {
        lock(&self.state).settled()
    }
}

impl<P: CallsProtocol> State<P> {
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

/// One call: on `stream` (opened with `open` if none is open), or with `unary`, which
/// gets the request back, when there is no stream or it cannot carry the call.
pub async fn call_or_unary<P, T, O, OpenFut, U, UnaryFut>(
    stream: Option<&CallStream<P>>,
    open: O,
    request: T,
    trace: Option<&TraceContext>,
    unary: U,
) -> Result<T::Response, Status>
where
    P: CallsProtocol,
    T: StreamedCall<P>,
    O: Fn(ReceiverStream<P::Request>) -> OpenFut,
    OpenFut: Future<Output = Result<tonic::Response<tonic::Streaming<P::Answer>>, Status>>
        + Send
        + 'static,
    U: FnOnce(T) -> UnaryFut,
    UnaryFut: Future<Output = Result<tonic::Response<T::Response>, Status>>,
{
    let request = match stream {
        Some(stream) => match stream.call(open, request, trace).await {
            Ok(answer) => return answer,
            Err(request) => request,
        },
        None => request,
    };
    unary(request).await.map(tonic::Response::into_inner)
}

/// How calls to a server travel now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// On its open calls stream.
    Stream,
    /// Unary: the server serves no stream, one could not be opened lately, or the
    /// caller keeps no stream (its calls are unary by choice).
    Unary,
    /// No stream is open: the next call opens one.
    NoStreamOpen,
}

/// Opens the stream, then hands each answer to its caller until the stream ends, breaks
/// or is idle; then gives every call still waiting its outcome (nobody will answer it
/// on this stream).
async fn deliver<P, F>(opening: F, shared: Arc<Shared<P>>, close_idle_after: Duration)
where
    P: CallsProtocol,
    F: Future<Output = Result<tonic::Response<tonic::Streaming<P::Answer>>, Status>>,
{
    let _end_when_gone = EndWhenGone(&shared);
    let mut answers = match opening.await {
        Ok(response) => {
            lock(&shared.waiting).confirmed = true;
            response.into_inner()
        }
        Err(status) if status.code() == tonic::Code::Unimplemented => {
            tracing::info!(status_message = %status.message(), "the server serves unary calls only");
            end(&shared, Ended::Unsupported, || Outcome::Unary);
            return;
        }
        Err(status) => {
            tracing::debug!(code = ?status.code(), status_message = %status.message(), "call stream not opened; calling unary for a while");
            // Every call's answer, as it would be unary: the server's own refusal
            // (credentials), or the transport's failure (which keeps its source, so it
            // reads as no answer).
            end(&shared, Ended::NotOpened(Instant::now()), || {
                Outcome::Answered(Err(status.clone()))
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
                    // another. Without a sender the server sees the stream's end.
                    waiting.ended = Some(Ended::Over);
                    waiting.requests = None;
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

/// Ends the stream for its callers if its delivering task stops without having said how
/// (its runtime shut down): nobody else would give them an outcome.
struct EndWhenGone<'a, P: CallsProtocol>(&'a Shared<P>);

impl<P: CallsProtocol> Drop for EndWhenGone<'_, P> {
    fn drop(&mut self) {
        let ended = lock(&self.0.waiting).ended.is_some();
        if !ended {
            end(self.0, Ended::Over, || {
                Outcome::Answered(Err(no_answer("the call stream's task ended")))
            });
        }
    }
}

/// Gives `answer` to the call waiting for it, if its caller still waits.
fn hand_over<P: CallsProtocol>(shared: &Shared<P>, answer: P::Answer) {
    let (call_id, outcome) = P::answered(answer);
    let Some(caller) = lock(&shared.waiting).calls.remove(&call_id) else {
        return;
    };
    let _ = caller.send(Outcome::Answered(outcome));
}

/// Marks the stream ended and gives each call still waiting `outcome()`.
fn end<P: CallsProtocol>(shared: &Shared<P>, ended: Ended, outcome: impl Fn() -> Outcome<P>) {
    let callers = {
        let mut waiting = lock(&shared.waiting);
        waiting.ended = Some(ended);
        waiting.requests = None;
        std::mem::take(&mut waiting.calls)
    };
    for (_, caller) in callers {
        let _ = caller.send(outcome());
    }
}
