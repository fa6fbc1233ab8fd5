//! The final transactions a shard keeps in memory, oldest first, and which of them to
//! drop: those past `memory_retention_ms`, then the oldest while more than
//! `max_retained_transactions` are kept or their estimated bytes exceed the shard's share
//! of the memory budget (whichever limit is reached first).
//!
//! A dropped transaction leaves memory only: its record stays in the log (a two-phase
//! commit's history and a saga's are written there), and lookups that miss memory ask
//! the log, as they always have for transactions past their memory retention.
//!
//! Invariants: `bytes` is the sum of the estimates of the entries kept; entries are in
//! the order their transactions ended; every limit is at least one entry, so the
//! latest final transaction is kept until it expires; nothing leaves memory before the
//! log has applied every write issued up to its end, whatever the limit, so that a
//! transaction whose last records are written lazily (a parallel commit's decision and
//! end) is never read back from the log without them; and the byte limit drops nothing
//! that ended less than [`MIN_KEPT_MS`] ago (the memory governor can take it to zero:
//! `memory.rs`).

use std::collections::VecDeque;

use crate::model::{TxnId, UnixMs};

/// How long a final transaction stays in memory at least, whatever its bytes, so that
/// a coordinator short of memory does not send every lookup of what just ended to the
/// log.
pub(super) const MIN_KEPT_MS: u64 = 1_000;

/// When final transactions leave memory, for one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RetainLimits {
    pub retention_ms: u64,
    pub max_transactions: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kept {
    ended_unix_ms: UnixMs,
    id: TxnId,
    estimated_bytes: usize,
    /// The log's count of writes issued when the transaction ended: it leaves memory
    /// only once the log has applied that many.
    writes_issued: u64,
}

#[derive(Debug, Default)]
pub(super) struct Retained {
    kept: VecDeque<Kept>,
    bytes: usize,
}

impl Retained {
    /// What one entry of the queue takes (for the estimate of a retained transaction).
    pub(super) const ENTRY_BYTES: usize = std::mem::size_of::<Kept>();

    /// A transaction that became final at `ended_unix_ms`, holding `estimated_bytes`,
    /// once the log had been given `writes_issued` writes (its final ones among them).
    pub(super) fn push(
        &mut self,
        ended_unix_ms: UnixMs,
        id: TxnId,
        estimated_bytes: usize,
        writes_issued: u64,
    ) {
        self.kept.push_back(Kept {
            ended_unix_ms,
            id,
            estimated_bytes,
            writes_issued,
        });
        self.bytes += estimated_bytes;
    }

    /// Stops counting a transaction dropped from memory by other means (an operator's
    /// forget). Linear in the entries kept: operators' requests are rare.
    pub(super) fn remove(&mut self, id: TxnId) {
        if let Some(at) = self.kept.iter().position(|k| k.id == id) {
            if let Some(kept) = self.kept.remove(at) {
                self.bytes -= kept.estimated_bytes;
            }
        }
    }

    /// Takes out, oldest first, the entries to drop from memory now, with the log
    /// having applied `writes_applied` writes; their ids are passed to `drop`.
    pub(super) fn evict(
        &mut self,
        now: UnixMs,
        limits: RetainLimits,
        writes_applied: u64,
        mut drop: impl FnMut(TxnId),
    ) {
        let max_transactions = limits.max_transactions.max(1);
        while let Some(&oldest) = self.kept.front() {
            // Entries are pushed in order, with counts that never fall: none after this
            // one is further along in the log either.
            if oldest.writes_issued > writes_applied {
                break;
            }
            let expired = now.saturating_sub(oldest.ended_unix_ms) >= limits.retention_ms;
            let too_many = self.kept.len() > max_transactions;
            // The latest one stays whatever its size: a limit below one transaction
            // would keep nothing.
            let too_big = self.bytes > limits.max_bytes
                && self.kept.len() > 1
                && now.saturating_sub(oldest.ended_unix_ms) >= MIN_KEPT_MS;
            if !(expired || too_many || too_big) {
                break;
            }
            self.kept.pop_front();
            self.bytes -= oldest.estimated_bytes;
            drop(oldest.id);
        }
    }

    pub(super) fn len(&self) -> usize {
        self.kept.len()
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<TxnId> {
        let mut ids: Vec<TxnId> = (0..n).map(|i| TxnId::generate(i as u64 + 1)).collect();
        ids.sort();
        ids
    }

    const LONG: u64 = 1_000_000;

    fn limits(max_transactions: usize, max_bytes: usize) -> RetainLimits {
        RetainLimits {
            retention_ms: LONG,
            max_transactions,
            max_bytes,
        }
    }

    fn evicted(retained: &mut Retained, now: UnixMs, limits: RetainLimits) -> Vec<TxnId> {
        let mut dropped = Vec::new();
        retained.evict(now, limits, u64::MAX, |id| dropped.push(id));
        dropped
    }

    /// Whatever limit it is past, a transaction stays until the log has applied the
    /// writes issued up to its end; those after it wait behind it.
    #[test]
    fn nothing_leaves_before_the_log_has_applied_its_end() {
        let ids = ids(3);
        let mut retained = Retained::default();
        for (i, id) in ids.iter().enumerate() {
            retained.push(1, *id, 1_000, 10 * (i as u64 + 1));
        }
        let past_every_limit = RetainLimits {
            retention_ms: 0,
            max_transactions: 1,
            max_bytes: 0,
        };
        let mut evict = |applied| {
            let mut dropped = Vec::new();
            retained.evict(LONG, past_every_limit, applied, |id| dropped.push(id));
            dropped
        };
        assert_eq!(evict(9), Vec::<TxnId>::new());
        assert_eq!(evict(25), ids[..2].to_vec());
        assert_eq!(evict(30), ids[2..].to_vec());
    }

    #[test]
    fn over_the_byte_share_the_oldest_go_first_until_it_fits() {
        let ids = ids(10);
        let mut retained = Retained::default();
        for (i, id) in ids.iter().enumerate() {
            retained.push(i as u64, *id, 1_000, 0);
        }
        assert_eq!(retained.bytes(), 10_000);
        // 4,500 bytes allowed: 4 entries of 1,000 fit, the 6 oldest go.
        let dropped = evicted(&mut retained, MIN_KEPT_MS + 10, limits(100, 4_500));
        assert_eq!(dropped, ids[..6].to_vec());
        assert_eq!(retained.len(), 4);
        assert_eq!(retained.bytes(), 4_000);
        // Exactly at the share: nothing more goes.
        let dropped = evicted(&mut retained, MIN_KEPT_MS + 10, limits(100, 4_000));
        assert!(dropped.is_empty());
        assert_eq!(retained.len(), 4);
    }

    #[test]
    fn sizes_differ_and_the_estimate_of_each_is_what_counts() {
        let ids = ids(4);
        let mut retained = Retained::default();
        for (id, bytes) in ids.iter().zip([5_000, 100, 100, 100]) {
            retained.push(1, *id, bytes, 0);
        }
        // One big old entry alone is over: dropping it is enough.
        let dropped = evicted(&mut retained, MIN_KEPT_MS + 2, limits(100, 1_000));
        assert_eq!(dropped, vec![ids[0]]);
        assert_eq!(retained.bytes(), 300);
        assert_eq!(retained.len(), 3);
    }

    #[test]
    fn whichever_limit_is_reached_first_applies() {
        let ids = ids(10);
        let mut retained = Retained::default();
        for id in &ids {
            retained.push(1, *id, 100, 0);
        }
        // The count cap (3) is tighter than the bytes (10,000).
        assert_eq!(
            evicted(&mut retained, MIN_KEPT_MS + 2, limits(3, 10_000)),
            ids[..7]
        );
        // The bytes (150) are tighter than the count (3).
        assert_eq!(
            evicted(&mut retained, MIN_KEPT_MS + 2, limits(3, 150)),
            ids[7..9]
        );
        assert_eq!(retained.len(), 1);
        assert_eq!(retained.bytes(), 100);
    }

    #[test]
    fn the_latest_stays_even_if_alone_it_is_over_the_share() {
        let ids = ids(2);
        let mut retained = Retained::default();
        retained.push(1, ids[0], 10_000, 0);
        retained.push(1, ids[1], 10_000, 0);
        assert_eq!(
            evicted(&mut retained, MIN_KEPT_MS + 2, limits(100, 1)),
            vec![ids[0]]
        );
        assert_eq!(retained.len(), 1);
        assert!(evicted(&mut retained, MIN_KEPT_MS + 2, limits(100, 1)).is_empty());
    }

    #[test]
    fn the_byte_share_drops_nothing_that_ended_within_the_minimum() {
        let ids = ids(3);
        let mut retained = Retained::default();
        retained.push(1_000, ids[0], 1_000, 0);
        retained.push(1_500, ids[1], 1_000, 0);
        retained.push(2_000, ids[2], 1_000, 0);
        let nothing_fits = limits(100, 0);
        // At 1,999 every one ended less than a second ago.
        assert!(evicted(&mut retained, 1_000 + MIN_KEPT_MS - 1, nothing_fits).is_empty());
        assert_eq!(retained.len(), 3);
        // Then they go as they come of age, the latest staying.
        assert_eq!(
            evicted(&mut retained, 1_000 + MIN_KEPT_MS, nothing_fits),
            ids[..1]
        );
        assert_eq!(
            evicted(&mut retained, 2_000 + MIN_KEPT_MS, nothing_fits),
            ids[1..2]
        );
        assert_eq!(retained.len(), 1);
    }

    #[test]
    fn past_the_retention_they_go_whatever_the_room() {
        let ids = ids(3);
        let mut retained = Retained::default();
        retained.push(100, ids[0], 10, 0);
        retained.push(200, ids[1], 10, 0);
        retained.push(300, ids[2], 10, 0);
        let by_time = RetainLimits {
            retention_ms: 150,
            max_transactions: 100,
            max_bytes: 1_000_000,
        };
        assert_eq!(evicted(&mut retained, 350, by_time), ids[..2]);
        assert_eq!(evicted(&mut retained, 449, by_time), Vec::<TxnId>::new());
        assert_eq!(evicted(&mut retained, 450, by_time), ids[2..]);
        assert_eq!(retained.bytes(), 0);
    }

    #[test]
    fn a_forgotten_transaction_stops_counting() {
        let ids = ids(3);
        let mut retained = Retained::default();
        for id in &ids {
            retained.push(1, *id, 100, 0);
        }
        retained.remove(ids[1]);
        retained.remove(ids[1]);
        assert_eq!(retained.len(), 2);
        assert_eq!(retained.bytes(), 200);
        assert_eq!(evicted(&mut retained, 2, limits(1, 10_000)), vec![ids[0]]);
    }
}
