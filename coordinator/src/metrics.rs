//! The coordinator's Prometheus metrics and the `/metrics` endpoint that serves them.
//!
//! Counters and histograms are updated where things happen: a transaction ends, a
//! participant call returns, the log makes a group durable. The gauges that describe the
//! transactions in memory (in progress, in doubt, stuck, undelivered aborts, the retry
//! backlog) are not kept up to date event by event: every scrape asks the shards for a
//! [`Health`] summary and sets them from it, so they cannot drift.
//!
//! Invariant: every label takes values from a bounded set. Endpoints are named by
//! clients, so at most [`MAX_ENDPOINT_LABELS`] distinct endpoints get their own label;
//! calls to any other are counted under `endpoint="other"`.

use std::collections::HashSet;
use std::sync::RwLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::model::{TxnKind, TxnState};

pub use health::Health;
pub use treaty_sdk::metrics::serve_metrics;

mod health;

/// Distinct endpoints that get a label of their own.
pub const MAX_ENDPOINT_LABELS: usize = 256;
/// The label of every endpoint past [`MAX_ENDPOINT_LABELS`].
const OTHER_ENDPOINT: &str = "other";

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users spell them
pub enum Protocol {
    two_phase,
    saga,
}

impl From<TxnKind> for Protocol {
    fn from(kind: TxnKind) -> Self {
        match kind {
            TxnKind::TwoPhase => Protocol::two_phase,
            TxnKind::Saga => Protocol::saga,
        }
    }
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Outcome {
    committed,
    aborted,
    completed,
    compensated,
}

impl Outcome {
    /// The outcome a final state stands for.
    pub fn of_final(state: TxnState) -> Option<Self> {
        match state {
            TxnState::Committed => Some(Outcome::committed),
            TxnState::Aborted => Some(Outcome::aborted),
            TxnState::Completed => Some(Outcome::completed),
            TxnState::Compensated => Some(Outcome::compensated),
            _ => None,
        }
    }
}

/// What a call to a participant was for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CallOperation {
    prepare,
    commit,
    one_phase_commit,
    abort,
    step,
    compensate,
}

/// How a call to a participant ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CallResult {
    /// An answer of the protocol (whatever it said: a NO vote is an answer).
    ok,
    /// The participant answered with an error status.
    error,
    /// No answer within the deadline.
    timeout,
    /// No connection, or not a gRPC server.
    unreachable,
    /// Not sent: the endpoint's circuit is open.
    circuit_open,
    /// Not sent: the calls in flight (to the endpoint, or in all) stayed at their limit
    /// until the call's deadline.
    no_permit,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransactionLabels {
    protocol: Protocol,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: Protocol,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    endpoint: String,
    operation: CallOperation,
    result: CallResult,
}

/// A part of the memory budget (`defaults::MemoryBudget`).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users spell them
enum BudgetPart {
    total,
    log,
    retained,
    headroom,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    part: BudgetPart,
}

/// Why final records left the log.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users spell them
enum PurgeReason {
    /// Older than the log retention.
    retention,
    /// Beyond the most the memory budget lets the log keep.
    limit,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurgeLabels {
    reason: PurgeReason,
}

/// How a compaction of the log ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users spell them
enum CompactionResult {
    /// The rebuilt copy replaced the log.
    switched,
    /// Given up after it started (the log unchanged, unless the switch could not be
    /// made durable, which fails the log).
    abandoned,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CompactionLabels {
    result: CompactionResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

/// Every metric of the coordinator. Cheap to update from any task or thread.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    transactions: Family<TransactionLabels, Counter>,
    in_progress: Family<ProtocolLabels, Gauge>,
    in_doubt: Gauge,
    in_doubt_oldest_age_seconds: Gauge<f64, AtomicU64>,
    stuck_sagas: Gauge,
    stuck_two_phase_commits: Gauge,
    undelivered_aborts: Gauge,
    retry_backlog_oldest_age_seconds: Gauge<f64, AtomicU64>,
    heuristic_outcomes: Counter,
    participant_calls: Family<CallLabels, Histogram>,
    log_fsync_seconds: Histogram,
    log_batch_records: Histogram,
    circuit_state: Family<EndpointLabels, Gauge>,
    retained_transactions: Gauge,
    retained_estimated_bytes: Gauge,
    memory_budget_bytes: Family<BudgetLabels, Gauge>,
    resident_bytes: Gauge,
    retained_allowance_bytes: Gauge,
    log_finished: Gauge,
    log_finished_limit: Gauge,
    log_purged: Family<PurgeLabels, Counter>,
    log_compactions: Family<CompactionLabels, Counter>,
    log_disk_bytes: Gauge,
    /// Endpoints that have a label of their own.
    labelled_endpoints: RwLock<HashSet<String>>,
}

fn call_duration_histogram() -> Histogram {
    // 250 µs to ~16 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let transactions = Family::<TransactionLabels, Counter>::default();
        registry.register(
            "treaty_transactions",
            "Transactions that ended, by protocol and outcome",
            transactions.clone(),
        );
        let in_progress = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "treaty_transactions_in_progress",
            "Transactions not yet final, by protocol",
            in_progress.clone(),
        );
        let in_doubt = Gauge::default();
        registry.register(
            "treaty_in_doubt_transactions",
            "Two-phase commits decided whose phase 2 has not reached every participant, or \
             recovered with their intent logged while their votes are asked again",
            in_doubt.clone(),
        );
        let in_doubt_oldest_age_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "treaty_in_doubt_oldest_age",
            "Time since the oldest in-doubt transaction was decided, or began if its votes \
             are being asked again (0 if none)",
            Unit::Seconds,
            in_doubt_oldest_age_seconds.clone(),
        );
        let stuck_sagas = Gauge::default();
        registry.register(
            "treaty_stuck_sagas",
            "Sagas flagged stuck: a compensation keeps failing, or a step stated committed waits for an operator to undo it (an operator should look)",
            stuck_sagas.clone(),
        );
        let stuck_two_phase_commits = Gauge::default();
        registry.register(
            "treaty_stuck_two_phase_commits",
            "Two-phase commits whose delivery, or whose prepare asked again after a restart, \
             keeps failing or cannot succeed (an operator should look)",
            stuck_two_phase_commits.clone(),
        );
        let undelivered_aborts = Gauge::default();
        registry.register(
            "treaty_undelivered_aborts",
            "Aborted two-phase commits that some participant has not acknowledged",
            undelivered_aborts.clone(),
        );
        let retry_backlog_oldest_age_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register_with_unit(
            "treaty_retry_backlog_oldest_age",
            "Time since the oldest participant call still waiting to be retried first failed (0 if none)",
            Unit::Seconds,
            retry_backlog_oldest_age_seconds.clone(),
        );
        let heuristic_outcomes = Counter::default();
        registry.register(
            "treaty_heuristic_outcomes",
            "Heuristic outcomes: a participant answered against the decision, or an operator stated a branch's outcome (treaty txn resolve)",
            heuristic_outcomes.clone(),
        );
        let participant_calls =
            Family::<CallLabels, Histogram>::new_with_constructor(call_duration_histogram as _);
        registry.register_with_unit(
            "treaty_participant_call_duration",
            "Calls to participants, by endpoint, operation and result",
            Unit::Seconds,
            participant_calls.clone(),
        );
        let log_fsync_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register_with_unit(
            "treaty_log_fsync_duration",
            "Time to make one group of forced log writes durable",
            Unit::Seconds,
            log_fsync_seconds.clone(),
        );
        let log_batch_records = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register(
            "treaty_log_batch_records",
            "Records written by one group commit of the log",
            log_batch_records.clone(),
        );
        let circuit_state = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "treaty_circuit_state",
            "Circuit of each participant endpoint: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );
        let retained_transactions = Gauge::default();
        registry.register(
            "treaty_retained_transactions",
            "Final transactions kept in memory (for GetTransaction, Watch and Outcome without a log read)",
            retained_transactions.clone(),
        );
        let retained_estimated_bytes = Gauge::default();
        registry.register_with_unit(
            "treaty_retained_transactions_estimated",
            "Estimated memory held by the final transactions kept in memory",
            Unit::Bytes,
            retained_estimated_bytes.clone(),
        );
        let memory_budget_bytes = Family::<BudgetLabels, Gauge>::default();
        registry.register_with_unit(
            "treaty_memory_budget",
            "The configured memory budget (part=total) and its split: the decision log (sled's caches and what sled keeps beside them), final transactions kept in memory, headroom for work in progress",
            Unit::Bytes,
            memory_budget_bytes.clone(),
        );
        let resident_bytes = Gauge::default();
        registry.register_with_unit(
            "treaty_resident_memory",
            "The coordinator's resident set, as the memory governor last read it (every second)",
            Unit::Bytes,
            resident_bytes.clone(),
        );
        let retained_allowance_bytes = Gauge::default();
        registry.register_with_unit(
            "treaty_retained_transactions_allowed",
            "What final transactions kept in memory may hold now: their share of the budget, lowered once the resident set passes 15/16 of the budget and raised again under 7/8",
            Unit::Bytes,
            retained_allowance_bytes.clone(),
        );
        let log_finished = Gauge::default();
        registry.register(
            "treaty_log_finished_transactions",
            "Final transactions the decision log keeps (counted by the log; see treaty_log_finished_transactions_limit)",
            log_finished.clone(),
        );
        let log_finished_limit = Gauge::default();
        registry.register(
            "treaty_log_finished_transactions_limit",
            "The most final transactions the decision log keeps: what its share of the memory budget holds; beyond it the oldest are purged before their retention is up",
            log_finished_limit.clone(),
        );
        let log_purged = Family::<PurgeLabels, Counter>::default();
        registry.register(
            "treaty_log_purged",
            "Final transactions deleted from the decision log: past the log retention (reason=retention) or beyond the limit the memory budget sets (reason=limit)",
            log_purged.clone(),
        );
        let log_compactions = Family::<CompactionLabels, Counter>::default();
        // Both series from the start, at 0, so that a rate over them has a beginning.
        for result in [CompactionResult::switched, CompactionResult::abandoned] {
            log_compactions
                .get_or_create(&CompactionLabels { result })
                .inc_by(0);
        }
        registry.register(
            "treaty_log_compactions",
            "Compactions of the decision log (rebuilt holding only its live records), by how they ended; while one runs the process holds a second copy of the log in memory and on disk",
            log_compactions.clone(),
        );
        let log_disk_bytes = Gauge::default();
        registry.register_with_unit(
            "treaty_log_disk",
            "What the decision log's files take on disk, a compaction's copy and a replaced generation not yet deleted included",
            Unit::Bytes,
            log_disk_bytes.clone(),
        );
        Self {
            registry,
            transactions,
            in_progress,
            in_doubt,
            in_doubt_oldest_age_seconds,
            stuck_sagas,
            stuck_two_phase_commits,
            undelivered_aborts,
            retry_backlog_oldest_age_seconds,
            heuristic_outcomes,
            participant_calls,
            log_fsync_seconds,
            log_batch_records,
            circuit_state,
            retained_transactions,
            retained_estimated_bytes,
            memory_budget_bytes,
            resident_bytes,
            retained_allowance_bytes,
            log_finished,
            log_finished_limit,
            log_purged,
            log_compactions,
            log_disk_bytes,
            labelled_endpoints: RwLock::default(),
        }
    }

    /// Shows the memory governor's last reading of the resident set.
    pub fn set_resident_memory(&self, resident_bytes: u64) {
        self.resident_bytes.set(to_i64(resident_bytes));
    }

    /// Shows what finished transactions kept in memory may hold now.
    pub fn set_retained_allowance(&self, allowance_bytes: usize) {
        self.retained_allowance_bytes
            .set(to_i64(allowance_bytes as u64));
    }

    /// The configured memory budget and its split (set once, at start).
    pub fn memory_budget(&self, budget: &crate::defaults::MemoryBudget) {
        let parts = [
            (BudgetPart::total, budget.budget_bytes),
            (BudgetPart::log, budget.log_bytes),
            (BudgetPart::retained, budget.retained_bytes as u64),
            (BudgetPart::headroom, budget.headroom_bytes),
        ];
        for (part, bytes) in parts {
            self.memory_budget_bytes
                .get_or_create(&BudgetLabels { part })
                .set(to_i64(bytes));
        }
        self.log_finished_limit.set(to_i64(budget.log_finished_max));
    }

    /// Counts final records a purge deleted, by why.
    pub fn log_purged(&self, past_retention: usize, over_limit: usize) {
        for (reason, purged) in [
            (PurgeReason::retention, past_retention),
            (PurgeReason::limit, over_limit),
        ] {
            self.log_purged
                .get_or_create(&PurgeLabels { reason })
                .inc_by(purged as u64);
        }
    }

    /// Shows how many final records the log keeps.
    pub fn set_log_finished(&self, finished: u64) {
        self.log_finished.set(to_i64(finished));
    }

    /// Counts a compaction of the log that ended: switched, or abandoned.
    pub fn log_compacted(&self, switched: bool) {
        let result = if switched {
            CompactionResult::switched
        } else {
            CompactionResult::abandoned
        };
        self.log_compactions
            .get_or_create(&CompactionLabels { result })
            .inc();
    }

    /// Shows what the log's files take on disk.
    pub fn set_log_disk_bytes(&self, bytes: u64) {
        self.log_disk_bytes.set(to_i64(bytes));
    }

    /// A transaction reached a final state.
    pub fn transaction_ended(&self, kind: TxnKind, state: TxnState) {
        if let Some(outcome) = Outcome::of_final(state) {
            self.transactions
                .get_or_create(&TransactionLabels {
                    protocol: kind.into(),
                    outcome,
                })
                .inc();
        }
    }

    /// A participant answered against the decision, or an operator stated a branch's
    /// outcome.
    pub fn heuristic_outcome(&self) {
        self.heuristic_outcomes.inc();
    }

    pub fn participant_call(
        &self,
        endpoint: &str,
        operation: CallOperation,
        result: CallResult,
        seconds: f64,
    ) {
        let labels = CallLabels {
            endpoint: self.endpoint_label(endpoint),
            operation,
            result,
        };
        self.participant_calls
            .get_or_create(&labels)
            .observe(seconds);
    }

    /// The `treaty_circuit_state` gauge of `endpoint` (0 closed, 1 half-open, 2 open),
    /// for its circuit to set under its own lock. An endpoint without a label of its own
    /// gets a gauge that is not exported: a state is one circuit's, and the endpoints
    /// counted under "other" would overwrite each other's (`treaty endpoints` shows
    /// every circuit).
    pub fn circuit_gauge(&self, endpoint: &str) -> Gauge {
        let label = self.endpoint_label(endpoint);
        if label == OTHER_ENDPOINT {
            return Gauge::default();
        }
        self.circuit_state
            .get_or_create(&EndpointLabels { endpoint: label })
            .clone()
    }

    /// One group commit of the log.
    pub fn log_group(&self, records: usize, sync_seconds: Option<f64>) {
        self.log_batch_records.observe(records as f64);
        if let Some(seconds) = sync_seconds {
            self.log_fsync_seconds.observe(seconds);
        }
    }

    /// `endpoint` itself while fewer than [`MAX_ENDPOINT_LABELS`] have labels, else
    /// "other".
    fn endpoint_label(&self, endpoint: &str) -> String {
        let known = self
            .labelled_endpoints
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(endpoint);
        if known {
            return endpoint.to_string();
        }
        let mut labelled = self
            .labelled_endpoints
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if labelled.len() < MAX_ENDPOINT_LABELS {
            labelled.insert(endpoint.to_string());
            return endpoint.to_string();
        }
        if labelled.contains(endpoint) {
            endpoint.to_string()
        } else {
            OTHER_ENDPOINT.to_string()
        }
    }

    /// The text exposition of every metric, with the gauges set from `health` as of
    /// `now_unix_ms`.
    pub fn encode(&self, health: Health, now_unix_ms: u64) -> Result<String, std::fmt::Error> {
        let age_seconds =
            |since: Option<u64>| since.map_or(0.0, |t| now_unix_ms.saturating_sub(t) as f64 / 1e3);
        self.in_progress
            .get_or_create(&ProtocolLabels {
                protocol: Protocol::two_phase,
            })
            .set(to_i64(health.two_phase_in_progress));
        self.in_progress
            .get_or_create(&ProtocolLabels {
                protocol: Protocol::saga,
            })
            .set(to_i64(health.sagas_in_progress));
        self.in_doubt.set(to_i64(health.in_doubt));
        self.in_doubt_oldest_age_seconds
            .set(age_seconds(health.oldest_in_doubt_unix_ms));
        self.stuck_sagas.set(to_i64(health.stuck_sagas));
        self.stuck_two_phase_commits
            .set(to_i64(health.stuck_two_phase_commits));
        self.undelivered_aborts
            .set(to_i64(health.undelivered_aborts));
        self.retry_backlog_oldest_age_seconds
            .set(age_seconds(health.oldest_retry_unix_ms));
        self.retained_transactions
            .set(to_i64(health.retained_transactions));
        self.retained_estimated_bytes
            .set(to_i64(health.retained_estimated_bytes));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

fn to_i64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
