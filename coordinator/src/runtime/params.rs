//! What the runtime is set up with, asked with and answers with: its config, its errors,
//! a new two-phase commit's or saga's parameters, a list's filter and page, what a
//! participant in doubt is told, and what recovery and a purge of the log report.

use super::*;

/// What the runtime needs to know; the daemon fills it from its validated config.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub shards: usize,
    /// The endpoint participants are told to ask for outcomes.
    pub advertise_endpoint: String,
    pub participant_call_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    pub retry_backoff_initial_ms: u64,
    pub retry_backoff_max_ms: u64,
    pub max_active_transactions: usize,
    /// Aborts undelivered past their deadline kept in memory (and retried) at most; the
    /// oldest beyond are forgotten.
    pub max_undelivered_aborts: usize,
    /// Transactions one principal may have in progress at once.
    pub max_active_per_principal: usize,
    /// Payload bytes transactions in progress may hold in memory, all together.
    pub max_payload_memory_bytes: usize,
    pub max_in_flight_calls: usize,
    pub max_branches: usize,
    /// How long a final transaction stays in memory (GetTransaction, Watch, Outcome).
    pub memory_retention_ms: u64,
    /// At most this many final transactions are kept in memory (oldest go first).
    pub max_retained_transactions: usize,
    /// At most this many estimated bytes of final transactions are kept in memory, all
    /// shards together (oldest go first): their share of `memory_budget_bytes`.
    pub max_retained_bytes: usize,
    /// What of `max_retained_bytes` final transactions may hold now: lowered by the
    /// memory governor while the process is over its budget (see `memory.rs`).
    pub retained_allowance: memory::RetainedAllowance,
    /// How long final records stay in the log.
    pub log_retention_ms: u64,
    /// At most this many final records stay in the log (the oldest go first, before
    /// their retention is up): what the log's share of `memory_budget_bytes` holds.
    pub log_finished_max: u64,
    /// No participant is called about a transaction older than this (by its id): what
    /// is still undelivered then waits for an operator. Participants may forget final
    /// barrier records past it (plus a margin for clock skew).
    pub delivery_horizon_ms: u64,
    /// Write (lazily) the history of transactions the protocol does not log: aborts,
    /// one-phase and read-only commits.
    pub history_records: bool,
    /// A two-phase commit writes its intent alongside its prepares, and its votes decide
    /// it (see `engine::twopc`); `false`: the decision is forced after the votes.
    pub parallel_commit: bool,
    /// Calls go over each participant's `Calls` stream where it serves one (see
    /// `participants::stream`); `false`: every call is unary.
    pub participant_call_streams: bool,
    /// How often each shard sweeps for transactions without progress.
    pub sweep_interval_ms: u64,
    /// Unfinished transactions examined per sweep, per shard.
    pub sweep_batch: usize,
    /// How long a call may go unanswered before the sweeper sends it again.
    pub stale_after_ms: u64,
    /// TLS for `https://` participants (`None`: the API refuses them).
    pub participant_tls: Option<tonic::transport::ClientTlsConfig>,
    /// What participant calls present.
    pub participant_credentials: treaty_sdk::auth::Credentials,
    /// Where transactions, participant calls and the log are counted.
    pub metrics: Arc<Metrics>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        let budget = MemoryBudget::of(defaults::MEMORY_BUDGET_BYTES);
        Self {
            shards: 2,
            advertise_endpoint: String::new(),
            participant_call_timeout_ms: defaults::PARTICIPANT_CALL_TIMEOUT_MS,
            connect_timeout_ms: defaults::PARTICIPANT_CALL_TIMEOUT_MS
                .min(defaults::MAX_CONNECT_TIMEOUT_MS),
            retry_backoff_initial_ms: defaults::RETRY_BACKOFF_INITIAL_MS,
            retry_backoff_max_ms: defaults::RETRY_BACKOFF_MAX_MS,
            max_active_transactions: defaults::MAX_ACTIVE_TRANSACTIONS,
            max_undelivered_aborts: defaults::MAX_UNDELIVERED_ABORTS,
            max_active_per_principal: defaults::MAX_ACTIVE_PER_PRINCIPAL,
            max_payload_memory_bytes: defaults::MAX_PAYLOAD_MEMORY_BYTES,
            max_in_flight_calls: defaults::MAX_IN_FLIGHT_CALLS,
            max_branches: treaty_sdk::limits::MAX_BRANCHES,
            memory_retention_ms: defaults::MEMORY_RETENTION_MS,
            max_retained_transactions: defaults::MAX_RETAINED_TRANSACTIONS,
            max_retained_bytes: budget.retained_bytes,
            retained_allowance: memory::RetainedAllowance::default(),
            log_retention_ms: defaults::LOG_RETENTION_MS,
            log_finished_max: budget.log_finished_max,
            delivery_horizon_ms: defaults::DELIVERY_HORIZON_MS,
            history_records: true,
            parallel_commit: true,
            participant_call_streams: true,
            sweep_interval_ms: defaults::SWEEP_INTERVAL_MS,
            sweep_batch: defaults::SWEEP_BATCH,
            stale_after_ms: defaults::STALE_AFTER_MS,
            participant_tls: None,
            participant_credentials: treaty_sdk::auth::Credentials::none(),
            metrics: Arc::default(),
        }
    }
}

/// Why the runtime could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "unknown transaction {0}: this coordinator has no record of it. It was never begun \
         here, or it ended longer ago than the log keeps records (aborts may be kept in \
         memory only), or it was undecided when the coordinator restarted (then no commit \
         was ever reported for it, and participants that voted are told to abort)"
    )]
    UnknownTransaction(TxnId),
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("transaction {0} is a saga: Enlist, Commit and Abort are for two-phase commits")]
    NotTwoPhase(TxnId),
    #[error("transaction {0} is a two-phase commit: CancelSaga is for sagas (use Abort)")]
    NotSaga(TxnId),
    #[error("idempotency key {0:?} was used before for a saga with other steps")]
    IdempotencyConflict(String),
    /// A request field refused once the runtime knew it would start something new.
    #[error(transparent)]
    Invalid(treaty_sdk::limits::FieldError),
    #[error("{0} transactions are in progress, the most allowed; retry later")]
    Overloaded(usize),
    #[error(
        "{principal} has {limit} transactions in progress, the most one principal may have \
         (max_active_per_principal); retry after some finish"
    )]
    PrincipalOverloaded { principal: String, limit: usize },
    #[error(
        "payloads of transactions in progress hold {held} bytes of the {budget}-byte budget \
         (max_payload_memory_bytes); retry after some finish"
    )]
    PayloadBudget { held: usize, budget: usize },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Log(#[from] LogError),
}

/// A new transaction's parameters, validated by the API.
#[derive(Debug, Clone)]
pub struct BeginParams {
    pub deadline_unix_ms: UnixMs,
    pub prepare_timeout_ms: u64,
    pub branches: Vec<BranchSpec>,
    /// The principal beginning it (`None` without authentication).
    pub owner: Option<String>,
    /// The caller's W3C trace context (`None`: the transaction starts a new trace).
    pub trace: Option<TraceContext>,
}

/// Which transactions a list shows (every condition set must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only these states (every state if empty).
    pub states: Vec<TxnState>,
    /// Only this principal's transactions (everyone's if `None`).
    pub owner: Option<String>,
    /// Only those flagged stuck (a delivery or compensation keeps failing, or a saga
    /// step waits for an operator).
    pub stuck: bool,
    /// Only those created before this time.
    pub created_before_unix_ms: Option<UnixMs>,
    /// Only those with a branch (or step) at this endpoint.
    pub endpoint: Option<String>,
}

impl ListFilter {
    pub fn matches<'a>(
        &self,
        state: TxnState,
        owner: Option<&str>,
        created_unix_ms: UnixMs,
        stuck: bool,
        mut endpoints: impl Iterator<Item = &'a str>,
    ) -> bool {
        (self.states.is_empty() || self.states.contains(&state))
            && self
                .owner
                .as_deref()
                .is_none_or(|wanted| owner == Some(wanted))
            && (stuck || !self.stuck)
            && self
                .created_before_unix_ms
                .is_none_or(|before| created_unix_ms < before)
            && self
                .endpoint
                .as_deref()
                .is_none_or(|wanted| endpoints.any(|e| e == wanted))
    }

    pub fn matches_record(&self, record: &TxnRecord) -> bool {
        self.matches(
            record.state,
            record.owner.as_deref(),
            record.created_unix_ms,
            record.stuck,
            record.branches.iter().map(|b| b.endpoint.as_str()),
        )
    }
}

/// A saga to submit, validated by the API.
#[derive(Debug, Clone)]
pub struct SagaParams {
    pub definition: SagaDefinition,
    /// Scoped to the owner by the API (see `api::scoped_key`).
    pub idempotency_key: Option<String>,
    /// The principal submitting it (`None` without authentication).
    pub owner: Option<String>,
    /// The caller's W3C trace context (`None`: the saga starts a new trace).
    pub trace: Option<TraceContext>,
    /// Compensate if it has not completed by then (`None`: no deadline).
    pub deadline_unix_ms: Option<UnixMs>,
    /// Answer the saga already submitted with the idempotency key, but refuse with this
    /// error rather than submit a new one: a retry after the first request's deadline
    /// passed still finds its saga, and a new saga cannot have a deadline in the past.
    pub refused_if_new: Option<treaty_sdk::limits::FieldError>,
}

/// The answer to a submit: the saga (new, or the one submitted earlier with the same
/// idempotency key) and its updates.
#[derive(Debug)]
pub struct Submitted {
    pub id: TxnId,
    pub created: bool,
    pub updates: watch::Receiver<Arc<TxnRecord>>,
}

/// What a participant in doubt is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Commit,
    Abort,
    Pending,
}

impl Decision {
    pub(super) fn of_state(state: TxnState) -> Self {
        match state {
            TxnState::Active | TxnState::Preparing | TxnState::Running => Decision::Pending,
            TxnState::Committing | TxnState::Committed | TxnState::Completed => Decision::Commit,
            TxnState::Aborting
            | TxnState::Aborted
            | TxnState::Compensating
            | TxnState::Compensated => Decision::Abort,
        }
    }
}

/// What the log reader found: the transactions to resume (logged commits whose phase 2
/// is not acknowledged, intents whose votes decide, aborts decided after an intent,
/// running or compensating sagas).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    pub resumed: usize,
}

/// What one [`Runtime::purge_log`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Purged {
    /// Final records older than the log retention.
    pub past_retention: usize,
    /// The oldest final records beyond what the memory budget lets the log keep.
    pub over_limit: usize,
}

impl Purged {
    pub fn total(&self) -> usize {
        self.past_retention + self.over_limit
    }
}

/// A page of [`Runtime::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub transactions: Vec<TxnRecord>,
    pub next_after: Option<TxnId>,
}
