//! The client initiators (and the `treaty` CLI) use to run transactions through a
//! coordinator.
//!
//! Protocol outcomes come back as values ([`Outcome`], `Option` for unknown
//! transactions); [`ClientError`] is for calls that got no answer or were refused as
//! malformed, or that named a transaction the coordinator does not know
//! ([`ClientError::is_unknown_transaction`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;

use crate::auth::{BearerToken, Credentials};
pub use crate::call_stream_client::Transport;
use crate::call_stream_client::{CallStream, StreamedCall, call_or_unary};
pub use crate::tls::ClientTlsFiles;
use crate::trace::TraceContext;

pub use pb::{Branch, BranchState, Transaction, TransactionState, Transition};

mod values;
pub use values::{
    BeginOptions, BranchSpec, ClientError, Decision, Outcome, SagaStep, SubmitOptions,
    SubmittedSaga, TransactionFilter, Update,
};
use values::{begin_request, outcome_from};

/// How a client reaches its coordinator: TLS for `https://` endpoints, the token it
/// presents (redacted from `Debug`), and how soon it gives up a connection that went
/// silent.
#[derive(Clone)]
pub struct ClientOptions {
    /// For `https://` endpoints: the CA to verify the coordinator with (the system's roots
    /// if `ca` is `None`) and a client certificate for mutual TLS. An `https://` endpoint
    /// without it uses the system's roots; `http://` is always cleartext.
    pub tls: Option<ClientTlsFiles>,
    /// Sent as `authorization: Bearer TOKEN` with every call.
    pub token: Option<String>,
    /// While a call waits for its answer, the client pings the coordinator (HTTP/2 PING)
    /// after this long without hearing from it ...
    pub keepalive_interval_ms: u64,
    /// ... and gives the connection up when a ping is not answered within this long: the
    /// calls on it fail with UNAVAILABLE instead of waiting for ever for a coordinator
    /// whose host lost power or whose network path dropped without a reset.
    pub keepalive_timeout_ms: u64,
}

/// [`ClientOptions::keepalive_interval_ms`] by default.
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 10_000;
/// [`ClientOptions::keepalive_timeout_ms`] by default.
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 20_000;
/// The longest keepalive interval or timeout a client takes: one hour.
pub const MAX_KEEPALIVE_MS: u64 = 3_600_000;

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            tls: None,
            token: None,
            keepalive_interval_ms: DEFAULT_KEEPALIVE_INTERVAL_MS,
            keepalive_timeout_ms: DEFAULT_KEEPALIVE_TIMEOUT_MS,
        }
    }
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("keepalive_interval_ms", &self.keepalive_interval_ms)
            .field("keepalive_timeout_ms", &self.keepalive_timeout_ms)
            .finish()
    }
}

impl ClientOptions {
    /// Refuses settings no client could use, naming the field: keepalive out of range,
    /// or a token that cannot be sent as a header.
    pub fn validate(&self) -> Result<(), String> {
        self.keepalive()?;
        credentials(self).map_err(|e| format!("token: {e}"))?;
        Ok(())
    }

    /// The keepalive's interval and timeout, each refused (naming it) outside
    /// 1..=[`MAX_KEEPALIVE_MS`].
    fn keepalive(&self) -> Result<(Duration, Duration), String> {
        let checked = |name: &str, ms: u64| {
            if (1..=MAX_KEEPALIVE_MS).contains(&ms) {
                Ok(Duration::from_millis(ms))
            } else {
                Err(format!(
                    "{name} must be 1..={MAX_KEEPALIVE_MS} ms, not {ms}"
                ))
            }
        };
        Ok((
            checked("keepalive_interval_ms", self.keepalive_interval_ms)?,
            checked("keepalive_timeout_ms", self.keepalive_timeout_ms)?,
        ))
    }
}

/// Whether `endpoint` names an `https://` server, its scheme in any case, as the SDK's
/// endpoint checks accept it (a recorded `HTTPS://` coordinator is dialled over TLS, not
/// refused by tonic for want of it).
fn uses_tls(endpoint: &str) -> bool {
    endpoint
        .get(.."https://".len())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

/// The channel to `endpoint` with `options` applied, not yet connected.
pub fn endpoint_with(endpoint: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let bad = |message: String| ClientError::Endpoint {
        endpoint: endpoint.to_string(),
        message,
    };
    let (keepalive_interval, keepalive_timeout) = options.keepalive().map_err(bad)?;
    let mut channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        // Only while calls are open: an idle connection that died is found by the next
        // call, whose pings go unanswered.
        .http2_keep_alive_interval(keepalive_interval)
        .keep_alive_timeout(keepalive_timeout)
        .keep_alive_while_idle(false);
    if uses_tls(endpoint) {
        let tls = options.tls.clone().unwrap_or_default();
        let config = tls.load().map_err(|e| bad(e.to_string()))?;
        channel = channel.tls_config(config).map_err(|e| bad(e.to_string()))?;
    }
    Ok(channel)
}

/// A stream's failure as the caller should read it: tonic reports a connection lost in
/// the middle of a response stream (a reset, or a keepalive ping unanswered) as UNKNOWN,
/// with the transport error as its source; that is UNAVAILABLE, as for a unary call.
fn lost_or_as_is(status: tonic::Status) -> tonic::Status {
    if status.code() == tonic::Code::Unknown && std::error::Error::source(&status).is_some() {
        return tonic::Status::unavailable(format!(
            "the connection to the coordinator was lost: {}",
            status.message()
        ));
    }
    status
}

/// The interceptor that presents `options.token`.
pub fn credentials(options: &ClientOptions) -> Result<Credentials, ClientError> {
    match &options.token {
        None => Ok(Credentials::none()),
        Some(token) => BearerToken::new(token)
            .map(Credentials::bearer)
            .map_err(|message| ClientError::Endpoint {
                endpoint: "(token)".to_string(),
                message,
            }),
    }
}

type Connection = InterceptedService<Channel, Credentials>;

/// The messages of `Coordinator.Calls`.
#[derive(Debug)]
pub struct CoordinatorCalls;

crate::calls_protocol!(
    CoordinatorCalls,
    pb::TransactionCall,
    pb::TransactionAnswer,
    pb::transaction_call::Call,
    pb::transaction_answer::Answer,
    "the coordinator",
    withdraw = pb::transaction_call::Call::Withdraw(pb::WithdrawCall {})
);

macro_rules! coordinator_call {
    ($request:ty, $response:ty, $variant:ident) => {
        crate::streamed_call!(
            CoordinatorCalls,
            pb::transaction_call::Call,
            pb::transaction_answer::Answer,
            $request,
            $response,
            $variant
        );
    };
}

coordinator_call!(pb::BeginRequest, pb::BeginResponse, Begin);
coordinator_call!(pb::EnlistRequest, pb::EnlistResponse, Enlist);
coordinator_call!(pb::CommitRequest, pb::CommitResponse, Commit);
coordinator_call!(pb::AbortRequest, pb::AbortResponse, Abort);
coordinator_call!(pb::SubmitSagaRequest, pb::SubmitSagaResponse, SubmitSaga);
coordinator_call!(pb::CancelSagaRequest, pb::CancelSagaResponse, CancelSaga);

/// A connection to one coordinator. Cheap to clone; clones share the connection.
///
/// Begin, Enlist, Commit, Abort, SubmitSaga and CancelSaga travel on one
/// `Coordinator.Calls` stream shared by the clones, where the coordinator serves it:
/// each costs a fraction of a unary call's CPU at both ends. A coordinator that does
/// not serve it gets unary calls, as does a client made with
/// [`unary_only`](Self::unary_only). A call whose caller stops waiting for it is
/// withdrawn, and the coordinator cancels it as it cancels a unary call whose caller
/// went, even while every place the coordinator keeps for the connection is taken
/// (unless more than 64 calls, or 1 MiB of them, wait ahead of the withdrawal). A
/// submit that waits for the saga's outcome while every wait the coordinator keeps for
/// the connection is taken (or that a coordinator from before such waits refuses on the
/// stream) is sent unary instead; past as many waiting submits as the coordinator keeps
/// waits for, it goes unary at once. A call that gets no answer (the coordinator out of
/// reach, the stream broken) fails UNAVAILABLE, as unary.
#[derive(Debug, Clone)]
pub struct TreatyClient {
    inner: CoordinatorClient<Connection>,
    /// The calls stream, unless every call is unary.
    calls: Option<Arc<CallStream<CoordinatorCalls>>>,
    /// One for each waiting SubmitSaga this client (and its clones) has on the stream:
    /// as many as the coordinator keeps waits per connection. Past them a waiting
    /// submit goes unary at once rather than being refused on the stream first.
    stream_waits: Arc<tokio::sync::Semaphore>,
    /// Sent with every call (see [`TreatyClient::with_trace`]).
    trace: Option<TraceContext>,
}

impl TreatyClient {
    /// Connects to `endpoint` (`http://host:port`), failing fast if it is not reachable.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, &ClientOptions::default()).await
    }

    /// [`connect`](Self::connect) with TLS files and a token.
    pub async fn connect_with(
        endpoint: impl Into<String>,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let channel = endpoint_with(&endpoint.into(), options)?.connect().await?;
        Ok(Self::from_channel_with(channel, credentials(options)?))
    }

    /// A client that connects on first use and reconnects after failures: for callers
    /// that must outlive coordinator restarts. Fails only on a malformed endpoint.
    pub fn connect_lazy(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_lazy_with(endpoint, &ClientOptions::default())
    }

    /// [`connect_lazy`](Self::connect_lazy) with TLS files and a token.
    pub fn connect_lazy_with(
        endpoint: impl Into<String>,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let channel = endpoint_with(&endpoint.into(), options)?.connect_lazy();
        Ok(Self::from_channel_with(channel, credentials(options)?))
    }

    /// A client on `channel`. Clients made from clones of one channel count their
    /// waiting submits on the stream apart, while the coordinator counts them per
    /// connection: past its waits, theirs are refused first and then sent unary.
    pub fn from_channel(channel: Channel) -> Self {
        Self::from_channel_with(channel, Credentials::none())
    }

    pub fn from_channel_with(channel: Channel, credentials: Credentials) -> Self {
        Self {
            inner: CoordinatorClient::with_interceptor(channel, credentials),
            calls: Some(Arc::default()),
            stream_waits: Arc::new(tokio::sync::Semaphore::new(
                crate::connections::MAX_CONCURRENT_STREAMS as usize,
            )),
            trace: None,
        }
    }

    /// A client sharing this one's connection whose calls are all unary.
    pub fn unary_only(&self) -> Self {
        Self {
            calls: None,
            ..self.clone()
        }
    }

    /// How the calls that may travel on the stream travel now.
    pub fn transport(&self) -> Transport {
        self.calls
            .as_ref()
            .map_or(Transport::Unary, |calls| calls.transport())
    }

    /// A client (sharing this one's connection) whose calls carry `trace` as W3C
    /// `traceparent` / `tracestate` metadata. The coordinator keeps the trace of `begin`
    /// and `submit_saga` with the transaction, and every participant call it makes for
    /// that transaction (prepare, commit, abort, saga steps, compensations, retries)
    /// carries the same trace id. Without it the coordinator starts a new trace.
    ///
    /// Pass the context of the initiator's current span, e.g.
    /// `TraceContext::parse(&traceparent, None)` from an incoming request, or a
    /// participant's [`BranchContext::trace`](crate::BranchContext::trace).
    pub fn with_trace(&self, trace: TraceContext) -> Self {
        Self {
            trace: Some(trace),
            ..self.clone()
        }
    }

    /// The trace context this client sends, if any.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// One call on the stream, or unary with `unary` when no stream can carry it.
    async fn send<T, F, Fut>(&self, message: T, unary: F) -> Result<T::Response, ClientError>
    where
        T: StreamedCall<CoordinatorCalls>,
        F: FnOnce(CoordinatorClient<Connection>, tonic::Request<T>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T::Response>, tonic::Status>>,
    {
        let open = |requests| {
            let mut client = self.inner.clone();
            async move { client.calls(tonic::Request::new(requests)).await }
        };
        let answer = call_or_unary(
            self.calls.as_deref(),
            open,
            message,
            self.trace.as_ref(),
            |message| unary(self.inner.clone(), self.request(message)),
        );
        Ok(answer.await?)
    }

    /// `message` as a request carrying this client's trace context.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(trace) = &self.trace {
            trace.inject(request.metadata_mut());
        }
        request
    }

    /// Starts a two-phase commit with these first branches; returns its id.
    pub async fn begin(
        &self,
        options: BeginOptions,
        branches: Vec<BranchSpec>,
    ) -> Result<String, ClientError> {
        let response = self
            .send(
                begin_request(options, branches, false),
                |mut c, r| async move { c.begin(r).await },
            )
            .await?;
        Ok(response.transaction_id)
    }

    pub async fn enlist(
        &self,
        transaction_id: &str,
        branch: BranchSpec,
    ) -> Result<(), ClientError> {
        let request = pb::EnlistRequest {
            transaction_id: transaction_id.to_string(),
            branch: Some(branch.into()),
        };
        self.send(request, |mut c, r| async move { c.enlist(r).await })
            .await?;
        Ok(())
    }

    /// Runs both phases; returns once the outcome is decided (durably, for a commit).
    pub async fn commit(&self, transaction_id: &str) -> Result<Outcome, ClientError> {
        let request = pb::CommitRequest {
            transaction_id: transaction_id.to_string(),
        };
        let response = self
            .send(request, |mut c, r| async move { c.commit(r).await })
            .await?;
        outcome_from(response.outcome, response.reason)
    }

    pub async fn abort(&self, transaction_id: &str, reason: &str) -> Result<(), ClientError> {
        let request = pb::AbortRequest {
            transaction_id: transaction_id.to_string(),
            reason: reason.to_string(),
        };
        self.send(request, |mut c, r| async move { c.abort(r).await })
            .await?;
        Ok(())
    }

    /// The transaction, or `None` if the coordinator knows nothing of it.
    pub async fn get(&self, transaction_id: &str) -> Result<Option<Transaction>, ClientError> {
        let response = self
            .inner
            .clone()
            .get_transaction(self.request(pb::GetTransactionRequest {
                transaction_id: transaction_id.to_string(),
            }))
            .await?
            .into_inner();
        Ok(if response.found {
            response.transaction
        } else {
            None
        })
    }

    /// One page of transactions in the given states (all states if empty). Returns the
    /// page and the token of the next one, if there is more.
    pub async fn list(
        &self,
        states: &[TransactionState],
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Transaction>, Option<String>), ClientError> {
        let filter = TransactionFilter {
            states: states.to_vec(),
            ..TransactionFilter::default()
        };
        self.list_filtered(&filter, page_size, page_token).await
    }

    /// One page of the transactions `filter` selects, and the token of the next page if
    /// there is more. A page may be short, even empty, while a next one exists.
    pub async fn list_filtered(
        &self,
        filter: &TransactionFilter,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Transaction>, Option<String>), ClientError> {
        // A set: each state sent once (the coordinator takes at most one per state).
        let mut states: Vec<i32> = filter.states.iter().map(|s| *s as i32).collect();
        states.sort_unstable();
        states.dedup();
        let response = self
            .inner
            .clone()
            .list_transactions(self.request(pb::ListTransactionsRequest {
                states,
                page_size,
                page_token: page_token.to_string(),
                stuck: filter.stuck,
                older_than_ms: filter.older_than_ms.unwrap_or(0),
                endpoint: filter.endpoint.clone().unwrap_or_default(),
            }))
            .await?
            .into_inner();
        let next = (!response.next_page_token.is_empty()).then_some(response.next_page_token);
        Ok((response.transactions, next))
    }

    /// The transaction's current state, then one update per change; the stream ends
    /// after a final state. `Ok(None)` if the transaction is unknown.
    pub async fn watch(
        &self,
        transaction_id: &str,
    ) -> Result<Option<impl Stream<Item = Result<Update, ClientError>> + use<>>, ClientError> {
        let mut stream = self
            .inner
            .clone()
            .watch_transaction(self.request(pb::WatchTransactionRequest {
                transaction_id: transaction_id.to_string(),
            }))
            .await?
            .into_inner()
            .peekable();
        if let Some(Ok(first)) = std::pin::Pin::new(&mut stream).peek().await {
            if !first.found {
                return Ok(None);
            }
        }
        Ok(Some(stream.filter_map(|message| async move {
            match message {
                Ok(message) => match (message.transition, message.transaction) {
                    (Some(transition), Some(transaction)) => Some(Ok(Update {
                        transition,
                        transaction,
                    })),
                    _ => None,
                },
                Err(status) => Some(Err(ClientError::Status(lost_or_as_is(status)))),
            }
        })))
    }

    /// What a participant in doubt would be told.
    pub async fn outcome(&self, transaction_id: &str) -> Result<Decision, ClientError> {
        let response = self
            .inner
            .clone()
            .get_outcome(self.request(pb::GetOutcomeRequest {
                transaction_id: transaction_id.to_string(),
                branch_id: String::new(),
            }))
            .await?
            .into_inner();
        match pb::Decision::try_from(response.decision) {
            Ok(pb::Decision::Commit) => Ok(Decision::Commit),
            Ok(pb::Decision::Abort) => Ok(Decision::Abort),
            Ok(pb::Decision::Pending) => Ok(Decision::Pending),
            _ => Err(ClientError::UnknownValue(format!(
                "decision {}",
                response.decision
            ))),
        }
    }

    /// Submits a saga. Returns once its definition is durable (or, with
    /// `wait_for_outcome`, once it is COMPLETED or COMPENSATED).
    pub async fn submit_saga(
        &self,
        steps: Vec<SagaStep>,
        options: SubmitOptions,
    ) -> Result<SubmittedSaga, ClientError> {
        let request = pb::SubmitSagaRequest {
            idempotency_key: options.idempotency_key.unwrap_or_default(),
            steps: steps.into_iter().map(Into::into).collect(),
            wait_for_outcome: options.wait_for_outcome,
            deadline_unix_ms: options.deadline_unix_ms.unwrap_or(0),
        };
        let unary = |mut client: CoordinatorClient<Connection>, request| async move {
            client.submit_saga(request).await
        };
        // A wait on the stream holds one of this client's waits until it is answered;
        // with none left it goes unary at once. Calls that go unary anyway take none.
        let waits_on_stream = request.wait_for_outcome && self.transport() != Transport::Unary;
        let stream_wait = waits_on_stream
            .then(|| self.stream_waits.clone().try_acquire_owned().ok())
            .flatten();
        let unary_at_once = waits_on_stream && stream_wait.is_none();
        let unary_client;
        let client = if unary_at_once {
            unary_client = self.unary_only();
            &unary_client
        } else {
            self
        };
        // Refused only before anything was submitted: then it waits unary. A submit sent
        // unary at once is never refused so, and needs no copy to send again.
        let if_waits_taken = (request.wait_for_outcome && !unary_at_once).then(|| request.clone());
        let response = match (client.send(request, unary).await, if_waits_taken) {
            (Err(error), Some(request)) if error.is_wait_refused_on_stream() => {
                drop(stream_wait);
                self.unary_only().send(request, unary).await?
            }
            (answer, _) => answer?,
        };
        let transaction = response
            .transaction
            .ok_or_else(|| ClientError::UnknownValue("a submit answer without the saga".into()))?;
        Ok(SubmittedSaga {
            transaction_id: response.transaction_id,
            created: response.created,
            transaction,
        })
    }

    /// Cancels a saga this caller submitted: its steps that ran are compensated. Returns
    /// once the decision is durable: `true` with the saga compensating (or compensated),
    /// or `false` if it had completed first (nothing is undone).
    pub async fn cancel_saga(
        &self,
        transaction_id: &str,
        reason: &str,
    ) -> Result<(bool, Transaction), ClientError> {
        let request = pb::CancelSagaRequest {
            transaction_id: transaction_id.to_string(),
            reason: reason.to_string(),
        };
        let response = self
            .send(request, |mut c, r| async move { c.cancel_saga(r).await })
            .await?;
        let transaction = response
            .transaction
            .ok_or_else(|| ClientError::UnknownValue("a cancel answer without the saga".into()))?;
        Ok((response.cancelled, transaction))
    }

    /// Begins a transaction over `branches`, commits it, and returns its id and outcome,
    /// in one round trip (a Begin with `commit`). An error says nothing of the outcome.
    pub async fn run_two_phase(
        &self,
        branches: Vec<BranchSpec>,
        options: BeginOptions,
    ) -> Result<(String, Outcome), ClientError> {
        let response = self
            .send(
                begin_request(options, branches, true),
                |mut c, r| async move { c.begin(r).await },
            )
            .await?;
        if response.outcome == pb::Outcome::Unspecified as i32 {
            // A coordinator older than Begin's `commit` began it and no more.
            let outcome = self.commit(&response.transaction_id).await?;
            return Ok((response.transaction_id, outcome));
        }
        let outcome = outcome_from(response.outcome, response.reason)?;
        Ok((response.transaction_id, outcome))
    }

    /// Follows the transaction until it reaches COMMITTED or ABORTED (every participant
    /// has acknowledged), or `timeout` passes. Returns its last known state.
    pub async fn wait_until_finished(
        &self,
        transaction_id: &str,
        timeout: Duration,
    ) -> Result<Option<Transaction>, ClientError> {
        let follow = async {
            let Some(stream) = self.watch(transaction_id).await? else {
                return Ok(None);
            };
            let mut stream = std::pin::pin!(stream);
            let mut last = None;
            while let Some(update) = stream.next().await {
                last = Some(update?.transaction);
            }
            Ok(last)
        };
        match tokio::time::timeout(timeout, follow).await {
            Ok(result) => result,
            Err(_) => self.get(transaction_id).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::uses_tls;

    #[test]
    fn an_https_endpoint_is_dialled_over_tls_whatever_the_case_of_its_scheme() {
        assert!(uses_tls("https://coordinator:7300"));
        assert!(uses_tls("HTTPS://coordinator:7300"));
        assert!(uses_tls("Https://coordinator:7300"));
        assert!(!uses_tls("http://coordinator:7300"));
        assert!(!uses_tls("HTTP://coordinator:7300"));
        assert!(!uses_tls("https:"));
        assert!(!uses_tls("httpé://x"));
    }
}
