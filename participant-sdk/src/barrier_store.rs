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
//! - `load` returns what the last durable write for the branch held, whether `save` or the
//!   participant's own transaction made it;
//! - `in_doubt` lists the branches whose last write was marked in doubt, in an order of the
//!   store's choosing that does not change, strictly after `after` in that order;
//! - once a write failed, `failure` says so: a record the store shows may then not be
//!   durable, so the barrier answers nothing from it and runs no user code.

use std::future::Future;

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

    /// Up to `limit` branches marked in doubt, after `after` (`None`: from the start).
    fn in_doubt(
        &self,
        after: Option<&BranchKey>,
        limit: usize,
    ) -> Result<Vec<BranchKey>, StoreError>;

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

const RECORD_PREFIX: &str = "b/";
const IN_DOUBT_PREFIX: &str = "d/";

/// The keys of the SDK's own store: `b/<transaction>/<branch>` holds the record,
/// `d/<transaction>/<branch>` marks a branch in doubt. Ids cannot contain `/` (see
/// [`crate::limits::check_id`]); participants keep their own data under other keys.
fn record_key(key: &BranchKey) -> Vec<u8> {
    format!("{RECORD_PREFIX}{}/{}", key.transaction_id, key.branch_id).into_bytes()
}

fn in_doubt_key(key: &BranchKey) -> Vec<u8> {
    format!("{IN_DOUBT_PREFIX}{}/{}", key.transaction_id, key.branch_id).into_bytes()
}

/// `write` as operations on the SDK's own store.
pub(crate) fn write_batch(write: &BarrierWrite) -> WriteBatch {
    let mut batch = WriteBatch::new();
    batch.insert(record_key(&write.key), write.record.clone());
    if write.in_doubt {
        batch.insert(in_doubt_key(&write.key), Vec::new());
    } else {
        batch.remove(in_doubt_key(&write.key));
    }
    batch
}

impl BarrierStore for DurableStore {
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

    fn in_doubt(
        &self,
        after: Option<&BranchKey>,
        limit: usize,
    ) -> Result<Vec<BranchKey>, StoreError> {
        let start = match after {
            Some(after) => {
                let mut start = in_doubt_key(after);
                start.push(0);
                start
            }
            None => IN_DOUBT_PREFIX.as_bytes().to_vec(),
        };
        let mut found = Vec::new();
        for entry in self.db().range(start..).take(limit) {
            let (key, _) = entry.map_err(|e| StoreError::Read(e.to_string()))?;
            let Some(rest) = key.strip_prefix(IN_DOUBT_PREFIX.as_bytes()) else {
                break;
            };
            let text = String::from_utf8_lossy(rest);
            let Some((transaction_id, branch_id)) = text.split_once('/') else {
                return Err(StoreError::Read(format!(
                    "in-doubt key {text:?} has no branch"
                )));
            };
            found.push(BranchKey {
                transaction_id: transaction_id.to_string(),
                branch_id: branch_id.to_string(),
            });
        }
        Ok(found)
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
/// written and replaced by later writes, and in-doubt marks listed, paged with a
/// cursor, and cleared. Run it in your tests on an empty store; it writes branches of
/// transactions named `conformance-*`.
pub async fn check_conformance<S: BarrierStore>(store: &S) -> Result<(), String> {
    let key = |txn: usize, branch: &str| BranchKey {
        transaction_id: format!("conformance-{txn}"),
        branch_id: branch.to_string(),
    };
    let write = |key: BranchKey, record: &[u8], in_doubt: bool| BarrierWrite {
        key,
        record: record.to_vec(),
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
        Some(record) if record == b"second" => {}
        other => return Err(format!("after two writes, load gave {other:?}")),
    }
    if !store
        .in_doubt(None, 10)
        .map_err(|e| failed("in_doubt", e))?
        .is_empty()
    {
        return Err("a branch whose last write cleared the mark is still in doubt".into());
    }
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
    Ok(())
}
