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

/// Checks a store against the parts of the contract a test can see: records read back as
/// written and replaced by later writes; in-doubt marks listed, paged with a cursor, and
/// cleared; records listed below a transaction id bound, paged, and removed with their
/// marks (what the garbage collector needs). Run it in your tests on an empty store; it
/// writes branches of transactions named `conformance-*` and of UUIDv7 ids from 2023,
/// with barrier records whose status agrees with their mark, as the barrier's do.
pub async fn check_conformance<S: BarrierStore>(store: &S) -> Result<(), String> {
    let key = |txn: usize, branch: &str| BranchKey {
        transaction_id: format!("conformance-{txn}"),
        branch_id: branch.to_string(),
    };
    let write = |key: BranchKey, record: &[u8], in_doubt: bool| BarrierWrite {
        key,
        record: conformance_record(record, in_doubt),
        in_doubt,
    };
    let failed = |what: &str, e: StoreError| format!("{what}: {e}");
    let absent = store.load(&key(0, "a")).map_err(|e| failed("load", e))?;
    if absent.is_some() {
        return Err("a branch never written has a record".into());
    }
    store
        .save(write(key(0, "a"), b"first", true))
        .await
        .map_err(|e| failed("save", e))?;
    store
        .save(write(key(0, "a"), b"second", false))
        .await
        .map_err(|e| failed("save", e))?;
    match store.load(&key(0, "a")).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"second", false) => {}
        other => return Err(format!("after two writes, load gave {other:?}")),
    }
    if !store
        .in_doubt(None, 10)
        .map_err(|e| failed("in_doubt", e))?
        .is_empty()
    {
        return Err("a branch whose last write cleared the mark is still in doubt".into());
    }
    check_unforced(store).await?;
    let marked: Vec<BranchKey> = (1..=5).map(|txn| key(txn, "b")).collect();
    for branch in &marked {
        store
            .save(write(branch.clone(), b"prepared", true))
            .await
            .map_err(|e| failed("save", e))?;
    }
    let mut listed = Vec::new();
    let mut cursor: Option<BranchKey> = None;
    for _ in 0..marked.len() + 1 {
        let page = store
            .in_doubt(cursor.as_ref(), 2)
            .map_err(|e| failed("in_doubt", e))?;
        if page.len() > 2 {
            return Err(format!(
                "in_doubt gave {} branches for a limit of 2",
                page.len()
            ));
        }
        cursor = page.last().cloned();
        let done = page.len() < 2;
        listed.extend(page);
        if done {
            break;
        }
    }
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != listed.len() || sorted != marked {
        return Err(format!(
            "paging in_doubt listed {listed:?}, not each of {marked:?} once"
        ));
    }
    check_collection(store).await
}

/// An unforced write is seen at once (record and mark), and a later forced write of the
/// branch replaces it.
async fn check_unforced<S: BarrierStore>(store: &S) -> Result<(), String> {
    let failed = |what: &str, e: StoreError| format!("{what}: {e}");
    let key = BranchKey {
        transaction_id: "conformance-unforced".into(),
        branch_id: "u".into(),
    };
    let write = |record: &[u8], in_doubt: bool| BarrierWrite {
        key: key.clone(),
        record: conformance_record(record, in_doubt),
        in_doubt,
    };
    store
        .save_unforced(write(b"unforced", true))
        .await
        .map_err(|e| failed("save_unforced", e))?;
    match store.load(&key).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"unforced", true) => {}
        other => return Err(format!("after save_unforced, load gave {other:?}")),
    }
    let listed = store
        .in_doubt(None, 10)
        .map_err(|e| failed("in_doubt", e))?;
    if listed != [key.clone()] {
        return Err(format!(
            "after save_unforced with a mark, in_doubt listed {listed:?}"
        ));
    }
    store
        .save(write(b"settled", false))
        .await
        .map_err(|e| failed("save", e))?;
    match store.load(&key).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"settled", false) => {}
        other => return Err(format!("a save after save_unforced left {other:?}")),
    }
    if !store
        .in_doubt(None, 10)
        .map_err(|e| failed("in_doubt", e))?
        .is_empty()
    {
        return Err("a save clearing the mark left an unforced mark in doubt".into());
    }
    Ok(())
}

/// The part of [`check_conformance`] the garbage collector relies on.
async fn check_collection<S: BarrierStore>(store: &S) -> Result<(), String> {
    use crate::transaction_age::first_transaction_id_at;
    let failed = |what: &str, e: StoreError| format!("{what}: {e}");
    // November 2023: old UUIDv7 ids, one in doubt, and a young one at the bound.
    let at = 1_700_000_000_000;
    let old: Vec<BranchKey> = (0..5u64)
        .map(|i| BranchKey {
            transaction_id: first_transaction_id_at(at + i * 1_000),
            branch_id: format!("old-{i}"),
        })
        .collect();
    let bound = first_transaction_id_at(at + 60_000);
    let young = BranchKey {
        transaction_id: bound.clone(),
        branch_id: "young".into(),
    };
    for (index, key) in old.iter().chain([&young]).enumerate() {
        let write = BarrierWrite {
            key: key.clone(),
            record: conformance_record(format!("record-{index}").as_bytes(), index == 1),
            in_doubt: index == 1,
        };
        store.save(write).await.map_err(|e| failed("save", e))?;
    }
    let list_all = || -> Result<Vec<BranchKey>, String> {
        let mut listed = Vec::new();
        let mut cursor: Option<BranchKey> = None;
        for _ in 0..100 {
            let page = store
                .records_before(cursor.as_ref(), &bound, 2)
                .map_err(|e| failed("records_before", e))?;
            if page.len() > 2 {
                return Err(format!(
                    "records_before gave {} records for a limit of 2",
                    page.len()
                ));
            }
            cursor = page.last().map(|(key, _)| key.clone());
            let done = page.len() < 2;
            listed.extend(page.into_iter().map(|(key, _)| key));
            if done {
                return Ok(listed);
            }
        }
        Err("records_before kept giving full pages".into())
    };
    let listed = list_all()?;
    if listed.contains(&young) {
        return Err("records_before listed a record at its bound".into());
    }
    let mut old_listed: Vec<BranchKey> = listed
        .into_iter()
        .filter(|key| key.branch_id.starts_with("old-"))
        .collect();
    old_listed.sort();
    if old_listed != old {
        return Err(format!(
            "paging records_before listed {old_listed:?}, not each of {old:?} once"
        ));
    }
    store
        .remove(old.clone())
        .await
        .map_err(|e| failed("remove", e))?;
    for key in &old {
        if store.load(key).map_err(|e| failed("load", e))?.is_some() {
            return Err(format!("{key:?} still has a record after remove"));
        }
    }
    let in_doubt = store
        .in_doubt(None, 100)
        .map_err(|e| failed("in_doubt", e))?;
    if in_doubt.contains(&old[1]) {
        return Err("a removed branch is still listed in doubt".into());
    }
    if list_all()?.iter().any(|key| old.contains(key)) {
        return Err("records_before still lists removed records".into());
    }
    match store.load(&young).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"record-5", false) => Ok(()),
        other => Err(format!("a record not removed reads {other:?}")),
    }
}

/// A barrier record for the conformance check, told apart by `payload`: a two-phase
/// branch prepared (in doubt) or committed.
fn conformance_record(payload: &[u8], in_doubt: bool) -> Vec<u8> {
    use crate::barrier::{BranchMode, BranchStatus};
    let status = if in_doubt {
        BranchStatus::Prepared
    } else {
        BranchStatus::Committed
    };
    encoded_record(BranchMode::TwoPhase, status, payload)
}

/// A barrier record's bytes, with no coordinator and no time (for checks and tests).
fn encoded_record(
    mode: crate::barrier::BranchMode,
    status: crate::barrier::BranchStatus,
    payload: &[u8],
) -> Vec<u8> {
    crate::barrier::encode(&crate::barrier::BranchRecord {
        mode,
        status,
        payload: payload.to_vec(),
        coordinator_endpoint: String::new(),
        updated_unix_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::barrier::{BranchMode, BranchStatus};
    use crate::durable::StoreOptions;

    fn key(transaction_id: &str) -> BranchKey {
        BranchKey {
            transaction_id: transaction_id.into(),
            branch_id: "b".into(),
        }
    }

    #[test]
    fn branch_keys_name_their_branch_and_a_record_key_parses_back() {
        let branch = BranchKey {
            transaction_id: "0193a1b2-txn".into(),
            branch_id: "payment-1".into(),
        };
        let bytes = record_key(&branch);
        assert_eq!(bytes, b"b/0193a1b2-txn/payment-1");
        assert_eq!(parse_key(&bytes, RECORD_PREFIX).ok(), Some(branch));
        assert_eq!(branch_key_bytes("", "t", "b"), b"t/b");
    }

    fn record(mode: BranchMode, status: BranchStatus) -> Vec<u8> {
        encoded_record(mode, status, &[])
    }

    fn open(dir: &std::path::Path) -> DurableStore {
        DurableStore::open(dir, StoreOptions::default()).unwrap()
    }

    /// Writes each record (of branch "b" of the named transaction) as given, forced.
    async fn write_records(
        store: &DurableStore,
        records: impl IntoIterator<Item = (&'static str, Vec<u8>)>,
    ) {
        let mut batch = WriteBatch::new();
        for (txn, bytes) in records {
            batch.insert(record_key(&key(txn)), bytes);
        }
        store.write(batch, Durability::Forced).await.unwrap();
    }

    #[tokio::test]
    async fn after_a_reopen_the_branches_in_doubt_are_read_from_their_records_and_old_marks_go() {
        let dir = tempfile::tempdir().unwrap();
        {
            // Written as a version that kept its marks on disk did, with a stray mark
            // beside a committed record: the records decide, not the marks.
            let store = open(dir.path());
            let mut batch = WriteBatch::new();
            let cases = [
                (
                    "two-phase-yes",
                    BranchMode::TwoPhase,
                    BranchStatus::Prepared,
                    true,
                ),
                (
                    "one-phase-yes",
                    BranchMode::OnePhase,
                    BranchStatus::Prepared,
                    true,
                ),
                (
                    "saga-step-yes",
                    BranchMode::SagaStep,
                    BranchStatus::Prepared,
                    false,
                ),
                (
                    "committed",
                    BranchMode::TwoPhase,
                    BranchStatus::Committed,
                    true,
                ),
            ];
            for (txn, mode, status, old_mark) in cases {
                batch.insert(record_key(&key(txn)), record(mode, status));
                if old_mark {
                    batch.insert(format!("{OLD_IN_DOUBT_PREFIX}{txn}/b"), Vec::new());
                }
            }
            store.write(batch, Durability::Forced).await.unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(
            store.in_doubt(None, 10).unwrap(),
            [key("one-phase-yes"), key("two-phase-yes")]
        );
        // The old marks' removal is queued before this write, so it is applied first.
        store
            .write(WriteBatch::new(), Durability::Forced)
            .await
            .unwrap();
        assert_eq!(store.db().scan_prefix(OLD_IN_DOUBT_PREFIX).count(), 0);
        // From then on the marks change with the writes.
        store
            .save(BarrierWrite {
                key: key("two-phase-yes"),
                record: record(BranchMode::TwoPhase, BranchStatus::Committed),
                in_doubt: false,
            })
            .await
            .unwrap();
        assert_eq!(store.in_doubt(None, 10).unwrap(), [key("one-phase-yes")]);
    }

    #[tokio::test]
    async fn a_damaged_record_fails_the_listing_instead_of_hiding_a_branch_in_doubt() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        write_records(&store, [("unreadable", b"\x07garbage".to_vec())]).await;
        let error = store.in_doubt(None, 10).unwrap_err();
        assert!(error.to_string().contains("unreadable"), "{error}");
    }

    #[tokio::test]
    async fn counting_the_records_at_start_seeds_the_branches_in_doubt_in_the_same_pass() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let records = [
                (
                    "two-phase-yes",
                    BranchMode::TwoPhase,
                    BranchStatus::Prepared,
                ),
                ("committed", BranchMode::TwoPhase, BranchStatus::Committed),
                (
                    "saga-step-yes",
                    BranchMode::SagaStep,
                    BranchStatus::Prepared,
                ),
            ];
            let records = records.map(|(txn, mode, status)| (txn, record(mode, status)));
            write_records(&store, records).await;
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.count_records().unwrap(), 3);
        let listed = store
            .marked(None, 10, |_| panic!("the records were read a second time"))
            .unwrap();
        assert_eq!(listed, [record_key(&key("two-phase-yes"))]);
        // Once the marks are seeded, a count reads the records on its own.
        assert_eq!(store.count_records().unwrap(), 3);
    }

    #[tokio::test]
    async fn a_record_that_cannot_be_decoded_is_still_counted_and_fails_the_listings() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        write_records(
            &store,
            [
                ("unreadable", b"\x07garbage".to_vec()),
                (
                    "committed",
                    record(BranchMode::TwoPhase, BranchStatus::Committed),
                ),
            ],
        )
        .await;
        assert_eq!(store.count_records().unwrap(), 2);
        let error = store.in_doubt(None, 10).unwrap_err();
        assert!(error.to_string().contains("unreadable"), "{error}");
    }

    /// The seed reads a record's mode and status only: damage after them is found when
    /// the branch is listed, and only a branch in doubt is.
    #[tokio::test]
    async fn a_record_damaged_after_its_status_is_skipped_if_settled_and_fails_the_listing_if_in_doubt()
     {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let cut_short = |status| {
            let mut bytes = encoded_record(BranchMode::TwoPhase, status, &[7; 64]);
            bytes.truncate(bytes.len() - 10);
            bytes
        };
        write_records(
            &store,
            [
                ("settled", cut_short(BranchStatus::Committed)),
                ("in-doubt", cut_short(BranchStatus::Prepared)),
            ],
        )
        .await;
        assert_eq!(store.count_records().unwrap(), 2);
        assert_eq!(store.in_doubt(None, 10).unwrap(), [key("in-doubt")]);
        let error = crate::barrier::Barrier::new(store.clone())
            .in_doubt(10)
            .unwrap_err();
        assert!(error.to_string().contains("in-doubt"), "{error}");
    }

    /// The first listing reads the records while writes go on; whenever it happens,
    /// the set afterwards is exactly the branches whose last write left them in doubt.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_listing_during_writes_ends_with_exactly_the_branches_in_doubt() {
        const WRITERS: usize = 4;
        const BRANCHES: usize = 100;
        for round in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(open(dir.path()));
            let writers: Vec<_> = (0..WRITERS)
                .map(|writer| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        for branch in 0..BRANCHES {
                            let key = key(&format!("w{writer}-{branch}"));
                            let write = |status: BranchStatus| BarrierWrite {
                                key: key.clone(),
                                in_doubt: status == BranchStatus::Prepared,
                                record: record(BranchMode::TwoPhase, status),
                            };
                            store.save(write(BranchStatus::Prepared)).await.unwrap();
                            if branch % 2 == 0 {
                                store.save(write(BranchStatus::Committed)).await.unwrap();
                            }
                        }
                    })
                })
                .collect();
            // The first listing lands somewhere different in each round.
            tokio::time::sleep(std::time::Duration::from_millis(round * 3)).await;
            store.in_doubt(None, usize::MAX).unwrap();
            for writer in writers {
                writer.await.unwrap();
            }
            let mut expected: Vec<BranchKey> = (0..WRITERS)
                .flat_map(|writer| {
                    (1..BRANCHES)
                        .step_by(2)
                        .map(move |branch| key(&format!("w{writer}-{branch}")))
                })
                .collect();
            expected.sort();
            let listed = store.in_doubt(None, usize::MAX).unwrap();
            let mut sorted = listed.clone();
            sorted.sort();
            assert_eq!(listed, sorted, "round {round}: listed in one order");
            assert_eq!(listed, expected, "round {round}");
        }
    }
}
