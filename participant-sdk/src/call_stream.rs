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
//!   none; where calls can be withdrawn, it reads on while it waits, taking withdrawals
//!   (of calls being answered, of the waiting call, of calls read ahead) and keeping
//!   the calls for their turn, up to [`MAX_READ_AHEAD_CALLS`] and
//!   [`MAX_READ_AHEAD_BYTES`]: a withdrawal frees a place even while all are taken,
//!   unless more than that waits ahead of it;
//! - a call that only waits (for an outcome decided elsewhere) may trade its place for
//!   one of the connection's `max_in_flight` waits ([`CallPlace`]), so that places are
//!   held only by calls whose work ends on its own and the stream goes on reading (a
//!   withdrawal among what it reads); an answer not yet sent still holds its place or
//!   wait;
//! - every call read is answered on the stream: by its method, INTERNAL if the method
//!   panicked, or CANCELLED once its caller withdrew it (a protocol whose calls can be
//!   withdrawals: [`CallMessages::withdraws`]); a withdrawal itself is not answered;
//! - once the caller has gone (it dropped the stream, or its connection broke), the
//!   calls it left are dropped as unary calls are when their caller goes, and a call it
//!   withdrew is dropped so at once: a participant's operations still run to their end,
//!   as they do unary;
//! - once the server is stopping, no further call is read: the stream ends when the
//!   calls read so far are answered.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use prost::Message as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
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
    type Call: prost::Message + Send + 'static;
    /// What an answer carries when the call did not fail (its `oneof`).
    type Answered: Send + 'static;
    /// An answer as it goes.
    type Answer: Send + 'static;
    /// The number the caller gave `call`.
    fn call_id(call: &Self::Call) -> u64;
    /// Whether a call can be withdrawn (then the stream keeps, for each call being
    /// answered, the means to withdraw it).
    const WITHDRAWALS: bool = false;
    /// Whether `call` is no call but the withdrawal of the one numbered as it is.
    fn withdraws(_call: &Self::Call) -> bool {
        false
    }
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

    // The coordinator withdraws a call whose deadline passed, so that a call stuck
    // behind a branch's lock or in user code gives its place back as a unary call does.
    const WITHDRAWALS: bool = true;

    fn withdraws(call: &pb::CallRequest) -> bool {
        matches!(call.call, Some(pb::call_request::Call::Withdraw(_)))
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

/// The messages of `Coordinator.Calls`.
#[derive(Debug)]
pub struct TransactionCalls;

impl CallMessages for TransactionCalls {
    type Call = pb::TransactionCall;
    type Answered = pb::transaction_answer::Answer;
    type Answer = pb::TransactionAnswer;

    fn call_id(call: &pb::TransactionCall) -> u64 {
        call.call_id
    }

    const WITHDRAWALS: bool = true;

    fn withdraws(call: &pb::TransactionCall) -> bool {
        matches!(call.call, Some(pb::transaction_call::Call::Withdraw(_)))
    }

    fn answer(call_id: u64, answered: Result<Self::Answered, Status>) -> pb::TransactionAnswer {
        pb::TransactionAnswer {
            call_id,
            answer: Some(answered.unwrap_or_else(|status| {
                pb::transaction_answer::Answer::Error(call_error(&status))
            })),
        }
    }
}

/// What a call being answered holds: its place among the calls its connection's
/// streams answer at once, or, once it traded that place for a wait, one of the
/// connection's waits. Held until its answer is sent.
#[derive(Debug, Clone)]
pub struct CallPlace {
    held: Arc<Mutex<Held>>,
    waits: Arc<Semaphore>,
}

#[derive(Debug)]
struct Held {
    place: Option<OwnedSemaphorePermit>,
    wait: Option<OwnedSemaphorePermit>,
}

impl CallPlace {
    /// Takes one of the connection's waits, beside the place, for a call that is about
    /// to wait for an outcome decided elsewhere; `false` if every wait is taken (the
    /// caller then refuses the call, or waits in its place). Taking it before the work
    /// that leads to the wait lets a call be refused before it changed anything.
    pub fn take_wait(&self) -> bool {
        let mut held = lock(&self.held);
        if held.wait.is_some() {
            return true;
        }
        match self.waits.clone().try_acquire_owned() {
            Ok(wait) => {
                held.wait = Some(wait);
                true
            }
            Err(_) => false,
        }
    }

    /// Gives the place back, if the call holds a wait ([`take_wait`](Self::take_wait)):
    /// from now on the call only waits, and another call can be answered in its place.
    pub fn wait_without_place(&self) {
        let mut held = lock(&self.held);
        if held.wait.is_some() {
            held.place = None;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The calls of one stream being answered, by number: how to withdraw each. Kept by the
/// stream's reader alone; the calls answered since are swept out as the list grows, so
/// it holds at most about twice the calls in progress (their places and waits).
#[derive(Default)]
struct Withdrawals {
    calls: HashMap<u64, oneshot::Sender<()>>,
    sweep_at_len: usize,
}

/// The least length at which [`Withdrawals`] are swept.
const MIN_WITHDRAWALS_SWEPT: usize = 64;

impl Withdrawals {
    /// Lists call `call_id`; the receiver resolves once it is withdrawn.
    fn list(&mut self, call_id: u64) -> oneshot::Receiver<()> {
        if self.calls.len() >= self.sweep_at_len {
            // A call's receiver is gone once its answering ended.
            self.calls.retain(|_, withdraw| !withdraw.is_closed());
            self.sweep_at_len = (2 * self.calls.len()).max(MIN_WITHDRAWALS_SWEPT);
        }
        let (withdraw, withdrawn) = oneshot::channel();
        self.calls.insert(call_id, withdraw);
        withdrawn
    }

    /// Withdraws call `call_id`, if it is being answered.
    fn withdraw(&mut self, call_id: u64) {
        if let Some(withdraw) = self.calls.remove(&call_id) {
            let _ = withdraw.send(());
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
    serve_calls::<ParticipantCalls, _, _>(
        request,
        stopping,
        max_in_flight,
        move |stream, call, _place| {
            let service = service.clone();
            async move { answer(&service, &stream, call).await }
        },
    )
}

/// Serves one stream of calls of any service: reads each call, has `answer` answer it
/// (with what the unary call gives: its response's place in the answer, or its status)
/// in a task of its own, and sends the answers in the order they are ready (see the
/// module's invariants for the bounds, withdrawals, the caller's going and the server's
/// stop). `answer` gets the call's [`CallPlace`] too, to trade it for a wait.
pub fn serve_calls<M, F, Fut>(
    request: Request<Streaming<M::Call>>,
    stopping: watch::Receiver<bool>,
    max_in_flight: usize,
    answer: F,
) -> Response<Answers<M::Answer>>
where
    M: CallMessages,
    F: Fn(StreamContext, M::Call, CallPlace) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<M::Answered, Status>> + Send + 'static,
{
    let max_in_flight = max_in_flight.max(1);
    let (metadata, extensions, calls) = request.into_parts();
    let (in_flight, waits) = match extensions.get::<ConnectionInfo>() {
        Some(connection) => (
            connection.stream_call_places(max_in_flight),
            connection.stream_call_waits(max_in_flight),
        ),
        None => (
            Arc::new(Semaphore::new(max_in_flight)),
            Arc::new(Semaphore::new(max_in_flight)),
        ),
    };
    let stream = StreamContext {
        metadata: Arc::new(metadata),
        extensions: Arc::new(extensions),
    };
    let (answers, answered) = mpsc::channel(max_in_flight);
    let mut reader = Reader::<M> {
        calls,
        stopping,
        ahead: VecDeque::new(),
        ahead_bytes: 0,
        done: false,
        withdrawals: Withdrawals::default(),
    };
    tokio::spawn(async move {
        while let Some(call) = reader.next_call().await {
            let call_id = M::call_id(&call);
            // A call read is answered, even once the server is stopping: its place comes
            // when one of the calls being answered is.
            let permit = match reader.place_for(call_id, &in_flight, &answers).await {
                Ok(permit) => permit,
                Err(Unplaced::Withdrawn) => {
                    let _ = answers.send(Ok(withdrawn_answer::<M>(call_id))).await;
                    continue;
                }
                // Never, as the server uses its places: the calls read are answered.
                Err(Unplaced::Closed) => {
                    let ahead = std::mem::take(&mut reader.ahead);
                    for call_id in
                        std::iter::once(call_id).chain(ahead.iter().map(|(c, _)| M::call_id(c)))
                    {
                        let closed = Status::unavailable("the stream's places are closed");
                        let _ = answers.send(Ok(M::answer(call_id, Err(closed)))).await;
                    }
                    return;
                }
            };
            // The caller has gone while the call waited: nobody to answer.
            if answers.is_closed() {
                return;
            }
            let place = CallPlace {
                held: Arc::new(Mutex::new(Held {
                    place: Some(permit),
                    wait: None,
                })),
                waits: waits.clone(),
            };
            let withdrawn = M::WITHDRAWALS.then(|| reader.withdrawals.list(call_id));
            let answers = answers.clone();
            let answering =
                std::panic::AssertUnwindSafe(answer(stream.clone(), call, place.clone()));
            tokio::spawn(async move {
                let answered = tokio::select! {
                    answered = answering.catch_unwind() => answered.unwrap_or_else(|_| {
                        Err(Status::internal("the call's handler panicked"))
                    }),
                    Some(Ok(())) = withdrawal(withdrawn) => Err(withdrawn_status()),
                    // The caller has gone: its call is dropped, as a unary call's is.
                    () = answers.closed() => return,
                };
                // A send fails only when the caller has gone: nobody to tell.
                let _ = answers.send(Ok(M::answer(call_id, answered))).await;
                drop(place);
            });
        }
    });
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        answered,
    )))
}

/// Calls a stream holds read ahead while one waits for a place, at most (where calls
/// can be withdrawn: to read the withdrawals behind them).
pub const MAX_READ_AHEAD_CALLS: usize = 64;
/// The encoded size of the calls a stream holds read ahead, at most (the call that
/// reaches it is held too, and is the last one read: the size may pass this by one
/// call, itself bounded by the server's message limit).
pub const MAX_READ_AHEAD_BYTES: usize = 1024 * 1024;

/// What a withdrawn call is answered.
fn withdrawn_status() -> Status {
    Status::cancelled("the call was withdrawn by its caller")
}

/// The answer to call `call_id`, withdrawn before it was answered.
fn withdrawn_answer<M: CallMessages>(call_id: u64) -> M::Answer {
    M::answer(call_id, Err(withdrawn_status()))
}

/// The reading side of one stream: calls in the order they came, withdrawals taken on
/// the way.
struct Reader<M: CallMessages> {
    calls: Streaming<M::Call>,
    stopping: watch::Receiver<bool>,
    /// Calls read while the one before them waited for a place, in order, each with
    /// its encoded size (never a withdrawal: those are taken as they are read).
    ahead: VecDeque<(M::Call, usize)>,
    /// Their encoded size.
    ahead_bytes: usize,
    /// No further message is read: the stream ended or broke, or the server is stopping.
    done: bool,
    withdrawals: Withdrawals,
}

/// Why a call read got no place.
enum Unplaced {
    /// Its caller withdrew it while it waited for one.
    Withdrawn,
    /// The places are closed (never, as the server uses them).
    Closed,
}

impl<M: CallMessages> Reader<M> {
    /// The next call to answer, withdrawals taken on the way; `None` once no further
    /// call is read.
    async fn next_call(&mut self) -> Option<M::Call> {
        if let Some((call, size)) = self.ahead.pop_front() {
            self.ahead_bytes -= size;
            return Some(call);
        }
        loop {
            let call = self.read().await?;
            if !M::withdraws(&call) {
                return Some(call);
            }
            // Needs no place. A call already answered is not withdrawn.
            self.withdrawals.withdraw(M::call_id(&call));
        }
    }

    /// Waits for a place for call `call_id`; where calls can be withdrawn, reading on
    /// meanwhile while there is room ahead: withdrawals are taken (of calls being
    /// answered, of this call, of calls read ahead, which are answered CANCELLED on
    /// `answers`), and other calls are kept for their turn. So a withdrawal is read, and
    /// frees a place, even while every place is taken.
    async fn place_for(
        &mut self,
        call_id: u64,
        places: &Arc<Semaphore>,
        answers: &mpsc::Sender<Result<M::Answer, Status>>,
    ) -> Result<OwnedSemaphorePermit, Unplaced> {
        let place = places.clone().acquire_owned();
        tokio::pin!(place);
        loop {
            let room =
                self.ahead.len() < MAX_READ_AHEAD_CALLS && self.ahead_bytes < MAX_READ_AHEAD_BYTES;
            tokio::select! {
                biased;
                place = &mut place => return place.map_err(|_| Unplaced::Closed),
                next = self.read(), if M::WITHDRAWALS && room && !self.done => match next {
                    Some(next) if M::withdraws(&next) => {
                        let withdrawn = M::call_id(&next);
                        if withdrawn == call_id {
                            return Err(Unplaced::Withdrawn);
                        }
                        match self.ahead.iter().position(|(call, _)| M::call_id(call) == withdrawn) {
                            Some(index) => {
                                if let Some((_, size)) = self.ahead.remove(index) {
                                    self.ahead_bytes -= size;
                                }
                                let _ = answers.send(Ok(withdrawn_answer::<M>(withdrawn))).await;
                            }
                            None => self.withdrawals.withdraw(withdrawn),
                        }
                    }
                    Some(next) => {
                        let size = next.encoded_len();
                        self.ahead_bytes += size;
                        self.ahead.push_back((next, size));
                    }
                    None => {}
                },
            }
        }
    }

    /// The next message, unless none is to be read: `None` (and done) once the caller
    /// ended its side, the stream broke, or the server is stopping.
    async fn read(&mut self) -> Option<M::Call> {
        if self.done {
            return None;
        }
        let next = tokio::select! {
            biased;
            () = stopped(&mut self.stopping) => None,
            next = self.calls.message() => Some(next),
        };
        match next {
            Some(Ok(Some(call))) => return Some(call),
            None | Some(Ok(None)) => {}
            // The caller ended it (an idle stream is ended so).
            Some(Err(status)) if status.code() == tonic::Code::Cancelled => {
                tracing::debug!(status_message = %status.message(), "a call stream was cancelled by its caller");
            }
            Some(Err(status)) => {
                tracing::warn!(code = ?status.code(), status_message = %status.message(), "a call stream broke; no further call is read from it");
            }
        }
        // The calls read so far are still answered (their tasks hold the sender).
        self.done = true;
        None
    }
}

/// The withdrawal of a call, if the protocol has them: resolves `Some(Ok(()))` once the
/// call is withdrawn, `Some(Err(_))` if its listing is gone (its number taken by a later
/// call, or the reader ended), never without one.
async fn withdrawal(
    withdrawn: Option<oneshot::Receiver<()>>,
) -> Option<Result<(), oneshot::error::RecvError>> {
    match withdrawn {
        Some(withdrawn) => Some(withdrawn.await),
        None => std::future::pending().await,
    }
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
        // The stream's reader takes withdrawals itself: none is answered.
        Some(Call::Withdraw(_)) => Err(Status::internal(
            "a withdrawal was answered as a call (the stream's reader takes them)",
        )),
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
