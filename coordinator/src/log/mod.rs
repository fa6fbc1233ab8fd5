//! The decision log: where the coordinator keeps what it must not forget.
//!
//! Presumed abort keeps it small: a two-phase commit is written once when its commit
//! decision is taken (forced) and once when every participant has acknowledged (lazy);
//! with parallel commit, its intent is forced alongside its prepares, then its decision
//! (lazy, or forced for an abort) and its end (lazy) follow. Other aborts are never
//! written; one-phase and read-only commits once, forced, when concluded (and history
//! records lazily, if kept). After a restart, the records whose state is not final are
//! the coordinator's unfinished work.
//!
//! Any error from a log is fatal to the coordinator: it stops acknowledging anything,
//! shuts down, and recovers from the log on the next start.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::model::{TxnId, TxnRecord, UnixMs};

mod finished;
pub mod memory;
pub mod sled_log;
#[cfg(test)]
pub(crate) mod suite;
pub mod verify;

pub use memory::MemoryLog;
pub use sled_log::SledLog;
pub use treaty_sdk::durable::Durability;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("decision log storage: {0}")]
    Store(#[from] treaty_sdk::durable::StoreError),
    #[error("decision log record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error("the decision log is closed")]
    Closed,
    #[error("the record of {id} needs {bytes} bytes even without its history")]
    TooLarge { id: String, bytes: usize },
}

/// Whether a final record stays for the whole log retention even beyond the count the
/// memory budget sets ([`DecisionLog::purge_finished_beyond`]), because someone may still
/// rely on it then: a saga's idempotency key answers a resubmit for as long as its record
/// is kept, a branch an operator resolved may still be in doubt at its participant,
/// which asks the coordinator for the outcome when it comes back (presumed abort would
/// answer ABORT without the record), and a heuristic outcome is what an operator reads
/// (`treaty txn report`) and settles.
pub fn held_for_retention(record: &TxnRecord) -> bool {
    record.idempotency_key.is_some()
        || record
            .branches
            .iter()
            .any(|b| b.resolution.is_some() || b.heuristic.is_some())
}

/// Resolves when a [`DecisionLog::write`] is done (see its contract).
pub type LogWrite = Pin<Box<dyn Future<Output = Result<(), LogError>> + Send>>;

/// Resolves with the reason once a [`DecisionLog`] has failed (see [`DecisionLog::failed`]).
pub type LogFailed = Pin<Box<dyn Future<Output = String> + Send>>;

/// Durable storage of transaction records.
///
/// Contract, for every implementation:
/// - `write(record, Forced)`: when the future resolves `Ok`, the record survives a crash
///   of the process (and, as far as the disk honours fdatasync, of the machine). Until it
///   resolves `Ok`, nothing derived from the record may be reported to anyone.
/// - `write(record, Lazy)`: resolves once the record is applied; it reaches the disk at
///   the latest with the next forced write.
/// - Writes are applied in the order `write` is called (not the order the futures are
///   polled): a lazy write issued after a forced one never lands before it.
/// - `write` queues the write before it returns: its future only reports the outcome,
///   and dropping it unpolled does not cancel the write. A write that fails after
///   `write` returned makes [`failed`](DecisionLog::failed) resolve, so a caller that
///   needs nothing from a lazy write may drop its future and watch `failed` instead.
/// - A record replaces any earlier record of the same transaction. An implementation may
///   drop its oldest history (attempts, transitions) to keep it small; the protocol's
///   fields (states, decisions, definitions) are kept as written.
/// - After an `Err` from any method, the log may refuse everything that follows.
pub trait DecisionLog: Send + Sync + fmt::Debug + 'static {
    fn write(&self, record: &TxnRecord, durability: Durability) -> LogWrite;

    /// Resolves with the reason once the log has failed: a write failed after `write`
    /// returned, and the log refuses every write from then on. Never resolves for a log
    /// whose writes can only fail within `write` itself (the default).
    fn failed(&self) -> LogFailed {
        Box::pin(std::future::pending())
    }

    /// Writes issued so far (counted once `write` or `forget` has queued them). A log
    /// whose writes are applied within `write` keeps the defaults of this and
    /// [`writes_applied`](Self::writes_applied).
    fn writes_queued(&self) -> u64 {
        0
    }

    /// Writes applied so far, in the order they were issued: once this reaches a count
    /// [`writes_queued`](Self::writes_queued) returned, [`get`](Self::get) sees every
    /// write issued before that reading.
    fn writes_applied(&self) -> u64 {
        0
    }

    /// The record of `id`, as last written (durable or not: see `DurableStore::db`).
    fn get(&self, id: &TxnId) -> Result<Option<TxnRecord>, LogError>;

    /// The saga submitted with this idempotency key, if its record is still kept.
    fn find_by_key(&self, key: &str) -> Result<Option<TxnId>, LogError>;

    /// Every record whose state is not final, in id order: the work to resume at start.
    fn unfinished(&self) -> Result<Vec<TxnRecord>, LogError>;

    /// Up to `limit` records with ids greater than `after`, in id order.
    fn scan(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnRecord>, LogError>;

    /// As [`scan`](Self::scan), stopping also before the records' stored bytes would
    /// pass `max_bytes` (the first record is always read); with whether it stopped
    /// early (at `limit` or at `max_bytes`), so that the records after the last one read
    /// may still be there. A log that keeps no stored bytes bounds by `limit` alone (the
    /// default).
    fn scan_bounded(
        &self,
        after: Option<TxnId>,
        limit: usize,
        _max_bytes: usize,
    ) -> Result<(Vec<TxnRecord>, bool), LogError> {
        let records = self.scan(after, limit)?;
        let stopped_early = records.len() >= limit;
        Ok((records, stopped_early))
    }

    /// Deletes up to `max` final records that ended before `cutoff_unix_ms`, oldest
    /// first; returns how many. Unfinished records are never deleted.
    fn purge_ended_before(&self, cutoff_unix_ms: UnixMs, max: usize) -> Result<usize, LogError>;

    /// How many final records the log keeps that [`held_for_retention`] does not hold.
    /// Never fewer than it holds; an implementation that counts may count more (see
    /// `finished.rs` for `SledLog`), and then purges early, never late.
    fn finished_count(&self) -> u64;

    /// What all the log's files take on disk (`None`: it keeps no files); for
    /// `SledLog`, its store's [`files_on_disk_bytes`](treaty_sdk::durable::DurableStore::files_on_disk_bytes).
    /// Reads the filesystem: call it off the async runtime's threads.
    fn files_on_disk_bytes(&self) -> Option<u64> {
        None
    }

    /// Deletes up to `max` final records, oldest (by end) first, while more than `keep`
    /// are counted; returns how many. Unfinished records, and final ones
    /// [`held_for_retention`] holds, are never deleted by it.
    fn purge_finished_beyond(&self, keep: u64, max: usize) -> Result<usize, LogError>;

    /// Deletes `record`'s transaction and its index entries, durably, after every write
    /// issued before (an operator's `forget`; the runtime only forgets final
    /// transactions). The keys come from `record`, not from what the log has applied, so
    /// that a write still queued cannot bring the transaction back. Nothing to delete
    /// is Ok. The caller writes no record of the transaction after forgetting it.
    fn forget(&self, record: &TxnRecord) -> LogWrite;

    /// Makes every write issued so far durable and refuses later ones.
    fn close(&self) -> Result<(), LogError>;
}
