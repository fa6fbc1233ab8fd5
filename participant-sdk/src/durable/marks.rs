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
//!   under the set's lock. The logger applies a group's marks under that lock too and
//!   only after the group is in sled, so for every key the later of the two wins: a
//!   seed that read an older record is followed by the newer record's mark, and a mark
//!   applied before the seed began is read back from sled by the seed.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Mutex;

use super::StoreError;

/// The set and whether it was seeded from the caller's records yet.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    state: Mutex<MarkState>,
}

#[derive(Debug, Default)]
struct MarkState {
    keys: BTreeSet<Vec<u8>>,
    seeded: bool,
}

impl Marks {
    /// Sets (`true`) or clears each key, in order; called by the logger once the batches
    /// carrying them are applied.
    pub(super) fn apply<'a>(&self, changes: impl IntoIterator<Item = &'a (Vec<u8>, bool)>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for (key, marked) in changes {
            if *marked {
                state.keys.insert(key.clone());
            } else {
                state.keys.remove(key);
            }
        }
    }

    /// Up to `limit` marked keys after `after` (`None`: from the first), in key order.
    /// The first call seeds the set with what `seed` returns (read from sled while the
    /// set is locked); a failed seed is tried again by the next call.
    pub(super) fn list(
        &self,
        after: Option<&[u8]>,
        limit: usize,
        seed: impl FnOnce() -> Result<BTreeSet<Vec<u8>>, StoreError>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !state.seeded {
            state.keys = seed()?;
            state.seeded = true;
        }
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        Ok(state
            .keys
            .range::<[u8], _>((start, Bound::Unbounded))
            .take(limit)
            .cloned()
            .collect())
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
    fn a_failed_seed_is_tried_again() {
        let marks = Marks::default();
        let failed = marks.list(None, 10, || Err(StoreError::Read("damaged".into())));
        assert_eq!(failed, Err(StoreError::Read("damaged".into())));
        let seeded = marks.list(None, 10, || Ok(keys(&["a"]))).unwrap();
        assert_eq!(seeded, vec![b"a".to_vec()]);
    }

    #[test]
    fn a_mark_set_then_cleared_in_one_group_is_cleared() {
        let marks = Marks::default();
        marks.list(None, 10, || Ok(BTreeSet::new())).unwrap();
        marks.apply(&[(b"k".to_vec(), true), (b"k".to_vec(), false)]);
        assert!(listed(&marks, None, 10).is_empty());
    }
}
