//! The decision log on sled 0.34.7, written through the SDK's group-committing
//! [`DurableStore`] (one logger thread, one `apply_batch` per group, `flush()` then
//! `fdatasync`; see shared/DESIGN.md "Durability on sled").
//!
//! One database, one tree, key prefixes; a record and its index entries change in one
//! batch:
//! - `t/<id: 16 bytes>` → the record (a format byte, then postcard: see `encode`);
//! - `e/<ended_unix_ms: 8 bytes big-endian><id>` → empty, for final records (retention
//!   and the count);
//! - `h/<ended_unix_ms><id>` → empty, instead, for final records
//!   [`held_for_retention`](super::held_for_retention) (retention only);
//! - `k/<idempotency key>` → the id of the saga submitted with that key.
//!
//! Recovery finds the unfinished records by reading every record's state once, at open
//! ([`DecisionLog::unfinished`]): the finished records the log keeps are bounded by the
//! memory budget (docs/limits.md; those held for their retention come on top), and an
//! index of them (`u/<id>`, written with a record's first write and removed with its
//! final one, until 2026-12) cost a 2PC two of its five sled operations. An older
//! version's `u/` entries are removed at open. A `k/` entry is written with every
//! write: a forget or purge of an earlier saga with the same key removes the entry by
//! key, and may land after a new saga's first write.
//!
//! The log counts its final records not held (`e/` entries): exactly at open, then as it
//! writes and purges them (`finished.rs` says how, and when the count may be high), so a
//! purge by count ([`DecisionLog::purge_finished_beyond`]) deletes early, never late.
//!
//! Records are bounded (`MAX_RECORD_BYTES`): branches carry a payload only in a
//! two-phase commit's intent, whose payloads are bounded like a saga's, and the API
//! bounds branch count, id, endpoint and reason lengths. sled still writes blob files for
//! tree nodes over ~128 KiB (values from ~7.5 KiB on); the durable store syncs them.

use std::path::Path;
use std::sync::Arc;

use treaty_sdk::durable::{Durability, DurableStore, StoreError, StoreOptions, WriteBatch};

use super::finished::FinishedCount;
use super::{DecisionLog, LogError, LogFailed, LogWrite, held_for_retention};
use crate::model::{BranchRecord, OperatorResolution, TxnId, TxnKind, TxnRecord, TxnState, UnixMs};

/// Format 4: the record, its owner, each branch's heuristic answer and operator
/// resolution, then each branch's payload (all postcard), for a two-phase commit's
/// intent; every other record is written in format 3, without the payloads. Formats 2
/// (no branch notes) and 1 (no owner either) are still read: such records have none.
const FORMAT_VERSION: u8 = 4;
const FORMAT_WITHOUT_PAYLOADS: u8 = 3;
const FORMAT_WITHOUT_BRANCH_NOTES: u8 = 2;
const FORMAT_WITHOUT_OWNER: u8 = 1;

/// What format 3 adds per branch (fields of `BranchRecord` outside its serde form).
type BranchNotes = (Option<String>, Option<OperatorResolution>);

/// Largest encoded record written, which bounds memory and write cost: history is
/// trimmed to fit, and a record whose protocol fields alone exceed this is refused.
pub const MAX_RECORD_BYTES: usize = 96 * 1024;
const RECORD: u8 = b't';
/// The index of unfinished records an older version kept (removed at open).
const OLD_UNFINISHED: u8 = b'u';
const ENDED: u8 = b'e';
const HELD: u8 = b'h';
const KEY: u8 = b'k';

#[derive(Debug, Clone)]
pub struct SledLog {
    store: Arc<DurableStore>,
    /// `e/` entries: counted at open, then kept up to date.
    finished: Arc<FinishedCount>,
    /// Held by the purge under way (see `purge_oldest`).
    purging: Arc<std::sync::Mutex<()>>,
    /// Records this process has written unfinished and not yet final or forgotten: one
    /// found here when it is written final holds no `e/` entry yet, so its count needs
    /// no read of the store (see `write`). One entry per unfinished record written
    /// since the log opened, so it is bounded as the coordinator's transactions in
    /// progress are.
    written_unfinished: Arc<std::sync::Mutex<std::collections::HashSet<TxnId>>>,
}

impl SledLog {
    pub fn open(dir: &Path) -> Result<Self, LogError> {
        Self::open_with(dir, StoreOptions::default())
    }

    /// Opens the log; counting its final records takes about a second per million.
    /// Removes the index of unfinished records an older version kept (a lazy write: a
    /// removal lost in a crash is done again at the next open).
    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, LogError> {
        let store = DurableStore::open(dir, options)?;
        let mut finished = 0;
        for entry in store.db().scan_prefix([ENDED]).keys() {
            entry.map_err(read_error)?;
            finished += 1;
        }
        let mut old_index = WriteBatch::new();
        for entry in store.db().scan_prefix([OLD_UNFINISHED]).keys() {
            old_index.remove(entry.map_err(read_error)?.to_vec());
        }
        if !old_index.is_empty() {
            futures::executor::block_on(store.write(old_index, Durability::Lazy))?;
        }
        Ok(Self {
            store: Arc::new(store),
            finished: Arc::new(FinishedCount::new(finished)),
            purging: Arc::default(),
            written_unfinished: Arc::default(),
        })
    }

    /// Deletes up to `max` final records whose `prefix` entries (`e/` or `h/`) sort
    /// before `end` (`None`: all), oldest first, with their records and idempotency keys;
    /// returns how many records it deleted. With `release_held`, a record
    /// [`held_for_retention`] is not deleted: its `e/` entry (written before there were
    /// `h/` ones, or before a heuristic answer came) becomes an `h/` one. One purge runs
    /// at a time: two that read the same entry would both take it off the count.
    fn purge_oldest(
        &self,
        prefix: u8,
        end: Option<UnixMs>,
        max: usize,
        release_held: bool,
    ) -> Result<usize, LogError> {
        let _one_at_a_time = self.purging.lock().unwrap_or_else(|e| e.into_inner());
        let emptying = end.is_none();
        let end = match end {
            Some(cutoff) => ended_key(prefix, cutoff, &TxnId::from_bytes([0; 16])),
            None => vec![prefix + 1],
        };
        let mut batch = WriteBatch::new();
        let mut purged = 0;
        let mut found = 0;
        let mut counted_entries = Vec::new();
        for entry in self.store.db().range(vec![prefix]..end).take(max) {
            let (index_key, _) = entry.map_err(read_error)?;
            let id = indexed_id(&index_key, 9, "ended")?;
            let record = self.get(&id)?;
            found += 1;
            batch.remove(index_key.to_vec());
            if prefix == ENDED {
                counted_entries.push(index_key.to_vec());
            }
            let Some(record) = record else {
                // An entry left without its record: nothing else to delete.
                continue;
            };
            if release_held && held_for_retention(&record) {
                let mut held = index_key.to_vec();
                held[0] = HELD;
                batch.insert(held, Vec::new());
                continue;
            }
            if let Some(idempotency) = &record.idempotency_key {
                batch.remove(idempotency_key(idempotency));
            }
            batch.remove(key(RECORD, &id));
            purged += 1;
        }
        if batch.is_empty() {
            if emptying && found < max {
                // Not one entry left: what the count holds beyond the keys counted
                // lately was counted high.
                self.finished.removed(&[], true, true);
            }
            return Ok(purged);
        }
        // Forgetting is lazy: a purge lost in a crash is simply done again.
        let ticket = self.finished.removing(&counted_entries, || {
            self.store.write(batch, Durability::Lazy)
        });
        let applied = futures::executor::block_on(ticket);
        self.finished
            .removed(&counted_entries, applied.is_ok(), emptying && found < max);
        applied?;
        Ok(purged)
    }

    /// Whether the log has applied `key` (a write still queued is not seen).
    fn holds(&self, key: &[u8]) -> Result<bool, LogError> {
        self.store.db().contains_key(key).map_err(read_error)
    }

    /// The store underneath, for integrity checks (`treaty log verify`).
    pub fn store(&self) -> &DurableStore {
        &self.store
    }

    fn read(&self, key: &[u8]) -> Result<Option<TxnRecord>, LogError> {
        let value = self
            .store
            .db()
            .get(key)
            .map_err(|e| StoreError::Read(e.to_string()))?;
        value.map(|bytes| decode(key, &bytes)).transpose()
    }
}

fn key(prefix: u8, id: &TxnId) -> Vec<u8> {
    let mut key = Vec::with_capacity(17);
    key.push(prefix);
    key.extend_from_slice(id.as_bytes());
    key
}

/// The `e/` entry of a final record, or its `h/` one (`prefix`).
fn ended_key(prefix: u8, ended_unix_ms: UnixMs, id: &TxnId) -> Vec<u8> {
    let mut key = Vec::with_capacity(25);
    key.push(prefix);
    key.extend_from_slice(&ended_unix_ms.to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// The id an index entry ends with, from byte `id_at` on (`index` names the index).
fn indexed_id(index_key: &[u8], id_at: usize, index: &str) -> Result<TxnId, LogError> {
    let id_bytes: [u8; 16] = index_key
        .get(id_at..)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| LogError::Corrupt {
            key: format!("{index_key:02x?}"),
            message: format!("{index}-index key of the wrong length"),
        })?;
    Ok(TxnId::from_bytes(id_bytes))
}

fn idempotency_key(key: &str) -> Vec<u8> {
    let mut index = Vec::with_capacity(1 + key.len());
    index.push(KEY);
    index.extend_from_slice(key.as_bytes());
    index
}

fn id_from(key: &[u8], bytes: &[u8]) -> Result<TxnId, LogError> {
    let id: [u8; 16] = bytes.try_into().map_err(|_| LogError::Corrupt {
        key: format!("{key:02x?}"),
        message: "an index entry that is not a transaction id".into(),
    })?;
    Ok(TxnId::from_bytes(id))
}

/// Encodes `record` in format 4 if a branch has a payload (an intent), else in format 3,
/// which a build from before format 4 still reads: only an unfinished intent keeps a
/// log from being opened by such a build.
fn encode(record: &TxnRecord) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(ENCODE_CAPACITY_BYTES);
    let payloads = record.branches.iter().any(|b| !b.payload.is_empty());
    bytes.push(match payloads {
        true => FORMAT_VERSION,
        false => FORMAT_WITHOUT_PAYLOADS,
    });
    // The parts appended to one buffer, nothing copied or cloned on the way.
    append(&mut bytes, record);
    append(&mut bytes, &record.owner);
    append(&mut bytes, &NotesOf(&record.branches));
    if payloads {
        append(&mut bytes, &PayloadsOf(&record.branches));
    }
    bytes
}

/// Appends `part` to `bytes` as postcard writes it.
fn append<T: serde::Serialize + ?Sized>(bytes: &mut Vec<u8>, part: &T) {
    if let Err(error) = postcard::to_extend(part, Appender(bytes)) {
        // postcard fails only on a sequence or map whose length it is not told, and a
        // record's parts are derived plain data and `NotesOf`'s sequence of known length.
        unreachable!("a part of a log record failed to serialize: {error}");
    }
}

/// Room first given to an encoded record, so that most are written without growing it
/// (a 3-step saga's records are 280–380 bytes as it runs); a larger one grows it.
const ENCODE_CAPACITY_BYTES: usize = 512;

/// Appends what postcard writes to a buffer it borrows.
struct Appender<'a>(&'a mut Vec<u8>);

impl Extend<u8> for Appender<'_> {
    fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
        self.0.extend(bytes);
    }
}

/// The branches' notes as a sequence of [`BranchNotes`], serialized from the branches
/// themselves (the same bytes as a `Vec<BranchNotes>`). Its iterator must keep telling
/// its exact length: postcard writes the length first.
struct NotesOf<'a>(&'a [BranchRecord]);

impl serde::Serialize for NotesOf<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|b| (&b.heuristic, &b.resolution)))
    }
}

/// The branches' payloads as a sequence of byte strings (the same bytes as a
/// `Vec<Vec<u8>>`), like [`NotesOf`].
struct PayloadsOf<'a>(&'a [BranchRecord]);

impl serde::Serialize for PayloadsOf<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|b| &b.payload))
    }
}

/// Decodes a record as stored under `key` (for `treaty log verify` too).
pub(super) fn decode_record(key: &[u8], bytes: &[u8]) -> Result<TxnRecord, LogError> {
    decode(key, bytes)
}

fn decode(key: &[u8], bytes: &[u8]) -> Result<TxnRecord, LogError> {
    let corrupt = |message: String| LogError::Corrupt {
        key: format!("{key:02x?}"),
        message,
    };
    match bytes.split_first() {
        Some((&version @ (FORMAT_VERSION | FORMAT_WITHOUT_PAYLOADS), rest)) => {
            let (mut record, rest): (TxnRecord, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
            let (owner, rest): (Option<String>, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
            let (notes, rest): (Vec<BranchNotes>, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
            let branches = record.branches.len();
            if notes.len() != branches {
                return Err(corrupt(format!(
                    "{} branch notes for {branches} branches",
                    notes.len()
                )));
            }
            for (branch, (heuristic, resolution)) in record.branches.iter_mut().zip(notes) {
                branch.heuristic = heuristic;
                branch.resolution = resolution;
            }
            if version == FORMAT_VERSION {
                let payloads: Vec<Vec<u8>> =
                    postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
                if payloads.len() != branches {
                    return Err(corrupt(format!(
                        "{} payloads for {branches} branches",
                        payloads.len()
                    )));
                }
                for (branch, payload) in record.branches.iter_mut().zip(payloads) {
                    branch.payload = payload;
                }
            }
            record.owner = owner;
            Ok(record)
        }
        Some((&FORMAT_WITHOUT_BRANCH_NOTES, rest)) => {
            let (mut record, owner): (TxnRecord, &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| corrupt(e.to_string()))?;
            record.owner = postcard::from_bytes(owner).map_err(|e| corrupt(e.to_string()))?;
            Ok(record)
        }
        Some((&FORMAT_WITHOUT_OWNER, rest)) => {
            postcard::from_bytes(rest).map_err(|e| corrupt(e.to_string()))
        }
        Some((version, _)) => Err(corrupt(format!("unknown format version {version}"))),
        None => Err(corrupt("empty record".into())),
    }
}

/// Whether the record stored under `key` is final, from the fields every format begins
/// with (the id, the kind and the state): recovery reads every record, and most are
/// final. A record of an unknown format, or too short for them, is reported as damage.
fn is_final(key: &[u8], bytes: &[u8]) -> Result<bool, LogError> {
    match bytes.split_first() {
        Some((
            &(FORMAT_VERSION
            | FORMAT_WITHOUT_PAYLOADS
            | FORMAT_WITHOUT_BRANCH_NOTES
            | FORMAT_WITHOUT_OWNER),
            rest,
        )) => {
            let ((_, _, state), _): ((TxnId, TxnKind, TxnState), &[u8]) =
                postcard::take_from_bytes(rest).map_err(|e| LogError::Corrupt {
                    key: format!("{key:02x?}"),
                    message: e.to_string(),
                })?;
            Ok(state.is_final())
        }
        _ => decode(key, bytes).map(|record| record.state.is_final()),
    }
}

fn read_error(e: sled::Error) -> LogError {
    LogError::Store(StoreError::Read(e.to_string()))
}

impl DecisionLog for SledLog {
    fn write(&self, record: &TxnRecord, durability: Durability) -> LogWrite {
        let mut encoded = encode(record);
        if encoded.len() > MAX_RECORD_BYTES {
            let mut trimmed = record.clone();
            let fits = trimmed.trim_history(|r| encode(r).len() <= MAX_RECORD_BYTES);
            if !fits {
                let error = LogError::TooLarge {
                    id: record.id.to_string(),
                    bytes: encoded.len(),
                };
                return Box::pin(std::future::ready(Err(error)));
            }
            tracing::debug!(txn_id = %record.id, from = encoded.len(), "trimmed history to fit the log");
            encoded = encode(&trimmed);
        }
        let mut batch = WriteBatch::new();
        batch.insert(key(RECORD, &record.id), encoded);
        // Held until the write is queued, so that the set and the queue agree on the
        // order of one record's writes.
        let mut written_unfinished = self
            .written_unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let was_written_unfinished = if record.state.is_final() {
            written_unfinished.remove(&record.id)
        } else {
            written_unfinished.insert(record.id);
            true
        };
        // The `e/` entry of a final record that is counted: added to `batch` under the
        // count's lock, so that the count and the store see writes in one order.
        let mut counted = None;
        if record.state.is_final() {
            if let Some(ended) = record.ended_unix_ms {
                if held_for_retention(record) {
                    batch.insert(ended_key(HELD, ended, &record.id), Vec::new());
                } else {
                    counted = Some(ended_key(ENDED, ended, &record.id));
                }
            }
        }
        if let Some(idempotency) = &record.idempotency_key {
            batch.insert(idempotency_key(idempotency), record.id.as_bytes().to_vec());
        }
        let ticket = match counted {
            Some(index_key) => self.finished.write(
                &index_key,
                // A record this process wrote unfinished and not final since holds no
                // `e/` entry in the store: only a final write adds one, a final record
                // is never written unfinished again, and one final at open is not
                // resumed. Its first final write then needs no read of the store.
                || {
                    if was_written_unfinished {
                        Ok(false)
                    } else {
                        self.holds(&index_key)
                    }
                },
                || {
                    batch.insert(index_key.clone(), Vec::new());
                    self.store.write(batch, durability)
                },
            ),
            None => self.store.write(batch, durability),
        };
        drop(written_unfinished);
        Box::pin(async move { Ok(ticket.await?) })
    }

    /// The store's failure: every write's error after it was queued makes the store fail
    /// (`DurableStore::failed`), and so do a write-behind's and a panic of its logger
    /// thread. Does not keep the store open.
    fn failed(&self) -> LogFailed {
        Box::pin(self.store.failure_watch())
    }

    fn writes_queued(&self) -> u64 {
        self.store.write_progress().queued()
    }

    fn writes_applied(&self) -> u64 {
        self.store.write_progress().applied()
    }

    fn get(&self, id: &TxnId) -> Result<Option<TxnRecord>, LogError> {
        self.read(&key(RECORD, id))
    }

    fn find_by_key(&self, key: &str) -> Result<Option<TxnId>, LogError> {
        let index = idempotency_key(key);
        let value = self.store.db().get(&index).map_err(read_error)?;
        value.map(|bytes| id_from(&index, &bytes)).transpose()
    }

    /// Reads every record's state, and decodes the unfinished ones: a record whose
    /// state cannot be read fails it, since it might be an unfinished one.
    fn unfinished(&self) -> Result<Vec<TxnRecord>, LogError> {
        let mut records = Vec::new();
        for entry in self.store.db().range(vec![RECORD]..vec![RECORD + 1]) {
            let (record_key, value) = entry.map_err(read_error)?;
            if !is_final(&record_key, &value)? {
                records.push(decode(&record_key, &value)?);
            }
        }
        Ok(records)
    }

    fn scan(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnRecord>, LogError> {
        Ok(self.scan_bounded(after, limit, usize::MAX)?.0)
    }

    fn scan_bounded(
        &self,
        after: Option<TxnId>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<TxnRecord>, bool), LogError> {
        let start = match after {
            // The smallest key greater than `t/<after>`.
            Some(after) => {
                let mut start = key(RECORD, &after);
                start.push(0);
                start
            }
            None => vec![RECORD],
        };
        let mut records = Vec::new();
        let mut bytes = 0usize;
        for entry in self.store.db().range(start..vec![RECORD + 1]) {
            if records.len() >= limit {
                return Ok((records, true));
            }
            let (record_key, value) = entry.map_err(read_error)?;
            bytes = bytes.saturating_add(value.len());
            if bytes > max_bytes && !records.is_empty() {
                return Ok((records, true));
            }
            records.push(decode(&record_key, &value)?);
        }
        Ok((records, false))
    }

    fn purge_ended_before(&self, cutoff_unix_ms: UnixMs, max: usize) -> Result<usize, LogError> {
        let purged = self.purge_oldest(ENDED, Some(cutoff_unix_ms), max, false)?;
        let max = max.saturating_sub(purged);
        Ok(purged + self.purge_oldest(HELD, Some(cutoff_unix_ms), max, false)?)
    }

    fn finished_count(&self) -> u64 {
        self.finished.get()
    }

    fn files_on_disk_bytes(&self) -> Option<u64> {
        match self.store.files_on_disk_bytes() {
            Ok(bytes) => Some(bytes),
            Err(error) => {
                tracing::warn!(%error, "cannot measure the log's size on disk");
                None
            }
        }
    }

    fn purge_finished_beyond(&self, keep: u64, max: usize) -> Result<usize, LogError> {
        let excess = self.finished_count().saturating_sub(keep);
        if excess == 0 || max == 0 {
            return Ok(0);
        }
        let max = usize::try_from(excess).unwrap_or(max).min(max);
        self.purge_oldest(ENDED, None, max, true)
    }

    fn forget(&self, record: &TxnRecord) -> LogWrite {
        let id = &record.id;
        let mut written_unfinished = self
            .written_unfinished
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        written_unfinished.remove(id);
        let mut batch = WriteBatch::new();
        batch.remove(key(RECORD, id));
        if let Some(ended) = record.ended_unix_ms {
            // Still counted (see `finished.rs`).
            let index_key = ended_key(ENDED, ended, id);
            self.finished.forgotten(&index_key);
            batch.remove(index_key);
            batch.remove(ended_key(HELD, ended, id));
        }
        if let Some(idempotency) = &record.idempotency_key {
            batch.remove(idempotency_key(idempotency));
        }
        let ticket = self.store.write(batch, Durability::Forced);
        Box::pin(async move { Ok(ticket.await?) })
    }

    fn close(&self) -> Result<(), LogError> {
        Ok(self.store.close()?)
    }
}

#[cfg(test)]
#[path = "sled_log_tests.rs"]
mod tests;
