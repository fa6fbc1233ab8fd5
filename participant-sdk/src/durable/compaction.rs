//! Compaction: rebuilding the store in a fresh sled database so that its size on disk
//! follows its live records, not everything ever written (sled 0.34.7 does not give
//! back the space of removed records; a log whose live records stay the same size still
//! grew from 12 to 39 MiB over 1,000,000 transactions).
//!
//! The logger thread does it between group commits, so no write ever waits for more
//! than one bounded step:
//! 1. it opens an empty database in the next generation's directory (see
//!    `generations`);
//! 2. it copies the live records over, [`COPY_CHUNK_RECORDS`] at a time between groups,
//!    in key order; every group committed meanwhile is applied to both databases, so a
//!    record written or removed behind the copy's position is written or removed in the
//!    new one too, and one ahead of it is copied with its latest value when reached;
//! 3. when the copy is done it makes the new generation complete and durable (sled's
//!    flush, every file and directory synced, `fdatasync`, its own high-water mark at the
//!    last acknowledged group), then switches `CURRENT` to it;
//! 4. readers get the new database from then on; the old one is deleted once no reader
//!    holds it any more.
//!
//! When: under a [`CompactionPolicy`], once the store is past `min_bytes` and past
//! `growth_factor` times its base (its size after the last compaction), and has
//! removed `min_removed_records` records since. A store created empty has no base and
//! awaits one (`Base::Awaited`, kept in the store across reopens): its size at the
//! first look after its first removals becomes the base, instead of a copy that would
//! free little.
//!
//! Invariants:
//! - Until the switch the old generation is the store: a crash, or any error, before it
//!   leaves the store as it was (the unfinished generation is removed at the next open
//!   or after the error). A failed step of compaction never fails the store; a failed
//!   switch whose rename may have happened does, as any uncertain write would.
//! - The new generation holds, at the switch, exactly what the old one holds: every
//!   record copied or mirrored, and the forced-group number (so that the high-water
//!   check keeps working across the switch).
//! - Only the caller's tree and the store's bookkeeping are copied, so a database that
//!   holds other sled trees (written around the store) is never compacted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::files::{self, SyncedFiles, SyncedPath};
use super::generations::{self, SwitchError};
use super::high_water::{self, HighWater};
use super::logger::Logger;
use super::{
    BASE_AWAITED_KEY, COMPACTED_BYTES_KEY, CompactionObserver, Generation, LOG_FILE_NAME,
    META_TREE, open_sled_at,
};

mod policy;
mod switch;
#[cfg(test)]
pub(super) use policy::baseline_bytes;
use policy::free_bytes;
pub(super) use policy::{Base, generation_bytes, store_bytes, stored_base};
pub use policy::{
    CompactionPolicy, CompactionReport, DEFAULT_COMPACTION_GROWTH_FACTOR,
    DEFAULT_COMPACTION_MIN_BYTES, DEFAULT_COMPACTION_MIN_REMOVED_RECORDS,
    DEFAULT_COMPACTION_RETRY_AFTER_FAILURE_MS, MIN_COMPACTION_GROWTH_FACTOR,
};

/// Records copied per step, between two group commits (fewer if they reach the
/// store's `max_batch_bytes`). A group that comes during a step waits for it: at 1,000
/// records a saga's p99 at 64 in flight during a compaction was 28–34 ms, at 250 it is
/// 19–28 ms, at the same rate and with compactions that take as long
/// (docs/PERFORMANCE.md, "Smaller compaction steps").
pub const COPY_CHUNK_RECORDS: usize = 250;
/// Free space a compaction leaves on the filesystem beyond its copy: it does not start
/// without it, and gives up when the copy would eat into it (the store's own writes
/// need the room more than the compaction does).
const FREE_SPACE_MARGIN_BYTES: u64 = 64 * 1024 * 1024;
/// How long a replaced generation may wait for its readers, or for its files to be
/// deleted, before they are left to the next open (and compaction may start again).
const RETIRED_PATIENCE: Duration = Duration::from_secs(600);
/// How long sled's background threads may still touch a database after its last
/// handle is dropped, before its files are deleted.
const LET_GO_OF_FILES: Duration = Duration::from_secs(2);

pub(super) type CompactionWaiter = tokio::sync::oneshot::Sender<Result<CompactionReport, String>>;

/// A generation being built.
pub(super) struct Rebuild {
    number: u64,
    dir: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    /// The last key of the caller's tree copied so far.
    copied_up_to: Option<sled::IVec>,
    records: u64,
    bytes_before: u64,
    /// The removals counted when it started, given back to the policy if it is
    /// abandoned (the old generation still holds their dead space).
    removed_records_before: u64,
}

impl Rebuild {
    /// Applies a group commit's writes (if it has any) and its number (if forced) to the
    /// new database too.
    pub(super) fn mirror(
        &self,
        batch: Option<&sled::Batch>,
        forced_number: Option<[u8; 8]>,
    ) -> Result<(), String> {
        if let Some(batch) = batch {
            self.db
                .apply_batch(batch.clone())
                .map_err(|e| format!("mirroring a group: {e}"))?;
        }
        if let Some(number) = forced_number {
            self.meta
                .insert(super::FORCED_GROUPS_KEY, &number)
                .map_err(|e| format!("mirroring a group's number: {e}"))?;
        }
        Ok(())
    }
}

/// A generation replaced by a newer one (or abandoned), waiting to be deleted.
pub(super) struct Retired {
    number: u64,
    /// Still referenced while readers may hold it.
    held: Option<Arc<Generation>>,
    let_go_at: Option<Instant>,
    since: Instant,
}

/// The logger's compaction state.
#[derive(Default)]
pub(super) struct Compaction {
    pub(super) policy: Option<CompactionPolicy>,
    pub(super) rebuild: Option<Rebuild>,
    pub(super) retired: Option<Retired>,
    waiters: Vec<CompactionWaiter>,
    requested: bool,
    /// The size the policy grows from.
    base: Base,
    /// Records removed since the last compaction started, or since the store opened.
    removed_records: u64,
    next_check: Option<Instant>,
    observer: Option<CompactionObserver>,
}

impl Compaction {
    pub(super) fn new(
        policy: Option<CompactionPolicy>,
        base: Base,
        observer: Option<CompactionObserver>,
    ) -> Self {
        Self {
            policy,
            base,
            observer,
            ..Self::default()
        }
    }

    /// A group removed `records` records from the store.
    pub(super) fn removed(&mut self, records: u64) {
        self.removed_records = self.removed_records.saturating_add(records);
    }

    /// Someone asked for a compaction now (a rebuild already under way serves them:
    /// it copies what is there when it ends).
    pub(super) fn request(&mut self, waiter: CompactionWaiter) {
        self.waiters.push(waiter);
        self.requested |= self.rebuild.is_none();
    }

    /// How long the logger may wait for requests before it has compaction work to do
    /// (`None`: it has none).
    pub(super) fn idle_wait(&self) -> Option<Duration> {
        if self.rebuild.is_some() || (self.requested && self.retired.is_none()) {
            Some(Duration::ZERO)
        } else if self.retired.is_some() || self.requested {
            Some(LET_GO_OF_FILES / 4)
        } else {
            self.policy
                .as_ref()
                .map(|policy| Duration::from_millis(policy.check_interval_ms.max(1)))
        }
    }

    fn answer(&mut self, result: &Result<CompactionReport, String>) {
        for waiter in self.waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }

    /// A compaction that started ended (switched, or abandoned): the observer hears it
    /// first, then its waiters.
    pub(super) fn ended(&mut self, result: &Result<CompactionReport, String>) {
        if let Some(observer) = &self.observer {
            observer(result);
        }
        self.answer(result);
    }

    /// Tells every waiter that no compaction will happen (the store closes or failed).
    pub(super) fn refuse_waiters(&mut self, why: &str) {
        self.requested = false;
        self.answer(&Err(why.to_string()));
    }
}

impl Logger {
    /// One step of compaction work, between group commits: delete a retired
    /// generation, start a rebuild when asked or due, or copy the next chunk (and
    /// switch when the copy is done).
    pub(super) fn compaction_step(&mut self) {
        self.delete_retired_when_let_go();
        if let Some(message) = self.failure.get().cloned() {
            // Once: the policy stops, and so do the wake-ups it asks for.
            if self.compaction.rebuild.is_some() {
                self.abandon_rebuild(format!("the store failed: {message}"));
            }
            self.compaction.policy = None;
            self.compaction.refuse_waiters(&message);
            return;
        }
        if self.compaction.rebuild.is_none() {
            let due = self.compaction.requested || self.compaction_due();
            // A new rebuild waits until the previous generation's files are gone.
            if due && self.compaction.retired.is_none() {
                self.compaction.requested = false;
                if let Err(message) = self.start_rebuild() {
                    self.abandon_rebuild(message);
                }
            }
            return;
        }
        match self.copy_chunk() {
            Ok(false) => {}
            Ok(true) => self.finish_rebuild(),
            Err(message) => self.abandon_rebuild(message),
        }
    }

    fn compaction_due(&mut self) -> bool {
        let Some(policy) = self.compaction.policy.clone() else {
            return false;
        };
        if self.compaction.removed_records < policy.min_removed_records {
            return false;
        }
        let now = Instant::now();
        if self.compaction.next_check.is_some_and(|next| now < next) {
            return false;
        }
        self.compaction.next_check = Some(now + Duration::from_millis(policy.check_interval_ms));
        let bytes = match generation_bytes(&self.generation) {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(%error, "cannot measure the store's size on disk");
                return false;
            }
        };
        if policy.min_removed_records > 0 && self.compaction.base == Base::Awaited {
            // Its first removals: a copy now would free little (a coordinator's log at
            // its first purge, 154–155 MB, was copied to 148–161 MB, and grew back past
            // where a log never copied stays).
            self.set_baseline(bytes);
            tracing::info!(
                bytes,
                "the store's first removals: its size is the compaction policy's base"
            );
            return false;
        }
        let threshold = policy.min_bytes.max(
            self.compaction
                .base
                .bytes()
                .saturating_mul(policy.growth_factor.max(MIN_COMPACTION_GROWTH_FACTOR)),
        );
        bytes > threshold
    }

    fn start_rebuild(&mut self) -> Result<(), String> {
        let trees = self.generation.db.tree_names();
        // The default tree and the store's bookkeeping tree.
        if trees.len() > 2 {
            return Err(format!(
                "the database holds {} sled trees besides the store's own; only the store's \
                 records would be copied",
                trees.len() - 2
            ));
        }
        let bytes_before = generation_bytes(&self.generation).map_err(|e| e.to_string())?;
        // The copy is at most as big as what it copies.
        let free = free_bytes(&self.root)?;
        if free < bytes_before.saturating_add(FREE_SPACE_MARGIN_BYTES) {
            return Err(format!(
                "{free} bytes free: not enough room for a copy of the store's \
                 {bytes_before} bytes and a margin of {FREE_SPACE_MARGIN_BYTES}"
            ));
        }
        let number = self.generation.number + 1;
        let dir = generations::dir_of(&self.root, number);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| format!("removing an unfinished {}: {e}", dir.display()))?;
        }
        files::create_dir_synced(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let db = open_sled_at(&dir, self.cache_capacity_bytes)?;
        let meta = db
            .open_tree(META_TREE)
            .map_err(|e| format!("opening the new generation's bookkeeping: {e}"))?;
        tracing::info!(
            generation = number,
            bytes_before,
            removed_records = self.compaction.removed_records,
            "compacting the store"
        );
        // Removals from here on are mirrored into the copy, which never holds them.
        let removed_records_before = std::mem::take(&mut self.compaction.removed_records);
        self.compaction.rebuild = Some(Rebuild {
            number,
            dir,
            db,
            meta,
            copied_up_to: None,
            records: 0,
            bytes_before,
            removed_records_before,
        });
        Ok(())
    }

    /// A group is about to remove `records` records. A store awaiting a base under a
    /// policy that will never take one (none, or its size alone) stops awaiting it
    /// first: it is about to hold removed records, and a policy set later must treat it
    /// as any store opened with some. The mark goes before the removals in sled's log,
    /// which recovers a prefix of it, so no removal is durable without it.
    pub(super) fn removals_coming(&mut self, records: u64) {
        if records == 0 || self.compaction.base != Base::Awaited {
            return;
        }
        // A policy that takes no base: none, or one that does not count removals.
        let policy = self.compaction.policy.as_ref();
        if policy.is_none_or(|policy| policy.min_removed_records == 0) {
            self.compaction.base = Base::None;
            if let Err(error) = self.generation.meta.remove(BASE_AWAITED_KEY) {
                tracing::warn!(%error, "cannot mark the store as holding removed records");
            }
        }
    }

    /// The size the policy grows from, kept for it after a restart, and the store no
    /// longer awaiting one; durable with the next forced group (a loss only makes the
    /// base be taken again, or the next compaction come sooner).
    fn set_baseline(&mut self, bytes: u64) {
        self.compaction.base = Base::Bytes(bytes);
        let mut batch = sled::Batch::default();
        batch.insert(COMPACTED_BYTES_KEY, &bytes.to_be_bytes());
        batch.remove(BASE_AWAITED_KEY);
        if let Err(error) = self.generation.meta.apply_batch(batch) {
            tracing::warn!(%error, "cannot keep the compaction policy's base");
        }
    }

    /// Copies the next chunk; `Ok(true)` when everything has been copied.
    fn copy_chunk(&mut self) -> Result<bool, String> {
        let Some(rebuild) = self.compaction.rebuild.as_mut() else {
            return Ok(false);
        };
        fail::fail_point!("durable::compaction_copy", |_| Err(
            "injected copy failure".to_string()
        ));
        let start = match rebuild.copied_up_to.clone() {
            Some(key) => std::ops::Bound::Excluded(key),
            None => std::ops::Bound::Unbounded,
        };
        let mut batch = sled::Batch::default();
        let mut copied = 0;
        let mut bytes = 0;
        let mut last = None;
        let mut more = false;
        let range = (start, std::ops::Bound::<sled::IVec>::Unbounded);
        for entry in self.generation.db.range(range) {
            if copied == COPY_CHUNK_RECORDS || bytes >= self.max_batch_bytes {
                more = true;
                break;
            }
            let (key, value) = entry.map_err(|e| format!("reading a record to copy: {e}"))?;
            bytes += key.len() + value.len();
            batch.insert(key.clone(), value);
            last = Some(key);
            copied += 1;
        }
        rebuild
            .db
            .apply_batch(batch)
            .map_err(|e| format!("copying records: {e}"))?;
        rebuild.records += copied as u64;
        if let Some(last) = last {
            rebuild.copied_up_to = Some(last);
        }
        if more {
            let free = free_bytes(&self.root)?;
            if free < FREE_SPACE_MARGIN_BYTES {
                return Err(format!(
                    "{free} bytes left free on the filesystem, less than the margin of \
                     {FREE_SPACE_MARGIN_BYTES}"
                ));
            }
            return Ok(false);
        }
        for entry in self.generation.meta.iter() {
            let (key, value) = entry.map_err(|e| format!("reading the bookkeeping: {e}"))?;
            rebuild
                .meta
                .insert(key, value)
                .map_err(|e| format!("copying the bookkeeping: {e}"))?;
        }
        Ok(true)
    }

    /// Gives up the rebuild in progress, if any: its directory is deleted once sled has
    /// let go of it, and the policy waits before trying again.
    pub(super) fn abandon_rebuild(&mut self, message: String) {
        let retry_after_ms = self
            .compaction
            .policy
            .as_ref()
            .map_or(DEFAULT_COMPACTION_RETRY_AFTER_FAILURE_MS, |policy| {
                policy.retry_after_failure_ms
            });
        self.compaction.next_check = Some(Instant::now() + Duration::from_millis(retry_after_ms));
        if let Some(rebuild) = self.compaction.rebuild.take() {
            tracing::warn!(generation = rebuild.number, error = %message, "compaction abandoned; the store is unchanged");
            self.compaction.removed(rebuild.removed_records_before);
            drop(rebuild);
            self.compaction.retired = Some(Retired {
                number: self.generation.number + 1,
                held: None,
                let_go_at: Some(Instant::now()),
                since: Instant::now(),
            });
            self.compaction.ended(&Err(message));
        } else {
            // Not a compaction that ended: its waiters hear why none started.
            tracing::warn!(error = %message, "compaction not started");
            self.compaction.answer(&Err(message));
        }
    }

    fn delete_retired_when_let_go(&mut self) {
        let Some(retired) = self.compaction.retired.as_mut() else {
            return;
        };
        if retired.since.elapsed() > RETIRED_PATIENCE {
            tracing::warn!(
                generation = retired.number,
                "a replaced generation of the store is still in use or cannot be deleted; \
                 its files are left for the next open to remove"
            );
            self.compaction.retired = None;
            return;
        }
        if let Some(held) = retired.held.take() {
            match Arc::try_unwrap(held) {
                // The last reader let go: sled closes the database on drop.
                Ok(generation) => {
                    drop(generation);
                    retired.let_go_at = Some(Instant::now());
                }
                Err(held) => {
                    retired.held = Some(held);
                    return;
                }
            }
        }
        if retired
            .let_go_at
            .is_some_and(|at| at.elapsed() < LET_GO_OF_FILES)
        {
            return;
        }
        match generations::remove_generation(&self.root, retired.number) {
            Ok(()) => self.compaction.retired = None,
            Err(error) => {
                tracing::warn!(generation = retired.number, %error, "cannot delete a replaced generation yet");
                retired.let_go_at = Some(Instant::now());
            }
        }
    }
}
