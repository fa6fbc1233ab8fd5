//! The participant server's Prometheus metrics, and the `/metrics` endpoint that serves
//! them (the coordinator serves its own through the same [`serve_metrics`]).
//!
//! What is counted, and where:
//! - `treaty_participant_operations_total{operation,result}` and
//!   `treaty_participant_operation_duration_seconds{operation}`: every call the gRPC
//!   service answers, at the edge ([`crate::server`]), by the protocol answer it gave, or
//!   `refused` (bad input, unauthenticated or untrusted caller: INVALID_ARGUMENT,
//!   UNAUTHENTICATED, PERMISSION_DENIED) or `error` (any other status: user code failed,
//!   store failed, call past the retention), or `cancelled` (the call was dropped before
//!   it answered: the caller cancelled, its deadline passed or its connection went; the
//!   operation behind it still ran to its end).
//! - `treaty_participant_barrier_records`: records in the barrier store. Counting them at
//!   each scrape would be a pass over the whole store (millions of records over a week's
//!   retention) on an unauthenticated endpoint, and a capped count would stop growing
//!   exactly when the number matters (collection falling behind). So it is a gauge kept
//!   up to date by the barrier: counted once when [`crate::serve`] starts (one pass, before
//!   the first call is served, so nothing is counted twice), +1 when an operation writes a
//!   branch's first record, −n when the collector deletes n. Every new record is written
//!   under its branch's lock after a read found none, so each is counted once; a removal
//!   lost in a crash is done again and counted then.
//! - `treaty_participant_branches_in_doubt` and
//!   `treaty_participant_in_doubt_oldest_age_seconds`: as of the last complete pass of the
//!   in-doubt resolver ([`crate::in_doubt`]), which reads every branch in doubt anyway;
//!   the age is computed at the scrape from the oldest branch's prepare time. Absent until
//!   the first pass ends. `treaty_participant_in_doubt_passes_total` counts the passes
//!   ended, so that a reader can tell a gauge from a pass that began after some instant
//!   (two more passes than then) from an older one.
//! - `treaty_participant_barrier_gc_removed_total`: records deleted by the collector.
//! - `treaty_participant_outcome_inquiries_total{result}`: `GetOutcome` calls to
//!   coordinators for branches in doubt, by answer.
//! - `treaty_participant_store_fsyncs_total`,
//!   `treaty_participant_store_forced_records_total` and
//!   `treaty_participant_store_fsync_seconds_total`: forced groups the barrier's store
//!   made durable, the records in them and the time their syncs took, as the store's
//!   logger counts them ([`crate::durable::DurabilityCounters`]); absent for a store that
//!   does not count.
//!
//! Invariants: every label takes values from a fixed enum, never from a request; an update
//! is an atomic operation or a read-locked map lookup, never held across an await; a
//! scrape reads atomics only (no store access), so it costs the same however large the
//! store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

mod http;

pub use http::{check_metrics_listen, serve_metrics};

/// What a call to the participant asked for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)] // label values as Prometheus users spell them
pub enum Operation {
    prepare,
    /// Phase 2 of a two-phase commit (and a commit whose mode is not valid).
    commit,
    one_phase_commit,
    saga_step,
    abort,
    compensate,
}

/// How a call to the participant ended: the answer it gave, or none.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum OperationResult {
    yes,
    no,
    read_only,
    committed,
    rejected,
    not_prepared,
    already_aborted,
    aborted,
    already_committed,
    compensated,
    /// Refused before the barrier: bad input, or a caller not authenticated or trusted.
    refused,
    /// No answer: user code or the store failed, or the call was past the retention.
    error,
    /// The caller went before the answer (it cancelled, its deadline passed or its
    /// connection dropped); the operation itself still ran to its end.
    cancelled,
}

/// The protocol answers each operation can give (plus `refused`, `error` and `cancelled`
/// for all):
/// their series exist from the start, at 0.
const ANSWERS: &[(Operation, &[OperationResult])] = {
    use OperationResult::*;
    &[
        (Operation::prepare, &[yes, no, read_only]),
        (
            Operation::commit,
            &[committed, not_prepared, already_aborted],
        ),
        (
            Operation::one_phase_commit,
            &[committed, rejected, already_aborted],
        ),
        (
            Operation::saga_step,
            &[committed, rejected, already_aborted],
        ),
        (Operation::abort, &[aborted, already_committed]),
        (Operation::compensate, &[compensated]),
    ]
};

/// What a coordinator said when asked about a branch in doubt.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum InquiryResult {
    commit,
    abort,
    pending,
    /// No answer: an error status, a timeout, or a decision this SDK does not know.
    error,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationResultLabels {
    operation: Operation,
    result: OperationResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: Operation,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InquiryLabels {
    result: InquiryResult,
}

/// Every metric of one participant server. Cheap to update from any task; cloned handles
/// share their values.
#[derive(Debug)]
pub struct ParticipantMetrics {
    registry: Registry,
    operations: Family<OperationResultLabels, Counter>,
    durations: Family<OperationLabels, Histogram>,
    barrier_records: Gauge,
    gc_removed: Counter,
    inquiries: Family<InquiryLabels, Counter>,
    in_doubt: Arc<InDoubtGauges>,
    store: Arc<StoreCounters>,
}

impl Default for ParticipantMetrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    // 100 µs to ~6.5 s: a barrier read, up to user code behind a slow database.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 17))
}

impl ParticipantMetrics {
    pub fn new() -> Self {
        let operations = Family::<OperationResultLabels, Counter>::default();
        let durations =
            Family::<OperationLabels, Histogram>::new_with_constructor(duration_histogram as _);
        for (operation, answers) in ANSWERS {
            // Created now, so that they are scraped at 0 before the first call.
            drop(durations.get_or_create(&OperationLabels {
                operation: *operation,
            }));
            let always = [
                OperationResult::refused,
                OperationResult::error,
                OperationResult::cancelled,
            ];
            for result in answers.iter().chain(always.iter()) {
                drop(operations.get_or_create(&OperationResultLabels {
                    operation: *operation,
                    result: *result,
                }));
            }
        }
        let inquiries = Family::<InquiryLabels, Counter>::default();
        for result in [
            InquiryResult::commit,
            InquiryResult::abort,
            InquiryResult::pending,
            InquiryResult::error,
        ] {
            drop(inquiries.get_or_create(&InquiryLabels { result }));
        }
        let mut metrics = Self {
            registry: Registry::default(),
            operations,
            durations,
            barrier_records: Gauge::default(),
            gc_removed: Counter::default(),
            inquiries,
            in_doubt: Arc::new(InDoubtGauges::default()),
            store: Arc::new(StoreCounters::default()),
        };
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics.registry = registry;
        metrics
    }

    /// Registers every metric into `registry` too, for a service that already serves a
    /// prometheus-client registry of its own (the values are shared, not copied).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "treaty_participant_operations",
            "Calls answered by the participant server, by operation and result",
            self.operations.clone(),
        );
        registry.register_with_unit(
            "treaty_participant_operation_duration",
            "Time to answer a call, by operation",
            Unit::Seconds,
            self.durations.clone(),
        );
        registry.register(
            "treaty_participant_barrier_records",
            "Records in the barrier store (final branches are deleted after the retention)",
            self.barrier_records.clone(),
        );
        registry.register(
            "treaty_participant_barrier_gc_removed",
            "Barrier records deleted by the garbage collector",
            self.gc_removed.clone(),
        );
        registry.register(
            "treaty_participant_outcome_inquiries",
            "GetOutcome calls to coordinators for branches in doubt, by answer",
            self.inquiries.clone(),
        );
        registry.register_collector(Box::new(self.in_doubt.clone()));
        registry.register_collector(Box::new(self.store.clone()));
    }

    /// Exports what the barrier's store has made durable (the first call wins).
    pub fn observe_store(&self, counters: Arc<crate::durable::DurabilityCounters>) {
        let _ = self.store.counters.set(counters);
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// A call answered `result` after `elapsed`.
    pub fn operation(&self, operation: Operation, result: OperationResult, elapsed: Duration) {
        self.operations
            .get_or_create(&OperationResultLabels { operation, result })
            .inc();
        self.durations
            .get_or_create(&OperationLabels { operation })
            .observe(elapsed.as_secs_f64());
    }

    /// `count` records are in the store besides those counted so far (at start).
    pub fn barrier_records_found(&self, count: u64) {
        self.barrier_records.inc_by(to_i64(count));
    }

    /// A branch's first record was written.
    pub fn barrier_record_created(&self) {
        self.barrier_records.inc();
    }

    /// The collector deleted `count` records.
    pub fn barrier_records_collected(&self, count: u64) {
        self.barrier_records.dec_by(to_i64(count));
        self.gc_removed.inc_by(count);
    }

    /// A coordinator was asked about a branch in doubt.
    pub fn outcome_inquiry(&self, result: InquiryResult) {
        self.inquiries
            .get_or_create(&InquiryLabels { result })
            .inc();
    }

    /// A pass of the in-doubt resolver ended having seen `count` branches still in doubt,
    /// the oldest prepared at `oldest_prepared_unix_ms`.
    pub fn in_doubt_pass(&self, count: u64, oldest_prepared_unix_ms: Option<u64>) {
        self.in_doubt.count.store(count, Ordering::Relaxed);
        self.in_doubt
            .oldest_prepared_unix_ms
            .store(oldest_prepared_unix_ms.unwrap_or(0), Ordering::Relaxed);
        self.in_doubt.passes.fetch_add(1, Ordering::Relaxed);
        self.in_doubt.known.store(true, Ordering::Release);
    }
}

/// The in-doubt gauges, encoded at each scrape so that the age is as of the scrape.
#[derive(Debug, Default)]
struct InDoubtGauges {
    /// A pass has ended: the other fields mean something.
    known: AtomicBool,
    count: AtomicU64,
    /// 0 when none is in doubt.
    oldest_prepared_unix_ms: AtomicU64,
    /// Passes ended.
    passes: AtomicU64,
}

impl Collector for InDoubtGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if !self.known.load(Ordering::Acquire) {
            return Ok(());
        }
        let count = ConstGauge::new(to_i64(self.count.load(Ordering::Relaxed)));
        count.encode(encoder.encode_descriptor(
            "treaty_participant_branches_in_doubt",
            "Branches that voted YES and have no outcome yet, as of the in-doubt resolver's last pass.",
            None,
            count.metric_type(),
        )?)?;
        let oldest = self.oldest_prepared_unix_ms.load(Ordering::Relaxed);
        let age_seconds = if oldest == 0 {
            0.0
        } else {
            crate::barrier::now_unix_ms().saturating_sub(oldest) as f64 / 1e3
        };
        let age = ConstGauge::new(age_seconds);
        age.encode(encoder.encode_descriptor(
            "treaty_participant_in_doubt_oldest_age",
            "Time since the oldest branch in doubt voted YES (0 if none).",
            Some(&Unit::Seconds),
            age.metric_type(),
        )?)?;
        let passes = ConstCounter::new(self.passes.load(Ordering::Relaxed));
        passes.encode(encoder.encode_descriptor(
            "treaty_participant_in_doubt_passes",
            "Passes of the in-doubt resolver over every branch in doubt that have ended.",
            None,
            passes.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The store's durability counters, read at each scrape.
#[derive(Debug, Default)]
struct StoreCounters {
    counters: std::sync::OnceLock<Arc<crate::durable::DurabilityCounters>>,
}

impl Collector for StoreCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(counters) = self.counters.get() else {
            return Ok(());
        };
        let fsyncs = ConstCounter::new(counters.syncs());
        fsyncs.encode(encoder.encode_descriptor(
            "treaty_participant_store_fsyncs",
            "Forced groups the barrier's store made durable (each a flush and fdatasync).",
            None,
            fsyncs.metric_type(),
        )?)?;
        let records = ConstCounter::new(counters.forced_records());
        records.encode(encoder.encode_descriptor(
            "treaty_participant_store_forced_records",
            "Records written in forced groups by the barrier's store.",
            None,
            records.metric_type(),
        )?)?;
        let sync_time = ConstCounter::new(counters.sync_seconds());
        sync_time.encode(encoder.encode_descriptor(
            "treaty_participant_store_fsync",
            "Time the barrier's store spent making its forced groups durable; divided by \
             the fsyncs, the mean wait of a forced group for the disk.",
            Some(&Unit::Seconds),
            sync_time.metric_type(),
        )?)?;
        Ok(())
    }
}

fn to_i64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of `expected` is in the exposition `text`.
    fn assert_shows(text: &str, expected: &[&str]) {
        for line in expected {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn series_exist_at_zero_and_count_what_happens() {
        let metrics = ParticipantMetrics::new();
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "treaty_participant_operations_total{operation=\"prepare\",result=\"yes\"} 0"
            ),
            "{text}"
        );
        assert!(
            !text.contains("treaty_participant_branches_in_doubt"),
            "{text}"
        );
        metrics.operation(
            Operation::abort,
            OperationResult::aborted,
            Duration::from_millis(2),
        );
        metrics.barrier_records_found(5);
        metrics.barrier_record_created();
        metrics.barrier_records_collected(2);
        metrics.outcome_inquiry(InquiryResult::pending);
        let long_ago = crate::barrier::now_unix_ms() - 1_500;
        metrics.in_doubt_pass(3, Some(long_ago));
        let text = metrics.encode().unwrap();
        assert_shows(
            &text,
            &[
                "treaty_participant_operations_total{operation=\"abort\",result=\"aborted\"} 1",
                "treaty_participant_operation_duration_seconds_count{operation=\"abort\"} 1",
                "treaty_participant_barrier_records 4",
                "treaty_participant_barrier_gc_removed_total 2",
                "treaty_participant_outcome_inquiries_total{result=\"pending\"} 1",
                "treaty_participant_branches_in_doubt 3",
                "treaty_participant_in_doubt_passes_total 1",
            ],
        );
        let age: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("treaty_participant_in_doubt_oldest_age_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(age >= 1.5, "{text}");
    }

    /// The store's counters are read at each scrape: what its logger counted since the
    /// last one shows, the time of its syncs in seconds.
    #[test]
    fn the_store_counts_its_forced_groups_and_their_sync_time() {
        let metrics = ParticipantMetrics::new();
        let text = metrics.encode().unwrap();
        assert!(!text.contains("treaty_participant_store_"), "{text}");
        let counters = Arc::new(crate::durable::DurabilityCounters::default());
        metrics.observe_store(counters.clone());
        counters.forced_group(3, Duration::from_millis(250));
        counters.forced_group(2, Duration::from_millis(500));
        let text = metrics.encode().unwrap();
        assert_shows(
            &text,
            &[
                "treaty_participant_store_fsyncs_total 2\n",
                "treaty_participant_store_forced_records_total 5\n",
                "treaty_participant_store_fsync_seconds_total 0.75\n",
                "# UNIT treaty_participant_store_fsync_seconds seconds\n",
            ],
        );
    }

    #[test]
    fn an_embedding_registry_shares_the_values() {
        let metrics = ParticipantMetrics::new();
        let mut theirs = Registry::with_prefix("shop");
        metrics.register(&mut theirs);
        metrics.barrier_record_created();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &theirs).unwrap();
        assert!(
            text.contains("shop_treaty_participant_barrier_records 1"),
            "{text}"
        );
    }
}
