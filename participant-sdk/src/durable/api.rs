//! What callers hand the durable store and what it tells them: write batches and how
//! durable each must be, the store's errors, its options and their defaults, and the
//! observers and counters through which it reports its group commits. The contract
//! these serve is in [`super`]'s docs.

use super::*;

/// How long a write may stay only in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk (flushed and fdatasync'ed, with every file it needs) before the ticket
    /// resolves.
    Forced,
    /// Applied (visible to readers) when the ticket resolves; on disk at the next sync
    /// (a forced write's or a patient one's) or sled's background flush, whichever comes
    /// first.
    Lazy,
    /// On disk before the ticket resolves, as [`Forced`](Self::Forced), but without
    /// hurry: applied at once, and made durable by the next forced write's sync or, if
    /// none comes within [`StoreOptions::patient_sync_wait`], by a sync of its own. For
    /// writes whose acknowledgement nobody is waiting on, such as a participant's
    /// phase-2 record: it shares the sync of the next transaction's forced YES instead
    /// of making that YES wait behind a sync of its own.
    Patient,
}

/// An ordered set of inserts and removes applied atomically, with the marks it sets or
/// clears in the store's in-memory set (see `DurableStore::marked`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    pub(super) ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub(super) marks: Vec<(Vec<u8>, bool)>,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), Some(value.into())));
    }

    pub fn remove(&mut self, key: impl Into<Vec<u8>>) {
        self.ops.push((key.into(), None));
    }

    /// Adds `key` to the store's marked keys once the batch is applied (nothing on disk).
    pub(crate) fn mark(&mut self, key: impl Into<Vec<u8>>) {
        self.marks.push((key.into(), true));
    }

    /// Takes `key` out of the store's marked keys once the batch is applied.
    pub(crate) fn unmark(&mut self, key: impl Into<Vec<u8>>) {
        self.marks.push((key.into(), false));
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends `other`'s writes (and marks) after this batch's.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
        self.marks.extend(other.marks);
    }

    /// The bytes of every key and value in the batch.
    pub fn byte_len(&self) -> usize {
        self.ops
            .iter()
            .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
            .sum()
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("cannot open the database in {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error(
        "the database in {path} is damaged: {message}. Acknowledged writes may be lost, so \
         it is not opened. Keep the directory as it is (copy it for a post-mortem), restore \
         it from a backup, and see `treaty log verify --data-dir {path}` for what is readable"
    )]
    Damaged { path: PathBuf, message: String },
    #[error("the store failed and accepts no more writes: {0}")]
    Failed(String),
    #[error("the store is closed")]
    Closed,
    #[error("read failed: {0}")]
    Read(String),
}

/// Called after each sync with what it made durable (tests of power loss use it to
/// build the disk a power cut would leave).
pub type SyncObserver = Arc<dyn Fn(&[SyncedPath]) + Send + Sync>;

/// One group commit, as [`StoreOptions::group_observer`] hears of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupCommitted {
    /// Records (keys written or removed) the group applied.
    pub records: usize,
    /// Writes (callers) the group served.
    pub writes: usize,
    /// Time spent making a forced group durable (flush, new files, fdatasync, the
    /// high-water mark's note); `None` for a group left unsynced (lazy writes, and
    /// patient ones that wait for a later sync). The sync of patient writes alone is
    /// reported as a group of its own, with their records and writes.
    pub sync_seconds: Option<f64>,
}

/// Called after each successful group commit (metrics use it).
pub type GroupObserver = Arc<dyn Fn(GroupCommitted) + Send + Sync>;

/// Called on the logger thread when a compaction that started ends: switched (`Ok`),
/// or abandoned (`Err`, why; the store is unchanged unless the switch itself could not
/// be made durable, which fails the store). A compaction refused before it started
/// (no free space, other sled trees) is not one; its waiters still hear why. Called
/// before [`DurableStore::compact`]'s waiters are answered; it must return quickly and
/// never wait on the store. Metrics use it: a compaction holds a second copy of the
/// store in memory and on disk until it switches.
pub type CompactionObserver = Arc<dyn Fn(&Result<CompactionReport, String>) + Send + Sync>;

/// How far a [`DurableStore`]'s writes have come: how many were queued, and how many of
/// them the logger thread has applied (visible to reads; durable only as their
/// durability says). Writes are applied in the order they were queued, so once
/// `applied` reaches a count `queued` showed, every write queued before that reading
/// is visible. A write refused after a failure is never counted applied.
#[derive(Debug, Default)]
pub struct WriteProgress {
    queued: std::sync::atomic::AtomicU64,
    applied: std::sync::atomic::AtomicU64,
}

impl WriteProgress {
    /// Writes queued so far.
    pub fn queued(&self) -> u64 {
        self.queued.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Writes applied so far, in the order they were queued.
    pub fn applied(&self) -> u64 {
        self.applied.load(std::sync::atomic::Ordering::Acquire)
    }

    /// One more write queued; called under the queue's lock, so that the count and the
    /// queue's order agree.
    pub(crate) fn note_queued(&self) {
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Takes back a write counted queued that the closed queue refused.
    pub(crate) fn unqueued(&self) {
        self.queued
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// `writes` more applied, after the `apply_batch` that made them visible.
    pub(crate) fn note_applied(&self, writes: usize) {
        self.applied
            .fetch_add(writes as u64, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What a [`DurableStore`] has made durable since it opened, counted by its logger
/// thread (three relaxed additions per forced group: cheap enough to be always on). The
/// participant server exports them (`treaty_participant_store_*`); `treaty bench`
/// divides them by transactions.
#[derive(Debug, Default)]
pub struct DurabilityCounters {
    syncs: std::sync::atomic::AtomicU64,
    forced_records: std::sync::atomic::AtomicU64,
    /// Time in those groups' syncs, in nanoseconds.
    sync_nanos: std::sync::atomic::AtomicU64,
}

impl DurabilityCounters {
    /// Forced groups made durable (each one sled flush, then `fdatasync` of the log
    /// file and of any new file; the high-water mark's own sync, at most one a second,
    /// is not counted).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records (keys written or removed) in those forced groups.
    pub fn forced_records(&self) -> u64 {
        self.forced_records
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Seconds those groups took from applied in memory to durable (sled's write-out of
    /// its buffer, then the `fdatasync`s), in all; wall-clock time, so a wait for a core
    /// is in it too. With [`syncs`](Self::syncs) it gives the mean time a forced group
    /// waits for the disk, which grows when the device is slow to flush.
    pub fn sync_seconds(&self) -> f64 {
        let nanos = self.sync_nanos.load(std::sync::atomic::Ordering::Relaxed);
        std::time::Duration::from_nanos(nanos).as_secs_f64()
    }

    pub(crate) fn forced_group(&self, records: usize, sync: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        self.syncs.fetch_add(1, Relaxed);
        self.forced_records.fetch_add(records as u64, Relaxed);
        let nanos = u64::try_from(sync.as_nanos()).unwrap_or(u64::MAX);
        // Saturates rather than wraps: a counter must never go down (it cannot reach
        // the limit in practice: 584 years of syncs).
        let _ = self
            .sync_nanos
            .fetch_update(Relaxed, Relaxed, |total| Some(total.saturating_add(nanos)));
    }
}

/// [`StoreOptions::group_commit_hold`] by default.
pub const DEFAULT_GROUP_COMMIT_HOLD: std::time::Duration = std::time::Duration::from_micros(500);
/// The longest [`StoreOptions::group_commit_hold`] the store uses (a longer one is
/// taken as this). A sync takes under a millisecond, so anything near this only adds
/// latency; the bound keeps deadlines far from overflow.
pub const MAX_GROUP_COMMIT_HOLD: std::time::Duration = std::time::Duration::from_secs(60);
/// [`StoreOptions::group_commit_hold_after_writes`] by default.
pub const DEFAULT_GROUP_COMMIT_HOLD_AFTER_WRITES: usize = 8;
/// [`StoreOptions::group_commit_max_holds`] by default: one hold, however large the
/// previous group.
pub const DEFAULT_GROUP_COMMIT_MAX_HOLDS: u32 = 1;
/// [`StoreOptions::patient_sync_wait`] by default: a few times the gap between a
/// participant's phase-2 record and the next transaction's prepare at one transaction in
/// flight on loopback, and short beside anything that waits for a phase-2 answer.
pub const DEFAULT_PATIENT_SYNC_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// Tunables of a [`DurableStore`].
#[derive(Clone)]
pub struct StoreOptions {
    /// Most records one group commit applies; more wait for the next one.
    pub max_batch_records: usize,
    /// Most bytes (keys and values) one group commit applies; a single larger write
    /// still goes alone.
    pub max_batch_bytes: usize,
    /// Under load, how long a group with a forced write waits for more writes before it
    /// is applied and synced, so that one sync makes more of them durable (PostgreSQL's
    /// `commit_delay`; at most [`MAX_GROUP_COMMIT_HOLD`]). It waits only while the
    /// previous forced group held at least
    /// [`group_commit_hold_after_writes`](Self::group_commit_hold_after_writes) forced
    /// writes and a forced group came less than a hold ago (lazy writes do not count):
    /// one writer at a time never waits. Zero: never wait.
    pub group_commit_hold: std::time::Duration,
    /// Forced writes in the previous forced group from which the next one waits
    /// [`group_commit_hold`](Self::group_commit_hold) (PostgreSQL's `commit_siblings`).
    pub group_commit_hold_after_writes: usize,
    /// The next forced group waits one hold for every
    /// [`group_commit_hold_after_writes`](Self::group_commit_hold_after_writes) forced
    /// writes the previous one held, up to this many holds (and
    /// [`MAX_GROUP_COMMIT_HOLD`]): the more writes arrive during one sync, the more a
    /// wait gathers. 1 (the default): one hold, however large the previous group. A
    /// store whose writers wait for each other in turn (a participant answering a
    /// saga's steps one after another) loses throughput to longer holds.
    pub group_commit_max_holds: u32,
    /// The longest a [`Durability::Patient`] write waits for a forced write to share
    /// its sync before it is synced alone (at most [`MAX_GROUP_COMMIT_HOLD`]; zero: it is
    /// synced as a forced write).
    pub patient_sync_wait: std::time::Duration,
    /// sled's page cache, in bytes.
    pub cache_capacity_bytes: u64,
    /// Read every record at open, so that a damaged one stops the open rather than a
    /// later read (costs a scan of the whole store).
    pub verify_on_open: bool,
    /// When the store compacts itself (`None`: only when [`DurableStore::compact`] is
    /// called). Compaction copies the store's own tree only: a store whose database
    /// also holds sled trees written around it is never compacted.
    /// `CompactionPolicy::default()` compacts at three times the size the last
    /// compaction left (twice until 2026-12-05), and only once a record has been
    /// removed since; a store created empty takes its size at its first removals as
    /// that base instead of compacting then. Before 2026-12-06 the size alone decided.
    pub compaction: Option<CompactionPolicy>,
    pub sync_observer: Option<SyncObserver>,
    pub group_observer: Option<GroupObserver>,
    pub compaction_observer: Option<CompactionObserver>,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("max_batch_records", &self.max_batch_records)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("group_commit_hold", &self.group_commit_hold)
            .field(
                "group_commit_hold_after_writes",
                &self.group_commit_hold_after_writes,
            )
            .field("group_commit_max_holds", &self.group_commit_max_holds)
            .field("patient_sync_wait", &self.patient_sync_wait)
            .field("cache_capacity_bytes", &self.cache_capacity_bytes)
            .field("verify_on_open", &self.verify_on_open)
            .field("compaction", &self.compaction)
            .field("sync_observer", &self.sync_observer.is_some())
            .field("group_observer", &self.group_observer.is_some())
            .field("compaction_observer", &self.compaction_observer.is_some())
            .finish()
    }
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_batch_records: 4096,
            max_batch_bytes: 8 * 1024 * 1024,
            group_commit_hold: DEFAULT_GROUP_COMMIT_HOLD,
            group_commit_hold_after_writes: DEFAULT_GROUP_COMMIT_HOLD_AFTER_WRITES,
            group_commit_max_holds: DEFAULT_GROUP_COMMIT_MAX_HOLDS,
            patient_sync_wait: DEFAULT_PATIENT_SYNC_WAIT,
            cache_capacity_bytes: 256 * 1024 * 1024,
            verify_on_open: true,
            compaction: None,
            sync_observer: None,
            group_observer: None,
            compaction_observer: None,
        }
    }
}

/// What a full read of the store found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreSummary {
    /// Records (keys) in the caller's tree.
    pub records: u64,
    /// Their keys' and values' bytes.
    pub bytes: u64,
    /// Forced groups sled holds, and the number the high-water mark says were
    /// acknowledged (sled may be ahead: the mark is written last).
    pub forced_groups: u64,
    pub acknowledged_groups: u64,
}
