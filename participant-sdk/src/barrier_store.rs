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
