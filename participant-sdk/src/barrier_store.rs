//! Where the barrier keeps its records: the [`BarrierStore`] trait, and its
//! implementation on the SDK's own [`DurableStore`] (sled).
//!
//! A participant whose data lives in another database implements the trait there, so
//! that the barrier's record of an operation is written in the same local transaction as
//! the operation's effect ([`crate::BranchContext::take_barrier_write`]): that is what
//! makes effects exactly-once across crashes. `examples/src/rewards.rs` does it for
//! SQLite.
//!
//! What an implementation must guarantee:
//! - `save` returns Ok only once the write is durable (it survives a crash of the
//!   process or the machine), with the record and its in-doubt mark applied together;
//! - `save_unforced` may return before its write is durable, but once it returns `load`
//!   and `in_doubt` see it, and writes reach the disk in the order they were made: a
//!   later `save` makes it durable too, and a crash keeps a prefix of the writes (the
//!   default makes it a `save`);
//! - `save_phase_two` returns Ok only once the write is durable, like `save`; it may wait
//!   a short, bounded while to share a later write's sync (the default makes it a `save`);
//! - `load` returns what the last durable write for the branch held, whether `save` or the
//!   participant's own transaction made it;
//! - `in_doubt` lists the branches whose last write was marked in doubt, in an order of the
//!   store's choosing that does not change, strictly after `after` in that order;
//! - once a write failed, `failure` says so: a record the store shows may then not be
//!   durable, so the barrier answers nothing from it and runs no user code;
//! - `records_before` lists, in pages, every record whose transaction id sorts bytewise
//!   below a bound, in an order of the store's choosing that does not change, strictly
//!   after `after` in that order (it may list others too: the barrier checks each), and
//!   `remove` deletes records with their in-doubt marks. The barrier's garbage collector
//!   ([`crate::barrier_gc`]) uses them to delete the records of final branches past the
//!   retention; a store where they do nothing keeps every record for ever.
//!
//! The SDK's own store writes only the records (`b/<transaction>/<branch>`). It keeps
//! its in-doubt marks in memory (`DurableStore::marked`), changed with each batch that
//! carries a record, and rebuilds them at its first listing after an open, or at the
//! count `serve` makes when it starts with metrics on, whichever comes first, by
//! reading every record's mode and status: a branch is in doubt exactly when its record
//! says it voted YES in a two-phase or one-phase commit and has no outcome
//! (`barrier::is_in_doubt`), so the marks cannot disagree with the records after a
//! crash. That read covers the whole store (about a second per million records
//! measured here; writes go on meanwhile, and the resolver lists from a blocking
//! thread), and a record whose format or mode and status it cannot decode fails it and
//! every later listing until the store is opened again: a damaged record might be one
//! in doubt. (The rest of a record is decoded when its branch is listed.) The marks an
//! older version kept on disk (`d/<transaction>/<branch>`) are removed then.
//! Keeping them off the disk saved a sled insert and a remove per two-phase branch,
//! and a remove per saga step (docs/PERFORMANCE.md, "The participants' in-doubt marks
//! in memory, and the coordinator's unfinished index gone").

use std::future::Future;
use std::sync::Arc;

use crate::durable::{Durability, DurableStore, StoreError, WriteBatch};

mod conformance;
pub use conformance::check_conformance;

/// Which branch of which transaction.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BranchKey {
    pub transaction_id: String,
    pub branch_id: String,
}

/// The barrier's write for one branch: its record (opaque bytes, to be kept as they are)
/// and whether the branch is now in doubt (it voted YES in a two-phase or one-phase
/// commit and has no outcome yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarrierWrite {
    pub key: BranchKey,
    pub record: Vec<u8>,
    pub in_doubt: bool,
}

/// Durable storage for the barrier's records (see the module docs for the contract).
pub trait BarrierStore: Send + Sync + 'static {
    /// The record last written for `key`.
    fn load(&self, key: &BranchKey) -> Result<Option<Vec<u8>>, StoreError>;

    /// Writes `write` and resolves once it is durable.
    fn save(&self, write: BarrierWrite) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Writes `write`, perhaps not yet durably: for a record nobody hears of before a
    /// later `save` of the same branch (the YES of a one-phase commit or a saga step,
    /// which its commit's record follows; only with
    /// [`Barrier::with_unforced_one_phase_yes`](crate::barrier::Barrier::with_unforced_one_phase_yes)).
    /// Once it resolves, `load` and `in_doubt` see the write; writes must reach the disk
    /// in the order they were made. A store that cannot promise it keeps this default,
    /// a forced write.
    fn save_unforced(
        &self,
        write: BarrierWrite,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.save(write)
    }

    /// Writes `write` and resolves once it is durable, as `save` does, for the record of
    /// a two-phase commit's phase 2: only the coordinator's bookkeeping waits for that
    /// answer, so a store may make it durable with the sync of a write that follows
    /// shortly (the next transaction's YES) instead of a sync of its own, as long as
    /// the wait is short and bounded. A store that cannot keeps this default, `save`.
    fn save_phase_two(
        &self,
        write: BarrierWrite,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.save(write)
    }

    /// Up to `limit` branches marked in doubt, after `after` (`None`: from the start).
    fn in_doubt(
        &self,
        after: Option<&BranchKey>,
        limit: usize,
    ) -> Result<Vec<BranchKey>, StoreError>;

    /// Up to `limit` records (key and bytes) whose transaction id sorts bytewise below
    /// `before_transaction_id`, after `after` (`None`: from the start) in the store's
    /// order. Every such record of a canonical UUIDv7 transaction must come up in a pass
    /// over the pages; records of other ids may come up too.
    fn records_before(
        &self,
        after: Option<&BranchKey>,
        before_transaction_id: &str,
        limit: usize,
    ) -> Result<Vec<(BranchKey, Vec<u8>)>, StoreError>;

    /// Deletes these records and their in-doubt marks; resolves once applied. It need not
    /// be durable when it resolves: a removal lost in a crash is simply done again.
    fn remove(&self, keys: Vec<BranchKey>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// How many records the store holds. Called once, when [`crate::serve`] starts with
    /// metrics on, from a blocking thread (see [`crate::metrics`]). The default pages
    /// through [`records_before`](Self::records_before) with a bound above every valid
    /// transaction id; a store with a cheaper count (`SELECT COUNT(*)`) should say so.
    fn count_records(&self) -> Result<u64, StoreError> {
        const PAGE: usize = 1_000;
        let mut count = 0u64;
        let mut cursor: Option<BranchKey> = None;
        loop {
            let page = self.records_before(cursor.as_ref(), ABOVE_EVERY_ID, PAGE)?;
            count += page.len() as u64;
            if page.len() < PAGE {
                return Ok(count);
            }
            cursor = page.into_iter().next_back().map(|(key, _)| key);
        }
    }

    /// What the store has made durable since it opened, for the server's metrics
    /// (`treaty_participant_store_fsyncs_total`, `..._store_forced_records_total`,
    /// `..._store_fsync_seconds_total`); `None` (the default) for a store that does not
    /// count.
    fn durability_counters(&self) -> Option<Arc<crate::durable::DurabilityCounters>> {
        None
    }

    /// Why the store can no longer promise durability, if it cannot.
    fn failure(&self) -> Option<String> {
        None
    }

    /// Resolves with the reason once the store has failed (never, by default).
    fn failed(&self) -> impl Future<Output = String> + Send {
        std::future::pending()
    }

    /// Makes everything written durable and releases the store; called once, when the
    /// server stops, from a blocking thread.
    fn close(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// For logs: where the records are.
    fn describe(&self) -> String;

    /// Whether [`crate::BranchContext::include_barrier_record`] may put the record into
    /// a [`WriteBatch`] of this store. Only the SDK's own store says yes.
    fn takes_write_batches(&self) -> bool {
        false
    }
}

/// Sorts above every id [`crate::limits::check_id`] accepts (letters, digits, `.:_-`).
const ABOVE_EVERY_ID: &str = "~";

const RECORD_PREFIX: &str = "b/";
/// Where the SDK's store kept its in-doubt marks before they moved to memory: a store
/// written by an older version may still hold some, removed at the first listing.
const OLD_IN_DOUBT_PREFIX: &str = "d/";

/// The SDK's own store keeps each record under `b/<transaction>/<branch>`. Ids cannot
/// contain `/` (see [`crate::limits::check_id`]). Participants keep their own data
/// under other keys, and not under `d/` either: older versions kept marks there.
fn record_key(key: &BranchKey) -> Vec<u8> {
    branch_key_bytes(RECORD_PREFIX, &key.transaction_id, &key.branch_id)
}

/// `<prefix><transaction>/<branch>`, built without the formatting machinery: every call
/// a participant serves builds two such keys (its lock's and its record's).
pub(crate) fn branch_key_bytes(prefix: &str, transaction_id: &str, branch_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + transaction_id.len() + 1 + branch_id.len());
    key.extend_from_slice(prefix.as_bytes());
    key.extend_from_slice(transaction_id.as_bytes());
    key.push(b'/');
    key.extend_from_slice(branch_id.as_bytes());
    key
}

/// The branch a `<prefix><transaction>/<branch>` key names.
fn parse_key(key: &[u8], prefix: &str) -> Result<BranchKey, StoreError> {
    let text = String::from_utf8_lossy(key.strip_prefix(prefix.as_bytes()).unwrap_or(key));
    let Some((transaction_id, branch_id)) = text.split_once('/') else {
        return Err(StoreError::Read(format!(
            "barrier key {prefix}{text:?} has no branch"
        )));
    };
    Ok(BranchKey {
        transaction_id: transaction_id.to_string(),
        branch_id: branch_id.to_string(),
    })
}

/// `write` as operations on the SDK's own store: the record, and the branch's mark in
/// the store's in-memory set of branches in doubt (see `DurableStore::marked`).
pub(crate) fn write_batch(write: &BarrierWrite) -> WriteBatch {
    let mut batch = WriteBatch::new();
    let key = record_key(&write.key);
    batch.insert(key.clone(), write.record.clone());
    if write.in_doubt {
        batch.mark(key);
    } else {
        batch.unmark(key);
    }
    batch
}

/// What the seed of the in-doubt marks reads from the SDK's own store.
struct ReadForSeed {
    /// The branches in doubt, read from their records.
    in_doubt: std::collections::BTreeSet<Vec<u8>>,
    /// The keys of marks an older version left on disk.
    old_marks: Vec<sled::IVec>,
    /// How many records were read.
    records: u64,
}

/// Reads every record's mode and status (`barrier::encoded_is_in_doubt`; the rest of a
/// record is not decoded, and its key is parsed only to name it in an error).
fn read_for_seed(db: &sled::Db) -> Result<ReadForSeed, StoreError> {
    let read = |e: sled::Error| StoreError::Read(e.to_string());
    let mut in_doubt = std::collections::BTreeSet::new();
    let mut records = 0;
    for entry in db.scan_prefix(RECORD_PREFIX.as_bytes()) {
        let (key, value) = entry.map_err(read)?;
        match crate::barrier::encoded_is_in_doubt(&value) {
            Ok(true) => {
                in_doubt.insert(key.to_vec());
            }
            Ok(false) => {}
            Err(message) => {
                let branch = parse_key(&key, RECORD_PREFIX)?;
                let corrupt = crate::barrier::corrupt_error(&branch, message);
                return Err(StoreError::Read(corrupt.to_string()));
            }
        }
        records += 1;
    }
    let old_marks = db
        .scan_prefix(OLD_IN_DOUBT_PREFIX.as_bytes())
        .keys()
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    Ok(ReadForSeed {
        in_doubt,
        old_marks,
        records,
    })
}

/// The SDK store's in-doubt listing (see `BarrierStore::in_doubt` below), and, when
/// this call is the one that seeded the marks, how many records the seed read.
fn list_in_doubt(
    store: &DurableStore,
    after: Option<&BranchKey>,
    limit: usize,
) -> Result<(Vec<BranchKey>, Option<u64>), StoreError> {
    let mut old_marks = Vec::new();
    let mut records_read = None;
    let after = after.map(record_key);
    let keys = store.marked(after.as_deref(), limit, |db| {
        let read = read_for_seed(db)?;
        old_marks = read.old_marks;
        records_read = Some(read.records);
        Ok(read.in_doubt)
    })?;
    if !old_marks.is_empty() {
        let mut batch = WriteBatch::new();
        for key in old_marks {
            batch.remove(key.to_vec());
        }
        // A failed write fails the store, which the barrier reports.
        drop(store.write(batch, Durability::Lazy));
    }
    let keys = keys
        .iter()
        .map(|key| parse_key(key, RECORD_PREFIX))
        .collect::<Result<_, _>>()?;
    Ok((keys, records_read))
}

impl BarrierStore for DurableStore {
    fn durability_counters(&self) -> Option<Arc<crate::durable::DurabilityCounters>> {
        Some(DurableStore::durability_counters(self))
    }

    fn load(&self, key: &BranchKey) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self
            .db()
            .get(record_key(key))
            .map_err(|e| StoreError::Read(e.to_string()))?;
        Ok(value.map(|bytes| bytes.to_vec()))
    }

    fn save(&self, write: BarrierWrite) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(write_batch(&write), Durability::Forced)
    }

    /// A lazy write: the store applies writes in order, so the next forced one covers it.
    fn save_unforced(
        &self,
        write: BarrierWrite,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(write_batch(&write), Durability::Lazy)
    }

    /// A patient write: durable before it resolves, synced with the next forced write
    /// or within [`StoreOptions::patient_sync_wait`](crate::durable::StoreOptions::patient_sync_wait).
    fn save_phase_two(
        &self,
        write: BarrierWrite,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.write(write_batch(&write), Durability::Patient)
    }

    /// Listed from memory. The first listing reads every record to find the branches in
    /// doubt, and removes the marks an older version kept on disk (a lazy write: one
    /// lost in a crash is made again by the next first listing).
    fn in_doubt(
        &self,
        after: Option<&BranchKey>,
        limit: usize,
    ) -> Result<Vec<BranchKey>, StoreError> {
        Ok(list_in_doubt(self, after, limit)?.0)
    }

    fn records_before(
        &self,
        after: Option<&BranchKey>,
        before_transaction_id: &str,
        limit: usize,
    ) -> Result<Vec<(BranchKey, Vec<u8>)>, StoreError> {
        let start = match after {
            Some(after) => {
                let mut start = record_key(after);
                start.push(0);
                start
            }
            None => RECORD_PREFIX.as_bytes().to_vec(),
        };
        // `b/<id>` sorts below `b/<bound>` exactly when the id sorts below the bound and is
        // not a prefix of it followed by a character below `/` (never a canonical UUID).
        let end = format!("{RECORD_PREFIX}{before_transaction_id}").into_bytes();
        if start >= end {
            return Ok(Vec::new());
        }
        let mut found = Vec::new();
        for entry in self.db().range(start..end).take(limit) {
            let (key, value) = entry.map_err(|e| StoreError::Read(e.to_string()))?;
            found.push((parse_key(&key, RECORD_PREFIX)?, value.to_vec()));
        }
        Ok(found)
    }

    fn remove(&self, keys: Vec<BranchKey>) -> impl Future<Output = Result<(), StoreError>> + Send {
        let mut batch = WriteBatch::new();
        for key in &keys {
            let key = record_key(key);
            batch.remove(key.clone());
            batch.unmark(key);
        }
        self.write(batch, Durability::Lazy)
    }

    /// Read in the pass that seeds the in-doubt marks when they are not seeded yet (at
    /// `serve`'s start they usually are not), so that a start reads the records once
    /// for both; that pass also queues the removal of an older version's `d/` marks, as
    /// the first listing does. A seed that fails, for any reason, is remembered and
    /// reported by the listings, as it would have been by the first one, and logged
    /// here; the records are then counted on their own, as they are once the marks are
    /// seeded.
    fn count_records(&self) -> Result<u64, StoreError> {
        match list_in_doubt(self, None, 0) {
            Ok((_, Some(records))) => return Ok(records),
            Ok((_, None)) => {}
            Err(error) => tracing::warn!(
                %error,
                "reading the barrier records for the branches in doubt failed; every in-doubt listing will report it"
            ),
        }
        let mut count = 0u64;
        for entry in self.db().scan_prefix(RECORD_PREFIX.as_bytes()) {
            entry.map_err(|e| StoreError::Read(e.to_string()))?;
            count += 1;
        }
        Ok(count)
    }

    fn failure(&self) -> Option<String> {
        DurableStore::failure(self)
    }

    fn failed(&self) -> impl Future<Output = String> + Send {
        DurableStore::failed(self)
    }

    fn close(&self) -> Result<(), StoreError> {
        DurableStore::close(self)
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }

    fn takes_write_batches(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
