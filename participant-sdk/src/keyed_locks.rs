//! Per-key async mutual exclusion, so that concurrent duplicates of one operation run one
//! after the other (the second then finds the first one's record).
//!
//! Invariants: an entry exists in the map only while some task holds or awaits its lock
//! (a wait given up removes its place too), so the map's size is bounded by the
//! requests in flight; and at most [`MAX_WAITING_PER_KEY`] wait for one key's lock. A
//! call whose user code does not end holds its branch's lock, and the calls that
//! follow for that branch (the coordinator's retries) run on by themselves once their
//! callers give up: without the bound they would pile up behind it for as long as it
//! lasts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// How many may wait for one key's lock while another holds it; one more is refused.
pub const MAX_WAITING_PER_KEY: usize = 8;

/// A lock refused because [`MAX_WAITING_PER_KEY`] already wait for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "{MAX_WAITING_PER_KEY} operations on this branch already wait for one that has not \
     ended; retry later"
)]
pub struct Busy;

#[derive(Debug, Default)]
pub struct KeyedLocks {
    entries: Mutex<HashMap<Vec<u8>, Entry>>,
}

#[derive(Debug, Default)]
struct Entry {
    mutex: Arc<tokio::sync::Mutex<()>>,
    /// The task holding the lock and those waiting for it.
    users: usize,
}

/// Holds the lock of one key until dropped.
#[derive(Debug)]
pub struct KeyGuard<'a> {
    // Fields drop in order: the lock is released before the place is given up.
    _guard: OwnedMutexGuard<()>,
    _place: Place<'a>,
}

/// A task's place among one key's users, from its call to `lock` until it gives the lock
/// up or stops waiting; the last one out removes the entry.
#[derive(Debug)]
struct Place<'a> {
    key: Vec<u8>,
    locks: &'a KeyedLocks,
}

impl KeyedLocks {
    pub fn new() -> Self {
        Self::default()
    }

    /// Waits for `key`'s lock, or refuses at once when [`MAX_WAITING_PER_KEY`] already
    /// wait for it.
    pub async fn lock(&self, key: Vec<u8>) -> Result<KeyGuard<'_>, Busy> {
        let (mutex, place) = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            let entry = entries.entry(key.clone()).or_default();
            if entry.users > MAX_WAITING_PER_KEY {
                return Err(Busy);
            }
            entry.users += 1;
            (entry.mutex.clone(), Place { key, locks: self })
        };
        Ok(KeyGuard {
            _guard: mutex.lock_owned().await,
            _place: place,
        })
    }

    /// `key`'s lock if no one holds or waits for it; `None` at once otherwise.
    pub fn try_lock(&self, key: Vec<u8>) -> Option<KeyGuard<'_>> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let std::collections::hash_map::Entry::Vacant(vacant) = entries.entry(key.clone()) else {
            return None;
        };
        let entry = vacant.insert(Entry {
            users: 1,
            ..Entry::default()
        });
        let Ok(guard) = entry.mutex.clone().try_lock_owned() else {
            unreachable!("a new entry's mutex is held by no one");
        };
        Some(KeyGuard {
            _guard: guard,
            _place: Place { key, locks: self },
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut entries = self.locks.entries.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = entries.get_mut(&self.key) else {
            unreachable!("a key's entry outlives every place in it");
        };
        entry.users -= 1;
        if entry.users == 0 {
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
                let _guard = locks.lock(b"k".to_vec()).await.unwrap();
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
        let _a = locks.lock(b"a".to_vec()).await.unwrap();
        let b = tokio::time::timeout(Duration::from_secs(5), locks.lock(b"b".to_vec())).await;
        assert!(b.is_ok());
    }

    /// The holder leaves while another waits, then the waiter gives up before it was
    /// woken: the last one out removes the entry.
    #[tokio::test]
    async fn a_wait_given_up_leaves_no_entry_behind() {
        let locks = KeyedLocks::new();
        let held = locks.lock(b"k".to_vec()).await.unwrap();
        let mut waiting = Box::pin(locks.lock(b"k".to_vec()));
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "the lock is held"
        );
        drop(held);
        assert_eq!(locks.len(), 1, "the waiter still has its place");
        drop(waiting);
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn one_more_than_the_waiters_allowed_is_refused_until_one_leaves() {
        let locks = Arc::new(KeyedLocks::new());
        let held = locks.lock(b"k".to_vec()).await.unwrap();
        let mut waiters = Vec::new();
        for _ in 0..MAX_WAITING_PER_KEY {
            let locks = locks.clone();
            waiters.push(tokio::spawn(async move {
                drop(locks.lock(b"k".to_vec()).await.unwrap());
            }));
        }
        let started = std::time::Instant::now();
        loop {
            let users = locks.entries.lock().unwrap()[b"k".as_slice()].users;
            if users == 1 + MAX_WAITING_PER_KEY {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "{users} users");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(locks.lock(b"k".to_vec()).await.unwrap_err(), Busy);
        assert!(
            locks.lock(b"other".to_vec()).await.is_ok(),
            "other keys unaffected"
        );
        drop(held);
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert!(locks.lock(b"k".to_vec()).await.is_ok());
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_try_takes_only_a_lock_no_one_holds_or_awaits() {
        let locks = KeyedLocks::new();
        let held = locks.lock(b"k".to_vec()).await.unwrap();
        assert!(locks.try_lock(b"k".to_vec()).is_none());
        let other = locks.try_lock(b"other".to_vec()).expect("a free key");
        assert!(locks.try_lock(b"other".to_vec()).is_none());
        drop((held, other));
        assert_eq!(locks.len(), 0);
        let tried = locks.try_lock(b"k".to_vec()).expect("free again");
        let waiting = locks.lock(b"k".to_vec());
        drop(tried);
        drop(waiting.await.unwrap());
        assert_eq!(locks.len(), 0);
    }
}
