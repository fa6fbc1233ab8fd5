//! Talking to participants: one lazily connected tonic channel per endpoint, a deadline
//! on every call, a bound on calls in flight, a circuit breaker per endpoint, and the
//! retry backoff. Over the channel, calls go on the participant's `Calls` stream where
//! it serves one, and unary otherwise (module `stream`); which way a call travels changes
//! nothing else here.
//!
//! Calls in flight are bounded twice: in all (`max_in_flight`), and per endpoint (a
//! quarter of that), so that a participant that stopped answering never holds the
//! permits the others need. An endpoint whose circuit is open (see [`circuit`]) is not
//! called at all: its calls fail at once and hold nothing. A call's deadline counts its
//! wait for those permits too, so no call is still waiting to go out once the engine,
//! past that deadline, may take it for lost and send it again.
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
mod failure;
mod health;
mod status;
mod stream;
pub mod window;

use circuit::Admission;
pub use failure::{CIRCUIT_OPEN, CallFailure, UNREACHABLE};
use failure::{answered_by_participant, describe_failure, refused_for_good};
use health::PeerHealth;
pub use status::EndpointStatus;
pub use stream::Transport;
use stream::{CallStream, StreamedCall};

/// Channels kept open; past this the cache starts over (old channels close when their
/// calls finish).
const MAX_CACHED_ENDPOINTS: usize = 4096;

/// Where and how to reach one branch.
#[derive(Debug, Clone)]
pub struct Call {
    /// In canonical form (the API accepts no other), so that it is the channel's key.
    pub endpoint: String,
    pub transaction_id: String,
    pub branch_id: String,
    /// How long the coordinator waits for the answer, counted from the call's start
    /// (its wait for a permit included). It is not sent as
    /// `grpc-timeout`: with the same deadline there, tonic's client or the participant's
    /// server could end the call first, and it would read as unreachable, or as an
    /// answer that keeps the circuit closed (tests/tests/sagas/main.rs,
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
            None => Arc::new(PeerHealth::new(
                self.max_in_flight_per_endpoint,
                self.metrics.circuit_gauge(endpoint),
            )),
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
        // The call's deadline counts from here, its waits for a permit included: the
        // engine takes a call open past its deadline (and a prepare's grace) for lost
        // and may send it again, so none may still be waiting to go out by then.
        let deadline = tokio::time::Instant::now() + call.timeout;
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
        let Some(admitted) = peer.health.admit(&call.endpoint) else {
            self.metrics
                .participant_call(&call.endpoint, operation, CallResult::circuit_open, 0.0);
            return Err(CallFailure::transient(CIRCUIT_OPEN));
        };
        let Some(_endpoint_permit) = Self::permit_by(deadline, &peer.health.permits).await? else {
            return Err(self.no_permit_in_time(
                call,
                &peer,
                operation,
                started,
                "to this participant",
            ));
        };
        // The circuit may have opened while this call waited for its permit.
        if admitted.admission == Admission::Call && !admitted.circuit_closed() {
            self.metrics
                .participant_call(&call.endpoint, operation, CallResult::circuit_open, 0.0);
            return Err(CallFailure::transient(CIRCUIT_OPEN));
        }
        let Some(_permit) = Self::permit_by(deadline, &self.in_flight).await? else {
            return Err(self.no_permit_in_time(call, &peer, operation, started, "in all"));
        };
        let waited = started.elapsed();
        let (result, answer) = self
            .send(call, deadline, waited, &peer, message, unary)
            .await;
        let answered = matches!(result, CallResult::ok | CallResult::error);
        // A participant that had less than half the deadline (the rest went waiting for
        // a permit, which calls to others may hold) is not judged by its timeout.
        let had_its_time = waited <= call.timeout / 2;
        if answered || had_its_time || !matches!(result, CallResult::timeout) {
            admitted.finish(answered);
        }
        let failure = answer.as_ref().err().map(|f| f.message.as_str());
        Self::record_recent(&peer, failure);
        self.metrics.participant_call(
            &call.endpoint,
            operation,
            result,
            started.elapsed().as_secs_f64(),
        );
        answer
    }

    /// One of `permits`, unless `deadline` passes first (`None`).
    async fn permit_by<'a>(
        deadline: tokio::time::Instant,
        permits: &'a Semaphore,
    ) -> Result<Option<tokio::sync::SemaphorePermit<'a>>, CallFailure> {
        // Most calls find a permit free: no timer for them. (Released permits go to the
        // calls waiting first, so this takes no queued call's place.)
        if let Ok(permit) = permits.try_acquire() {
            return Ok(Some(permit));
        }
        match tokio::time::timeout_at(deadline, permits.acquire()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            Ok(Err(_closed)) => Err(CallFailure::transient("coordinator shutting down")),
            Err(_elapsed) => Ok(None),
        }
    }

    /// Counts how the call ended in the endpoint's recent calls (`treaty endpoints`):
    /// answered, or failed with `failure`.
    fn record_recent(peer: &Peer, failure: Option<&str>) {
        peer.health
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(
                std::time::Instant::now(),
                crate::runtime::now_unix_ms(),
                failure,
            );
    }

    /// A call whose deadline passed while it waited for a permit: no answer, as one
    /// the participant did not answer in time, but not held against its circuit (the
    /// participant never had it), and counted apart (`no_permit`). `whose` says which
    /// limit was full.
    fn no_permit_in_time(
        &self,
        call: &Call,
        peer: &Peer,
        operation: CallOperation,
        started: std::time::Instant,
        whose: &str,
    ) -> CallFailure {
        tracing::warn!(
            endpoint = %call.endpoint,
            branch_id = %call.branch_id,
            timeout_ms = call.timeout.as_millis() as u64,
            "call not sent: the calls in flight {whose} stayed at their limit until its deadline"
        );
        self.metrics.participant_call(
            &call.endpoint,
            operation,
            CallResult::no_permit,
            started.elapsed().as_secs_f64(),
        );
        let failure = CallFailure::transient(format!(
            "not sent within {} ms: the calls in flight {whose} were at their limit",
            call.timeout.as_millis()
        ));
        Self::record_recent(peer, Some(&failure.message));
        failure
    }

    /// One call, on the endpoint's stream or unary, and how it ended for the metrics.
    async fn send<T, F, Fut>(
        &self,
        call: &Call,
        deadline: tokio::time::Instant,
        waited: Duration,
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
        match tokio::time::timeout_at(deadline, answer).await {
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
                let waited_ms = waited.as_millis();
                tracing::warn!(
                    endpoint = %call.endpoint,
                    branch_id = %call.branch_id,
                    timeout_ms = call.timeout.as_millis() as u64,
                    waited_for_permit_ms = waited_ms as u64,
                    "participant did not answer in time"
                );
                // A wait worth naming: a queue, not the moment it takes to find a permit.
                let message = if waited <= call.timeout / 10 {
                    format!(
                        "participant did not answer within {} ms",
                        call.timeout.as_millis()
                    )
                } else {
                    format!(
                        "participant did not answer within {} ms, sent after {waited_ms} ms \
                         waiting for a place among the calls in flight",
                        call.timeout.saturating_sub(waited).as_millis()
                    )
                };
                (CallResult::timeout, Err(CallFailure::transient(message)))
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
pub(crate) mod tests;
