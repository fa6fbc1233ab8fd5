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
mod calls;
mod page_token;
pub mod pb;
pub mod saga;
mod status;
mod watching;

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
pub use status::status_of;
use status::{invalid, not_yours, stream_waits_taken};
use treaty_sdk::auth::Principal;
use treaty_sdk::call_stream::{Answers, CallPlace, StreamContext, TransactionCalls, serve_calls};
use treaty_sdk::connections::MAX_CONCURRENT_STREAMS;
use watching::{update_message, watch_stream};

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
/// Most bytes of transactions in one page: a page ends early (with a token for the rest)
/// rather than pass the 4 MiB a gRPC client decodes by default (a page of 1,000
/// transactions of 32 branches each can weigh 9 MiB). A page holds at least one.
const MAX_PAGE_BYTES: usize = 3 * 1024 * 1024;
/// Most entries in a list's `states` filter: one per state. A longer list only repeats
/// some, and each entry is compared with every transaction looked at.
const MAX_LISTED_STATES: usize = pb::TRANSACTION_STATES;

#[derive(Debug, Clone)]
pub struct CoordinatorService {
    runtime: Runtime,
    config: ApiConfig,
    auth: Arc<Authenticator>,
    /// Becomes true when the daemon stops: open watch streams end.
    stopping: watch::Receiver<bool>,
    /// Seals ListTransactions page tokens (a key per process).
    page_tokens: Arc<page_token::PageTokens>,
}

impl CoordinatorService {
    /// A service that authenticates no one (every caller is the anonymous admin).
    pub fn new(runtime: Runtime, config: ApiConfig, stopping: watch::Receiver<bool>) -> Self {
        Self {
            runtime,
            config,
            auth: Arc::new(Authenticator::open()),
            stopping,
            page_tokens: Arc::new(page_token::PageTokens::new()),
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
        if request.states.len() > MAX_LISTED_STATES {
            return Err(invalid(FieldError::new(
                "states",
                format!(
                    "{} states; the limit is {MAX_LISTED_STATES} (one per state)",
                    request.states.len()
                ),
            )));
        }
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
            let opened = self.page_tokens.open(&principal.name, &request.page_token);
            Some(opened.map_err(invalid)?)
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
        let mut transactions = Vec::with_capacity(page.transactions.len());
        let mut next_after = page.next_after;
        let mut page_bytes = 0;
        for record in &page.transactions {
            let transaction = pb::transaction_to_pb(record);
            page_bytes += prost::Message::encoded_len(&transaction);
            if page_bytes > MAX_PAGE_BYTES && !transactions.is_empty() {
                // The next page starts after the last one sent.
                next_after = page.transactions.get(transactions.len() - 1).map(|r| r.id);
                break;
            }
            transactions.push(transaction);
        }
        Ok(Response::new(proto::ListTransactionsResponse {
            transactions,
            next_page_token: next_after
                .map(|id| self.page_tokens.seal(&principal.name, id))
                .unwrap_or_default(),
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
