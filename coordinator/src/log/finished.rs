//! The count of a log's final records that a purge by count may delete (`SledLog`'s `e/`
//! entries), kept while final writes and purges race.
//!
//! The log counts its entries once at open, then follows its writes and purges. Both act
//! on what the store has *applied*, and both are queued before they are applied, so the
//! count takes three things into account:
//! - a final record written again before its first write was applied (an operator's
//!   resolve that finishes a saga writes its final record twice, both forced) is found
//!   among the keys counted lately, not counted twice;
//! - a write issued after a purge queued the removal of its entry, but before the removal
//!   was applied, lands after it: it is counted again;
//! - a write and a purge submit their batches under one lock, so that the order they are
//!   counted in is the order the store applies them.
//!
//! Invariant: the count is never below the entries the store holds once every submitted
//! batch is applied, except after more than [`RECENTLY_COUNTED`] final writes were
//! submitted while one was still unapplied (the store would have to lag by seconds). It
//! may be above them: a record an operator forgot stays counted, and so does one counted
//! again after it left the recent keys while its first write was still queued, until the
//! next open or until a purge by count finds no entry left to delete. A purge by count
//! therefore deletes early, never late.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};

/// Keys of the latest counted final writes that are remembered.
pub const RECENTLY_COUNTED: usize = 8_192;

#[derive(Debug, Default)]
pub struct FinishedCount {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    count: u64,
    /// Keys counted by the latest final writes, each with the number of its latest
    /// count, and those counts in order (older ones may name keys a purge took out).
    recent: HashMap<Vec<u8>, u64>,
    order: VecDeque<(u64, Vec<u8>)>,
    counted: u64,
    /// Keys whose removal a purge has submitted and not yet seen applied.
    removing: HashSet<Vec<u8>>,
}

impl FinishedCount {
    /// Starts from the entries counted at open.
    pub fn new(count: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                count,
                ..Inner::default()
            }),
        }
    }

    pub fn get(&self) -> u64 {
        self.lock().count
    }

    /// A final write of `key`: counts it unless it was counted lately or the store holds
    /// it (`applied`) and no purge is removing it, then calls `submit` under the same
    /// lock. `applied` is read only when needed; an error reading it counts the key.
    pub fn write<T>(
        &self,
        key: &[u8],
        applied: impl FnOnce() -> Result<bool, super::LogError>,
        submit: impl FnOnce() -> T,
    ) -> T {
        let mut inner = self.lock();
        let counted_already = inner.recent.contains_key(key)
            || (!inner.removing.contains(key) && applied().unwrap_or(false));
        if !counted_already {
            inner.count += 1;
            inner.remember(key.to_vec());
        }
        submit()
    }

    /// A purge removing `keys` (entries the store holds): marks them as being removed and
    /// calls `submit` under the same lock. [`removed`](Self::removed) must follow,
    /// whether the batch was applied or not.
    pub fn removing<T>(&self, keys: &[Vec<u8>], submit: impl FnOnce() -> T) -> T {
        let mut inner = self.lock();
        for key in keys {
            inner.recent.remove(key);
            inner.removing.insert(key.clone());
        }
        submit()
    }

    /// The purge of `keys` is over: they are no longer counted if it was `applied`. With
    /// `emptied` (a purge of every entry it found), whatever the store holds now was
    /// written since, so it is among the keys counted lately.
    pub fn removed(&self, keys: &[Vec<u8>], applied: bool, emptied: bool) {
        let mut inner = self.lock();
        for key in keys {
            inner.removing.remove(key);
        }
        if applied {
            inner.count = inner.count.saturating_sub(keys.len() as u64);
            if emptied {
                inner.count = inner.count.min(inner.recent.len() as u64);
            }
        }
    }

    /// An operator forgot the record of `key`: it is not among the keys counted lately
    /// any more, though it stays counted (see the module docs).
    pub fn forgotten(&self, key: &[u8]) {
        self.lock().recent.remove(key);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change under the lock is a few field updates that cannot be left half
        // done by a panic elsewhere.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    fn remember(&mut self, key: Vec<u8>) {
        if self.order.len() == RECENTLY_COUNTED {
            if let Some((number, oldest)) = self.order.pop_front() {
                if self.recent.get(&oldest) == Some(&number) {
                    self.recent.remove(&oldest);
                }
            }
        }
        self.counted += 1;
        self.recent.insert(key.clone(), self.counted);
        self.order.push_back((self.counted, key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Vec<u8> {
        vec![b'e', n]
    }

    #[test]
    fn a_rewrite_before_the_first_write_is_applied_counts_once() {
        let count = FinishedCount::new(0);
        count.write(&key(1), || Ok(false), || ());
        count.write(&key(1), || Ok(false), || ());
        assert_eq!(count.get(), 1);
        // Applied and no longer recent: the store's answer decides.
        count.write(&key(2), || Ok(true), || ());
        assert_eq!(count.get(), 1);
    }

    #[test]
    fn a_write_after_a_purge_queued_its_removal_counts_again() {
        let count = FinishedCount::new(1);
        count.removing(&[key(1)], || ());
        // The store still holds the entry, but the removal is queued ahead of this write.
        count.write(&key(1), || Ok(true), || ());
        count.removed(&[key(1)], true, false);
        assert_eq!(count.get(), 1, "the write re-inserts it after the removal");
    }

    #[test]
    fn a_purge_that_was_not_applied_leaves_the_count() {
        let count = FinishedCount::new(3);
        count.removing(&[key(1), key(2)], || ());
        count.removed(&[key(1), key(2)], false, false);
        assert_eq!(count.get(), 3);
        count.removing(&[key(1), key(2)], || ());
        count.removed(&[key(1), key(2)], true, false);
        assert_eq!(count.get(), 1);
    }

    #[test]
    fn a_purge_that_emptied_the_entries_keeps_only_what_was_counted_since() {
        // Counted high (an operator forgot some): 10 counted, 2 held.
        let count = FinishedCount::new(9);
        count.write(&key(9), || Ok(false), || ());
        count.removing(&[key(1)], || ());
        count.removed(&[key(1)], true, true);
        assert_eq!(count.get(), 1, "key 9 may still be queued");
    }

    #[test]
    fn the_recent_keys_are_bounded_and_a_key_counted_again_stays_by_its_new_count() {
        let count = FinishedCount::new(0);
        let again = u64::MAX.to_be_bytes().to_vec();
        count.write(&again, || Ok(false), || ());
        count.removing(std::slice::from_ref(&again), || ());
        count.removed(std::slice::from_ref(&again), true, false);
        count.write(&again, || Ok(false), || ());
        // Its first count leaves with the next write past the bound; its second stays.
        for n in 0..RECENTLY_COUNTED - 1 {
            count.write(&(n as u64).to_be_bytes(), || Ok(false), || ());
        }
        count.write(&again, || Ok(false), || ());
        let inner = count.lock();
        assert_eq!(inner.order.len(), RECENTLY_COUNTED);
        assert_eq!(inner.recent.len(), RECENTLY_COUNTED);
        assert_eq!(inner.count, RECENTLY_COUNTED as u64);
    }
}
