//! What the example services keep, in the participant's own durable store beside the
//! barrier: integer counters (balances, stock) and JSON records, each change forced to
//! disk before the operation that made it returns.
//!
//! Keys are `<prefix>/<name>`; no example key starts with the barrier's `b/` or `d/`.
//! An operation's changes are applied with the barrier's record of it
//! ([`Ledger::apply_with`]): exactly-once effects across crashes.
//! One lock serializes read-modify-write sequences: these are examples, not benchmarks.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, MutexGuard};
use treaty_sdk::durable::{Durability, DurableStore, WriteBatch};
use treaty_sdk::{BranchContext, ParticipantError};

pub fn failed(error: impl std::fmt::Display) -> ParticipantError {
    ParticipantError::new(format!("ledger: {error}"))
}

#[derive(Debug)]
pub struct Ledger {
    store: Arc<DurableStore>,
    lock: Mutex<()>,
}

/// The changes of one operation, applied together.
#[derive(Debug, Default)]
pub struct Changes(WriteBatch);

impl Changes {
    pub fn set_i64(&mut self, key: &str, value: i64) {
        self.0
            .insert(key.as_bytes().to_vec(), value.to_be_bytes().to_vec());
    }

    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) {
        // Serializing plain example data cannot fail.
        self.0.insert(
            key.as_bytes().to_vec(),
            serde_json::to_vec(value).unwrap_or_default(),
        );
    }

    pub fn remove(&mut self, key: &str) {
        self.0.remove(key.as_bytes().to_vec());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Entries (key as text, value) of one page of a [`Pass`].
pub type Page = Vec<(String, Vec<u8>)>;

/// A pass over the entries under one prefix, a page per call, for background work that
/// must not hold the ledger for long (pruning old entries).
#[derive(Debug, Default)]
pub struct Pass {
    /// The last key of the previous page; `None` starts the pass over.
    cursor: std::sync::Mutex<Option<Vec<u8>>>,
}

impl Pass {
    /// The next (at most `limit`) entries under `prefix`, keys as text, and whether the
    /// pass goes on after them (once it does not, the next call starts over).
    pub fn next_page(
        &self,
        store: &DurableStore,
        prefix: &str,
        limit: usize,
    ) -> Result<(Page, bool), ParticipantError> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let start = match cursor.take() {
            Some(mut last) => {
                last.push(0);
                last
            }
            None => prefix.as_bytes().to_vec(),
        };
        let mut page = Vec::new();
        let mut last = None;
        for entry in store.db().range(start..).take(limit) {
            let (key, value) = entry.map_err(failed)?;
            if !key.starts_with(prefix.as_bytes()) {
                break;
            }
            last = Some(key.to_vec());
            page.push((String::from_utf8_lossy(&key).into_owned(), value.to_vec()));
        }
        let more = page.len() == limit;
        if more {
            *cursor = last;
        }
        Ok((page, more))
    }
}

impl Ledger {
    pub fn new(store: Arc<DurableStore>) -> Self {
        Self {
            store,
            lock: Mutex::new(()),
        }
    }

    pub fn store(&self) -> &DurableStore {
        &self.store
    }

    /// Held across a read-modify-write sequence.
    pub async fn lock(&self) -> MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    pub fn i64(&self, key: &str) -> Result<Option<i64>, ParticipantError> {
        read_i64(&self.store, key)
    }

    pub fn json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ParticipantError> {
        let value = self.store.db().get(key.as_bytes()).map_err(failed)?;
        value
            .map(|bytes| serde_json::from_slice(&bytes).map_err(failed))
            .transpose()
    }

    /// Applies `changes` together with the barrier's record of the operation `branch` is
    /// running (see `BranchContext::include_barrier_record`): the effect and the record
    /// reach the disk in one write, so a crash can never separate them.
    pub async fn apply_with(
        &self,
        branch: &BranchContext,
        mut changes: Changes,
    ) -> Result<(), ParticipantError> {
        branch.include_barrier_record(&mut changes.0);
        self.apply(changes).await
    }

    /// Applies `changes` and waits until they are on disk.
    pub async fn apply(&self, changes: Changes) -> Result<(), ParticipantError> {
        self.store
            .write(changes.0, Durability::Forced)
            .await
            .map_err(failed)
    }

    /// Sets each counter that does not exist yet, and remembers its first value under
    /// `initial/<key>` (for the audit).
    pub async fn open_counters(&self, counters: &[(String, i64)]) -> Result<(), ParticipantError> {
        let _guard = self.lock().await;
        let mut changes = Changes::default();
        for (key, value) in counters {
            if self.i64(key)?.is_none() {
                changes.set_i64(key, *value);
                changes.set_i64(&format!("initial/{key}"), *value);
            }
        }
        self.apply(changes).await
    }
}

fn read_i64(store: &DurableStore, key: &str) -> Result<Option<i64>, ParticipantError> {
    let value = store.db().get(key.as_bytes()).map_err(failed)?;
    value
        .map(|bytes| {
            let bytes: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| failed(format!("{key} is not an 8-byte integer")))?;
            Ok(i64::from_be_bytes(bytes))
        })
        .transpose()
}

/// Every counter under `prefix` (key without the prefix → value), read from a store.
pub fn counters(
    store: &DurableStore,
    prefix: &str,
) -> Result<BTreeMap<String, i64>, ParticipantError> {
    let mut found = BTreeMap::new();
    for entry in store.db().scan_prefix(prefix.as_bytes()) {
        let (key, _) = entry.map_err(failed)?;
        let key = String::from_utf8_lossy(&key).into_owned();
        if let Some(value) = read_i64(store, &key)? {
            found.insert(key[prefix.len()..].to_string(), value);
        }
    }
    Ok(found)
}

/// Every JSON record under `prefix` (key without the prefix → value), read from a store.
pub fn records<T: DeserializeOwned>(
    store: &DurableStore,
    prefix: &str,
) -> Result<BTreeMap<String, T>, ParticipantError> {
    let mut found = BTreeMap::new();
    for entry in store.db().scan_prefix(prefix.as_bytes()) {
        let (key, value) = entry.map_err(failed)?;
        let key = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
        found.insert(key, serde_json::from_slice(&value).map_err(failed)?);
    }
    Ok(found)
}

/// Parses `alice=100,bob=50`.
pub fn parse_counters(text: &str) -> Result<Vec<(String, i64)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let (name, value) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not NAME=NUMBER"))?;
            let value = value
                .trim()
                .parse::<i64>()
                .map_err(|e| format!("{entry:?}: {e}"))?;
            Ok((name.trim().to_string(), value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse() {
        assert_eq!(
            parse_counters("alice=100, bob=-5").unwrap(),
            vec![("alice".to_string(), 100), ("bob".to_string(), -5)]
        );
        assert!(parse_counters("alice").is_err());
        assert!(parse_counters("alice=x").is_err());
    }

    #[tokio::test]
    async fn counters_open_once_and_remember_their_first_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
        let ledger = Ledger::new(store.clone());
        ledger
            .open_counters(&[("acct/a".into(), 10)])
            .await
            .unwrap();
        let mut changes = Changes::default();
        changes.set_i64("acct/a", 7);
        ledger.apply(changes).await.unwrap();
        ledger
            .open_counters(&[("acct/a".into(), 10)])
            .await
            .unwrap();
        assert_eq!(ledger.i64("acct/a").unwrap(), Some(7));
        assert_eq!(counters(&store, "initial/acct/").unwrap()["a"], 10);
    }
}
