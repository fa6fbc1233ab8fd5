//! The Coordinator gRPC service: protobuf in, typed call to the runtime, protobuf out.
//!
//! Every request is checked completely before the runtime sees it ([`pb`]); a bad field
//! is INVALID_ARGUMENT naming it, and nothing changes. Runtime errors become statuses in
//! one place ([`status_of`]). Protocol outcomes (aborted, unknown transaction, pending)
//! are response fields; where an unknown transaction is an error (Enlist, Commit, Abort)
//! the status carries a machine-readable `google.rpc.ErrorInfo` beside its text.
//!
//! The W3C trace context of Begin and SubmitSaga (the `traceparent`, `tracestate`
//! metadata of a unary call; the call's own fields on the `Calls` stream) goes to the
//! runtime with the transaction; an invalid one is ignored (the transaction starts a new
//! trace), never refused.
//!
//! `Calls` answers each call on it through the unary handler of its kind, with the
//! stream's credentials, so that every check is the unary call's. A SubmitSaga that
//! waits for the outcome (which may take as long as the saga's retries) waits there
//! without a place once its saga is durable, in one of its connection's waits; with
//! none left it is refused before anything is submitted (RESOURCE_EXHAUSTED, ErrorInfo
//! `STREAM_WAITS_TAKEN`), and its caller sends it unary.

pub mod admin;
pub mod auth;
pub mod pb;
pub mod saga;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};
use treaty_proto::v1 as proto;
use treaty_sdk::limits::{FieldError, canonical_endpoint, check_id, check_reason};
use treaty_sdk::trace::TraceContext;

use crate::defaults;
use crate::endpoint_policy::EndpointPolicy;
use crate::engine::twopc::Refusal;
use crate::model::{TxnId, TxnRecord, TxnState};
use crate::runtime::{
    BeginParams, Decision, ListFilter, Runtime, RuntimeError, SagaParams, Submitted, now_unix_ms,
};
use auth::Authenticator;
use treaty_sdk::auth::Principal;
use treaty_sdk::call_stream::{Answers, CallPlace, StreamContext, TransactionCalls, serve_calls};
use treaty_sdk::connections::MAX_CONCURRENT_STREAMS;

/// Limits and defaults the API applies to requests.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub default_transaction_timeout_ms: u64,
    pub max_transaction_timeout_ms: u64,
    pub default_prepare_timeout_ms: u64,
    pub max_prepare_timeout_ms: u64,
    pub saga: saga::SagaDefaults,
    /// Whether `https://` participant endpoints are accepted (a TLS configuration for
    /// them exists); without it they are INVALID_ARGUMENT.
    pub https_participants: bool,
    /// Where participant endpoints named in requests may point.
    pub endpoint_policy: Arc<EndpointPolicy>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            https_participants: false,
            default_transaction_timeout_ms: defaults::DEFAULT_TRANSACTION_TIMEOUT_MS,
            max_transaction_timeout_ms: defaults::MAX_TRANSACTION_TIMEOUT_MS,
            default_prepare_timeout_ms: defaults::DEFAULT_PREPARE_TIMEOUT_MS,
            max_prepare_timeout_ms: defaults::MAX_PREPARE_TIMEOUT_MS,
            saga: saga::SagaDefaults {
                step_timeout_ms: defaults::DEFAULT_STEP_TIMEOUT_MS,
                step_attempts: defaults::DEFAULT_STEP_ATTEMPTS,
                retry_backoff_initial_ms: defaults::RETRY_BACKOFF_INITIAL_MS,
                retry_backoff_max_ms: defaults::RETRY_BACKOFF_MAX_MS,
                stuck_after_attempts: defaults::COMPENSATION_STUCK_AFTER_ATTEMPTS,
            },
            endpoint_policy: Arc::default(),
        }
    }
}

const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Debug, Clone)]
pub struct CoordinatorService {
    runtime: Runtime,
    config: ApiConfig,
    auth: Arc<Authenticator>,
    /// Becomes true when the daemon stops: open watch streams end.
    stopping: watch::Receiver<bool>,
}

impl CoordinatorService {
    /// A service that authenticates no one (every caller is the anonymous admin).
    pub fn new(runtime: Runtime, config: ApiConfig, stopping: watch::Receiver<bool>) -> Self {
        Self {
            runtime,
            config,
            auth: Arc::new(Authenticator::open()),
            stopping,
        }
    }

    /// Authenticates callers with `auth`.
    pub fn with_authenticator(mut self, auth: Arc<Authenticator>) -> Self {
        self.auth = auth;
        self
    }

    /// Refuses to let `principal` act on another principal's transaction (admins act on
    /// all). An unknown transaction passes: the runtime answers for it.
    async fn check_owner(&self, principal: &Principal, id: TxnId) -> Result<(), Status> {
        if principal.admin {
            return Ok(());
        }
        match self.runtime.get(id).await.map_err(status_of)? {
            Some(record) if !may_act(principal, &record) => Err(not_yours(&id)),
            _ => Ok(()),
        }
    }

    /// Refuses `https://` participant endpoints when no TLS configuration exists for them:
    /// they would otherwise fail on every call (never fall back to cleartext).
    fn check_scheme<'a, F: std::fmt::Display>(
        &self,
        endpoints: impl IntoIterator<Item = (F, &'a str)>,
    ) -> Result<(), Status> {
        if self.config.https_participants {
            return Ok(());
        }
        for (field, endpoint) in endpoints {
            if endpoint
                .get(..8)
                .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
            {
                return Err(invalid(FieldError::new(
                    field,
                    "is https:// but this coordinator has no TLS configuration for \
                     participants (--participant-ca)",
                )));
            }
        }
        Ok(())
    }

    fn deadline(&self, requested: u64) -> Result<u64, FieldError> {
        let now = now_unix_ms();
        if requested == 0 {
            return Ok(now.saturating_add(self.config.default_transaction_timeout_ms));
        }
        if requested <= now {
            return Err(FieldError::new(
                "deadline_unix_ms",
                format!("{requested} is in the past (now is {now})"),
            ));
        }
        let latest = now.saturating_add(self.config.max_transaction_timeout_ms);
        if requested > latest {
            return Err(FieldError::new(
                "deadline_unix_ms",
                format!(
                    "{requested} is more than max_transaction_timeout_ms ({} ms) from now",
                    self.config.max_transaction_timeout_ms
                ),
            ));
        }
        Ok(requested)
    }

    fn prepare_timeout(&self, requested: u64) -> Result<u64, FieldError> {
        match requested {
            0 => Ok(self.config.default_prepare_timeout_ms),
            ms if ms > self.config.max_prepare_timeout_ms => Err(FieldError::new(
                "prepare_timeout_ms",
                format!(
                    "{ms} exceeds the limit of {} ms",
                    self.config.max_prepare_timeout_ms
                ),
            )),
            ms => Ok(ms),
        }
    }
}

/// Idempotency keys belong to principals: the runtime and the log see
/// `<principal>/<key>` (a key cannot contain `/`), so two principals' equal keys name
/// two sagas, and no principal can find another's saga by its key.
pub fn scoped_key(owner: Option<&str>, key: String) -> String {
    match owner {
        Some(owner) => format!("{owner}/{key}"),
        None => key,
    }
}

/// The key as its principal gave it.
pub fn unscoped_key(scoped: &str) -> &str {
    scoped.rsplit('/').next().unwrap_or(scoped)
}

/// What a transaction records as its owner when `principal` begins it.
fn owner_of(principal: &Principal) -> Option<String> {
    (principal.name != auth::ANONYMOUS).then(|| principal.name.clone())
}

/// Whether `principal` may see and act on `record`: its owner, or an admin.
fn may_act(principal: &Principal, record: &TxnRecord) -> bool {
    principal.admin || record.owner.as_deref() == Some(principal.name.as_str())
}

fn not_yours(id: &TxnId) -> Status {
    Status::permission_denied(format!("transaction_id: {id} belongs to another principal"))
}

fn invalid(error: FieldError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// The one mapping from runtime errors to gRPC statuses. An unknown transaction also
/// carries a machine-readable `ErrorInfo` (see [`unknown_transaction`]).
pub fn status_of(error: RuntimeError) -> Status {
    let field = match &error {
        RuntimeError::UnknownTransaction(id) => return unknown_transaction(*id, &error),
        RuntimeError::Refused(Refusal::DuplicateBranch(_)) => "branch.branch_id",
        RuntimeError::Refused(Refusal::TooManyBranches(_)) => "branch",
        RuntimeError::Refused(Refusal::NoBranches) => "branches",
        RuntimeError::Refused(Refusal::UnknownBranch(_) | Refusal::NothingToResolve { .. }) => {
            "branch_id"
        }
        // Operator verbs answer their refusals as `applied: false` (see admin.rs); the
        // rest cannot come from the calls of this service.
        RuntimeError::Refused(
            Refusal::NotActive(_)
            | Refusal::AlreadyCommitting
            | Refusal::CommitInFlight
            | Refusal::DecisionInFlight
            | Refusal::VotesDecide
            | Refusal::Final(_)
            | Refusal::Unfinished(_)
            | Refusal::MayStillAsk
            | Refusal::AlreadyEnding(_)
            | Refusal::NothingToRetry
            | Refusal::AlreadyPaused
            | Refusal::NotPaused
            | Refusal::Undecided(_)
            | Refusal::ContradictsDecision { .. },
        )
        | RuntimeError::NotTwoPhase(_)
        | RuntimeError::NotSaga(_) => "transaction_id",
        RuntimeError::IdempotencyConflict(_) => "idempotency_key",
        RuntimeError::Invalid(error) => return Status::invalid_argument(error.to_string()),
        RuntimeError::Overloaded(_)
        | RuntimeError::PrincipalOverloaded { .. }
        | RuntimeError::PayloadBudget { .. } => {
            return Status::resource_exhausted(error.to_string());
        }
        RuntimeError::ShuttingDown => return Status::unavailable(error.to_string()),
        RuntimeError::Log(_) => return Status::internal(error.to_string()),
    };
    Status::invalid_argument(format!("{field}: {error}"))
}

/// INVALID_ARGUMENT naming `transaction_id`, as every other bad field, with an
/// `ErrorInfo` detail (reason UNKNOWN_TRANSACTION, the id in its metadata) so that
/// clients can tell it from a malformed request without reading the text.
fn unknown_transaction(id: TxnId, error: &RuntimeError) -> Status {
    use treaty_proto::error_info::{DOMAIN, TRANSACTION_ID, UNKNOWN_TRANSACTION};
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("transaction_id: {error}"),
        ErrorDetails::with_error_info(
            UNKNOWN_TRANSACTION,
            DOMAIN,
            [(TRANSACTION_ID.to_string(), id.to_string())],
        ),
    )
}

/// A waiting SubmitSaga on a `Calls` stream that found every wait of its connection
/// taken: RESOURCE_EXHAUSTED with an `ErrorInfo` (reason STREAM_WAITS_TAKEN) by which
/// the SDK's client knows to send it unary. Nothing was submitted.
fn stream_waits_taken() -> Status {
    use treaty_proto::error_info::{DOMAIN, STREAM_WAITS_TAKEN};
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "every one of this connection's {MAX_CONCURRENT_STREAMS} waits on Calls streams is taken: \
             submit unary to wait for the outcome"
        ),
        ErrorDetails::with_error_info(STREAM_WAITS_TAKEN, DOMAIN, []),
    )
}

fn outcome_of(record: &TxnRecord) -> proto::CommitResponse {
    if record.state.is_commit() {
        proto::CommitResponse {
            outcome: proto::Outcome::Committed as i32,
            reason: String::new(),
        }
    } else {
        proto::CommitResponse {
            outcome: proto::Outcome::Aborted as i32,
            reason: record.reason.clone().unwrap_or_default(),
        }
    }
}

type WatchStream =
    Pin<Box<dyn Stream<Item = Result<proto::WatchTransactionResponse, Status>> + Send>>;

#[tonic::async_trait]
impl proto::coordinator_server::Coordinator for CoordinatorService {
    async fn begin(
        &self,
        request: Request<proto::BeginRequest>,
    ) -> Result<Response<proto::BeginResponse>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        self.check_scheme(request.branches.iter().enumerate().map(|(i, b)| {
            (
                pb::ItemField::new("branches", i, "endpoint"),
                b.endpoint.as_str(),
            )
        }))?;
        let deadline_unix_ms = self.deadline(request.deadline_unix_ms).map_err(invalid)?;
        let prepare_timeout_ms = self
            .prepare_timeout(request.prepare_timeout_ms)
            .map_err(invalid)?;
        if request.commit && request.branches.is_empty() {
            return Err(invalid(FieldError::new(
                "branches",
                "a Begin with commit needs at least one branch",
            )));
        }
        let branches =
            pb::branch_specs(request.branches, &self.config.endpoint_policy).map_err(invalid)?;
        let id = self
            .runtime
            .begin(BeginParams {
                deadline_unix_ms,
                prepare_timeout_ms,
                branches,
                owner: owner_of(&principal),
                trace,
            })
            .await
            .map_err(status_of)?;
        let mut response = proto::BeginResponse {
            transaction_id: id.to_string(),
            deadline_unix_ms,
            ..Default::default()
        };
        if request.commit {
            // Begun just now for this caller: no ownership to check. A failure now leaves
            // a transaction the caller has no id of: the status names it.
            let decided = self.runtime.commit(id).await.map_err(|error| {
                let status = status_of(error);
                Status::new(
                    status.code(),
                    format!("transaction {id} began; its commit: {}", status.message()),
                )
            })?;
            let outcome = outcome_of(&decided);
            response.outcome = outcome.outcome;
            response.reason = outcome.reason;
        }
        Ok(Response::new(response))
    }

    async fn enlist(
        &self,
        request: Request<proto::EnlistRequest>,
    ) -> Result<Response<proto::EnlistResponse>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let request = request.into_inner();
        let id = pb::parse_txn_id("transaction_id", &request.transaction_id).map_err(invalid)?;
        let spec = request
            .branch
            .ok_or_else(|| invalid(FieldError::new("branch", "is required")))?;
        self.check_scheme([("branch.endpoint", spec.endpoint.as_str())])?;
        let branch =
            pb::branch_spec("branch", spec, &self.config.endpoint_policy).map_err(invalid)?;
        self.check_owner(&principal, id).await?;
        self.runtime.enlist(id, branch).await.map_err(status_of)?;
        Ok(Response::new(proto::EnlistResponse {}))
    }

    async fn commit(
        &self,
        request: Request<proto::CommitRequest>,
    ) -> Result<Response<proto::CommitResponse>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let id = pb::parse_txn_id("transaction_id", &request.into_inner().transaction_id)
            .map_err(invalid)?;
        self.check_owner(&principal, id).await?;
        let decided = self.runtime.commit(id).await.map_err(status_of)?;
        Ok(Response::new(outcome_of(&decided)))
    }

    async fn abort(
        &self,
        request: Request<proto::AbortRequest>,
    ) -> Result<Response<proto::AbortResponse>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let request = request.into_inner();
        let id = pb::parse_txn_id("transaction_id", &request.transaction_id).map_err(invalid)?;
        check_reason("reason", &request.reason).map_err(invalid)?;
        let reason = if request.reason.is_empty() {
            "abort requested".to_string()
        } else {
            request.reason
        };
        self.check_owner(&principal, id).await?;
        self.runtime.abort(id, reason).await.map_err(status_of)?;
        Ok(Response::new(proto::AbortResponse {}))
    }

    async fn get_transaction(
        &self,
        request: Request<proto::GetTransactionRequest>,
    ) -> Result<Response<proto::GetTransactionResponse>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let id = pb::parse_txn_id("transaction_id", &request.into_inner().transaction_id)
            .map_err(invalid)?;
        let record = self.runtime.get(id).await.map_err(status_of)?;
        if record.as_ref().is_some_and(|r| !may_act(&principal, r)) {
            return Err(not_yours(&id));
        }
        Ok(Response::new(proto::GetTransactionResponse {
            found: record.is_some(),
            transaction: record.as_ref().map(pb::transaction_to_pb),
        }))
    }

    async fn list_transactions(
        &self,
        request: Request<proto::ListTransactionsRequest>,
    ) -> Result<Response<proto::ListTransactionsResponse>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let request = request.into_inner();
        let states = request
            .states
            .iter()
            .enumerate()
            .map(|(i, s)| pb::state_from_pb(&format!("states[{i}]"), *s))
            .collect::<Result<Vec<TxnState>, _>>()
            .map_err(invalid)?;
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n > MAX_PAGE_SIZE => {
                return Err(invalid(FieldError::new(
                    "page_size",
                    format!("{n} exceeds the limit of {MAX_PAGE_SIZE}"),
                )));
            }
            n => n,
        };
        let after = if request.page_token.is_empty() {
            None
        } else {
            Some(pb::parse_txn_id("page_token", &request.page_token).map_err(invalid)?)
        };
        let endpoint = match request.endpoint.as_str() {
            "" => None,
            // Branches keep their endpoints in canonical form.
            written => Some(canonical_endpoint("endpoint", written).map_err(invalid)?),
        };
        let filter = ListFilter {
            states,
            // Everyone sees their own; admins see all.
            owner: (!principal.admin).then(|| principal.name.clone()),
            stuck: request.stuck,
            created_before_unix_ms: (request.older_than_ms > 0)
                .then(|| now_unix_ms().saturating_sub(request.older_than_ms)),
            endpoint,
        };
        let page = self
            .runtime
            .list(&filter, after, page_size as usize)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::ListTransactionsResponse {
            transactions: page
                .transactions
                .iter()
                .map(pb::transaction_to_pb)
                .collect(),
            next_page_token: page.next_after.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    type WatchTransactionStream = WatchStream;

    async fn watch_transaction(
        &self,
        request: Request<proto::WatchTransactionRequest>,
    ) -> Result<Response<Self::WatchTransactionStream>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let id = pb::parse_txn_id("transaction_id", &request.into_inner().transaction_id)
            .map_err(invalid)?;
        self.check_owner(&principal, id).await?;
        if let Some(updates) = self.runtime.watch(id).await.map_err(status_of)? {
            return Ok(Response::new(watch_stream(updates, self.stopping.clone())));
        }
        // Not live: its final state from the log, or nothing.
        let message = match self.runtime.get(id).await.map_err(status_of)? {
            Some(record) => update_message(&record, record.transitions.len().saturating_sub(1)),
            None => proto::WatchTransactionResponse {
                found: false,
                transaction: None,
                transition: None,
            },
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(
            message,
        )]))))
    }

    async fn submit_saga(
        &self,
        request: Request<proto::SubmitSagaRequest>,
    ) -> Result<Response<proto::SubmitSagaResponse>, Status> {
        let wait_for_outcome = request.get_ref().wait_for_outcome;
        let submitted = self.submit(request).await?;
        self.answer_submit(submitted, wait_for_outcome).await
    }

    async fn cancel_saga(
        &self,
        request: Request<proto::CancelSagaRequest>,
    ) -> Result<Response<proto::CancelSagaResponse>, Status> {
        let principal = self.auth.authenticate(&request)?;
        let request = request.into_inner();
        let id = pb::parse_txn_id("transaction_id", &request.transaction_id).map_err(invalid)?;
        check_reason("reason", &request.reason).map_err(invalid)?;
        // The submitter, or an admin acting for it: named, unless nobody is.
        let by = match principal.name.as_str() {
            auth::ANONYMOUS => "its initiator".to_string(),
            name => name.to_string(),
        };
        let reason = if request.reason.is_empty() {
            format!("cancelled by {by}")
        } else {
            format!("cancelled by {by}: {}", request.reason)
        };
        self.check_owner(&principal, id).await?;
        let record = self
            .runtime
            .cancel_saga(id, reason)
            .await
            .map_err(status_of)?;
        Ok(Response::new(proto::CancelSagaResponse {
            cancelled: !record.state.is_commit(),
            transaction: Some(pb::transaction_to_pb(&record)),
        }))
    }

    type CallsStream = Answers<proto::TransactionAnswer>;

    /// Each call is answered by its unary method with the stream's credentials, so it is
    /// authenticated (and its fields checked) as that call; a caller without valid
    /// credentials is refused at the stream's start as well.
    async fn calls(
        &self,
        request: Request<tonic::Streaming<proto::TransactionCall>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        self.auth.authenticate(&request)?;
        let service = Arc::new(self.clone());
        Ok(serve_calls::<TransactionCalls, _, _>(
            request,
            self.stopping.clone(),
            MAX_CONCURRENT_STREAMS as usize,
            move |stream, call, place| {
                let service = service.clone();
                async move { service.answer_call(&stream, call, &place).await }
            },
        ))
    }

    async fn get_outcome(
        &self,
        request: Request<proto::GetOutcomeRequest>,
    ) -> Result<Response<proto::GetOutcomeResponse>, Status> {
        let request = request.into_inner();
        let id = pb::parse_txn_id("transaction_id", &request.transaction_id).map_err(invalid)?;
        if !request.branch_id.is_empty() {
            check_id("branch_id", &request.branch_id).map_err(invalid)?;
        }
        let decision = self.runtime.outcome(id).await.map_err(status_of)?;
        tracing::debug!(txn_id = %id, branch_id = %request.branch_id, ?decision, "outcome asked");
        let decision = match decision {
            Decision::Commit => proto::Decision::Commit,
            Decision::Abort => proto::Decision::Abort,
            Decision::Pending => proto::Decision::Pending,
        };
        Ok(Response::new(proto::GetOutcomeResponse {
            decision: decision as i32,
        }))
    }
}

impl CoordinatorService {
    /// A SubmitSaga's checks and the runtime's submit (its definition durable, or the
    /// saga its idempotency key names found).
    async fn submit(
        &self,
        request: Request<proto::SubmitSagaRequest>,
    ) -> Result<Submitted, Status> {
        let params = self.checked_saga(request)?;
        self.runtime.submit_saga(params).await.map_err(status_of)
    }

    /// A SubmitSaga checked (credentials, every field) and made into the runtime's
    /// parameters; nothing is changed.
    fn checked_saga(
        &self,
        request: Request<proto::SubmitSagaRequest>,
    ) -> Result<SagaParams, Status> {
        let principal = self.auth.authenticate(&request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        self.check_scheme(request.steps.iter().enumerate().map(|(i, s)| {
            (
                pb::ItemField::new("steps", i, "endpoint"),
                s.endpoint.as_str(),
            )
        }))?;
        let has_key = !request.idempotency_key.is_empty();
        // A retry with the same key after the deadline passed must still find the saga
        // it submitted: the runtime answers that one, and refuses only a new saga.
        let (deadline_unix_ms, refused_if_new) = match request.deadline_unix_ms {
            0 => (None, None),
            requested => match self.deadline(requested) {
                Ok(deadline) => (Some(deadline), None),
                Err(error) if has_key && requested <= now_unix_ms() => (None, Some(error)),
                Err(error) => return Err(invalid(error)),
            },
        };
        let mut params =
            saga::saga_params(request, &self.config.saga, &self.config.endpoint_policy)
                .map_err(invalid)?;
        params.owner = owner_of(&principal);
        params.trace = trace;
        params.deadline_unix_ms = deadline_unix_ms;
        params.refused_if_new = refused_if_new;
        params.idempotency_key = params
            .idempotency_key
            .map(|key| scoped_key(params.owner.as_deref(), key));
        Ok(params)
    }

    /// The answer to a submit: at once, or once the saga is final.
    async fn answer_submit(
        &self,
        mut submitted: Submitted,
        wait_for_outcome: bool,
    ) -> Result<Response<proto::SubmitSagaResponse>, Status> {
        if wait_for_outcome {
            let mut stopping = self.stopping.clone();
            tokio::select! {
                finished = submitted.updates.wait_for(|record| record.state.is_final()) => {
                    finished.map_err(|_| status_of(RuntimeError::ShuttingDown))?;
                }
                _ = stopping.wait_for(|stopping| *stopping) => {
                    return Err(status_of(RuntimeError::ShuttingDown));
                }
            }
        }
        let record = submitted.updates.borrow().clone();
        Ok(Response::new(proto::SubmitSagaResponse {
            transaction_id: submitted.id.to_string(),
            created: submitted.created,
            transaction: Some(pb::transaction_to_pb(&record)),
        }))
    }

    /// What one call of a `Calls` stream gives: its unary method's response, or its
    /// status.
    async fn answer_call(
        &self,
        stream: &StreamContext,
        call: proto::TransactionCall,
        place: &CallPlace,
    ) -> Result<proto::transaction_answer::Answer, Status> {
        use proto::coordinator_server::Coordinator;
        use proto::transaction_answer::Answer;
        use proto::transaction_call::Call;
        let (traceparent, tracestate) = (call.traceparent.as_str(), call.tracestate.as_str());
        match call.call {
            Some(Call::Begin(message)) => self
                .begin(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Begin(r.into_inner())),
            Some(Call::Enlist(message)) => self
                .enlist(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Enlist(r.into_inner())),
            Some(Call::Commit(message)) => self
                .commit(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Commit(r.into_inner())),
            Some(Call::Abort(message)) => self
                .abort(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Abort(r.into_inner())),
            // A wait for the saga's outcome may be as long as its retries: it waits
            // without a place once the saga is durable, so that the places stay with
            // calls whose work ends on its own and the stream reads on (a withdrawal of
            // this wait among what it reads).
            Some(Call::SubmitSaga(message)) if message.wait_for_outcome => {
                let params = self.checked_saga(stream.request(traceparent, tracestate, message))?;
                if !place.take_wait() {
                    return Err(stream_waits_taken());
                }
                let submitted = self.runtime.submit_saga(params).await.map_err(status_of)?;
                place.wait_without_place();
                self.answer_submit(submitted, true)
                    .await
                    .map(|r| Answer::SubmitSaga(r.into_inner()))
            }
            Some(Call::SubmitSaga(message)) => self
                .submit_saga(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::SubmitSaga(r.into_inner())),
            Some(Call::CancelSaga(message)) => self
                .cancel_saga(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::CancelSaga(r.into_inner())),
            // The stream's reader takes withdrawals itself: none is answered.
            Some(Call::Withdraw(_)) => Err(Status::internal(
                "a withdrawal was answered as a call (the stream's reader takes them)",
            )),
            None => Err(Status::invalid_argument(
                "call: one of begin, enlist, commit, abort, submit_saga or cancel_saga is required",
            )),
        }
    }
}

fn update_message(record: &TxnRecord, transition: usize) -> proto::WatchTransactionResponse {
    proto::WatchTransactionResponse {
        found: true,
        transaction: Some(pb::transaction_to_pb(record)),
        transition: record.transitions.get(transition).map(pb::transition_to_pb),
    }
}

/// The current state first, then one message per transition, never skipping one; ends
/// after a final state, or when the transaction leaves memory or the daemon stops.
fn watch_stream(
    mut updates: watch::Receiver<Arc<TxnRecord>>,
    stopping: watch::Receiver<bool>,
) -> WatchStream {
    let current = updates.borrow_and_update().clone();
    let first = update_message(&current, current.transitions.len().saturating_sub(1));
    struct State {
        updates: watch::Receiver<Arc<TxnRecord>>,
        stopping: watch::Receiver<bool>,
        queue: VecDeque<proto::WatchTransactionResponse>,
        sent: usize,
        finished: bool,
    }
    let state = State {
        finished: current.state.is_final(),
        sent: current.transitions.len(),
        queue: VecDeque::from([first]),
        updates,
        stopping,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(message) = state.queue.pop_front() {
                return Some((Ok(message), state));
            }
            if state.finished || *state.stopping.borrow() {
                return None;
            }
            tokio::select! {
                changed = state.updates.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = state.stopping.changed() => return None,
            }
            let record = state.updates.borrow_and_update().clone();
            for index in state.sent..record.transitions.len() {
                state.queue.push_back(update_message(&record, index));
            }
            state.sent = record.transitions.len();
            state.finished = record.state.is_final();
        }
    }))
}
