//! The runtime: owns the live transactions and carries out the engine's actions.
//!
//! Transactions are spread over shards by id. Each shard is one task that owns its
//! transactions outright (no shared locks): the API talks to it with messages carrying a
//! oneshot for the reply, and the work it starts (participant calls, log writes, timers)
//! reports back to it as events. See `shard.rs` for the loop.
//!
//! Invariants kept here:
//! - A commit is reported (to the caller of `commit`, to watchers, to `outcome`) only
//!   once the transaction's state says so, and the engine enters `Committing` only after
//!   the forced log write returned.
//! - The number of undecided-or-unacknowledged transactions is bounded
//!   (`max_active_transactions`); `begin` beyond it is refused, which also bounds the
//!   log's queue (one write in flight per transaction at most) and in-flight calls.
//! - A failed log write is fatal: it is reported on the fatal channel (one that nobody
//!   awaits, a lazy write, through the log's `failed`) and nothing that depended on it is
//!   acknowledged.
//! - No participant is called about a transaction older than `delivery_horizon_ms` (by
//!   its id's timestamp): such a call fails at once, without a connection, and what is
//!   undelivered waits for an operator. Participants rely on it to forget old records.
//! - Every participant call of a transaction carries its trace: the trace id the caller
//!   of Begin / SubmitSaga sent (or a new one), with a span id fresh for each call. The
//!   trace lives in memory only: work resumed from the log starts a new trace.

mod execute;
mod load;
mod machine;
pub mod memory;
mod retained;
mod shard;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use treaty_sdk::trace::TraceContext;

use crate::config::defaults;
use crate::engine::twopc::{BranchSpec, OperatorCommand, OperatorRequest, Refusal};
use crate::log::{DecisionLog, Durability, LogError};
use crate::metrics::{Health, Metrics};
use crate::model::{
    OperatorResolution, Resolution, SagaDefinition, Transition, TxnId, TxnKind, TxnRecord,
    TxnState, UnixMs,
};
use crate::participants::{EndpointStatus, Participants};
use load::Load;
use shard::{Lookup, Shard, ShardMsg, SubmitReply};

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
        Self {
            shards: 2,
            advertise_endpoint: String::new(),
            participant_call_timeout_ms: defaults::PARTICIPANT_CALL_TIMEOUT_MS,
            connect_timeout_ms: 2_000,
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
            max_retained_bytes: crate::config::MemoryBudget::of(defaults::MEMORY_BUDGET_BYTES)
                .retained_bytes,
            retained_allowance: memory::RetainedAllowance::default(),
            log_retention_ms: defaults::LOG_RETENTION_MS,
            log_finished_max: crate::config::MemoryBudget::of(defaults::MEMORY_BUDGET_BYTES)
                .log_finished_max,
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
    /// Only those flagged stuck (a delivery or compensation keeps failing).
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
    fn of_state(state: TxnState) -> Self {
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

/// Log records examined at most by one `list` call.
const LIST_SCAN_LIMIT: usize = 2_000;

/// The handle the API uses. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Runtime {
    shards: Arc<Vec<mpsc::Sender<ShardMsg>>>,
    participants: Participants,
    log: Arc<dyn DecisionLog>,
    load: Arc<Load>,
    metrics: Arc<Metrics>,
    /// The last rendering of the metrics and when it was made (see `render_metrics`).
    rendered_metrics: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, String)>>>,
}

/// How long one rendering of the metrics answers scrapes: a scrape costs a pass over
/// every shard's transactions, and `/metrics` is not authenticated.
const METRICS_REUSE: Duration = Duration::from_secs(1);

/// Runs the shards until [`Runtime::shutdown`].
#[derive(Debug)]
pub struct RuntimeTasks {
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// Reports the log's failure on the fatal channel; stopped at shutdown.
    log_watch: tokio::task::JoinHandle<()>,
}

pub fn now_unix_ms() -> UnixMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Runtime {
    /// Recovers unfinished work from `log` and starts the shards. Log errors are fatal
    /// later: they are sent on `fatal`.
    pub fn start(
        log: Arc<dyn DecisionLog>,
        config: RuntimeConfig,
        fatal: mpsc::UnboundedSender<String>,
    ) -> Result<(Self, RuntimeTasks, RecoveryReport), LogError> {
        let unfinished = log.unfinished()?;
        // A two-phase commit's unfinished records are its commit decision, its intent
        // (PREPARING, parallel commit) and the abort decided after an intent; sagas are
        // unfinished while running or compensating (with their definition). Anything else
        // means the log is damaged: guessing could undo a commit, so refuse to start and
        // let an operator look.
        let resumable = |r: &TxnRecord| match r.kind {
            TxnKind::TwoPhase => matches!(
                r.state,
                TxnState::Preparing | TxnState::Committing | TxnState::Aborting
            ),
            TxnKind::Saga => {
                matches!(r.state, TxnState::Running | TxnState::Compensating) && r.saga.is_some()
            }
        };
        if let Some(odd) = unfinished.iter().find(|r| !resumable(r)) {
            return Err(LogError::Corrupt {
                key: odd.id.to_string(),
                message: format!(
                    "unfinished {:?} record in state {:?} cannot be resumed",
                    odd.kind, odd.state
                ),
            });
        }
        let shard_count = config.shards.max(1);
        let participants = Participants::new(
            config.advertise_endpoint.clone(),
            config.max_in_flight_calls,
            Duration::from_millis(config.connect_timeout_ms),
        )
        .with_security(
            config.participant_tls.clone(),
            config.participant_credentials.clone(),
        )
        .with_metrics(config.metrics.clone())
        .with_call_streams(config.participant_call_streams);
        let load = Arc::new(Load::default());
        for record in &unfinished {
            load.count(
                record.owner.as_deref(),
                shard::recovered_payload_bytes(record),
            );
        }
        let report = RecoveryReport {
            resumed: unfinished.len(),
        };
        let mut recovered: Vec<Vec<TxnRecord>> = vec![Vec::new(); shard_count];
        for record in unfinished {
            recovered[shard_of(&record.id, shard_count)].push(record);
        }
        let mut senders = Vec::with_capacity(shard_count);
        let mut handles = Vec::with_capacity(shard_count);
        for records in recovered {
            // Bounded: the API waits for room rather than queueing without end.
            let (sender, receiver) = mpsc::channel(1024);
            let shard = Shard::new(
                log.clone(),
                participants.clone(),
                config.clone(),
                load.clone(),
                fatal.clone(),
                receiver,
            );
            // A shard that panics leaves its transactions stranded: stop the daemon so
            // that recovery takes over, rather than serve on without them.
            let shard_failed = fatal.clone();
            let shard_task = tokio::spawn(shard.run(records));
            handles.push(tokio::spawn(async move {
                if let Err(error) = shard_task.await {
                    let _ = shard_failed.send(format!("a shard task failed: {error}"));
                }
            }));
            senders.push(sender);
        }
        // Writes nobody awaits (`Shard::persist`) report a failure through this.
        let failed = log.failed();
        let log_watch = tokio::spawn(async move {
            let reason = failed.await;
            let _ = fatal.send(format!("the decision log failed: {reason}"));
        });
        let runtime = Self {
            shards: Arc::new(senders),
            participants,
            log,
            load,
            metrics: config.metrics.clone(),
            rendered_metrics: Arc::default(),
        };
        Ok((runtime, RuntimeTasks { handles, log_watch }, report))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The summary of the transactions in memory that the metrics' gauges show.
    pub async fn health(&self) -> Result<Health, RuntimeError> {
        let mut health = Health::default();
        for shard in self.shards.iter() {
            let (reply, answer) = oneshot::channel();
            shard
                .send(ShardMsg::Health { reply })
                .await
                .map_err(|_| RuntimeError::ShuttingDown)?;
            let part = answer.await.map_err(|_| RuntimeError::ShuttingDown)?;
            health = health.merge(part);
        }
        Ok(health)
    }

    /// The metrics' text exposition, at most [`METRICS_REUSE`] old. One rendering at a
    /// time: concurrent scrapes wait for it and share it.
    pub async fn render_metrics(&self) -> Result<String, String> {
        let mut rendered = self.rendered_metrics.lock().await;
        if let Some((at, text)) = rendered.as_ref() {
            if at.elapsed() < METRICS_REUSE {
                return Ok(text.clone());
            }
        }
        let health = self.health().await.map_err(|e| e.to_string())?;
        self.metrics.set_log_finished(self.log.finished_count());
        let log = self.log.clone();
        if let Ok(Some(bytes)) =
            tokio::task::spawn_blocking(move || log.files_on_disk_bytes()).await
        {
            self.metrics.set_log_disk_bytes(bytes);
        }
        let text = self
            .metrics
            .encode(health, now_unix_ms())
            .map_err(|e| format!("encoding metrics: {e}"))?;
        *rendered = Some((tokio::time::Instant::now(), text.clone()));
        Ok(text)
    }

    /// New TLS settings for `https://` participants (on SIGHUP); calls made from now on
    /// use them.
    pub fn reload_participant_tls(&self, tls: Option<tonic::transport::ClientTlsConfig>) {
        self.participants.reload_tls(tls);
    }

    async fn ask<T>(
        &self,
        id: &TxnId,
        make: impl FnOnce(oneshot::Sender<T>) -> ShardMsg,
    ) -> Result<T, RuntimeError> {
        let (reply, answer) = oneshot::channel();
        let shard = &self.shards[shard_of(id, self.shards.len())];
        shard
            .send(make(reply))
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        answer.await.map_err(|_| RuntimeError::ShuttingDown)
    }

    pub async fn begin(&self, params: BeginParams) -> Result<TxnId, RuntimeError> {
        let id = TxnId::generate(now_unix_ms());
        // The shard admits (or refuses) and counts the transaction in one step, so a
        // caller that gives up half-way cannot leave the count wrong.
        self.ask(&id, |reply| ShardMsg::Begin { id, params, reply })
            .await??;
        Ok(id)
    }

    pub async fn enlist(&self, id: TxnId, branch: BranchSpec) -> Result<(), RuntimeError> {
        match self
            .ask(&id, |reply| ShardMsg::Enlist { id, branch, reply })
            .await?
        {
            Err(RuntimeError::UnknownTransaction(_)) => match self.log.get(&id)? {
                Some(record) => Err(Refusal::NotActive(record.state).into()),
                None => Err(RuntimeError::UnknownTransaction(id)),
            },
            other => other,
        }
    }

    /// Starts the commit (or joins the one under way) and waits for the decision.
    /// Returns the transaction as of its decision.
    pub async fn commit(&self, id: TxnId) -> Result<Arc<TxnRecord>, RuntimeError> {
        let mut updates = match self
            .ask(&id, |reply| ShardMsg::Commit { id, reply })
            .await?
        {
            Ok(updates) => updates,
            // Asked again after the transaction left memory: the log has its outcome.
            Err(RuntimeError::UnknownTransaction(_)) => {
                return match self.log.get(&id)? {
                    Some(record) => Ok(Arc::new(record)),
                    None => Err(RuntimeError::UnknownTransaction(id)),
                };
            }
            Err(error) => return Err(error),
        };
        let decided = updates
            .wait_for(|record| record.state.is_decided())
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        Ok(decided.clone())
    }

    /// Aborts, or says the commit won. While a commit is in flight (its outcome not yet
    /// durable) it waits for that outcome and answers by it, never by a decision that a
    /// crash could still undo; so does an abort that must be forced first (parallel
    /// commit).
    pub async fn abort(&self, id: TxnId, reason: String) -> Result<(), RuntimeError> {
        let answer_by = |state: TxnState| {
            if state.is_commit() {
                Err(Refusal::AlreadyCommitting.into())
            } else {
                Ok(())
            }
        };
        let outcome_in_log = || match self.log.get(&id)? {
            Some(record) => answer_by(record.state),
            None => Err(RuntimeError::UnknownTransaction(id)),
        };
        let asked = self
            .ask(&id, |reply| ShardMsg::Abort { id, reason, reply })
            .await?;
        let aborted = match asked {
            Err(RuntimeError::UnknownTransaction(_)) => return outcome_in_log(),
            // With an intent, answered once the abort is durable.
            Ok(()) => true,
            Err(RuntimeError::Refused(Refusal::CommitInFlight)) => false,
            Err(error) => return Err(error),
        };
        let Some(mut updates) = self.watch(id).await? else {
            // Ended already: by this abort, or the log has the outcome.
            return if aborted { Ok(()) } else { outcome_in_log() };
        };
        let decided = updates
            .wait_for(|record| record.state.is_decided())
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        answer_by(decided.state)
    }

    /// Submits a saga, or finds the one submitted earlier with the same idempotency key.
    /// Returns once it is accepted (its definition durable) with its updates.
    pub async fn submit_saga(&self, params: SagaParams) -> Result<Submitted, RuntimeError> {
        let shards = self.shards.len();
        // Every submit of one key is decided by the same shard, one after the other; the
        // saga's id is drawn so that it lives on that shard too.
        let id = match &params.idempotency_key {
            Some(key) => in_shard(
                TxnId::generate(now_unix_ms()),
                shard_of_key(key, shards),
                shards,
            ),
            None => TxnId::generate(now_unix_ms()),
        };
        let mut submitted = match self
            .ask(&id, |reply| ShardMsg::Submit { id, params, reply })
            .await??
        {
            SubmitReply::Here(submitted) => submitted,
            SubmitReply::LivesOn(existing) => Submitted {
                id: existing,
                created: false,
                updates: self
                    .watch(existing)
                    .await?
                    .ok_or(RuntimeError::UnknownTransaction(existing))?,
            },
        };
        submitted
            .updates
            .wait_for(|record| !record.transitions.is_empty())
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        Ok(submitted)
    }

    /// The transaction from memory, else from the log.
    pub async fn get(&self, id: TxnId) -> Result<Option<TxnRecord>, RuntimeError> {
        match self.ask(&id, |reply| ShardMsg::Get { id, reply }).await? {
            Lookup::Visible(record) => Ok(Some(record)),
            Lookup::Hidden => Ok(None),
            Lookup::Absent => Ok(self.log.get(&id)?),
        }
    }

    /// Updates of a live transaction (the current state first); `None` if it is not in
    /// memory (then `get` has its final state, if anything).
    pub async fn watch(
        &self,
        id: TxnId,
    ) -> Result<Option<watch::Receiver<Arc<TxnRecord>>>, RuntimeError> {
        self.ask(&id, |reply| ShardMsg::Watch { id, reply }).await
    }

    /// Presumed abort: anything not known to be committed or still undecided is ABORT.
    pub async fn outcome(&self, id: TxnId) -> Result<Decision, RuntimeError> {
        match self.ask(&id, |reply| ShardMsg::State { id, reply }).await? {
            Lookup::Visible(state) => return Ok(Decision::of_state(state)),
            Lookup::Hidden => return Ok(Decision::Pending),
            Lookup::Absent => {}
        }
        // Not in memory: either final and evicted, or unknown (every unfinished record
        // in the log was recovered into memory at start, so what the log holds of it is
        // final, or an unfinished record that is not durable yet).
        Ok(match self.log.get(&id)? {
            Some(record) if record.state.is_commit() => Decision::Commit,
            _ => Decision::Abort,
        })
    }

    /// Up to `limit` transactions with ids after `after`, in id order, whose state is in
    /// `states` (all if empty), from memory and the log. For a transaction in memory, the
    /// memory copy is the truth: the log may hold a decision not yet durable, or an older
    /// state.
    pub async fn list(
        &self,
        filter: &ListFilter,
        after: Option<TxnId>,
        limit: usize,
    ) -> Result<Page, RuntimeError> {
        let limit = limit.max(1);
        let log = self.log.clone();
        let scanned = tokio::task::spawn_blocking(move || log.scan(after, LIST_SCAN_LIMIT))
            .await
            .map_err(|_| RuntimeError::ShuttingDown)??;
        // Past the last log record examined, the log has not been looked at yet: leave
        // those ids for a later page.
        let horizon = (scanned.len() == LIST_SCAN_LIMIT)
            .then(|| scanned.last().map(|r| r.id))
            .flatten();
        let mut scanned_ids: Vec<Vec<TxnId>> = vec![Vec::new(); self.shards.len()];
        for record in &scanned {
            scanned_ids[shard_of(&record.id, self.shards.len())].push(record.id);
        }
        let mut candidates: Vec<TxnRecord> = Vec::new();
        let mut in_memory: HashSet<TxnId> = HashSet::new();
        for (shard, known) in self.shards.iter().zip(scanned_ids) {
            let (reply, answer) = oneshot::channel();
            let message = ShardMsg::List {
                filter: filter.clone(),
                after,
                limit,
                known,
                reply,
            };
            shard
                .send(message)
                .await
                .map_err(|_| RuntimeError::ShuttingDown)?;
            let listed = answer.await.map_err(|_| RuntimeError::ShuttingDown)?;
            candidates.extend(listed.matching);
            in_memory.extend(listed.present);
        }
        candidates.retain(|r| horizon.is_none_or(|h| r.id <= h));
        candidates.extend(
            scanned
                .into_iter()
                .filter(|r| !in_memory.contains(&r.id) && filter.matches_record(r)),
        );
        candidates.sort_by_key(|r| r.id);
        let full = candidates.len() >= limit;
        candidates.truncate(limit);
        let next_after = if full {
            candidates.last().map(|r| r.id)
        } else {
            horizon
        };
        Ok(Page {
            transactions: candidates,
            next_after,
        })
    }

    /// Carries out an operator's request (the API checked the caller is an admin) and
    /// returns the transaction as it is now. A final transaction no longer in memory can
    /// only have a heuristic branch resolved, in its log record.
    pub async fn operate(
        &self,
        id: TxnId,
        request: OperatorRequest,
    ) -> Result<TxnRecord, RuntimeError> {
        let resolve = request.clone();
        match self
            .ask(&id, |reply| ShardMsg::Operate { id, request, reply })
            .await?
        {
            Err(RuntimeError::UnknownTransaction(_)) => {}
            Err(error) => return Err(error),
            Ok(operated) => {
                if let Some(durable) = operated.durable {
                    durable.await?;
                }
                if matches!(resolve.command, OperatorCommand::Cancel) {
                    // Answered once the decision (to compensate, or to abort after an
                    // intent) is durable, as for the initiator's cancel or abort.
                    return match self.watch(id).await? {
                        Some(mut updates) => {
                            let decided = updates
                                .wait_for(|record| record.state.is_decided())
                                .await
                                .map_err(|_| RuntimeError::ShuttingDown)?;
                            Ok(decided.as_ref().clone())
                        }
                        None => self
                            .get(id)
                            .await?
                            .ok_or(RuntimeError::UnknownTransaction(id)),
                    };
                }
                return Ok(operated.record);
            }
        }
        // Unfinished records are all in memory (recovered at start).
        let Some(mut record) = self.log.get(&id)?.filter(|r| r.state.is_final()) else {
            return Err(RuntimeError::UnknownTransaction(id));
        };
        if let OperatorCommand::Cancel = resolve.command {
            return Err(match record.state.is_commit() {
                true => Refusal::AlreadyCommitting,
                false => Refusal::AlreadyEnding(record.state),
            }
            .into());
        }
        resolve_logged(&mut record, &resolve, now_unix_ms())?;
        self.log.write(&record, Durability::Forced).await?;
        Ok(record)
    }

    /// The initiator cancels a saga: once the answer comes, the saga is compensating
    /// (durably), compensated, or it had completed (the record says which).
    pub async fn cancel_saga(&self, id: TxnId, reason: String) -> Result<TxnRecord, RuntimeError> {
        let mut updates = match self
            .ask(&id, |reply| ShardMsg::CancelSaga { id, reason, reply })
            .await?
        {
            Ok(updates) => updates,
            Err(RuntimeError::UnknownTransaction(_)) => {
                return match self.log.get(&id)? {
                    Some(record) if record.kind == TxnKind::Saga => Ok(record),
                    Some(_) => Err(RuntimeError::NotSaga(id)),
                    None => Err(RuntimeError::UnknownTransaction(id)),
                };
            }
            Err(error) => return Err(error),
        };
        let decided = updates
            .wait_for(|record| record.state != TxnState::Running)
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        Ok(decided.as_ref().clone())
    }

    /// Forgets a final transaction, in memory and in the log (durably). Returns its
    /// record as it was. A commit with a branch an operator resolved without its
    /// participant's answer is refused: that participant may still be in doubt and ask,
    /// and must hear COMMIT (its record stays for the log's retention).
    pub async fn forget(&self, id: TxnId) -> Result<TxnRecord, RuntimeError> {
        if let Some(record) = self.get(id).await? {
            let unanswered =
                |b: &crate::model::BranchRecord| b.resolution.is_some() && b.heuristic.is_none();
            if record.state.is_commit() && record.branches.iter().any(unanswered) {
                return Err(Refusal::MayStillAsk.into());
            }
        }
        let in_memory = self
            .ask(&id, |reply| ShardMsg::Forget { id, reply })
            .await??;
        let record = match in_memory {
            Some(record) => record,
            None => match self.log.get(&id)? {
                Some(record) if record.state.is_final() => record,
                Some(record) => return Err(Refusal::Unfinished(record.state).into()),
                None => return Err(RuntimeError::UnknownTransaction(id)),
            },
        };
        self.log.forget(&record).await?;
        tracing::info!(txn_id = %id, "forgotten at an operator's request");
        Ok(record)
    }

    /// Every participant endpoint called lately, with its health.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        self.participants.endpoints()
    }

    /// Deletes up to `max` final log records: those older than `log_retention_ms`, then
    /// the oldest beyond `log_finished_max`.
    pub fn purge_log(
        &self,
        log_retention_ms: u64,
        log_finished_max: u64,
        max: usize,
    ) -> Result<Purged, LogError> {
        let cutoff = now_unix_ms().saturating_sub(log_retention_ms);
        let past_retention = self.log.purge_ended_before(cutoff, max)?;
        let over_limit = self
            .log
            .purge_finished_beyond(log_finished_max, max.saturating_sub(past_retention));
        // What the first purge deleted is counted even if the second failed.
        self.metrics
            .log_purged(past_retention, *over_limit.as_ref().unwrap_or(&0));
        let over_limit = over_limit?;
        Ok(Purged {
            past_retention,
            over_limit,
        })
    }

    /// Transactions not yet final.
    pub fn active_transactions(&self) -> usize {
        self.load.total()
    }

    /// Stops the shards: undecided transactions are aborted, and work in flight gets
    /// `grace` to finish. What is left is recovery's job at the next start.
    pub async fn shutdown(&self, tasks: RuntimeTasks, grace: Duration) {
        for shard in self.shards.iter() {
            let _ = shard.send(ShardMsg::Shutdown { grace }).await;
        }
        for handle in tasks.handles {
            if let Err(error) = handle.await {
                tracing::error!(%error, "shard task ended abnormally");
            }
        }
        // Awaited, so that what it holds is gone when this returns.
        tasks.log_watch.abort();
        let _ = tasks.log_watch.await;
    }
}

/// An operator's resolution of a heuristic branch of a final transaction that is only in
/// the log (see `TwoPhaseCommit::resolve` for the same rule in memory).
fn resolve_logged(
    record: &mut TxnRecord,
    request: &OperatorRequest,
    now: UnixMs,
) -> Result<(), Refusal> {
    let OperatorCommand::Resolve { branch_id, outcome } = &request.command else {
        return Err(Refusal::Final(record.state));
    };
    let decided = if record.state.is_commit() {
        Resolution::Commit
    } else {
        Resolution::Abort
    };
    let branch = record
        .branches
        .iter_mut()
        .find(|b| &b.id == branch_id)
        .ok_or_else(|| Refusal::UnknownBranch(branch_id.clone()))?;
    if *outcome != decided {
        return Err(Refusal::contradicts(branch_id, *outcome, decided));
    }
    if branch.heuristic.is_none() || branch.resolution.is_some() {
        return Err(Refusal::NothingToResolve {
            branch: branch_id.clone(),
            state: branch.state,
        });
    }
    branch.resolution = Some(OperatorResolution {
        outcome: *outcome,
        by: request.by.clone(),
        at_unix_ms: now,
        reason: request.reason.clone(),
    });
    record.transitions.push(Transition {
        state: record.state,
        at_unix_ms: now,
        reason: request.describe(&format!("branch {branch_id} resolved as {outcome:?}")),
    });
    Ok(())
}

/// The shard that decides every submit of an idempotency key. CRC-32 is fixed by its
/// definition, so the choice is the same across Rust releases and restarts.
fn shard_of_key(key: &str, shards: usize) -> usize {
    (crc32fast::hash(key.as_bytes()) as u64 % shards.max(1) as u64) as usize
}

/// A UUIDv7's bytes 9..16 are random (byte 8 holds the variant bits, bytes 6..8 the
/// version): 56 random bits, read big-endian, spread evenly over any shard count.
const RANDOM_TAIL: std::ops::Range<usize> = 9..16;

fn random_tail(id: &TxnId) -> u64 {
    id.as_bytes()[RANDOM_TAIL]
        .iter()
        .fold(0, |tail, byte| (tail << 8) | u64::from(*byte))
}

fn shard_of(id: &TxnId, shards: usize) -> usize {
    (random_tail(id) % shards.max(1) as u64) as usize
}

/// `id` with its random tail moved to the nearest value that lands on `target`: one
/// step, no redrawing (the time order and the other random bits are kept).
fn in_shard(id: TxnId, target: usize, shards: usize) -> TxnId {
    let shards = shards.max(1) as u64;
    let tail = random_tail(&id);
    let mut moved = tail - tail % shards + target as u64 % shards;
    if moved >= 1 << 56 {
        moved -= shards;
    }
    let mut bytes = *id.as_bytes();
    bytes[RANDOM_TAIL].copy_from_slice(&moved.to_be_bytes()[1..]);
    TxnId::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Durability, MemoryLog};
    use crate::model::{TxnKind, TxnRecord};

    fn record(state: TxnState) -> TxnRecord {
        TxnRecord {
            id: TxnId::generate(now_unix_ms()),
            kind: TxnKind::TwoPhase,
            state,
            created_unix_ms: 0,
            deadline_unix_ms: 0,
            prepare_timeout_ms: 0,
            reason: None,
            branches: Vec::new(),
            transitions: Vec::new(),
            ended_unix_ms: None,
            idempotency_key: None,
            stuck: false,
            saga: None,
            owner: None,
            paused: false,
        }
    }

    #[tokio::test]
    async fn refuses_to_start_on_an_unfinished_record_that_cannot_be_resumed() {
        let log = Arc::new(MemoryLog::new());
        log.write(&record(TxnState::Active), Durability::Forced)
            .await
            .unwrap();
        let (fatal, _) = mpsc::unbounded_channel();
        let started = Runtime::start(log, RuntimeConfig::default(), fatal);
        assert!(matches!(started, Err(LogError::Corrupt { .. })));
    }

    /// The most shards the config accepts.
    const MAX_SHARDS: usize = 1024;

    #[test]
    fn ids_are_minted_in_the_wanted_shard_for_every_shard_count() {
        for shards in 1..=MAX_SHARDS {
            for target in [0, shards / 2, shards - 1] {
                let id = in_shard(TxnId::generate(now_unix_ms()), target, shards);
                assert_eq!(shard_of(&id, shards), target, "{shards} shards");
                // Still a well-formed UUIDv7.
                let uuid = uuid::Uuid::from_bytes(*id.as_bytes());
                assert_eq!(uuid.get_version_num(), 7);
                assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122);
            }
        }
        // The top of the 56-bit range wraps down instead of overflowing.
        let mut top = [0xff; 16];
        top[6] = 0x7f;
        top[8] = 0xbf;
        let id = in_shard(TxnId::from_bytes(top), 0, 1000);
        assert_eq!(shard_of(&id, 1000), 0);
    }

    #[test]
    fn every_shard_is_used_for_every_shard_count() {
        for shards in 1..=MAX_SHARDS {
            let mut used = vec![false; shards];
            // 16 draws per shard leave one unused with odds of about e^-16 each.
            for _ in 0..shards * 16 {
                used[shard_of(&TxnId::generate(now_unix_ms()), shards)] = true;
            }
            let unused = used.iter().filter(|u| !**u).count();
            assert!(
                unused == 0 || (shards > 64 && unused <= 1),
                "{shards}: {unused} unused"
            );
        }
    }

    #[test]
    fn idempotency_keys_spread_over_every_shard_and_stay_put() {
        // Fixed: the same key maps to the same shard in every build.
        // CRC-32 (IEEE) of "order-42" is 0x57f706de, as any implementation computes it.
        assert_eq!(shard_of_key("order-42", 1024), 0x57f7_06de % 1024);
        for shards in [1, 2, 3, 7, 64, 128, 1000, MAX_SHARDS] {
            let mut used = vec![false; shards];
            for i in 0..shards * 32 {
                used[shard_of_key(&format!("order-{i}"), shards)] = true;
            }
            assert!(used.iter().all(|u| *u), "{shards} shards");
        }
    }

    /// Polls `health` (every 50 ms, for at most 10 s) until `done` holds for it.
    async fn health_until(runtime: &Runtime, done: impl Fn(&Health) -> bool) -> Health {
        for _ in 0..200 {
            let health = runtime.health().await.unwrap();
            if done(&health) {
                return health;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        runtime.health().await.unwrap()
    }

    #[tokio::test]
    async fn a_lowered_allowance_drops_finished_transactions_without_new_ones() {
        let (fatal, _) = mpsc::unbounded_channel();
        let config = RuntimeConfig::default();
        let allowance = config.retained_allowance.clone();
        let governor = memory::Governor::new(1 << 30, config.max_retained_bytes, allowance);
        let (runtime, tasks, _) =
            Runtime::start(Arc::new(MemoryLog::new()), config.clone(), fatal).unwrap();
        let mut ids = Vec::new();
        for _ in 0..40 {
            let id = runtime
                .begin(BeginParams {
                    deadline_unix_ms: now_unix_ms() + 60_000,
                    prepare_timeout_ms: 5_000,
                    branches: Vec::new(),
                    owner: None,
                    trace: None,
                })
                .await
                .unwrap();
            runtime.abort(id, "test".into()).await.unwrap();
            ids.push(id);
        }
        let kept = health_until(&runtime, |h| h.retained_transactions == 40).await;
        assert_eq!(kept.retained_transactions, 40, "all within the share");

        // A resident set far over the budget's ceiling: the allowance falls to nothing,
        // and each shard's next housekeeping drops all but its latest.
        let mut governor = governor;
        assert_eq!(governor.observe(4 << 30, Some(usize::MAX)), 0);
        let left = health_until(&runtime, |h| {
            h.retained_transactions <= config.shards as u64
        })
        .await;
        assert!(
            left.retained_transactions <= config.shards as u64,
            "{} kept after the fall",
            left.retained_transactions
        );
        // Left memory, not the log: each one still answers.
        for id in ids {
            let record = runtime.get(id).await.unwrap().expect("in the log");
            assert_eq!(record.state, TxnState::Aborted);
        }
        runtime.shutdown(tasks, Duration::from_secs(1)).await;
    }

    #[tokio::test]
    async fn unknown_transactions_are_presumed_aborted() {
        let (fatal, _) = mpsc::unbounded_channel();
        let (runtime, tasks, report) =
            Runtime::start(Arc::new(MemoryLog::new()), RuntimeConfig::default(), fatal).unwrap();
        assert_eq!(report.resumed, 0);
        let unknown = TxnId::generate(now_unix_ms());
        assert_eq!(runtime.outcome(unknown).await, Ok(Decision::Abort));
        assert_eq!(runtime.get(unknown).await, Ok(None));
        assert_eq!(
            runtime.commit(unknown).await.map(|_| ()),
            Err(RuntimeError::UnknownTransaction(unknown))
        );
        runtime.shutdown(tasks, Duration::from_secs(1)).await;
    }
}
