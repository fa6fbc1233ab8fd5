//! Marked keys: a set of keys a [`DurableStore`](super::DurableStore) keeps in memory for
//! its caller, changed by the batches it applies (`WriteBatch::mark`, `unmark`) and
//! listed in key order ([`DurableStore::marked`](super::DurableStore::marked)).
//!
//! Marks are never written to disk: they are an index the caller can rebuild from its
//! records, which is what the barrier's in-doubt branches are (a branch is in doubt
//! exactly when its record says so). Keeping them off the disk spares the store two
//! writes per marked record, a key inserted at the right edge of its range and removed
//! from the left soon after, which keeps sled splitting and merging leaves.
//!
//! The invariants:
//! - A batch's marks change with the batch, in write order: the logger applies them
//!   right after the batch reaches sled and before any of its writes is acknowledged,
//!   so once a ticket resolves the set shows its marks.
//! - The set is rebuilt ("seeded") once, by the first listing, from what sled holds,
//!   without holding up the logger: the listing starts recording every mark the
//!   logger applies, then reads the records (from the database current after that
//!   start), then replaces the set with what it read and replays what was recorded,
//!   the last change of each key winning. A key changed while it read ends as its
//!   latest batch left it, whatever the read saw of it; a key not changed then was
//!   read as its last batch before the start left it, which sled (and any generation
//!   a compaction switched to) holds.
//! - A seed that fails is remembered: every listing fails with its error until the
//!   store is opened again, instead of reading the whole store again each time.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::Mutex;

use super::StoreError;

/// The set, and how far its seed is.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    state: Mutex<MarkState>,
    /// Held by the listing that seeds, for the whole seed: one seed at a time, and a
    /// listing that comes meanwhile waits for it.
    seeding: Mutex<()>,
}

#[derive(Debug, Default)]
struct MarkState {
    keys: BTreeSet<Vec<u8>>,
    seed: Seed,
}

#[derive(Debug, Default)]
enum Seed {
    #[default]
    NotYet,
    /// Reading the records; the marks applied since it began, the last per key.
    Reading(BTreeMap<Vec<u8>, bool>),
    Done,
    Failed(StoreError),
}

impl MarkState {
    /// The listing, once the set is seeded (or its seed failed).
    fn listed(
        &self,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Option<Result<Vec<Vec<u8>>, StoreError>> {
        match &self.seed {
            Seed::Done => {
                let start = after.map_or(Bound::Unbounded, Bound::Excluded);
                Some(Ok(self
                    .keys
                    .range::<[u8], _>((start, Bound::Unbounded))
                    .take(limit)
                    .cloned()
                    .collect()))
            }
            Seed::Failed(error) => Some(Err(error.clone())),
            Seed::NotYet | Seed::Reading(_) => None,
        }
    }
}

impl Marks {
    fn state(&self) -> std::sync::MutexGuard<'_, MarkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (`true`) or clears each key, in order; called by the logger once the batches
    /// carrying them are applied.
    pub(super) fn apply<'a>(&self, changes: impl IntoIterator<Item = &'a (Vec<u8>, bool)>) {
        let mut state = self.state();
        let state = &mut *state;
        for (key, marked) in changes {
            if let Seed::Reading(recorded) = &mut state.seed {
                recorded.insert(key.clone(), *marked);
            }
            if *marked {
                state.keys.insert(key.clone());
            } else {
                state.keys.remove(key);
            }
        }
    }

    /// Up to `limit` marked keys after `after` (`None`: from the first), in key order.
    /// The first call seeds the set with what `seed` reads from sled (see the module
    /// docs); it must take its database handle when called, not before.
    pub(super) fn list(
        &self,
        after: Option<&[u8]>,
        limit: usize,
        seed: impl FnOnce() -> Result<BTreeSet<Vec<u8>>, StoreError>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        if let Some(listed) = self.state().listed(after, limit) {
            return listed;
        }
        let _one_seed = self.seeding.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut state = self.state();
            if let Some(listed) = state.listed(after, limit) {
                return listed;
            }
            state.seed = Seed::Reading(BTreeMap::new());
        }
        let read = seed();
        let mut state = self.state();
        let recorded = match std::mem::take(&mut state.seed) {
            Seed::Reading(recorded) => recorded,
            _ => unreachable!("only the seeding listing, holding `seeding`, ends a seed"),
        };
        state.seed = match read {
            Ok(mut keys) => {
                for (key, marked) in recorded {
                    if marked {
                        keys.insert(key);
                    } else {
                        keys.remove(&key);
                    }
                }
                state.keys = keys;
                Seed::Done
            }
            Err(error) => Seed::Failed(error),
        };
        state
            .listed(after, limit)
            .unwrap_or_else(|| unreachable!("the seed just ended"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> BTreeSet<Vec<u8>> {
        names.iter().map(|name| name.as_bytes().to_vec()).collect()
    }

    fn listed(marks: &Marks, after: Option<&str>, limit: usize) -> Vec<String> {
        marks
            .list(after.map(str::as_bytes), limit, || {
                panic!("the set was seeded already")
            })
            .unwrap()
            .into_iter()
            .map(|key| String::from_utf8(key).unwrap())
            .collect()
    }

    #[test]
    fn the_seed_replaces_what_was_marked_before_it_and_later_marks_change_it() {
        let marks = Marks::default();
        marks.apply(&[(b"early".to_vec(), true)]);
        let seeded = marks.list(None, 10, || Ok(keys(&["a", "b", "c"]))).unwrap();
        assert_eq!(
            seeded,
            keys(&["a", "b", "c"]).into_iter().collect::<Vec<_>>()
        );
        marks.apply(&[(b"b".to_vec(), false), (b"d".to_vec(), true)]);
        assert_eq!(listed(&marks, None, 10), ["a", "c", "d"]);
        assert_eq!(listed(&marks, Some("a"), 1), ["c"]);
        assert_eq!(listed(&marks, Some("c"), 10), ["d"]);
        assert!(listed(&marks, Some("d"), 10).is_empty());
    }

    #[test]
    fn marks_applied_while_the_seed_reads_win_over_what_it_read() {
        let marks = Marks::default();
        let seeded = marks
            .list(None, 10, || {
                // The logger applies groups while the records are read: "a" was read
                // in doubt and then settled, "b" read settled and then marked.
                marks.apply(&[(b"a".to_vec(), false), (b"b".to_vec(), true)]);
                marks.apply(&[(b"c".to_vec(), true), (b"c".to_vec(), false)]);
                Ok(keys(&["a", "c", "z"]))
            })
            .unwrap();
        assert_eq!(seeded, keys(&["b", "z"]).into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_seed_is_remembered_not_read_again() {
        let marks = Marks::default();
        let failed = marks.list(None, 10, || Err(StoreError::Read("damaged".into())));
        assert_eq!(failed, Err(StoreError::Read("damaged".into())));
        let again = marks.list(None, 10, || panic!("read again"));
        assert_eq!(again, Err(StoreError::Read("damaged".into())));
    }

    #[test]
    fn a_mark_set_then_cleared_in_one_group_is_cleared() {
        let marks = Marks::default();
        marks.list(None, 10, || Ok(BTreeSet::new())).unwrap();
        marks.apply(&[(b"k".to_vec(), true), (b"k".to_vec(), false)]);
        assert!(listed(&marks, None, 10).is_empty());
    }
}
