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
        for entry in self.store.db().range(start..vec![RECORD + 1]).take(limit) {
            let (record_key, value) = entry.map_err(read_error)?;
            records.push(decode(&record_key, &value)?);
        }
        Ok(records)
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
mod tests {
    use super::super::suite::{self, LogHarness};
    use super::*;

    struct SledHarness {
        dir: tempfile::TempDir,
    }

    impl LogHarness for SledHarness {
        fn open(&mut self) -> Arc<dyn DecisionLog> {
            Arc::new(SledLog::open(self.dir.path()).unwrap())
        }

        fn reopen(&mut self, previous: Arc<dyn DecisionLog>) -> Arc<dyn DecisionLog> {
            previous.close().unwrap();
            // sled releases its file lock when the last handle is dropped.
            assert_eq!(
                Arc::strong_count(&previous),
                1,
                "the test still holds the log"
            );
            drop(previous);
            self.open()
        }
    }

    fn harness() -> SledHarness {
        SledHarness {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    suite::decision_log_suite!(harness);

    #[tokio::test]
    async fn records_are_kept_below_the_blob_threshold_by_trimming_history() {
        use crate::model::{AttemptLog, BranchRecord, BranchState, Operation, TxnState};
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(dir.path()).unwrap();
        let mut record = suite::record(1_700_000_000_000, TxnState::Committing);
        record.branches = (0..32)
            .map(|i| {
                let mut history = AttemptLog::default();
                for attempt in 0..16 {
                    history.start(Operation::Commit, attempt);
                    history.finish(&[Operation::Commit], "e".repeat(1024), attempt + 1);
                }
                BranchRecord {
                    id: format!("branch-{i}"),
                    endpoint: format!("http://participant-{i}.example:7000"),
                    payload: Vec::new(),
                    state: BranchState::Prepared,
                    attempts: 16,
                    compensation_attempts: 0,
                    last_error: Some("x".repeat(1024)),
                    history,
                    heuristic: None,
                    resolution: None,
                }
            })
            .collect();
        assert!(encode(&record).len() > 400 * 1024);
        log.write(&record, Durability::Forced).await.unwrap();
        let stored = log
            .store
            .db()
            .get(key(RECORD, &record.id))
            .unwrap()
            .unwrap();
        assert!(stored.len() <= MAX_RECORD_BYTES, "{}", stored.len());
        let read = log.get(&record.id).unwrap().unwrap();
        // The protocol's fields are intact; only history went.
        assert_eq!(read.state, record.state);
        assert_eq!(read.branches.len(), 32);
        assert!(
            read.branches
                .iter()
                .all(|b| b.state == BranchState::Prepared)
        );
    }

    /// Opens a log at `dir` that adds up the records (keys written or removed) of its
    /// group commits in `records`.
    fn counting_log(dir: &Path, records: &Arc<std::sync::atomic::AtomicUsize>) -> SledLog {
        let records = records.clone();
        let observer: treaty_sdk::durable::GroupObserver = Arc::new(move |group| {
            records.fetch_add(group.records, std::sync::atomic::Ordering::SeqCst);
        });
        let options = StoreOptions {
            group_observer: Some(observer),
            ..StoreOptions::default()
        };
        SledLog::open_with(dir, options).unwrap()
    }

    #[tokio::test]
    async fn an_unfinished_record_is_written_without_an_index_and_found_by_recovery() {
        use crate::model::TxnState;
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let dir = tempfile::tempdir().unwrap();
        let records = Arc::new(AtomicUsize::new(0));
        let log = counting_log(dir.path(), &records);
        let mut saga = suite::record(1_700_000_000_000, TxnState::Running);
        saga.kind = crate::model::TxnKind::Saga;
        saga.idempotency_key = Some("order-17".into());
        let mut written = Vec::new();
        for _ in 0..3 {
            log.write(&saga, Durability::Forced).await.unwrap();
            written.push(records.swap(0, SeqCst));
        }
        // The record and `k/`, each time.
        assert_eq!(written, [2, 2, 2]);

        // Reopened: recovery finds it among the records, and its key finds it.
        drop(log);
        let log = counting_log(dir.path(), &records);
        let unfinished: Vec<TxnId> = log.unfinished().unwrap().iter().map(|r| r.id).collect();
        assert_eq!(unfinished, [saga.id]);
        assert_eq!(log.find_by_key("order-17").unwrap(), Some(saga.id));
        log.write(&saga, Durability::Forced).await.unwrap();
        assert_eq!(records.swap(0, SeqCst), 2);

        // Final: the record, its `h/` entry (held: it has a key) and `k/`.
        saga.state = TxnState::Completed;
        saga.ended_unix_ms = Some(1_700_000_000_100);
        log.write(&saga, Durability::Forced).await.unwrap();
        assert_eq!(records.swap(0, SeqCst), 3);
        assert!(log.unfinished().unwrap().is_empty());
        assert_eq!(log.find_by_key("order-17").unwrap(), Some(saga.id));
    }

    #[tokio::test]
    async fn a_key_removed_by_the_forget_of_an_earlier_saga_is_written_again() {
        use crate::model::TxnState;
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(dir.path()).unwrap();
        let mut earlier = suite::record(1_700_000_000_000, TxnState::Completed);
        earlier.idempotency_key = Some("order-17".into());
        log.write(&earlier, Durability::Forced).await.unwrap();
        // The earlier saga left the log (retention) and a new one took its key; an
        // operator's forget of the earlier one, read before, lands after that.
        let mut later = suite::record(1_700_000_000_100, TxnState::Running);
        later.idempotency_key = Some("order-17".into());
        log.write(&later, Durability::Forced).await.unwrap();
        log.forget(&earlier).await.unwrap();
        assert_eq!(log.find_by_key("order-17").unwrap(), None);
        // The new saga's next write puts its key back.
        log.write(&later, Durability::Forced).await.unwrap();
        assert_eq!(log.find_by_key("order-17").unwrap(), Some(later.id));
    }

    #[tokio::test]
    async fn a_compacted_log_holds_the_same_records_and_indexes() {
        use crate::model::TxnState;
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(dir.path()).unwrap();
        let states = [
            TxnState::Committing,
            TxnState::Committed,
            TxnState::Compensating,
        ];
        for i in 0..3_000u64 {
            let mut record = suite::record(1_700_000_000_000 + i, states[i as usize % 3]);
            record.ended_unix_ms = record.state.is_final().then_some(1_700_000_000_000 + i);
            record.idempotency_key = (i % 10 == 0).then(|| format!("key-{i}"));
            log.write(&record, Durability::Lazy).await.unwrap();
        }
        let purged = log.purge_ended_before(1_700_000_001_500, 10_000).unwrap();
        assert_eq!(purged, 500);
        let everything = |log: &SledLog| log.scan(None, 10_000).unwrap();
        let before = everything(&log);
        let unfinished = log.unfinished().unwrap();
        assert_eq!(before.len(), 2_500);
        let report = log.store().compact().await.unwrap();
        assert_eq!(report.generation, 1);
        let same = |log: &SledLog| {
            assert_eq!(everything(log), before);
            assert_eq!(log.unfinished().unwrap(), unfinished);
            assert!(log.find_by_key("key-2990").unwrap().is_some());
        };
        same(&log);
        log.close().unwrap();
        drop(log);
        let log = SledLog::open(dir.path()).unwrap();
        same(&log);
        // Retention still finds what ended, oldest first: i in 1501..2000, i % 3 == 1.
        assert_eq!(
            log.purge_ended_before(1_700_000_002_000, 10_000).unwrap(),
            167
        );
    }

    #[tokio::test]
    async fn a_final_record_written_twice_at_once_is_counted_once() {
        use crate::model::TxnState;
        let mut harness = harness();
        let log = harness.open();
        let mut done = suite::record(1_700_000_000_000, TxnState::Committed);
        done.ended_unix_ms = Some(1_700_000_000_100);
        // As an operator's resolve that ends a logged 2PC does (its lazy end record,
        // then the resolve's forced write): both issued before either is applied.
        let first = log.write(&done, Durability::Lazy);
        let second = log.write(&done, Durability::Forced);
        first.await.unwrap();
        second.await.unwrap();
        assert_eq!(log.finished_count(), 1);
        // Once applied, written again.
        log.write(&done, Durability::Lazy).await.unwrap();
        assert_eq!(log.finished_count(), 1);
        assert_eq!(log.purge_finished_beyond(0, 10).unwrap(), 1);
        assert_eq!(log.finished_count(), 0);
        // Written again after its purge: counted again.
        log.write(&done, Durability::Lazy).await.unwrap();
        assert_eq!(log.finished_count(), 1);
        let log = harness.reopen(log);
        assert_eq!(log.finished_count(), 1, "counted exactly at open");
    }

    #[tokio::test]
    async fn a_record_written_unfinished_then_final_is_counted_once() {
        use crate::model::TxnState;
        let mut harness = harness();
        let log = harness.open();
        // A 2PC's decision, then its end: the end's `e/` entry is counted without a read
        // of the store (the record was unfinished in this process).
        let deciding = suite::record(1_700_000_000_000, TxnState::Committing);
        log.write(&deciding, Durability::Forced).await.unwrap();
        let mut done = deciding.clone();
        done.state = TxnState::Committed;
        done.ended_unix_ms = Some(1_700_000_000_100);
        log.write(&done, Durability::Lazy).await.unwrap();
        assert_eq!(log.finished_count(), 1);
        assert!(log.unfinished().unwrap().is_empty());
        // Written final again: found among the keys counted lately, not counted twice.
        log.write(&done, Durability::Forced).await.unwrap();
        assert_eq!(log.finished_count(), 1);
        let log = harness.reopen(log);
        assert_eq!(log.finished_count(), 1, "counted exactly at open");
    }

    #[tokio::test]
    async fn a_count_left_high_by_a_forget_comes_down_when_the_entries_run_out() {
        use crate::model::TxnState;
        let mut harness = harness();
        let log = harness.open();
        let mut records = Vec::new();
        for i in 0..3 {
            let mut done = suite::record(1_700_000_000_000 + i, TxnState::Committed);
            done.ended_unix_ms = Some(1_700_000_000_100 + i);
            log.write(&done, Durability::Forced).await.unwrap();
            records.push(done);
        }
        log.forget(&records[2]).await.unwrap();
        assert_eq!(log.finished_count(), 3, "a forgotten record stays counted");
        // A purge given no room (a retention purge took the whole batch) changes nothing.
        assert_eq!(log.purge_finished_beyond(1, 0).unwrap(), 0);
        assert_eq!(log.finished_count(), 3);
        // Keep 1: deletes the two oldest (one early, for the forgotten one), and the
        // count, high, stays above what is left until the entries run out.
        assert_eq!(log.purge_finished_beyond(1, 10).unwrap(), 2);
        assert_eq!(log.finished_count(), 1);
        assert_eq!(log.purge_finished_beyond(0, 10).unwrap(), 0);
        assert_eq!(
            log.finished_count(),
            0,
            "nothing left, and nothing written since"
        );
    }

    /// Writes `batch` into the log at `dir` as it is, as an earlier version wrote its
    /// keys, and closes it.
    async fn written_as_before(dir: &Path, batch: WriteBatch) {
        let earlier = SledLog::open(dir).unwrap();
        earlier
            .store()
            .write(batch, Durability::Forced)
            .await
            .unwrap();
        earlier.close().unwrap();
    }

    #[tokio::test]
    async fn a_held_record_indexed_before_there_were_held_entries_is_kept_by_the_count() {
        use crate::model::TxnState;
        let dir = tempfile::tempdir().unwrap();
        let mut saga = suite::record(1_700_000_000_000, TxnState::Completed);
        saga.idempotency_key = Some("order-1".into());
        saga.ended_unix_ms = Some(1_700_000_000_100);
        // As an earlier version wrote it: under `e/`.
        let mut batch = WriteBatch::new();
        batch.insert(key(RECORD, &saga.id), encode(&saga));
        batch.insert(ended_key(ENDED, 1_700_000_000_100, &saga.id), Vec::new());
        batch.insert(idempotency_key("order-1"), saga.id.as_bytes().to_vec());
        written_as_before(dir.path(), batch).await;
        let sled_log = SledLog::open(dir.path()).unwrap();
        assert_eq!(sled_log.finished_count(), 1);
        assert_eq!(sled_log.purge_finished_beyond(0, 10).unwrap(), 0);
        assert_eq!(sled_log.finished_count(), 0);
        assert_eq!(sled_log.find_by_key("order-1").unwrap(), Some(saga.id));
        // Now under `h/`: the retention purges it.
        assert_eq!(
            sled_log.purge_ended_before(1_700_000_001_000, 10).unwrap(),
            1
        );
        assert_eq!(sled_log.find_by_key("order-1").unwrap(), None);
    }

    #[tokio::test]
    async fn an_older_versions_index_of_unfinished_records_is_removed_at_open() {
        use crate::model::TxnState;
        let dir = tempfile::tempdir().unwrap();
        let deciding = suite::record(1_700_000_000_000, TxnState::Committing);
        let mut done = suite::record(1_700_000_000_001, TxnState::Committed);
        done.ended_unix_ms = Some(1_700_000_000_100);
        // As an older version wrote them: `u/` beside the unfinished record, and a
        // stray one beside a final record (every `u/` entry goes, whatever its record).
        let mut batch = WriteBatch::new();
        for record in [&deciding, &done] {
            batch.insert(key(RECORD, &record.id), encode(record));
            batch.insert(key(OLD_UNFINISHED, &record.id), Vec::new());
        }
        written_as_before(dir.path(), batch).await;
        let log = SledLog::open(dir.path()).unwrap();
        assert_eq!(log.unfinished().unwrap(), vec![deciding]);
        // The open waited for the removal to be applied.
        assert_eq!(log.store().db().scan_prefix([OLD_UNFINISHED]).count(), 0);
    }

    #[test]
    fn a_corrupt_record_is_reported_not_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = SledLog::open(dir.path()).unwrap();
        let id = TxnId::generate(1_700_000_000_000);
        let mut batch = WriteBatch::new();
        batch.insert(key(RECORD, &id), vec![FORMAT_VERSION, 0xff, 0xff]);
        futures::executor::block_on(log.store.write(batch, Durability::Forced)).unwrap();
        assert!(matches!(log.unfinished(), Err(LogError::Corrupt { .. })));
        assert!(matches!(log.get(&id), Err(LogError::Corrupt { .. })));
    }

    /// A record with an owner, and on its branch a heuristic answer and an operator's
    /// resolution with `outcome`.
    fn noted(state: TxnState, outcome: crate::model::Resolution, reason: &str) -> TxnRecord {
        let mut record = suite::record(1_700_000_000_000, state);
        record.owner = Some("alice".into());
        record.branches[0].heuristic = Some("answered Aborted to a commit".into());
        record.branches[0].resolution = Some(OperatorResolution {
            outcome,
            by: "ops".into(),
            at_unix_ms: 1_700_000_000_500,
            reason: reason.into(),
        });
        record
    }

    /// Format 3 as it was defined: the record, its owner and a `Vec<BranchNotes>`, each
    /// as postcard writes it on its own, one after another.
    fn encoded_in_three_parts(record: &TxnRecord) -> Vec<u8> {
        let notes: Vec<BranchNotes> = record
            .branches
            .iter()
            .map(|b| (b.heuristic.clone(), b.resolution.clone()))
            .collect();
        let mut bytes = vec![FORMAT_WITHOUT_PAYLOADS];
        bytes.extend(postcard::to_allocvec(record).unwrap());
        bytes.extend(postcard::to_allocvec(&record.owner).unwrap());
        bytes.extend(postcard::to_allocvec(&notes).unwrap());
        bytes
    }

    /// Format 4 as it is defined: format 3's parts, then a `Vec<Vec<u8>>` of payloads;
    /// format 3 for a record without payloads.
    fn encoded_in_parts(record: &TxnRecord) -> Vec<u8> {
        let mut bytes = encoded_in_three_parts(record);
        if record.branches.iter().all(|b| b.payload.is_empty()) {
            return bytes;
        }
        bytes[0] = FORMAT_VERSION;
        let payloads: Vec<Vec<u8>> = record.branches.iter().map(|b| b.payload.clone()).collect();
        bytes.extend(postcard::to_allocvec(&payloads).unwrap());
        bytes
    }

    /// The same bytes as format 4's four parts (format 3's three without payloads), and
    /// the record back from them: with and without an owner, branches, notes or
    /// payloads, a saga's definition, and at every length from well below the buffer's
    /// first size to well above it.
    #[test]
    fn a_record_is_encoded_as_its_parts_one_after_another() {
        use crate::model::{Resolution, SagaDefinition, TxnState};
        let check = |record: &TxnRecord| {
            let encoded = encode(record);
            assert_eq!(encoded, encoded_in_parts(record));
            assert_eq!(&decode(b"k", &encoded).unwrap(), record);
            encoded.len()
        };
        let plain = suite::record(1_700_000_000_000, TxnState::Compensating);
        check(&plain);
        assert_eq!(encode(&plain)[0], FORMAT_WITHOUT_PAYLOADS);
        let no_branches = TxnRecord {
            branches: Vec::new(),
            ..plain
        };
        check(&no_branches);
        let mut record = noted(TxnState::Compensating, Resolution::Abort, "undone by hand");
        let mut second = record.branches[0].clone();
        second.id = "shipping".into();
        second.heuristic = None;
        second.resolution = None;
        record.branches.push(second);
        record.saga = Some(Arc::new(SagaDefinition {
            steps: Vec::new(),
            stuck_after_attempts: 3,
        }));
        record.idempotency_key = Some("order-17".into());
        record.branches[0].payload = b"reserve 2 units".to_vec();
        let mut lengths = Vec::new();
        for error_bytes in 0..=2 * ENCODE_CAPACITY_BYTES {
            record.branches[1].last_error = Some("x".repeat(error_bytes));
            lengths.push(check(&record));
        }
        assert!(lengths[0] < ENCODE_CAPACITY_BYTES && lengths.contains(&ENCODE_CAPACITY_BYTES));
        assert!(lengths.iter().any(|&n| n > 2 * ENCODE_CAPACITY_BYTES));
    }

    #[test]
    fn owners_and_branch_notes_round_trip_and_older_formats_still_decode() {
        use crate::model::{Resolution, TxnState};
        let record = noted(
            TxnState::Committing,
            Resolution::Commit,
            "re-applied by hand",
        );
        let key = key(RECORD, &record.id);
        assert_eq!(decode(&key, &encode(&record)).unwrap(), record);
        // Version 3: no payloads (the record's is empty, as every one then was).
        let v3 = encoded_in_three_parts(&record);
        assert_eq!(decode(&key, &v3).unwrap(), record);
        let mut with_payload = record.clone();
        with_payload.branches[0].payload = vec![7; 300];
        let intent = encode(&with_payload);
        assert_eq!(intent[0], FORMAT_VERSION);
        assert_eq!(decode(&key, &intent).unwrap(), with_payload);
        // Version 2: the record and its owner, no branch notes.
        let mut v2 = vec![FORMAT_WITHOUT_BRANCH_NOTES];
        v2.extend(postcard::to_allocvec(&record).unwrap());
        v2.extend(postcard::to_allocvec(&record.owner).unwrap());
        let decoded = decode(&key, &v2).unwrap();
        assert_eq!(decoded.owner.as_deref(), Some("alice"));
        assert_eq!(decoded.branches[0].resolution, None);
        // A record written before owners existed: the record alone, version 1.
        let mut old = vec![FORMAT_WITHOUT_OWNER];
        old.extend(postcard::to_allocvec(&record).unwrap());
        let decoded = decode(&key, &old).unwrap();
        assert_eq!(decoded.owner, None);
        assert_eq!(decoded.state, record.state);
        // Recovery tells an unfinished record by its first fields, in every format.
        for bytes in [encode(&record), v3, v2, old] {
            assert!(!is_final(&key, &bytes).unwrap());
        }
        let mut done = record.clone();
        done.state = TxnState::Committed;
        assert!(is_final(&key, &encode(&done)).unwrap());
        assert!(matches!(
            is_final(&key, &[FORMAT_VERSION, 0xff]),
            Err(LogError::Corrupt { .. })
        ));
        assert!(matches!(
            is_final(&key, &[9]),
            Err(LogError::Corrupt { .. })
        ));
        // A record cut short is damage, not a record without owner or notes.
        let mut cut = encode(&record);
        cut.truncate(cut.len() - 3);
        assert!(matches!(decode(&key, &cut), Err(LogError::Corrupt { .. })));
    }
}
