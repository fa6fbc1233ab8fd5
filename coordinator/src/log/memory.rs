//! An in-memory decision log: for tests and for running without a disk. Every write is
//! "durable" the moment it is applied, for as long as the [`MemoryLog`]'s storage lives;
//! handles made with [`MemoryLog::reopen`] share that storage, which is how tests
//! simulate a restart.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{DecisionLog, Durability, LogError, LogWrite, held_for_retention};
use crate::model::{TxnId, TxnRecord, UnixMs};

#[derive(Debug, Default)]
pub struct MemoryLog {
    records: Arc<Mutex<BTreeMap<TxnId, TxnRecord>>>,
    closed: AtomicBool,
}

impl MemoryLog {
    pub fn new() -> Self {
        Self::default()
    }

    /// A new handle on the same storage, as if the process had restarted.
    pub fn reopen(&self) -> Self {
        Self {
            records: self.records.clone(),
            closed: AtomicBool::new(false),
        }
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<TxnId, TxnRecord>> {
        // A panic while holding the lock cannot leave a map half-updated: every
        // mutation is a single insert or remove.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The final records that have an end and pass `which`, oldest end first: the ones
/// purges delete.
fn finished_by_end(
    records: &BTreeMap<TxnId, TxnRecord>,
    which: impl Fn(&TxnRecord) -> bool,
) -> Vec<(UnixMs, TxnId)> {
    let mut ended: Vec<(UnixMs, TxnId)> = records
        .values()
        .filter(|r| r.state.is_final() && which(r))
        .filter_map(|r| r.ended_unix_ms.map(|ended| (ended, r.id)))
        .collect();
    ended.sort();
    ended
}

impl DecisionLog for MemoryLog {
    fn write(&self, record: &TxnRecord, _durability: Durability) -> LogWrite {
        let result = if self.closed.load(Ordering::SeqCst) {
            Err(LogError::Closed)
        } else {
            self.records().insert(record.id, record.clone());
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn get(&self, id: &TxnId) -> Result<Option<TxnRecord>, LogError> {
        Ok(self.records().get(id).cloned())
    }

    fn find_by_key(&self, key: &str) -> Result<Option<TxnId>, LogError> {
        Ok(self
            .records()
            .values()
            .find(|r| r.idempotency_key.as_deref() == Some(key))
            .map(|r| r.id))
    }

    fn unfinished(&self) -> Result<Vec<TxnRecord>, LogError> {
        Ok(self
            .records()
            .values()
            .filter(|r| !r.state.is_final())
            .cloned()
            .collect())
    }

    fn scan(&self, after: Option<TxnId>, limit: usize) -> Result<Vec<TxnRecord>, LogError> {
        let records = self.records();
        let iter: Box<dyn Iterator<Item = &TxnRecord>> = match after {
            Some(after) => Box::new(
                records
                    .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                    .map(|(_, r)| r),
            ),
            None => Box::new(records.values()),
        };
        Ok(iter.take(limit).cloned().collect())
    }

    fn purge_ended_before(&self, cutoff_unix_ms: UnixMs, max: usize) -> Result<usize, LogError> {
        let mut records = self.records();
        let mut ended = finished_by_end(&records, |_| true);
        ended.retain(|(ended, _)| *ended < cutoff_unix_ms);
        ended.truncate(max);
        for (_, id) in &ended {
            records.remove(id);
        }
        Ok(ended.len())
    }

    fn finished_count(&self) -> u64 {
        finished_by_end(&self.records(), |r| !held_for_retention(r)).len() as u64
    }

    fn purge_finished_beyond(&self, keep: u64, max: usize) -> Result<usize, LogError> {
        let mut records = self.records();
        let mut ended = finished_by_end(&records, |r| !held_for_retention(r));
        let excess = (ended.len() as u64).saturating_sub(keep);
        ended.truncate(usize::try_from(excess).unwrap_or(usize::MAX).min(max));
        for (_, id) in &ended {
            records.remove(id);
        }
        Ok(ended.len())
    }

    fn forget(&self, record: &TxnRecord) -> LogWrite {
        let result = if self.closed.load(Ordering::SeqCst) {
            Err(LogError::Closed)
        } else {
            self.records().remove(&record.id);
            Ok(())
        };
        Box::pin(std::future::ready(result))
    }

    fn close(&self) -> Result<(), LogError> {
        self.closed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::suite::{self, LogHarness};
    use super::*;

    struct MemoryHarness {
        storage: MemoryLog,
    }

    impl LogHarness for MemoryHarness {
        fn open(&mut self) -> Arc<dyn DecisionLog> {
            Arc::new(self.storage.reopen())
        }

        fn reopen(&mut self, previous: Arc<dyn DecisionLog>) -> Arc<dyn DecisionLog> {
            previous.close().unwrap();
            drop(previous);
            self.open()
        }
    }

    fn harness() -> MemoryHarness {
        MemoryHarness {
            storage: MemoryLog::new(),
        }
    }

    suite::decision_log_suite!(harness);
}
