//! Retention of what the example services keep per transaction, so that their disks stay
//! bounded like the barrier's: the bank's journal and memos, the rewards journal, and the
//! shop's per-order records.
//!
//! What is old is measured as the barrier measures it: from the transaction's creation,
//! read from its UUIDv7 id ([`treaty_sdk::transaction_age`]); entries of ids with no age
//! are kept. Deletion runs in the background in bounded rounds ([`prune_periodically`]),
//! each under the service's own lock and in one atomic write with whatever it folds into
//! running totals (the shop keeps its audit's sums that way).
//!
//! Invariant: `journal_retention_ms` is at least `barrier_retention_ms`. A shop service
//! still needs an order's record for as long as a compensation of it may come (the
//! refund looks the charge up), and that is as long as the barrier keeps the branch's
//! record; checked at start.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use treaty_sdk::ParticipantError;
use treaty_sdk::barrier::DEFAULT_RETENTION_MS;
use treaty_sdk::transaction_age::transaction_created_unix_ms;

/// Journal entries and per-order records are kept 30 days by default: audits look back
/// further than the barrier needs to.
pub const DEFAULT_JOURNAL_RETENTION_MS: u64 = 30 * 24 * 3_600_000;
/// Most entries one pruning round examines.
pub const PRUNE_BATCH: usize = 1_000;

/// The retention flags every example service takes.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct RetentionArgs {
    /// Keep the barrier's records of final branches this long after their transaction was
    /// created: at least the coordinator's --delivery-horizon-ms plus the worst clock skew.
    #[arg(long, default_value_t = DEFAULT_RETENTION_MS)]
    pub barrier_retention_ms: u64,
    /// Delete journal entries, memos and per-order records of transactions created longer
    /// ago than this (the shop folds them into its totals first). At least
    /// --barrier-retention-ms.
    #[arg(long, default_value_t = DEFAULT_JOURNAL_RETENTION_MS)]
    pub journal_retention_ms: u64,
}

impl Default for RetentionArgs {
    fn default() -> Self {
        Self {
            barrier_retention_ms: DEFAULT_RETENTION_MS,
            journal_retention_ms: DEFAULT_JOURNAL_RETENTION_MS,
        }
    }
}

impl RetentionArgs {
    pub fn validate(&self) -> Result<(), String> {
        if self.barrier_retention_ms == 0 {
            return Err("--barrier-retention-ms must be at least 1".into());
        }
        if self.journal_retention_ms < self.barrier_retention_ms {
            return Err(format!(
                "--journal-retention-ms ({}) must be at least --barrier-retention-ms ({}): a \
                 compensation may need an order's record as long as the barrier keeps its branch",
                self.journal_retention_ms, self.barrier_retention_ms
            ));
        }
        Ok(())
    }

    /// How often pruning rounds start: a tenth of the retention, 100 ms to 60 s.
    pub fn prune_interval(&self) -> Duration {
        Duration::from_millis((self.journal_retention_ms / 10).clamp(100, 60_000))
    }
}

/// Whether an entry of `transaction_id` is older than `cutoff_unix_ms` (ids with no age
/// never are).
pub fn created_before(transaction_id: &str, cutoff_unix_ms: u64) -> bool {
    transaction_created_unix_ms(transaction_id).is_some_and(|created| created < cutoff_unix_ms)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a pruning round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneRound {
    /// Entries deleted.
    pub pruned: usize,
    /// The round stopped at its batch limit: more may follow at once.
    pub more: bool,
}

/// A service whose per-transaction entries can be pruned.
pub trait Prune: Send + Sync + 'static {
    /// Deletes the entries of transactions created before `cutoff_unix_ms` among the
    /// next `limit` it examines, continuing where the last round stopped.
    fn prune_round(
        &self,
        cutoff_unix_ms: u64,
        limit: usize,
    ) -> impl Future<Output = Result<PruneRound, ParticipantError>> + Send;
}

/// Prunes `target` for ever: rounds of [`PRUNE_BATCH`] back to back while there is more,
/// then one every `retention.prune_interval()`. A failure is logged and tried again.
pub async fn prune_periodically<P: Prune>(target: Arc<P>, retention: RetentionArgs) {
    loop {
        let cutoff = now_unix_ms().saturating_sub(retention.journal_retention_ms);
        let pause = match target.prune_round(cutoff, PRUNE_BATCH).await {
            Ok(round) if round.more => Duration::from_millis(10),
            Ok(_) => retention.prune_interval(),
            Err(error) => {
                tracing::warn!(%error, "pruning old journal entries failed; trying again later");
                retention.prune_interval()
            }
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_outlives_the_barrier() {
        assert!(RetentionArgs::default().validate().is_ok());
        let short = RetentionArgs {
            barrier_retention_ms: 1_000,
            journal_retention_ms: 999,
        };
        assert!(
            short
                .validate()
                .unwrap_err()
                .contains("--journal-retention-ms")
        );
    }
}
