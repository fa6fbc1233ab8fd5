//! Durable writes on sled 0.34.7, with group commit, that survive a power cut and refuse
//! to open on damage.
//!
//! sled alone does not make a write durable when it returns, its own flushing is unsafe
//! to use concurrently, it never syncs the blob files it writes for large messages, and
//! it reads a damaged log as a shorter one (see `shared/DESIGN.md`, "Durability on
//! sled"). This module is the one place that writes to a Treaty sled database; the
//! coordinator's decision log and the participant barrier both sit on it.
//!
//! The contract (what a caller may rely on):
//! - A [`Durability::Forced`] write's ticket resolves `Ok` only once its records, and
//!   every write queued before it, survive a crash of the process **and a power cut**
//!   (as far as the disk honours `fdatasync`), whatever their size: the log file, every
//!   file sled created beside it (blobs, snapshots) and the directories naming them are
//!   synced before any waiter of the group is woken. The directory itself is synced when
//!   `open` creates it. A [`Durability::Patient`] write's ticket resolves on the same
//!   terms; only the sync that makes it durable may come up to
//!   [`StoreOptions::patient_sync_wait`] later.
//! - Writes are applied in the order `write` was called, so a lazy write issued after a
//!   forced one can never reach the disk before it.
//! - **Damage is detected, not served.** Each forced group is numbered; the number goes
//!   into sled with the group and, once the group is durable, into a high-water mark file
//!   beside it ([`high_water`]; written at once, synced within a second: after a kill -9
//!   it names the last acknowledged group, after a power cut possibly an earlier one).
//!   `open` refuses ([`StoreError::Damaged`]) a store whose sled holds fewer forced
//!   groups than the mark says were acknowledged — what a damaged byte or a cut-short
//!   file does to sled, which otherwise opens without complaint — and, unless told not
//!   to, reads every record once so that a damaged one is found at start, not when it is
//!   asked for (see `opening`).
//! - After the first failed write the store is failed for good: every later write
//!   resolves with [`StoreError::Failed`]. The owner must stop, restart and recover.
//! - `snap.*.generating` files left by a crash during `open()` are removed before opening.
//! - Keys are the caller's: the store keeps its own bookkeeping in a separate sled tree.
//! - A batch may also set or clear marks in a set of keys the store keeps in memory
//!   for its caller (`WriteBatch::mark`, `DurableStore::marked`; see `marks`): the
//!   marks change when the batch is applied, before its ticket resolves, and are never
//!   written; the caller rebuilds them from its records at the first listing.
//! - The store's size on disk can be kept to its live records by compaction
//!   ([`StoreOptions::compaction`], [`DurableStore::compact`]): a rebuilt copy replaces
//!   the database without a write waiting for more than one bounded step, and a crash at
//!   any point leaves either the old or the new copy, whole (see `compaction` and
//!   `generations`).

mod compaction;
mod files;
mod generations;
pub mod high_water;
mod logger;
mod marks;
mod opening;

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

pub use compaction::{
    COPY_CHUNK_RECORDS, CompactionPolicy, CompactionReport, DEFAULT_COMPACTION_GROWTH_FACTOR,
    DEFAULT_COMPACTION_MIN_BYTES, DEFAULT_COMPACTION_MIN_REMOVED_RECORDS,
    DEFAULT_COMPACTION_RETRY_AFTER_FAILURE_MS, MIN_COMPACTION_GROWTH_FACTOR,
};
pub use files::SyncedPath;
pub use generations::{POINTER_FILE, is_store};
use high_water::{HighWater, Mark};
use opening::{
    check_mark, forced_groups, open_sled, open_sled_at, read_everything,
    remove_unfinished_snapshots,
};

/// sled's log file in the store's directory.
pub const LOG_FILE_NAME: &str = "db";
/// The sled tree where the store keeps the number of its last forced group.
const META_TREE: &[u8] = b"__treaty_durable_store";
const FORCED_GROUPS_KEY: &[u8] = b"forced-groups";
/// The compaction policy's base: the store's size on disk right after its last
/// compaction, or, for a store created empty, when it first removed records (named
/// for the first of these, which it held alone until 2026-12-06).
const COMPACTED_BYTES_KEY: &[u8] = b"compacted-bytes";
/// Present in a store created empty until its compaction policy takes a base (at the
/// first look after its first removals, or after a compaction; removed in one batch
/// with the base) or it removes records under a policy that takes none (removed before
/// them), so that a store reopened before then is still known to hold nothing removed
/// (`compaction::Base::Awaited`). Set by the open that creates the store and durable
/// with that open's sync; a crash before it leaves a store without it, taken as one
/// holding records from before, which compacts once at its first removals.
const BASE_AWAITED_KEY: &[u8] = b"base-awaited";

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
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    marks: Vec<(Vec<u8>, bool)>,
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
    /// writes and the store has not been idle for longer than the hold since: one
    /// writer at a time never waits. Zero: never wait.
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

enum Request {
    Write {
        batch: WriteBatch,
        durability: Durability,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Replied on a std channel: `close` blocks, and may be called from async code.
    Close {
        done: mpsc::SyncSender<Result<(), StoreError>>,
    },
    Compact {
        done: compaction::CompactionWaiter,
    },
}

/// One generation of the store: a sled database and the directory holding it.
#[derive(Debug)]
pub(crate) struct Generation {
    number: u64,
    dir: PathBuf,
    db: sled::Db,
    /// The store's bookkeeping (the number of the last forced group).
    meta: sled::Tree,
}

/// The database as it was when [`DurableStore::db`] was called; derefs to it. Keeps
/// that generation's files from being deleted while it lives.
#[derive(Debug)]
pub struct DbRef(Arc<Generation>);

impl std::ops::Deref for DbRef {
    type Target = sled::Db;

    fn deref(&self) -> &sled::Db {
        &self.0.db
    }
}

/// A sled database whose writes go through one group-committing logger thread.
#[derive(Debug)]
pub struct DurableStore {
    current: Arc<RwLock<Arc<Generation>>>,
    path: PathBuf,
    queue: Mutex<Option<mpsc::Sender<Request>>>,
    failure: Arc<OnceLock<String>>,
    failed: Arc<tokio::sync::Notify>,
    logger: Mutex<Option<JoinHandle<()>>>,
    counters: Arc<DurabilityCounters>,
    marks: Arc<marks::Marks>,
}

impl DurableStore {
    /// Opens (creating if needed) the database in `dir`, after removing the
    /// `snap.*.generating` files a crash during a previous open may have left. Refuses
    /// a damaged store with [`StoreError::Damaged`].
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: dir.to_path_buf(),
            message,
        };
        let damaged = |message: String| StoreError::Damaged {
            path: dir.to_path_buf(),
            message,
        };
        let root = dir;
        files::create_dir_synced(root).map_err(|e| open_error(e.to_string()))?;
        let located = generations::locate(root)
            .map_err(|e| open_error(e.to_string()))?
            .map_err(damaged)?;
        let dir = located.dir.as_path();
        remove_unfinished_snapshots(dir).map_err(|e| open_error(e.to_string()))?;
        let mark = high_water::read(dir).map_err(|e| open_error(e.to_string()))?;
        // No database yet: sled creates it empty.
        let created_empty = !dir.join(LOG_FILE_NAME).exists();
        let (db, meta) = open_sled(root, dir, &options)?;
        let forced_groups = forced_groups(&meta).map_err(damaged)?;
        let acknowledged = check_mark(&mark, forced_groups, &db).map_err(damaged)?;
        if options.verify_on_open {
            read_everything(&db, &meta).map_err(damaged)?;
        }
        // Only once the current generation passed its checks: a store refused as damaged
        // keeps every file it had.
        generations::remove_all_but(root, located.number)
            .map_err(|e| open_error(format!("removing replaced generations: {e}")))?;
        if created_empty {
            // Durable with the sync below, before anything is written.
            meta.insert(BASE_AWAITED_KEY, &[])
                .map_err(|e| open_error(format!("marking the new store: {e}")))?;
        }
        let db_path = dir.join(LOG_FILE_NAME);
        // fdatasync through our own descriptor: sled's flush() only writes to the OS.
        let db_file = File::open(&db_path).map_err(|e| open_error(e.to_string()))?;
        // What the last run (or sled's own open) left unsynced becomes durable now, and
        // the mark catches up with sled (it may lag one group after a crash).
        let mut files = files::SyncedFiles::new(dir, &[LOG_FILE_NAME, high_water::FILE_NAME]);
        let mut synced = Vec::new();
        let baseline = db
            .flush()
            .map_err(|e| e.to_string())
            .and_then(|_| files.sync_new(&mut synced).map_err(|e| e.to_string()))
            .and_then(|()| db_file.sync_data().map_err(|e| e.to_string()));
        baseline.map_err(|e| open_error(format!("syncing at open: {e}")))?;
        let mark_synced = forced_groups.max(acknowledged);
        let high_water = HighWater::open(dir, mark_synced)
            .map_err(|e| open_error(format!("writing the high-water mark: {e}")))?;
        if let Some(observer) = &options.sync_observer {
            // The baseline above and the mark's creation synced the directory too.
            for path in [db_path.clone(), dir.join(high_water::FILE_NAME)] {
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                synced.push(SyncedPath {
                    path,
                    len,
                    is_dir: false,
                });
            }
            synced.push(SyncedPath {
                path: dir.to_path_buf(),
                len: 0,
                is_dir: true,
            });
            observer(&synced);
        }
        let (sender, receiver) = mpsc::channel();
        let failure = Arc::new(OnceLock::new());
        let failed = Arc::new(tokio::sync::Notify::new());
        let generation = Arc::new(Generation {
            number: located.number,
            dir: dir.to_path_buf(),
            db,
            meta,
        });
        let current = Arc::new(RwLock::new(generation.clone()));
        let base = compaction::stored_base(&generation.meta);
        let counters = Arc::new(DurabilityCounters::default());
        let marks = Arc::new(marks::Marks::default());
        let logger = logger::Logger {
            root: root.to_path_buf(),
            generation,
            shared: current.clone(),
            cache_capacity_bytes: options.cache_capacity_bytes,
            compaction: compaction::Compaction::new(
                options.compaction.clone(),
                base,
                options.compaction_observer.clone(),
            ),
            db_file,
            db_path,
            files,
            high_water,
            mark_synced,
            mark_synced_at: std::time::Instant::now(),
            forced_groups,
            receiver,
            failure: failure.clone(),
            failed: failed.clone(),
            max_batch_records: options.max_batch_records.max(1),
            max_batch_bytes: options.max_batch_bytes.max(1),
            hold: options.group_commit_hold.min(MAX_GROUP_COMMIT_HOLD),
            hold_after_writes: options.group_commit_hold_after_writes,
            max_holds: options.group_commit_max_holds,
            last_forced_writes: 0,
            last_group_at: std::time::Instant::now(),
            patient_sync_wait: options.patient_sync_wait.min(MAX_GROUP_COMMIT_HOLD),
            patient: logger::PatientWrites::default(),
            unwritten: false,
            sync_observer: options.sync_observer.clone(),
            group_observer: options.group_observer.clone(),
            counters: counters.clone(),
            marks: marks.clone(),
        };
        let handle = std::thread::Builder::new()
            .name("treaty-logger".into())
            .spawn(move || logger.run())
            .map_err(|e| open_error(format!("cannot start the logger thread: {e}")))?;
        Ok(Self {
            current,
            path: root.to_path_buf(),
            queue: Mutex::new(Some(sender)),
            failure,
            failed,
            logger: Mutex::new(Some(handle)),
            counters,
            marks,
        })
    }

    /// What this store has made durable since it opened.
    pub fn durability_counters(&self) -> Arc<DurabilityCounters> {
        self.counters.clone()
    }

    /// The database, for reads. Writes must go through [`DurableStore::write`]. Reads
    /// may see lazy and not-yet-durable forced writes: never answer a question whose
    /// answer must be durable from a read alone.
    /// A compaction may replace the database: a reader that holds the returned handle
    /// keeps reading the old one, whose files are kept until the handle is dropped. An
    /// iterator made from it does not keep them: keep the handle while iterating (a
    /// `for` loop over `store.db().range(..)` does).
    pub fn db(&self) -> DbRef {
        DbRef(self.generation())
    }

    fn generation(&self) -> Arc<Generation> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The store's directory (the database may be in a generation's directory below it).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bytes of the store's current database files on disk.
    pub fn size_on_disk_bytes(&self) -> std::io::Result<u64> {
        compaction::generation_bytes(&self.generation())
    }

    /// What all the store's files take on disk: the current generation's
    /// ([`size_on_disk_bytes`](Self::size_on_disk_bytes)), and while it compacts, the
    /// copy being built and the replaced generation until it is deleted.
    pub fn files_on_disk_bytes(&self) -> std::io::Result<u64> {
        compaction::store_bytes(&self.path)
    }

    /// Rebuilds the database in a fresh copy holding only the live records, while
    /// writes go on; resolves once the copy is current (or with why it could not be
    /// made: the store is then unchanged).
    pub async fn compact(&self) -> Result<CompactionReport, String> {
        let (done, report) = oneshot::channel();
        let request = Request::Compact { done };
        let sent = {
            let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            queue.as_ref().map(|sender| sender.send(request).is_ok())
        };
        if sent != Some(true) {
            return Err("the store is closed".into());
        }
        report
            .await
            .unwrap_or_else(|_| Err("the store closed".into()))
    }

    /// Reads every record (checking sled's checksums on the way) and counts them.
    pub fn verify(&self) -> Result<StoreSummary, StoreError> {
        let damaged = |message: String| StoreError::Damaged {
            path: self.path.clone(),
            message,
        };
        let generation = self.generation();
        let (records, bytes) =
            read_everything(&generation.db, &generation.meta).map_err(damaged)?;
        let forced_groups = forced_groups(&generation.meta).map_err(damaged)?;
        let acknowledged_groups = match high_water::read(&generation.dir) {
            Ok(Mark::At(mark)) => mark,
            Ok(_) => 0,
            Err(error) => return Err(damaged(error.to_string())),
        };
        Ok(StoreSummary {
            records,
            bytes,
            forced_groups,
            acknowledged_groups,
        })
    }

    /// Queues `batch`; it is applied after every write queued before it. The ticket
    /// resolves when the batch is applied (`Lazy`) or on disk (`Forced`, `Patient`).
    pub fn write(&self, batch: WriteBatch, durability: Durability) -> WriteTicket {
        let (done, ticket) = oneshot::channel();
        if let Some(message) = self.failure.get() {
            let _ = done.send(Err(StoreError::Failed(message.clone())));
            return WriteTicket(ticket);
        }
        let request = Request::Write {
            batch,
            durability,
            done,
        };
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        match queue.as_ref() {
            Some(sender) => {
                if let Err(mpsc::SendError(request)) = sender.send(request) {
                    reply(request, Err(StoreError::Closed));
                }
            }
            None => reply(request, Err(StoreError::Closed)),
        }
        WriteTicket(ticket)
    }

    /// Up to `limit` keys that the batches applied so far left marked, in key order,
    /// after `after` (`None`: from the first). Marks live in memory only: the first call
    /// rebuilds them with `seed`, which reads the caller's records from the database it
    /// is given while writes go on (see `marks`), so it blocks for a read of the whole
    /// store: call it from a blocking thread. A failed seed fails this call and every
    /// later one, until the store is opened again.
    pub(crate) fn marked(
        &self,
        after: Option<&[u8]>,
        limit: usize,
        seed: impl FnOnce(&sled::Db) -> Result<std::collections::BTreeSet<Vec<u8>>, StoreError>,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        // The handle is taken once the marks are being recorded: a compaction switch
        // before that is in the database read, one after it in what was recorded.
        self.marks.list(after, limit, || seed(&self.db()))
    }

    /// The reason the store failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    /// Resolves with the reason once the store has failed (at once if it already has).
    pub async fn failed(&self) -> String {
        self.failure_watch().await
    }

    /// Like [`failed`](Self::failed), without holding the store: it never resolves if
    /// the store is dropped without having failed.
    pub fn failure_watch(&self) -> impl Future<Output = String> + Send + 'static {
        let (failure, failed) = (self.failure.clone(), self.failed.clone());
        async move {
            loop {
                // Registered before the check, so a failure in between still wakes us.
                let notified = failed.notified();
                if let Some(message) = failure.get() {
                    return message.clone();
                }
                notified.await;
            }
        }
    }

    /// Makes every write queued so far durable, then stops the logger. Later writes
    /// resolve with [`StoreError::Closed`]. Blocks the calling thread.
    pub fn close(&self) -> Result<(), StoreError> {
        let sender = self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        let result = match sender {
            Some(sender) => {
                let (done, receiver) = mpsc::sync_channel(1);
                match sender.send(Request::Close { done }) {
                    Ok(()) => receiver.recv().unwrap_or(Err(StoreError::Closed)),
                    Err(_) => Err(StoreError::Closed),
                }
            }
            None => Ok(()),
        };
        if let Some(handle) = self.logger.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = handle.join();
        }
        result
    }
}

impl Drop for DurableStore {
    fn drop(&mut self) {
        // Stop the logger thread; queued writes are still applied and flushed.
        if self.logger.lock().map(|l| l.is_some()).unwrap_or(false) {
            let _ = self.close();
        }
    }
}

/// Resolves when a [`DurableStore::write`] has been applied or made durable.
#[derive(Debug)]
#[must_use = "a write is only known to be done when its ticket resolves Ok"]
pub struct WriteTicket(oneshot::Receiver<Result<(), StoreError>>);

impl Future for WriteTicket {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|result| result.unwrap_or(Err(StoreError::Closed)))
    }
}

fn reply(request: Request, result: Result<(), StoreError>) {
    match request {
        Request::Write { done, .. } => {
            let _ = done.send(result);
        }
        Request::Close { done } => {
            let _ = done.send(result);
        }
        Request::Compact { done } => {
            let why = result.err().unwrap_or(StoreError::Closed);
            let _ = done.send(Err(why.to_string()));
        }
    }
}

#[cfg(test)]
mod compaction_tests;
#[cfg(test)]
mod tests;
