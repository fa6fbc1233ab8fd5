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
//! - An operator's verbs (resolve, cancel, retry-now, pause, resume, forget) are carried
//!   out one at a time, each until its write is durable: a final transaction only in the
//!   log is read, changed and written back outside any shard, and the log's queued
//!   writes are not readable yet.
//! - Every participant call of a transaction carries its trace: the trace id the caller
//!   of Begin / SubmitSaga sent (or a new one), with a span id fresh for each call. The
//!   trace lives in memory only: work resumed from the log starts a new trace.

mod execute;
mod load;
mod machine;
pub mod memory;
mod operator;
mod params;
mod retained;
mod shard;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, watch};
use treaty_sdk::trace::TraceContext;

use crate::defaults::{self, MemoryBudget};
use crate::engine::twopc::{BranchSpec, OperatorCommand, OperatorRequest, Refusal};
use crate::log::{DecisionLog, Durability, LogError};
use crate::metrics::{Health, Metrics};
use crate::model::{
    OperatorResolution, Resolution, SagaDefinition, Transition, TxnId, TxnKind, TxnRecord,
    TxnState, UnixMs,
};
use crate::participants::{EndpointStatus, Participants};
use load::Load;
pub use params::{
    BeginParams, Decision, ListFilter, Page, Purged, RecoveryReport, RuntimeConfig, RuntimeError,
    SagaParams, Submitted,
};
use shard::{Lookup, Shard, ShardMsg, SubmitReply};

/// Log records examined at most by one `list` call.
const LIST_SCAN_LIMIT: usize = 2_000;
/// Stored bytes of log records one `list` call reads at most (the first record is read
/// whatever its size): 2,000 records of up to 96 KiB each would be about 190 MiB.
const LIST_SCAN_MAX_BYTES: usize = 8 << 20;
/// `list` calls reading the log at once; the others wait their turn, so that what
/// lists hold in memory stays within this many times [`LIST_SCAN_MAX_BYTES`].
const LIST_SCANS_AT_ONCE: usize = 2;

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
    /// Held by an operator's verb from its first read until its write is durable, so
    /// that two verbs on a transaction only in the log act one after the other (see
    /// `operator.rs`).
    operator_verbs: Arc<tokio::sync::Mutex<()>>,
    /// A turn to read the log for a `list` call ([`LIST_SCANS_AT_ONCE`]).
    list_scans: Arc<tokio::sync::Semaphore>,
}

/// How long one rendering of the metrics answers scrapes: a scrape costs a pass over
/// every shard's transactions, and `/metrics` is not authenticated.
pub const METRICS_REUSE: Duration = Duration::from_secs(1);

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
            operator_verbs: Arc::default(),
            list_scans: Arc::new(tokio::sync::Semaphore::new(LIST_SCANS_AT_ONCE)),
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
            Err(RuntimeError::UnknownTransaction(_)) => match self.two_phase_in_log(id)? {
                Some(record) => Err(Refusal::NotActive(record.state).into()),
                None => Err(RuntimeError::UnknownTransaction(id)),
            },
            other => other,
        }
    }

    /// A two-phase commit that left memory, from the log; a saga there is refused as
    /// it is while in memory (Enlist, Commit and Abort are not for sagas), so the answer
    /// does not depend on whether it is still retained.
    fn two_phase_in_log(&self, id: TxnId) -> Result<Option<TxnRecord>, RuntimeError> {
        match self.log.get(&id)? {
            Some(record) if record.kind == TxnKind::Saga => Err(RuntimeError::NotTwoPhase(id)),
            found => Ok(found),
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
                return match self.two_phase_in_log(id)? {
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
        let outcome_in_log = || match self.two_phase_in_log(id)? {
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
        // Held by the read itself, which goes on if this call is given up, and then
        // until the records read are filtered into the page.
        let turn = self
            .list_scans
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        let log = self.log.clone();
        let (scanned, stopped_early, _turn) = tokio::task::spawn_blocking(move || {
            log.scan_bounded(after, LIST_SCAN_LIMIT, LIST_SCAN_MAX_BYTES)
                .map(|(scanned, stopped_early)| (scanned, stopped_early, turn))
        })
        .await
        .map_err(|_| RuntimeError::ShuttingDown)??;
        // Past the last log record examined, the log has not been looked at yet: leave
        // those ids for a later page.
        let horizon = stopped_early
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
        self.shutdown_by(tasks, tokio::time::Instant::now() + grace)
            .await
    }

    /// [`Runtime::shutdown`], with work in flight given until `deadline`.
    pub async fn shutdown_by(&self, tasks: RuntimeTasks, deadline: tokio::time::Instant) {
        for shard in self.shards.iter() {
            let _ = shard.send(ShardMsg::Shutdown { deadline }).await;
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
mod tests;
