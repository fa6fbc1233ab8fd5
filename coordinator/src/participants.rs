//! Talking to participants: one lazily connected tonic channel per endpoint, a deadline
//! on every call, a bound on calls in flight, a circuit breaker per endpoint, and the
//! retry backoff. Over the channel, calls go on the participant's `Calls` stream where
//! it serves one, and unary otherwise (module `stream`); which way a call travels changes
//! nothing else here.
//!
//! Calls in flight are bounded twice: in all (`max_in_flight`), and per endpoint (a
//! quarter of that), so that a participant that stopped answering never holds the
//! permits the others need. An endpoint whose circuit is open (see [`circuit`]) is not
//! called at all: its calls fail at once and hold nothing.
//!
//! Every failure to get an answer (transport error, deadline, an error status) comes back
//! as `Err(description)`: the engine decides what it means (abort in phase 1, retry in
//! phase 2). Protocol outcomes come back as values.
//!
//! Descriptions reach clients (branch errors, histories, abort reasons), and clients name
//! the endpoints, so they say only which of three things happened: the participant was
//! unreachable, did not answer in time, or answered with an error (its gRPC status).
//! Transport details (connection refused or reset, TLS or HTTP/2 errors, a server that is
//! not gRPC) would tell a closed port from an open one; they go to the log instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Semaphore;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::auth::Credentials;
use treaty_sdk::call_stream_client::call_or_unary;
use treaty_sdk::limits::truncate_reason;
use treaty_sdk::trace::TraceContext;

use crate::engine::twopc::{Answer, Vote};
use crate::metrics::{CallOperation, CallResult, Metrics};

pub mod circuit;
mod status;
mod stream;
pub mod window;

use circuit::{Admission, Circuit, CircuitState};
pub use status::EndpointStatus;
pub use stream::Transport;
use stream::{CallStream, StreamedCall};
use window::CallWindow;

/// Channels kept open; past this the cache starts over (old channels close when their
/// calls finish).
const MAX_CACHED_ENDPOINTS: usize = 4096;

/// What clients are told when no gRPC answer came, whatever the transport said.
pub const UNREACHABLE: &str = "participant unreachable";
/// What they are told when the call was not made: the endpoint's circuit is open.
pub const CIRCUIT_OPEN: &str = "participant unreachable (circuit open: not called)";

/// How tonic begins the message of a status it made up from an HTTP status code because
/// the response had no `grpc-status`: the server there does not speak gRPC.
const NOT_GRPC_PREFIX: &str = "grpc-status header missing";

/// Where and how to reach one branch.
#[derive(Debug, Clone)]
pub struct Call {
    /// In canonical form (the API accepts no other), so that it is the channel's key.
    pub endpoint: String,
    pub transaction_id: String,
    pub branch_id: String,
    /// How long the coordinator waits for the answer. It is not sent as
    /// `grpc-timeout`: with the same deadline there, tonic's client or the participant's
    /// server could end the call first, and it would read as unreachable, or as an
    /// answer that keeps the circuit closed (tests/tests/sagas.rs,
    /// `a_step_without_an_answer_in_time_fails_as_a_timeout`).
    pub timeout: Duration,
    /// Sent as `traceparent` / `tracestate`: the transaction's trace, with a span id
    /// fresh for this call.
    pub trace: Option<TraceContext>,
}

impl Call {
    /// `message` as a request carrying the call's trace context.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(trace) = &self.trace {
            trace.inject(request.metadata_mut());
        }
        request
    }
}

/// Why a call brought no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailure {
    /// What happened, for the branch's history and the logs.
    pub message: String,
    /// Sending the same call again cannot succeed: the participant refused it for good
    /// (see [`refused_for_good`]).
    pub permanent: bool,
}

impl CallFailure {
    fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }
}

type Client = ParticipantClient<InterceptedService<Channel, Credentials>>;

/// What the coordinator keeps per endpoint.
#[derive(Debug)]
struct Peer {
    client: Client,
    /// Carries the calls over the client's channel, unless the participant or the
    /// configuration wants them unary.
    stream: Option<CallStream>,
    /// The TLS settings the client was made with (see `Participants::reload_tls`).
    tls_generation: u64,
    health: Arc<PeerHealth>,
}

/// What outlives a peer's channel (a TLS reload makes a new one): its share of the
/// permits and its circuit.
#[derive(Debug)]
struct PeerHealth {
    /// Calls to this endpoint in flight.
    permits: Semaphore,
    max_permits: usize,
    circuit: Mutex<Circuit>,
    /// `treaty_circuit_state` for this endpoint, set under the circuit's lock so that
    /// the last value written is the circuit's last state (set after the lock, a call
    /// that saw it open could overwrite the close a probe had just reported).
    circuit_gauge: prometheus_client::metrics::gauge::Gauge,
    /// Calls and failures of about the last minute.
    recent: Mutex<CallWindow>,
}

impl PeerHealth {
    /// No call in flight and the circuit closed: nothing is lost by forgetting it.
    fn is_idle(&self) -> bool {
        self.permits.available_permits() == self.max_permits
            && self.circuit_state() == CircuitState::Closed
    }

    fn circuit_state(&self) -> CircuitState {
        self.change_circuit(|_, _| ()).2
    }

    /// Runs `change` on the circuit; returns its result and the circuit's state before
    /// and after. The gauge shows the state after; open turns half-open with time
    /// alone, so it is written whenever the circuit is not closed (the slow path), and
    /// at any change.
    fn change_circuit<R>(
        &self,
        change: impl FnOnce(&mut Circuit, std::time::Instant) -> R,
    ) -> (R, CircuitState, CircuitState) {
        let mut circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let before = circuit.state(now);
        let result = change(&mut circuit, now);
        let after = circuit.state(now);
        if before != after || after != CircuitState::Closed {
            self.circuit_gauge.set(after.gauge());
        }
        (result, before, after)
    }
}

#[derive(Debug, Clone)]
pub struct Participants {
    peers: Arc<Mutex<HashMap<String, Arc<Peer>>>>,
    /// Bumped by each TLS reload: channels made before it are made again.
    tls_generation: Arc<std::sync::atomic::AtomicU64>,
    in_flight: Arc<Semaphore>,
    max_in_flight_per_endpoint: usize,
    coordinator_endpoint: String,
    connect_timeout: Duration,
    /// For `https://` participants (`None`: they are refused); replaced on reload.
    tls: Arc<RwLock<Option<ClientTlsConfig>>>,
    /// What every call presents.
    credentials: Credentials,
    /// Every call's duration and result.
    metrics: Arc<Metrics>,
    /// Calls go over each participant's `Calls` stream where it serves one.
    call_streams: bool,
    /// A stream idle this long is ended (`stream::CLOSE_IDLE_AFTER` but in tests).
    stream_idle_close: Duration,
}

impl Participants {
    pub fn new(
        coordinator_endpoint: String,
        max_in_flight: usize,
        connect_timeout: Duration,
    ) -> Self {
        Self {
            peers: Arc::default(),
            tls_generation: Arc::default(),
            in_flight: Arc::new(Semaphore::new(max_in_flight.max(1))),
            max_in_flight_per_endpoint: (max_in_flight / 4).max(1),
            coordinator_endpoint,
            connect_timeout,
            tls: Arc::default(),
            credentials: Credentials::none(),
            metrics: Arc::default(),
            call_streams: true,
            stream_idle_close: stream::CLOSE_IDLE_AFTER,
        }
    }

    /// With `false`, every call is a unary call, even to participants that serve the
    /// `Calls` stream.
    pub fn with_call_streams(mut self, call_streams: bool) -> Self {
        self.call_streams = call_streams;
        self
    }

    /// Counts calls in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Calls `https://` participants with `tls` and presents `credentials` on every call.
    pub fn with_security(mut self, tls: Option<ClientTlsConfig>, credentials: Credentials) -> Self {
        self.tls = Arc::new(RwLock::new(tls));
        self.credentials = credentials;
        self
    }

    /// New TLS settings (SIGHUP): channels opened from now on use them.
    pub fn reload_tls(&self, tls: Option<ClientTlsConfig>) {
        *self.tls.write().unwrap_or_else(|e| e.into_inner()) = tls;
        // Channels are made again; circuits and permit shares stay.
        self.tls_generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn peer(&self, endpoint: &str) -> Result<Arc<Peer>, String> {
        let generation = self
            .tls_generation
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let existing = peers.get(endpoint).cloned();
        if let Some(peer) = &existing {
            if peer.tls_generation == generation {
                return Ok(peer.clone());
            }
        }
        if existing.is_none() && peers.len() >= MAX_CACHED_ENDPOINTS {
            // Forget idle endpoints only: one with calls in flight or an open circuit
            // keeps its permits and circuit (at most one per call in flight). A call
            // between taking its peer and taking a permit holds that peer, or an older
            // one a TLS reload replaced, which shares the health: forgotten under it, the
            // endpoint would get a second circuit and gauge beside the one that call goes
            // on changing.
            peers.retain(|_, peer| {
                let held = Arc::strong_count(peer) > 1 || Arc::strong_count(&peer.health) > 1;
                held || !peer.health.is_idle()
            });
        }
        let mut channel = Endpoint::from_shared(endpoint.to_string())
            .map_err(|error| {
                tracing::warn!(endpoint = %endpoint.escape_debug(), %error, "participant endpoint not usable");
                "participant endpoint not usable".to_string()
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        if endpoint.starts_with("https://") {
            // Never cleartext: without a TLS configuration the call fails.
            let tls = self
                .tls
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .ok_or_else(|| {
                    "https:// participants are not configured (--participant-ca)".to_string()
                })?;
            channel = channel
                .tls_config(tls)
                .map_err(|error| {
                    tracing::warn!(endpoint = %endpoint.escape_debug(), %error, "TLS configuration not usable");
                    "participant endpoint not usable".to_string()
                })?;
        }
        let health = match existing {
            Some(peer) => peer.health.clone(),
            None => {
                // Shown from the first call, so that dashboards list every endpoint.
                let circuit_gauge = self.metrics.circuit_gauge(endpoint);
                circuit_gauge.set(CircuitState::Closed.gauge());
                Arc::new(PeerHealth {
                    permits: Semaphore::new(self.max_in_flight_per_endpoint),
                    max_permits: self.max_in_flight_per_endpoint,
                    circuit: Mutex::default(),
                    circuit_gauge,
                    recent: Mutex::default(),
                })
            }
        };
        let peer = Arc::new(Peer {
            client: ParticipantClient::with_interceptor(
                channel.connect_lazy(),
                self.credentials.clone(),
            ),
            stream: self
                .call_streams
                .then(|| CallStream::closing_idle_after(self.stream_idle_close)),
            tls_generation: generation,
            health,
        });
        peers.insert(endpoint.to_string(), peer.clone());
        Ok(peer)
    }

    /// Runs `request` against the branch's participant within the call's deadline,
    /// holding one of the in-flight permits, and counts it in the metrics.
    async fn call<T, F, Fut>(
        &self,
        call: &Call,
        operation: CallOperation,
        message: T,
        unary: F,
    ) -> Result<T::Response, CallFailure>
    where
        T: StreamedCall,
        F: FnOnce(Client, tonic::Request<T>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T::Response>, tonic::Status>>,
    {
        let started = std::time::Instant::now();
        let peer = match self.peer(&call.endpoint) {
            Ok(peer) => peer,
            Err(error) => {
                self.metrics.participant_call(
                    &call.endpoint,
                    operation,
                    CallResult::unreachable,
                    0.0,
                );
                return Err(CallFailure::transient(error));
            }
        };
        let Some(admitted) = self.admit(call, &peer) else {
            self.metrics
                .participant_call(&call.endpoint, operation, CallResult::circuit_open, 0.0);
            return Err(CallFailure::transient(CIRCUIT_OPEN));
        };
        let shutting_down = |_| CallFailure::transient("coordinator shutting down");
        let _endpoint_permit = peer.health.permits.acquire().await.map_err(shutting_down)?;
        // The circuit may have opened while this call waited for its permit.
        if admitted.admission == Admission::Call && !admitted.circuit_closed() {
            self.metrics
                .participant_call(&call.endpoint, operation, CallResult::circuit_open, 0.0);
            return Err(CallFailure::transient(CIRCUIT_OPEN));
        }
        let _permit = self.in_flight.acquire().await.map_err(shutting_down)?;
        let (result, answer) = self.send(call, &peer, message, unary).await;
        let answered = matches!(result, CallResult::ok | CallResult::error);
        admitted.finish(answered);
        peer.health
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(
                std::time::Instant::now(),
                crate::runtime::now_unix_ms(),
                answer
                    .as_ref()
                    .err()
                    .map(|failure| failure.message.as_str()),
            );
        self.metrics.participant_call(
            &call.endpoint,
            operation,
            result,
            started.elapsed().as_secs_f64(),
        );
        answer
    }

    /// Asks the endpoint's circuit whether the call may go out; `None`: fail at once.
    fn admit<'a>(&'a self, call: &'a Call, peer: &'a Peer) -> Option<Admitted<'a>> {
        let (admission, _, _) = peer.health.change_circuit(Circuit::admit);
        (admission != Admission::Refuse).then_some(Admitted {
            endpoint: &call.endpoint,
            peer,
            admission,
            finished: false,
        })
    }

    /// One call, on the endpoint's stream or unary, and how it ended for the metrics.
    async fn send<T, F, Fut>(
        &self,
        call: &Call,
        peer: &Peer,
        message: T,
        unary: F,
    ) -> (CallResult, Result<T::Response, CallFailure>)
    where
        T: StreamedCall,
        F: FnOnce(Client, tonic::Request<T>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T::Response>, tonic::Status>>,
    {
        let open = |requests| {
            let mut client = peer.client.clone();
            async move { client.calls(tonic::Request::new(requests)).await }
        };
        let answer = call_or_unary(
            peer.stream.as_ref(),
            open,
            message,
            call.trace.as_ref(),
            |message| unary(peer.client.clone(), call.request(message)),
        );
        match tokio::time::timeout(call.timeout, answer).await {
            Ok(Ok(response)) => (CallResult::ok, Ok(response)),
            Ok(Err(status)) => {
                let result = if answered_by_participant(&status) {
                    CallResult::error
                } else {
                    CallResult::unreachable
                };
                let failure = CallFailure {
                    message: describe_failure(call, &status),
                    permanent: refused_for_good(&status),
                };
                (result, Err(failure))
            }
            Err(_) => {
                tracing::warn!(
                    endpoint = %call.endpoint,
                    branch_id = %call.branch_id,
                    timeout_ms = call.timeout.as_millis() as u64,
                    "participant did not answer in time"
                );
                (
                    CallResult::timeout,
                    Err(CallFailure::transient(format!(
                        "participant did not answer within {} ms",
                        call.timeout.as_millis()
                    ))),
                )
            }
        }
    }

    pub async fn prepare(&self, call: &Call, payload: Vec<u8>) -> Result<Vote, CallFailure> {
        let message = pb::PrepareBranchRequest {
            transaction_id: call.transaction_id.clone(),
            branch_id: call.branch_id.clone(),
            payload,
            coordinator_endpoint: self.coordinator_endpoint.clone(),
        };
        let response = self
            .call(
                call,
                CallOperation::prepare,
                message,
                |mut client, request| async move { client.prepare(request).await },
            )
            .await?;
        match pb::Vote::try_from(response.vote) {
            Ok(pb::Vote::Yes) => Ok(Vote::Yes),
            Ok(pb::Vote::No) => Ok(Vote::No {
                reason: truncate_reason(response.reason),
            }),
            Ok(pb::Vote::ReadOnly) => Ok(Vote::ReadOnly),
            _ => Err(CallFailure::transient(format!(
                "participant sent an unknown vote {}",
                response.vote
            ))),
        }
    }

    /// A phase-2 commit (`payload` empty) or a one-phase commit.
    pub async fn commit(
        &self,
        call: &Call,
        mode: pb::CommitMode,
        payload: Vec<u8>,
    ) -> Result<Answer, CallFailure> {
        let operation = match mode {
            pb::CommitMode::OnePhase => CallOperation::one_phase_commit,
            pb::CommitMode::SagaStep => CallOperation::step,
            _ => CallOperation::commit,
        };
        let message = pb::CommitBranchRequest {
            transaction_id: call.transaction_id.clone(),
            branch_id: call.branch_id.clone(),
            mode: mode as i32,
            payload,
            coordinator_endpoint: self.coordinator_endpoint.clone(),
        };
        let response = self
            .call(call, operation, message, |mut client, request| async move {
                client.commit(request).await
            })
            .await?;
        match pb::CommitResult::try_from(response.result) {
            Ok(pb::CommitResult::Committed) => Ok(Answer::Committed),
            Ok(pb::CommitResult::Rejected) => Ok(Answer::Rejected {
                reason: truncate_reason(response.reason),
            }),
            Ok(pb::CommitResult::NotPrepared) => Ok(Answer::NotPrepared),
            Ok(pb::CommitResult::AlreadyAborted) => Ok(Answer::Aborted),
            _ => Err(CallFailure::transient(format!(
                "participant sent an unknown commit result {}",
                response.result
            ))),
        }
    }

    pub async fn abort(&self, call: &Call) -> Result<Answer, CallFailure> {
        let message = pb::AbortBranchRequest {
            transaction_id: call.transaction_id.clone(),
            branch_id: call.branch_id.clone(),
        };
        let response = self
            .call(
                call,
                CallOperation::abort,
                message,
                |mut client, request| async move { client.abort(request).await },
            )
            .await?;
        match pb::AbortResult::try_from(response.result) {
            Ok(pb::AbortResult::Aborted) => Ok(Answer::Aborted),
            Ok(pb::AbortResult::AlreadyCommitted) => Ok(Answer::Committed),
            _ => Err(CallFailure::transient(format!(
                "participant sent an unknown abort result {}",
                response.result
            ))),
        }
    }
}

/// A call the circuit let out; its result goes back to the circuit, and a call dropped
/// before it had one frees the probe.
struct Admitted<'a> {
    endpoint: &'a str,
    peer: &'a Peer,
    admission: Admission,
    finished: bool,
}

impl Admitted<'_> {
    fn circuit_closed(&self) -> bool {
        self.peer.health.circuit_state() == CircuitState::Closed
    }

    fn finish(mut self, answered: bool) {
        self.finished = true;
        let admission = self.admission;
        let ((), before, after) = self
            .peer
            .health
            .change_circuit(|circuit, now| circuit.record(admission, answered, now));
        if before != after {
            if after == CircuitState::Open {
                tracing::warn!(endpoint = %self.endpoint, "participant not answering; its circuit is open");
            } else if after == CircuitState::Closed {
                tracing::info!(endpoint = %self.endpoint, "participant answers again; its circuit is closed");
            }
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let admission = self.admission;
            self.peer
                .health
                .change_circuit(|circuit, _| circuit.abandon(admission));
        }
    }
}

impl Participants {
    /// A saga step's compensation.
    pub async fn compensate(&self, call: &Call, payload: Vec<u8>) -> Result<(), CallFailure> {
        let message = pb::CompensateBranchRequest {
            transaction_id: call.transaction_id.clone(),
            branch_id: call.branch_id.clone(),
            payload,
        };
        let response = self
            .call(
                call,
                CallOperation::compensate,
                message,
                |mut client, request| async move { client.compensate(request).await },
            )
            .await?;
        match pb::CompensateResult::try_from(response.result) {
            Ok(pb::CompensateResult::Compensated) => Ok(()),
            _ => Err(CallFailure::transient(format!(
                "participant sent an unknown compensate result {}",
                response.result
            ))),
        }
    }
}

/// What the client is told of a call that ended in `status`; the details go to the log.
fn describe_failure(call: &Call, status: &tonic::Status) -> String {
    if answered_by_participant(status) {
        tracing::debug!(
            endpoint = %call.endpoint,
            branch_id = %call.branch_id,
            code = ?status.code(),
            status_message = %status.message(),
            "participant answered with an error"
        );
        // A participant's message is bounded before it is kept or logged.
        return truncate_reason(format!(
            "participant answered {:?}: {}",
            status.code(),
            status.message()
        ));
    }
    tracing::warn!(
        endpoint = %call.endpoint,
        branch_id = %call.branch_id,
        code = ?status.code(),
        status_message = %status.message(),
        source = ?std::error::Error::source(status),
        "participant unreachable"
    );
    UNREACHABLE.to_string()
}

/// Whether `status` is a gRPC server's answer rather than one the client made up: tonic
/// gives a status made from a transport error (connect, TLS, HTTP/2) its source, and one
/// made from a non-gRPC HTTP response a recognisable message.
fn answered_by_participant(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_none() && !status.message().starts_with(NOT_GRPC_PREFIX)
}

/// A participant's FAILED_PRECONDITION: a call about a transaction past its barrier
/// retention that found no record. It answers the same however often it is sent, so
/// an operator must end the transaction (docs/PARTICIPANT-PROTOCOL.md, "Barrier
/// retention and late calls").
fn refused_for_good(status: &tonic::Status) -> bool {
    answered_by_participant(status) && status.code() == tonic::Code::FailedPrecondition
}

/// Capped exponential backoff with jitter: the delay before retry number `attempt`
/// (1-based) is drawn from `[cap/2, cap]`, where `cap = min(max, initial · 2^(attempt-1))`.
///
/// Written here rather than taken from a backoff crate because the engine owns the
/// attempt count (it survives in the transaction's state and history), so what is needed
/// is a pure function of the attempt, not a stateful iterator per branch.
pub fn retry_delay(attempt: u32, initial_ms: u64, max_ms: u64, rng: &mut impl Rng) -> Duration {
    let exponent = attempt.saturating_sub(1).min(32);
    let cap = initial_ms
        .max(1)
        .saturating_mul(1u64 << exponent)
        .min(max_ms.max(1));
    Duration::from_millis(rng.random_range(cap.div_ceil(2)..=cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn only_a_grpc_servers_own_status_counts_as_an_answer() {
        let call = Call {
            endpoint: "http://127.0.0.1:1".into(),
            transaction_id: "t".into(),
            branch_id: "b".into(),
            timeout: Duration::from_secs(1),
            trace: None,
        };
        let answered = tonic::Status::unavailable("participant: store down");
        assert_eq!(
            describe_failure(&call, &answered),
            "participant answered Unavailable: participant: store down"
        );
        let transport =
            tonic::Status::from_error(Box::new(std::io::Error::other("connection refused")));
        assert_eq!(describe_failure(&call, &transport), UNREACHABLE);
        let not_grpc = tonic::Status::unimplemented(
            "grpc-status header missing, mapped from HTTP status code 404",
        );
        assert_eq!(describe_failure(&call, &not_grpc), UNREACHABLE);
    }

    #[test]
    fn only_a_participants_failed_precondition_is_a_refusal_for_good() {
        let past_retention =
            tonic::Status::failed_precondition("the transaction is past the barrier retention");
        assert!(refused_for_good(&past_retention));
        assert!(!refused_for_good(&tonic::Status::unavailable(
            "participant: store down"
        )));
        assert!(!refused_for_good(&tonic::Status::internal(
            "record unreadable"
        )));
    }

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
    struct Served {
        /// Told when a prepare begins.
        started: Arc<tokio::sync::Notify>,
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    impl Served {
        async fn start(listener: tokio::net::TcpListener, delay: Duration, streams: bool) -> Self {
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

        async fn stop(self) {
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
        let off =
            Participants::new(String::new(), 64, Duration::from_secs(5)).with_call_streams(false);

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
            trust: treaty_sdk::server::CoordinatorTrust::default().token("right"),
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
}
