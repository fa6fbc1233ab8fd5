//! The barrier's garbage collector: deletes the records of final branches once their
//! transaction is older than the barrier's retention, so that a participant's disk stays
//! bounded.
//!
//! Why it is safe (docs/decisions.md, "Bounded disk"): the coordinator makes no call for
//! a transaction older than its delivery horizon, and the retention is at least that
//! horizon plus the worst clock skew; past it, a call that finds no record is refused
//! (see [`crate::barrier`], "Retention"), so a collected record can never be mistaken for
//! one that never existed.
//!
//! Invariants:
//! - only final records (every status but `Prepared`) of canonical UUIDv7 transactions
//!   created before the cutoff are deleted; a branch in doubt is never collected, nor a
//!   record that cannot be read;
//! - a record is deleted under its branch's lock, after being read again there, so it is
//!   final at the instant it goes (no operation turns a final record into a `Prepared`
//!   one);
//! - the barrier learns each cutoff before anything below it is deleted;
//! - work is bounded: a round lists at most `max_records_per_round` records and deletes
//!   at most that many, rounds are `round_pause_ms` apart while a pass has more to do and
//!   `interval_ms` apart once it is done; it runs beside the calls in its own task and
//!   takes only the locks of the old branches it deletes;
//! - a failure is logged and the pass starts over later; it never stops the participant
//!   (a failed store does that by itself).

use std::sync::Arc;
use std::time::Duration;

use crate::barrier::{Barrier, BarrierError, DEFAULT_RETENTION_MS, decode, lock_key};
use crate::barrier_store::{BarrierStore, BranchKey};
use crate::durable::{DurableStore, StoreError};
use crate::participant::BranchContext;
use crate::transaction_age::{first_transaction_id_at, transaction_created_unix_ms};

/// Most records one round may examine.
pub const MAX_RECORDS_PER_ROUND: usize = 100_000;

/// How the garbage collector runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierGcOptions {
    /// Records of final branches are kept this long after their transaction was created.
    /// At least the coordinator's `--delivery-horizon-ms` plus the worst clock skew
    /// between coordinator and participant.
    pub retention_ms: u64,
    /// Pause after a pass found nothing more to delete.
    pub interval_ms: u64,
    /// Most records listed (and so deleted) per round.
    pub max_records_per_round: usize,
    /// Pause between the rounds of a pass that has more to do: with
    /// `max_records_per_round` it caps the rate of deletions.
    pub round_pause_ms: u64,
}

impl Default for BarrierGcOptions {
    fn default() -> Self {
        Self {
            retention_ms: DEFAULT_RETENTION_MS,
            interval_ms: 10_000,
            max_records_per_round: 1_000,
            round_pause_ms: 20,
        }
    }
}

impl BarrierGcOptions {
    /// Checks every field; the message names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.retention_ms == 0 {
            return Err("barrier_gc.retention_ms: must be at least 1".into());
        }
        if !(1..=86_400_000).contains(&self.interval_ms) {
            return Err(format!(
                "barrier_gc.interval_ms: {} is not in 1..=86400000",
                self.interval_ms
            ));
        }
        if !(1..=MAX_RECORDS_PER_ROUND).contains(&self.max_records_per_round) {
            return Err(format!(
                "barrier_gc.max_records_per_round: {} is not in 1..={MAX_RECORDS_PER_ROUND}",
                self.max_records_per_round
            ));
        }
        if self.round_pause_ms > 60_000 {
            return Err(format!(
                "barrier_gc.round_pause_ms: {} is more than 60000",
                self.round_pause_ms
            ));
        }
        Ok(())
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CollectionReport {
    /// Records the store listed.
    pub examined: usize,
    /// Records deleted.
    pub collected: usize,
    /// Old records kept: in doubt, unreadable, not of a UUIDv7 transaction, or their
    /// branch busy with a call.
    pub kept: usize,
    /// The pass reached its end; the next round starts a new one.
    pub pass_done: bool,
}

/// Collects one barrier's old final records; see the module docs.
#[derive(Debug)]
pub struct BarrierCollector<S: BarrierStore = DurableStore> {
    barrier: Arc<Barrier<S>>,
    options: BarrierGcOptions,
    /// Where the pass continues, and the cutoff it collects below.
    cursor: Option<BranchKey>,
    cutoff_unix_ms: u64,
}

impl<S: BarrierStore> BarrierCollector<S> {
    /// Collects with the barrier's own retention (`options.retention_ms` is for the
    /// barrier; see [`Barrier::with_retention_ms`]). Refuses `options` that
    /// [`BarrierGcOptions::validate`] refuses, with its message.
    pub fn new(barrier: Arc<Barrier<S>>, options: BarrierGcOptions) -> Result<Self, String> {
        options.validate()?;
        Ok(Self {
            barrier,
            options,
            cursor: None,
            cutoff_unix_ms: 0,
        })
    }

    /// Runs rounds until `stop` becomes true (or its sender is dropped).
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let pause_ms = match self.round().await {
                Ok(report) => {
                    if report.collected > 0 {
                        tracing::debug!(?report, "barrier records collected");
                    }
                    if report.pass_done {
                        self.options.interval_ms
                    } else {
                        self.options.round_pause_ms
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "barrier garbage collection failed; trying again later");
                    self.cursor = None;
                    self.options.interval_ms
                }
            };
            if *stop.borrow() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(pause_ms)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Examines the next page of old records and deletes the final ones. It waits for
    /// no branch's lock: a branch busy with a call keeps its record until a later pass
    /// (a committed saga step is final, yet its compensation runs user code under the
    /// lock, and user code that does not end would hold the collection for as long).
    pub async fn round(&mut self) -> Result<CollectionReport, BarrierError> {
        if let Some(message) = self.barrier.store().failure() {
            return Err(StoreError::Failed(message).into());
        }
        if self.cursor.is_none() {
            self.cutoff_unix_ms = self.barrier.retention_cutoff_unix_ms();
            self.barrier.collecting_below(self.cutoff_unix_ms);
        }
        let limit = self.options.max_records_per_round.max(1);
        let page = self.list(limit).await?;
        let mut report = CollectionReport {
            examined: page.len(),
            pass_done: page.len() < limit,
            ..CollectionReport::default()
        };
        self.cursor = if report.pass_done {
            None
        } else {
            page.last().map(|(key, _)| key.clone())
        };
        let mut candidates = Vec::new();
        for (key, bytes) in page {
            if self.collectable(&key, &bytes) {
                candidates.push(key);
            } else {
                report.kept += 1;
            }
        }
        // Read again under each branch's lock, and hold the locks until the records are
        // gone: a record deleted is final when it goes.
        let mut guards = Vec::with_capacity(candidates.len());
        let mut doomed = Vec::with_capacity(candidates.len());
        for key in candidates {
            let branch = BranchContext::new(key.transaction_id.clone(), key.branch_id.clone());
            let Some(guard) = self.barrier.locks.try_lock(lock_key(&branch)) else {
                report.kept += 1;
                continue;
            };
            match self.barrier.record(&branch) {
                Ok(Some(record)) if record.status.is_final() => {
                    guards.push(guard);
                    doomed.push(key);
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(txn_id = %key.transaction_id, branch_id = %key.branch_id, %error, "barrier record kept: unreadable");
                    report.kept += 1;
                }
            }
        }
        report.collected = doomed.len();
        if !doomed.is_empty() {
            self.barrier.store().remove(doomed).await?;
            self.barrier
                .metrics()
                .barrier_records_collected(report.collected as u64);
        }
        drop(guards);
        Ok(report)
    }

    /// The next page of records below the cutoff, read on a blocking thread.
    async fn list(&self, limit: usize) -> Result<Vec<(BranchKey, Vec<u8>)>, BarrierError> {
        let store = self.barrier.store().clone();
        let cursor = self.cursor.clone();
        let bound = first_transaction_id_at(self.cutoff_unix_ms);
        let listed = tokio::task::spawn_blocking(move || {
            store.records_before(cursor.as_ref(), &bound, limit)
        })
        .await
        .map_err(|e| StoreError::Read(format!("listing barrier records: {e}")))?;
        Ok(listed?)
    }

    /// A record of a final branch whose transaction was created before the cutoff.
    fn collectable(&self, key: &BranchKey, bytes: &[u8]) -> bool {
        let old = transaction_created_unix_ms(&key.transaction_id)
            .is_some_and(|created| created < self.cutoff_unix_ms);
        old && decode(key, bytes).is_ok_and(|record| record.status.is_final())
    }
}
