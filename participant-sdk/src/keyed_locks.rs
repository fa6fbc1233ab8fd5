//! Per-key async mutual exclusion, so that concurrent duplicates of one operation run one
//! after the other (the second then finds the first one's record).
//!
//! Invariant: an entry exists in the map only while some task holds or awaits its lock,
//! so the map's size is bounded by the number of requests in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

#[derive(Debug, Default)]
pub struct KeyedLocks {
    entries: Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds the lock of one key until dropped.
#[derive(Debug)]
pub struct KeyGuard<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    key: Vec<u8>,
    locks: &'a KeyedLocks,
}

impl KeyedLocks {
    pub fn new() -> Self {
        Self::default()
    }

    pub async fn lock(&self, key: Vec<u8>) -> KeyGuard<'_> {
        let mutex = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.entry(key.clone()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        KeyGuard {
            guard: Some(guard),
            key,
            locks: self,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        // Release the mutex first, so that only the map and waiters hold the Arc.
        drop(self.guard.take());
        let mut entries = self.locks.entries.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only taken under the map lock, so the count is exact here.
        if entries
            .get(&self.key)
            .is_some_and(|mutex| Arc::strong_count(mutex) == 1)
        {
            entries.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn same_key_is_exclusive_and_entries_are_removed() {
        let locks = Arc::new(KeyedLocks::new());
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, max_inside) = (locks.clone(), inside.clone(), max_inside.clone());
            tasks.push(tokio::spawn(async move {
                let _guard = locks.lock(b"k".to_vec()).await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_inside.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(max_inside.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn different_keys_do_not_block_each_other() {
        let locks = KeyedLocks::new();
        let _a = locks.lock(b"a".to_vec()).await;
        let b = tokio::time::timeout(Duration::from_secs(5), locks.lock(b"b".to_vec())).await;
        assert!(b.is_ok());
    }
}
