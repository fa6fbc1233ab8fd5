//! The values an initiator gives the client and gets back: the branches and saga steps
//! it describes, the options of a begin or a submit, a list's filter, outcomes,
//! decisions and updates, and the client's errors.

use super::*;

/// A branch to enlist: who does the work, and what work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchSpec {
    pub branch_id: String,
    pub endpoint: String,
    pub payload: Vec<u8>,
}

impl BranchSpec {
    pub fn new(
        branch_id: impl Into<String>,
        endpoint: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            branch_id: branch_id.into(),
            endpoint: endpoint.into(),
            payload: payload.into(),
        }
    }
}

impl From<BranchSpec> for pb::BranchSpec {
    fn from(spec: BranchSpec) -> Self {
        pb::BranchSpec {
            branch_id: spec.branch_id,
            endpoint: spec.endpoint,
            payload: spec.payload,
        }
    }
}

/// One step of a saga: a forward action (delivered to the participant as `prepare` +
/// `commit`) and how to undo it (`compensate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SagaStep {
    pub step_id: String,
    pub endpoint: String,
    pub payload: Vec<u8>,
    pub compensation_payload: Vec<u8>,
    /// Deadline of each call; `None` takes the coordinator's default.
    pub timeout_ms: Option<u64>,
    /// `None` takes the coordinator's defaults.
    pub retry: Option<pb::RetryPolicy>,
    /// Ids of the steps this one runs after; empty: at once.
    pub after: Vec<String>,
}

impl SagaStep {
    pub fn new(
        step_id: impl Into<String>,
        endpoint: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            step_id: step_id.into(),
            endpoint: endpoint.into(),
            payload: payload.into(),
            compensation_payload: Vec::new(),
            timeout_ms: None,
            retry: None,
            after: Vec::new(),
        }
    }

    pub fn compensation(mut self, payload: impl Into<Vec<u8>>) -> Self {
        self.compensation_payload = payload.into();
        self
    }

    pub fn after<I, S>(mut self, steps: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.after = steps.into_iter().map(Into::into).collect();
        self
    }

    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = Some(timeout_ms);
        self
    }

    /// Forward attempts in all and the retry backoff; zeros take the defaults.
    pub fn retry(
        mut self,
        max_attempts: u32,
        initial_backoff_ms: u64,
        max_backoff_ms: u64,
    ) -> Self {
        self.retry = Some(pb::RetryPolicy {
            max_attempts,
            initial_backoff_ms,
            max_backoff_ms,
        });
        self
    }
}

impl From<SagaStep> for pb::SagaStep {
    fn from(step: SagaStep) -> Self {
        pb::SagaStep {
            step_id: step.step_id,
            endpoint: step.endpoint,
            payload: step.payload,
            compensation_payload: step.compensation_payload,
            timeout_ms: step.timeout_ms.unwrap_or(0),
            retry: step.retry,
            after: step.after,
        }
    }
}

/// How to submit a saga.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// Submitting again with the same key returns the first saga instead of a new one.
    pub idempotency_key: Option<String>,
    /// Return only once the saga is COMPLETED or COMPENSATED.
    pub wait_for_outcome: bool,
    /// Compensate the saga if it has not completed by then (ms since the Unix epoch).
    pub deadline_unix_ms: Option<u64>,
}

/// Which transactions [`TreatyClient::list_filtered`] returns; every condition set must
/// hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransactionFilter {
    /// Only these states (all if empty; one named twice counts once).
    pub states: Vec<TransactionState>,
    /// Only those flagged stuck (a delivery or compensation keeps failing, or a saga
    /// step waits for an operator).
    pub stuck: bool,
    /// Only those created more than this long ago.
    pub older_than_ms: Option<u64>,
    /// Only those with a branch (or saga step) at this endpoint.
    pub endpoint: Option<String>,
}

/// The answer to a submit.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmittedSaga {
    pub transaction_id: String,
    /// False when the idempotency key matched an earlier saga.
    pub created: bool,
    /// The saga as of the answer (final when waited for).
    pub transaction: Transaction,
}

/// Options of a new transaction; `None` takes the coordinator's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BeginOptions {
    pub deadline_unix_ms: Option<u64>,
    pub prepare_timeout_ms: Option<u64>,
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Aborted { reason: String },
}

/// A Begin of `branches`; with `commit`, one that also runs both phases.
pub(super) fn begin_request(
    options: BeginOptions,
    branches: Vec<BranchSpec>,
    commit: bool,
) -> pb::BeginRequest {
    pb::BeginRequest {
        deadline_unix_ms: options.deadline_unix_ms.unwrap_or(0),
        prepare_timeout_ms: options.prepare_timeout_ms.unwrap_or(0),
        branches: branches.into_iter().map(Into::into).collect(),
        commit,
    }
}

/// The outcome a Commit (or a Begin with commit) answered.
pub(super) fn outcome_from(outcome: i32, reason: String) -> Result<Outcome, ClientError> {
    match pb::Outcome::try_from(outcome) {
        Ok(pb::Outcome::Committed) => Ok(Outcome::Committed),
        Ok(pb::Outcome::Aborted) => Ok(Outcome::Aborted { reason }),
        _ => Err(ClientError::UnknownValue(format!("outcome {outcome}"))),
    }
}

impl Outcome {
    pub fn is_committed(&self) -> bool {
        matches!(self, Outcome::Committed)
    }
}

/// The coordinator's answer to an in-doubt participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
    Pending,
}

/// One message of [`TreatyClient::watch`].
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub transition: Transition,
    pub transaction: Transaction,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid coordinator endpoint {endpoint:?}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("cannot connect to the coordinator: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The coordinator refused or failed the call; INVALID_ARGUMENT names the field.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("the coordinator answered with a value this client does not know: {0}")]
    UnknownValue(String),
}

impl ClientError {
    /// The gRPC status code, if the coordinator answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status(status) => Some(status.code()),
            _ => None,
        }
    }

    /// Whether the coordinator refused the call because it has no record of the
    /// transaction (Enlist, Commit or Abort of it), as opposed to a malformed request.
    /// Read from the status's machine-readable detail, not from its text.
    pub fn is_unknown_transaction(&self) -> bool {
        self.unknown_transaction().is_some()
    }

    /// A waiting SubmitSaga was refused on the stream before anything was submitted, to
    /// be sent unary: the coordinator found every wait of its connection taken (the
    /// status's `google.rpc.ErrorInfo`, reason `STREAM_WAITS_TAKEN`), or it is one from
    /// before waits were served on the stream (INVALID_ARGUMENT on `wait_for_outcome`,
    /// a field no unary submit is refused for).
    pub(super) fn is_wait_refused_on_stream(&self) -> bool {
        use tonic_types::StatusExt;
        use treaty_proto::error_info::{DOMAIN, STREAM_WAITS_TAKEN};
        let ClientError::Status(status) = self else {
            return false;
        };
        let waits_taken = || {
            status
                .get_details_error_info()
                .is_some_and(|info| info.domain == DOMAIN && info.reason == STREAM_WAITS_TAKEN)
        };
        let refused_as_before = || {
            status.code() == tonic::Code::InvalidArgument
                && status.message().starts_with("wait_for_outcome:")
        };
        waits_taken() || refused_as_before()
    }

    /// The id of the transaction the coordinator said it has no record of, read from the
    /// status's `google.rpc.ErrorInfo` (reason `UNKNOWN_TRANSACTION`, domain `treaty.v1`).
    pub fn unknown_transaction(&self) -> Option<String> {
        use tonic_types::StatusExt;
        use treaty_proto::error_info::{DOMAIN, TRANSACTION_ID, UNKNOWN_TRANSACTION};
        let ClientError::Status(status) = self else {
            return None;
        };
        let mut info = status.get_details_error_info()?;
        if info.domain != DOMAIN || info.reason != UNKNOWN_TRANSACTION {
            return None;
        }
        Some(info.metadata.remove(TRANSACTION_ID).unwrap_or_default())
    }
}
