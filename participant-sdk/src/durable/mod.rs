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
//!   asked for.
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
    MIN_COMPACTION_GROWTH_FACTOR,
};
pub use files::SyncedPath;
pub use generations::{POINTER_FILE, is_store};
use high_water::{HighWater, Mark};

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
/// thread (two relaxed additions per forced group: cheap enough to be always on). The
/// participant server exports them (`treaty_participant_store_*`); `treaty bench`
/// divides them by transactions.
#[derive(Debug, Default)]
pub struct DurabilityCounters {
    syncs: std::sync::atomic::AtomicU64,
    forced_records: std::sync::atomic::AtomicU64,
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

    pub(crate) fn forced_group(&self, records: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.syncs.fetch_add(1, Relaxed);
        self.forced_records.fetch_add(records as u64, Relaxed);
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

/// The number of the last forced group sled holds (0: none yet).
fn forced_groups(meta: &sled::Tree) -> Result<u64, String> {
    let stored = meta
        .get(FORCED_GROUPS_KEY)
        .map_err(|e| format!("reading the forced-group number: {e}"))?;
    match stored {
        None => Ok(0),
        Some(bytes) => {
            let number: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| format!("the forced-group number has {} bytes, not 8", bytes.len()))?;
            Ok(u64::from_be_bytes(number))
        }
    }
}

/// Compares sled's forced groups with the high-water mark; returns the mark.
fn check_mark(mark: &Mark, forced_groups: u64, db: &sled::Db) -> Result<u64, String> {
    match *mark {
        Mark::At(acknowledged) if forced_groups < acknowledged => Err(format!(
            "it holds {forced_groups} forced write groups but {acknowledged} were acknowledged \
             ({} says so): everything logged after group {forced_groups} is missing, as sled \
             stops reading its log at the first damaged or cut-short message",
            high_water::FILE_NAME
        )),
        Mark::At(acknowledged) => Ok(acknowledged),
        Mark::Unreadable(ref why) => Err(format!("its high-water mark is unreadable: {why}")),
        // The mark is written with the first forced group and at every open: sled
        // holding a numbered group without it means the file was lost.
        Mark::Absent if forced_groups > 0 => Err(format!(
            "its high-water mark {} is missing although {forced_groups} forced write groups \
             were logged",
            high_water::FILE_NAME
        )),
        Mark::Absent => {
            if !db.is_empty() {
                tracing::warn!(
                    "the store has records but no high-water mark (written by an older \
                     version): damage before this open cannot be detected; it is from now on"
                );
            }
            Ok(0)
        }
    }
}

/// Reads every key and value, so that sled checks each page's checksum; returns the
/// caller's records and their bytes. sled trips on some damage with a panic: that is
/// damage too.
fn read_everything(db: &sled::Db, meta: &sled::Tree) -> Result<(u64, u64), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_all(db, meta)))
        .unwrap_or_else(|panic| Err(format!("sled failed reading it: {}", panic_text(&panic))))
}

fn read_all(db: &sled::Db, meta: &sled::Tree) -> Result<(u64, u64), String> {
    let mut records = 0;
    let mut bytes = 0;
    for entry in db.iter() {
        let (key, value) = entry.map_err(|e| format!("reading record {}: {e}", records + 1))?;
        records += 1;
        bytes += (key.len() + value.len()) as u64;
    }
    for entry in meta.iter() {
        entry.map_err(|e| format!("reading the store's bookkeeping: {e}"))?;
    }
    Ok((records, bytes))
}

/// How long `open` waits for the file lock of a database that another handle is still
/// letting go of: sled's background IO threads release it shortly after the last handle
/// is dropped, so a quick reopen in the same process can find it still held.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens a new generation's empty database (for compaction).
fn open_sled_at(dir: &Path, cache_capacity_bytes: u64) -> Result<sled::Db, String> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_capacity_bytes)
        .open()
        .map_err(|e| format!("opening a database in {}: {e}", dir.display()))
}

/// Opens sled in `dir` (the current generation of the store at `root`) and the store's
/// bookkeeping tree. sled reports some damage as a corruption error and trips on other
/// damage with a panic: both are `Damaged`.
fn open_sled(
    root: &Path,
    dir: &Path,
    options: &StoreOptions,
) -> Result<(sled::Db, sled::Tree), StoreError> {
    let started = std::time::Instant::now();
    let damaged = |message: String| StoreError::Damaged {
        path: root.to_path_buf(),
        message,
    };
    loop {
        let cache_capacity_bytes = options.cache_capacity_bytes;
        let attempt = std::panic::catch_unwind(|| {
            let db = sled::Config::new()
                .path(dir)
                .cache_capacity(cache_capacity_bytes)
                .open()?;
            let meta = db.open_tree(META_TREE)?;
            Ok::<_, sled::Error>((db, meta))
        });
        match attempt {
            Ok(Ok(opened)) => return Ok(opened),
            // sled 0.34.7 reports a held lock as an `Other` I/O error with this text.
            Ok(Err(sled::Error::Io(error)))
                if error.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_PATIENCE =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(Err(error @ sled::Error::Corruption { .. })) => {
                return Err(damaged(format!("sled found it corrupt: {error}")));
            }
            Ok(Err(error)) => {
                return Err(StoreError::Open {
                    path: root.to_path_buf(),
                    message: error.to_string(),
                });
            }
            Err(panic) => {
                return Err(damaged(format!(
                    "sled failed reading it: {}",
                    panic_text(&panic)
                )));
            }
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing a snapshot left unfinished by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> DurableStore {
        DurableStore::open(dir, StoreOptions::default()).unwrap()
    }

    #[tokio::test]
    async fn forced_write_is_readable_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path());
            let mut batch = WriteBatch::new();
            batch.insert(b"k1".to_vec(), b"v1".to_vec());
            store.write(batch, Durability::Forced).await.unwrap();
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert_eq!(store.db().get(b"k1").unwrap().as_deref(), Some(&b"v1"[..]));
    }

    #[tokio::test]
    async fn writes_apply_in_call_order_within_and_across_groups() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut tickets = Vec::new();
        for i in 0..200u32 {
            let mut batch = WriteBatch::new();
            batch.insert(b"counter".to_vec(), i.to_be_bytes().to_vec());
            let durability = if i % 7 == 0 {
                Durability::Forced
            } else {
                Durability::Lazy
            };
            tickets.push(store.write(batch, durability));
        }
        for ticket in tickets {
            ticket.await.unwrap();
        }
        let last = store.db().get(b"counter").unwrap().unwrap();
        assert_eq!(last.as_ref(), &199u32.to_be_bytes());
    }

    #[tokio::test]
    async fn forced_groups_and_their_records_are_counted_lazy_ones_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let counters = store.durability_counters();
        let mut lazy = WriteBatch::new();
        lazy.insert(b"lazy".to_vec(), b"1".to_vec());
        store.write(lazy, Durability::Lazy).await.unwrap();
        assert_eq!((counters.syncs(), counters.forced_records()), (0, 0));
        let mut forced = WriteBatch::new();
        forced.insert(b"a".to_vec(), b"1".to_vec());
        forced.insert(b"b".to_vec(), b"2".to_vec());
        store.write(forced, Durability::Forced).await.unwrap();
        assert_eq!((counters.syncs(), counters.forced_records()), (1, 2));
    }

    fn one_key(key: &[u8]) -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch.insert(key.to_vec(), b"1".to_vec());
        batch
    }

    /// Holds a forced write for up to a minute (the longest hold) once the previous
    /// forced group had `after_writes` forced writes: long enough that only company, a
    /// full group or a close ends a hold within the tests' patience.
    fn holding_a_minute(after_writes: usize, max_batch_records: usize) -> StoreOptions {
        StoreOptions {
            group_commit_hold: MAX_GROUP_COMMIT_HOLD,
            group_commit_hold_after_writes: after_writes,
            max_batch_records,
            ..StoreOptions::default()
        }
    }

    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

    /// Waits for `ticket` (failing with `what` if it takes longer than the tests'
    /// patience) and for the write to have succeeded.
    async fn acknowledged(ticket: WriteTicket, what: &str) {
        tokio::time::timeout(PATIENCE, ticket)
            .await
            .unwrap_or_else(|_| panic!("not acknowledged in time: {what}"))
            .unwrap();
    }

    /// Fails if `ticket` resolves within 300 ms: it must still wait for its sync.
    async fn still_waiting(ticket: &mut WriteTicket, what: &str) {
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), ticket).await;
        assert!(early.is_err(), "acknowledged too early: {what}");
    }

    #[tokio::test]
    async fn under_load_a_forced_write_waits_to_share_its_sync_with_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), holding_a_minute(1, 2)).unwrap();
        let counters = store.durability_counters();
        // No forced group before it: not held.
        acknowledged(
            store.write(one_key(b"first"), Durability::Forced),
            "a write after no load is not held",
        )
        .await;
        let mut held = store.write(one_key(b"held"), Durability::Forced);
        still_waiting(&mut held, "a held write before its company came").await;
        assert_eq!(counters.syncs(), 1);
        // The second write fills the group (max_batch_records 2): one sync for both.
        let company = store.write(one_key(b"company"), Durability::Forced);
        acknowledged(held, "the held write").await;
        acknowledged(company, "its company").await;
        assert_eq!((counters.syncs(), counters.forced_records()), (2, 3));
    }

    #[tokio::test]
    async fn with_more_holds_a_forced_write_waits_longer_after_a_larger_group() {
        let hold = std::time::Duration::from_secs(2);
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            group_commit_hold: hold,
            group_commit_hold_after_writes: 1,
            group_commit_max_holds: 4,
            max_batch_records: 3,
            ..StoreOptions::default()
        };
        let store = DurableStore::open(dir.path(), options).unwrap();
        let counters = store.durability_counters();
        acknowledged(
            store.write(one_key(b"first"), Durability::Forced),
            "a write after no load is not held",
        )
        .await;
        // Held one hold after a group of one, until three fill the group.
        let group: Vec<_> = [&b"a"[..], b"b", b"c"]
            .into_iter()
            .map(|key| store.write(one_key(key), Durability::Forced))
            .collect();
        for ticket in group {
            acknowledged(ticket, "a full group").await;
        }
        assert_eq!((counters.syncs(), counters.forced_records()), (2, 4));
        // After a group of three: three holds, so still waiting after one.
        let mut held = store.write(one_key(b"held"), Durability::Forced);
        tokio::time::sleep(hold).await;
        still_waiting(&mut held, "a write held after a group of three").await;
        let company: Vec<_> = [&b"d"[..], b"e"]
            .into_iter()
            .map(|key| store.write(one_key(key), Durability::Forced))
            .collect();
        acknowledged(held, "the held write").await;
        for ticket in company {
            acknowledged(ticket, "its company").await;
        }
        assert_eq!((counters.syncs(), counters.forced_records()), (3, 7));
    }

    #[test]
    fn the_hold_grows_with_the_last_group_up_to_its_cap() {
        let hold = std::time::Duration::from_micros(500);
        let cases = [
            (0, None),
            (7, None),
            (8, Some(hold)),
            (15, Some(hold)),
            (16, Some(hold * 2)),
            (31, Some(hold * 3)),
            (32, Some(hold * 4)),
            (10_000, Some(hold * 4)),
        ];
        for (last_forced_writes, expected) in cases {
            assert_eq!(
                logger::hold_after(hold, 8, 4, last_forced_writes),
                expected,
                "after a group of {last_forced_writes}"
            );
        }
        // One hold by default, however large the group.
        let default_holds = DEFAULT_GROUP_COMMIT_MAX_HOLDS;
        assert_eq!(
            logger::hold_after(hold, 8, default_holds, 10_000),
            Some(hold)
        );
        assert_eq!(logger::hold_after(hold, 0, 4, 0), Some(hold));
        assert_eq!(
            logger::hold_after(std::time::Duration::ZERO, 8, 4, 100),
            None
        );
        assert_eq!(
            logger::hold_after(MAX_GROUP_COMMIT_HOLD, 1, 4, 4),
            Some(MAX_GROUP_COMMIT_HOLD)
        );
    }

    #[tokio::test]
    async fn an_idle_spell_longer_than_the_hold_ends_the_load_across_timed_wake_ups() {
        // The idle spell runs from the last group, not from the logger's last wake-up:
        // the mark's sync (due a second after the mark was last synced, at open) wakes
        // the logger inside it. The observer shows that wake-up came.
        let hold = std::time::Duration::from_secs(4);
        let dir = tempfile::tempdir().unwrap();
        let mark_synced_at = Arc::new(Mutex::new(Vec::new()));
        let noted = mark_synced_at.clone();
        let options = StoreOptions {
            group_commit_hold: hold,
            group_commit_hold_after_writes: 1,
            sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
                if paths
                    .iter()
                    .any(|p| p.path.ends_with(high_water::FILE_NAME))
                {
                    noted.lock().unwrap().push(std::time::Instant::now());
                }
            })),
            ..StoreOptions::default()
        };
        let store = DurableStore::open(dir.path(), options).unwrap();
        acknowledged(
            store.write(one_key(b"first"), Durability::Forced),
            "a write after no load is not held",
        )
        .await;
        let acknowledged_at = std::time::Instant::now();
        tokio::time::sleep(hold + std::time::Duration::from_millis(500)).await;
        let woken = mark_synced_at.lock().unwrap().iter().any(|at| {
            at.checked_duration_since(acknowledged_at)
                .is_some_and(|after| after >= std::time::Duration::from_millis(100))
        });
        assert!(
            woken,
            "no timed wake-up (the mark's sync) inside the idle spell"
        );
        // Held, it would wait out the whole hold: nothing else comes.
        let after_idle = store.write(one_key(b"after idle"), Durability::Forced);
        tokio::time::timeout(hold - std::time::Duration::from_secs(1), after_idle)
            .await
            .expect("a forced write after an idle spell longer than the hold was held")
            .unwrap();
    }

    #[tokio::test]
    async fn a_lone_writer_is_never_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), holding_a_minute(2, 4096)).unwrap();
        for key in [&b"a"[..], b"b", b"c"] {
            acknowledged(
                store.write(one_key(key), Durability::Forced),
                "one write at a time is not held",
            )
            .await;
        }
        assert_eq!(store.durability_counters().syncs(), 3);
    }

    #[tokio::test]
    async fn lazy_writes_in_a_forced_group_do_not_count_as_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), holding_a_minute(2, 4096)).unwrap();
        let mut tickets: Vec<_> = (0..7u8)
            .map(|i| store.write(one_key(&[b'l', i]), Durability::Lazy))
            .collect();
        tickets.push(store.write(one_key(b"forced"), Durability::Forced));
        for ticket in tickets {
            acknowledged(ticket, "a write of the group").await;
        }
        acknowledged(
            store.write(one_key(b"next"), Durability::Forced),
            "one forced write per group is no load",
        )
        .await;
    }

    #[tokio::test]
    async fn a_group_full_by_its_bytes_is_not_held() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            max_batch_bytes: 1024,
            ..holding_a_minute(1, 4096)
        };
        let store = DurableStore::open(dir.path(), options).unwrap();
        store
            .write(one_key(b"first"), Durability::Forced)
            .await
            .unwrap();
        let mut full = WriteBatch::new();
        full.insert(b"full".to_vec(), vec![7; 1024]);
        acknowledged(
            store.write(full, Durability::Forced),
            "a full group has nobody to wait for",
        )
        .await;
    }

    #[tokio::test]
    async fn close_ends_a_hold_and_makes_the_held_write_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DurableStore::open(dir.path(), holding_a_minute(1, 4096)).unwrap();
            store
                .write(one_key(b"first"), Durability::Forced)
                .await
                .unwrap();
            let mut held = store.write(one_key(b"held"), Durability::Forced);
            still_waiting(&mut held, "a held write with nobody to share its sync").await;
            store.close().unwrap();
            acknowledged(held, "the held write, at close").await;
        }
        let store = open(dir.path());
        assert!(store.db().get(b"held").unwrap().is_some());
    }

    /// A patient write waits up to a minute for a forced write to share its sync.
    fn patient_a_minute() -> StoreOptions {
        StoreOptions {
            patient_sync_wait: MAX_GROUP_COMMIT_HOLD,
            ..StoreOptions::default()
        }
    }

    #[tokio::test]
    async fn a_patient_write_is_applied_at_once_and_acknowledged_with_the_next_forced_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
        let counters = store.durability_counters();
        let mut patient = store.write(one_key(b"patient"), Durability::Patient);
        still_waiting(&mut patient, "a patient write with nothing after it").await;
        assert!(store.db().get(b"patient").unwrap().is_some(), "not applied");
        assert_eq!(counters.syncs(), 0);
        // A lazy write after it is applied and answered without a sync.
        acknowledged(
            store.write(one_key(b"lazy"), Durability::Lazy),
            "a lazy write behind a patient one",
        )
        .await;
        still_waiting(&mut patient, "after a lazy write").await;
        let forced = store.write(one_key(b"forced"), Durability::Forced);
        acknowledged(forced, "the forced write").await;
        acknowledged(patient, "the patient write, by the forced sync").await;
        assert_eq!((counters.syncs(), counters.forced_records()), (1, 2));
    }

    /// Writes three values of `durability`, one at a time, and checks that each is in
    /// sled's log file within 200 ms while the store is idle, without a sync. Looked
    /// for soon after each write, three times: sled's own flusher (every 500 ms) would
    /// have to run in each of the three short windows to stand in for the write-behind.
    async fn written_out_while_idle(
        store: &DurableStore,
        dir: &std::path::Path,
        durability: Durability,
    ) -> Vec<WriteTicket> {
        let in_log = |value: &[u8]| {
            let log = std::fs::read(dir.join(LOG_FILE_NAME)).unwrap();
            log.windows(value.len()).any(|window| window == value)
        };
        let mut tickets = Vec::new();
        for round in 0..3 {
            let value = format!("{durability:?} value {round} 5c1f0e").into_bytes();
            let mut batch = WriteBatch::new();
            batch.insert(format!("idle/{round}").into_bytes(), value.clone());
            tickets.push(store.write(batch, durability));
            let mut written = false;
            for _ in 0..200 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                if in_log(&value) {
                    written = true;
                    break;
                }
            }
            assert!(
                written,
                "{durability:?} write {round} is not in the log file while idle"
            );
        }
        assert_eq!(
            store.durability_counters().syncs(),
            0,
            "written, not synced"
        );
        tickets
    }

    #[tokio::test]
    async fn a_patient_write_is_written_out_while_the_store_is_idle_before_its_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
        let mut tickets = written_out_while_idle(&store, dir.path(), Durability::Patient).await;
        still_waiting(&mut tickets[0], "written out is not durable").await;
        store.close().unwrap();
        for ticket in tickets {
            acknowledged(ticket, "a patient write, at close").await;
        }
    }

    #[tokio::test]
    async fn a_lazy_write_is_written_out_while_the_store_is_idle() {
        // So that the next forced group does not first write the lazy write's page.
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), StoreOptions::default()).unwrap();
        let tickets = written_out_while_idle(&store, dir.path(), Durability::Lazy).await;
        for ticket in tickets {
            acknowledged(ticket, "a lazy write").await;
        }
        store.close().unwrap();
    }

    #[tokio::test]
    async fn a_patient_write_alone_is_synced_once_its_wait_is_over_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let options = StoreOptions {
                patient_sync_wait: std::time::Duration::from_millis(20),
                ..StoreOptions::default()
            };
            let store = DurableStore::open(dir.path(), options).unwrap();
            let counters = store.durability_counters();
            acknowledged(
                store.write(one_key(b"patient"), Durability::Patient),
                "a patient write past its wait",
            )
            .await;
            assert_eq!((counters.syncs(), counters.forced_records()), (1, 1));
            // Acknowledged groups are numbered: the mark names it, so losing it is damage.
            let summary = store.verify().unwrap();
            assert_eq!((summary.forced_groups, summary.acknowledged_groups), (1, 1));
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert!(store.db().get(b"patient").unwrap().is_some());
    }

    #[tokio::test]
    async fn a_patient_write_is_synced_on_time_while_lazy_writes_keep_the_logger_busy() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            patient_sync_wait: std::time::Duration::from_millis(20),
            // One write per group: the queue below keeps the logger busy for a while.
            max_batch_records: 1,
            ..StoreOptions::default()
        };
        let store = DurableStore::open(dir.path(), options).unwrap();
        let patient = store.write(one_key(b"patient"), Durability::Patient);
        let lazy: Vec<_> = (0..20_000u32)
            .map(|i| store.write(one_key(&i.to_be_bytes()), Durability::Lazy))
            .collect();
        acknowledged(patient, "the patient write, while lazy writes are queued").await;
        let unanswered = lazy
            .into_iter()
            .map(|mut ticket| futures::FutureExt::now_or_never(&mut ticket).is_none())
            .filter(|&waiting| waiting)
            .count();
        assert!(
            unanswered > 0,
            "the patient write waited until the queue of lazy writes was empty"
        );
    }

    #[tokio::test]
    async fn close_syncs_the_patient_writes_waiting() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
            let mut patient = store.write(one_key(b"patient"), Durability::Patient);
            still_waiting(&mut patient, "before the close").await;
            store.close().unwrap();
            acknowledged(patient, "the patient write, at close").await;
        }
        let store = open(dir.path());
        assert!(store.db().get(b"patient").unwrap().is_some());
        let summary = store.verify().unwrap();
        assert_eq!((summary.forced_groups, summary.acknowledged_groups), (1, 1));
    }

    #[tokio::test]
    async fn without_a_wait_a_patient_write_is_synced_as_a_forced_one() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions {
            patient_sync_wait: std::time::Duration::ZERO,
            ..StoreOptions::default()
        };
        let store = DurableStore::open(dir.path(), options).unwrap();
        acknowledged(
            store.write(one_key(b"patient"), Durability::Patient),
            "a patient write that may not wait",
        )
        .await;
        assert_eq!(store.durability_counters().syncs(), 1);
    }

    #[tokio::test]
    async fn a_compaction_syncs_the_patient_writes_waiting_before_it_switches() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = DurableStore::open(dir.path(), patient_a_minute()).unwrap();
            let mut patient = store.write(one_key(b"patient"), Durability::Patient);
            still_waiting(&mut patient, "before the compaction").await;
            store.compact().await.unwrap();
            acknowledged(patient, "the patient write, at the switch").await;
            store.close().unwrap();
        }
        let store = open(dir.path());
        assert!(store.db().get(b"patient").unwrap().is_some());
        let summary = store.verify().unwrap();
        assert_eq!(summary.forced_groups, summary.acknowledged_groups);
    }

    #[tokio::test]
    async fn remove_deletes_and_close_rejects_later_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut batch = WriteBatch::new();
        batch.insert(b"a".to_vec(), b"1".to_vec());
        batch.remove(b"a".to_vec());
        store.write(batch, Durability::Forced).await.unwrap();
        assert!(store.db().get(b"a").unwrap().is_none());
        store.close().unwrap();
        let mut batch = WriteBatch::new();
        batch.insert(b"b".to_vec(), b"2".to_vec());
        assert_eq!(
            store.write(batch, Durability::Forced).await,
            Err(StoreError::Closed)
        );
    }

    #[test]
    fn opening_waits_briefly_for_a_handle_being_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path());
        let path = dir.path().to_path_buf();
        let letting_go = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(first);
        });
        // Held for 300 ms, then released: the second open waits for it.
        let second = DurableStore::open(&path, StoreOptions::default());
        letting_go.join().unwrap();
        assert!(second.is_ok(), "{:?}", second.err());
    }

    fn insert_batch(range: std::ops::Range<u32>, value: &[u8]) -> WriteBatch {
        let mut batch = WriteBatch::new();
        for i in range {
            batch.insert(format!("k{i:06}").into_bytes(), value.to_vec());
        }
        batch
    }

    fn contents(store: &DurableStore) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        store
            .db()
            .iter()
            .map(|entry| {
                let (key, value) = entry.unwrap();
                (key.to_vec(), value.to_vec())
            })
            .collect()
    }

    /// Polls `condition` every 50 ms for up to 20 s.
    fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        for _ in 0..400 {
            if condition() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("gave up after 20 s waiting for: {what}");
    }

    /// The mark is written with each forced group (what a kill -9 leaves holds the last
    /// one) but synced on its own only within a second, not once per group.
    #[tokio::test]
    async fn the_mark_is_noted_with_each_forced_group_and_synced_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let mark_syncs = Arc::new(Mutex::new(0usize));
        let counted = mark_syncs.clone();
        let options = StoreOptions {
            sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
                let mark = paths
                    .iter()
                    .filter(|synced| synced.path.ends_with(high_water::FILE_NAME));
                *counted.lock().unwrap() += mark.count();
            })),
            ..StoreOptions::default()
        };
        let store = DurableStore::open(dir.path(), options).unwrap();
        let at_open = *mark_syncs.lock().unwrap();
        for i in 0..5u32 {
            let ticket = store.write(insert_batch(i..i + 1, b"v"), Durability::Forced);
            ticket.await.unwrap();
        }
        assert_eq!(high_water::read(dir.path()).unwrap(), Mark::At(5));
        wait_for("the mark's own sync", || {
            *mark_syncs.lock().unwrap() > at_open
        });
        // One sync per forced group would be five (a slow machine may take two).
        assert!(
            *mark_syncs.lock().unwrap() < at_open + 5,
            "the mark was synced with every forced group"
        );
        store.close().unwrap();
    }

    /// sled's flusher fsyncs its log on its own (every 500 ms), so after a power cut the
    /// log may hold lazy groups whose blob files were never synced by a forced group;
    /// sled skips such a record and reads on. Each group's new files are synced before
    /// the next group is written, so a log that survived holds its groups whole.
    #[tokio::test]
    async fn a_lazy_groups_blob_files_are_synced_before_the_next_group() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let synced = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let noted = synced.clone();
        let options = StoreOptions {
            sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
                let mut noted = noted.lock().unwrap();
                noted.extend(paths.iter().map(|synced| synced.path.clone()));
            })),
            ..StoreOptions::default()
        };
        let store = DurableStore::open(&live, options).unwrap();
        for i in 0..12u32 {
            let value = vec![b'a' + (i % 26) as u8; 40 * 1024];
            let ticket = store.write(insert_batch(i % 4..i % 4 + 1, &value), Durability::Lazy);
            ticket.await.unwrap();
        }
        let ticket = store.write(insert_batch(100..101, b"small"), Durability::Lazy);
        ticket.await.unwrap();
        let expected = contents(&store);
        // As sled's flusher would: the log as written reaches the disk.
        store.db().flush().unwrap();
        let copy = dir.path().join("copy");
        copy_tree(&live, &copy);
        let synced = synced.lock().unwrap().clone();
        store.close().unwrap();
        let mut lost = 0;
        for entry in std::fs::read_dir(copy.join("blobs")).unwrap() {
            let entry = entry.unwrap();
            if !synced.contains(&live.join("blobs").join(entry.file_name())) {
                std::fs::remove_file(entry.path()).unwrap();
                lost += 1;
            }
        }
        let reopened = DurableStore::open(&copy, StoreOptions::default()).unwrap();
        assert_eq!(
            contents(&reopened),
            expected,
            "{lost} blob files were never synced"
        );
    }

    /// sled writes its buffers without syncing them (third_party/sled/TREATY-PATCHES.md),
    /// so it syncs what it wrote wherever it relies on it being on disk: before it
    /// overwrites a freed segment, removes replaced blob files, or opens a segment whose
    /// header vouches for what came before, and at open before it snapshots what it
    /// recovered. Rewriting a few large values over and over makes it do each: a leaf
    /// of them is a blob, replaced whenever sled consolidates it, and the log reuses
    /// its segments. (It checks that each kind of sync happened, not when: the order
    /// rests on third_party/sled/TREATY-PATCHES.md.)
    #[tokio::test]
    async fn sled_syncs_what_it_wrote_before_it_relies_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let value_bytes = 40 * 1024;
        let rounds = 240u32;
        for i in 0..rounds {
            let value = vec![b'a' + (i % 26) as u8; value_bytes];
            let ticket = store.write(insert_batch(i % 4..i % 4 + 1, &value), Durability::Lazy);
            ticket.await.unwrap();
        }
        let ticket = store.write(insert_batch(100..101, b"small"), Durability::Forced);
        ticket.await.unwrap();
        let expected = contents(&store);
        let written_bytes = u64::from(rounds) * value_bytes as u64;
        let log_bytes = log_file_bytes(dir.path());
        assert!(
            log_bytes < written_bytes,
            "the log ({log_bytes} bytes) should reuse its segments for {written_bytes} bytes of \
             rewritten values"
        );
        let syncs = store.db().order_syncs();
        assert!(syncs.segment_reused > 0, "{syncs:?}");
        assert!(syncs.segment_header > 0, "{syncs:?}");
        assert!(syncs.blobs_removed > 0, "{syncs:?}");
        store.close().unwrap();
        drop(store);
        let reopened = open(dir.path());
        assert_eq!(reopened.db().order_syncs().recovered, 1);
        assert_eq!(contents(&reopened), expected);
    }

    /// sled's default segment size, which the store keeps.
    const SLED_SEGMENT_BYTES: u64 = 512 * 1024;

    fn log_file_bytes(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(LOG_FILE_NAME)).unwrap().len()
    }

    /// The vendored sled fills a segment it adds at the log's end when it adds it
    /// (third_party/sled/TREATY-PATCHES.md), so a forced write's `fdatasync` flushes
    /// data into blocks the file already has rather than committing a new length each
    /// time: a new log grows by whole segments.
    #[tokio::test]
    async fn the_log_grows_by_whole_segments() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let value = vec![b'v'; 900];
        let mut lengths = std::collections::BTreeSet::new();
        for i in 0..1_500u32 {
            let ticket = store.write(insert_batch(i..i + 1, &value), Durability::Forced);
            ticket.await.unwrap();
            // sled's flusher thread may be filling the next segment right now, and a
            // reader sees the file grow page by page during that write: look again.
            let mut bytes = log_file_bytes(dir.path());
            for _ in 0..100 {
                if bytes % SLED_SEGMENT_BYTES == 0 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                bytes = log_file_bytes(dir.path());
            }
            lengths.insert(bytes);
        }
        assert!(
            lengths.len() > 2,
            "the writes should span several segments: {lengths:?}"
        );
        let unaligned: Vec<u64> = lengths
            .iter()
            .copied()
            .filter(|bytes| bytes % SLED_SEGMENT_BYTES != 0)
            .collect();
        assert!(
            unaligned.is_empty(),
            "log lengths that are not whole segments: {unaligned:?}"
        );
    }

    /// A kill -9 between the fill of a new segment and its first write leaves a segment
    /// of zeros at the log's end. sled reads zeros as a corrupted message, as in any
    /// unwritten part of a segment, and a segment without a valid header as free: the
    /// open recovers every record and the store keeps writing.
    #[tokio::test]
    async fn a_segment_of_zeros_at_the_end_of_the_log_is_recovered_as_free() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .write(insert_batch(0..300, &[b'a'; 300]), Durability::Forced)
            .await
            .unwrap();
        let expected = contents(&store);
        store.close().unwrap();
        drop(store);
        let log = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(LOG_FILE_NAME))
            .unwrap();
        let length = log.metadata().unwrap().len();
        log.set_len(length.next_multiple_of(SLED_SEGMENT_BYTES) + SLED_SEGMENT_BYTES)
            .unwrap();
        log.sync_all().unwrap();
        drop(log);

        let reopened = open(dir.path());
        assert_eq!(contents(&reopened), expected);
        reopened
            .write(insert_batch(300..600, &[b'b'; 300]), Durability::Forced)
            .await
            .unwrap();
        let expected = contents(&reopened);
        assert_eq!(expected.len(), 600);
        reopened.close().unwrap();
        drop(reopened);
        assert_eq!(contents(&open(dir.path())), expected);
    }

    #[tokio::test]
    async fn compaction_keeps_the_live_records_and_gives_back_the_space() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let value = vec![7u8; 200];
        for start in (0..20_000).step_by(2_000) {
            let batch = insert_batch(start..start + 2_000, &value);
            store.write(batch, Durability::Forced).await.unwrap();
        }
        let mut removals = WriteBatch::new();
        for i in (0..20_000).filter(|i| i % 20 != 0) {
            removals.remove(format!("k{i:06}").into_bytes());
        }
        store.write(removals, Durability::Forced).await.unwrap();
        let before = contents(&store);
        assert_eq!(before.len(), 1_000);
        let report = store.compact().await.unwrap();
        assert_eq!(report.generation, 1);
        assert_eq!(report.records, 1_000);
        assert!(
            report.bytes_after < report.bytes_before,
            "{report:?}: the copy is not smaller"
        );
        assert_eq!(contents(&store), before);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(POINTER_FILE)).unwrap(),
            "gen-1\n"
        );
        // The old generation (the directory's own files) goes once sled let go of it.
        wait_for("the replaced generation is deleted", || {
            !dir.path().join(LOG_FILE_NAME).exists()
        });
        assert!(dir.path().join("gen-1").join(LOG_FILE_NAME).is_file());
        // Written after the switch, durable in the new generation.
        store
            .write(insert_batch(50_000..50_010, b"after"), Durability::Forced)
            .await
            .unwrap();
        let expected = contents(&store);
        store.close().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_eq!(contents(&store), expected);
        let summary = store.verify().unwrap();
        assert_eq!(summary.records, 1_010);
        assert_eq!(summary.forced_groups, summary.acknowledged_groups);
        // The policy grows from the compacted size, also after a restart.
        assert_eq!(
            compaction::baseline_bytes(&store.generation().meta),
            report.bytes_after
        );
        // A second compaction replaces generation 1 with 2.
        assert_eq!(store.compact().await.unwrap().generation, 2);
        wait_for("generation 1 is deleted", || {
            !dir.path().join("gen-1").exists()
        });
        assert_eq!(contents(&store), expected);
    }

    #[tokio::test]
    async fn the_compaction_observer_hears_compactions_that_ended_not_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let heard = Arc::new(std::sync::Mutex::new(Vec::new()));
        let options = StoreOptions {
            compaction_observer: Some({
                let heard = heard.clone();
                Arc::new(move |result: &Result<CompactionReport, String>| {
                    heard.lock().unwrap().push(result.clone());
                })
            }),
            ..StoreOptions::default()
        };
        let store = DurableStore::open(dir.path(), options).unwrap();
        store
            .write(insert_batch(0..100, b"value"), Durability::Forced)
            .await
            .unwrap();
        let report = store.compact().await.unwrap();
        assert_eq!(report.records, 100);
        assert_eq!(*heard.lock().unwrap(), vec![Ok(report)]);
        // A tree written around the store: compaction refuses to start, and says why to
        // its caller; no compaction ended.
        store.db().open_tree("written around the store").unwrap();
        let refused = store.compact().await.unwrap_err();
        assert!(refused.contains("sled trees"), "{refused}");
        assert_eq!(*heard.lock().unwrap(), vec![Ok(report)]);
    }

    #[tokio::test]
    async fn writes_during_compaction_reach_the_new_generation_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(open(dir.path()));
        let mut expected = std::collections::BTreeMap::new();
        // Several copy steps' worth of records.
        let records = (COPY_CHUNK_RECORDS * 5) as u32;
        store
            .write(insert_batch(0..records, b"v0"), Durability::Forced)
            .await
            .unwrap();
        for i in 0..records {
            expected.insert(format!("k{i:06}").into_bytes(), b"v0".to_vec());
        }
        let compacting = {
            let store = store.clone();
            tokio::spawn(async move { store.compact().await })
        };
        // Overwrites, removals and new keys all over the key space, behind and ahead of
        // the copy, until the compaction is done (bounded: at most 2,000 rounds).
        let mut round = 0u32;
        while !compacting.is_finished() && round < 2_000 {
            let key = |i: u32| format!("k{:06}", i % (records + 500)).into_bytes();
            let mut batch = WriteBatch::new();
            let overwritten = key(round.wrapping_mul(7_919));
            let removed = key(round.wrapping_mul(104_729) + 13);
            let value = format!("v{round}").into_bytes();
            batch.insert(overwritten.clone(), value.clone());
            batch.remove(removed.clone());
            expected.insert(overwritten, value);
            expected.remove(&removed);
            // Patient writes too: synced by a forced group or by their own numbered
            // sync, whose number the rebuild must mirror.
            let durability = match round % 3 {
                0 => Durability::Forced,
                1 => Durability::Patient,
                _ => Durability::Lazy,
            };
            store.write(batch, durability).await.unwrap();
            round += 1;
        }
        let report = compacting.await.unwrap().unwrap();
        assert!(round > 0, "no write went in during the compaction");
        assert_eq!(report.generation, 1);
        assert_eq!(contents(&store), expected, "after {round} rounds of writes");
        store.close().unwrap();
        drop(store);
        let store = open(dir.path());
        assert_eq!(contents(&store), expected, "after reopening");
        let summary = store.verify().unwrap();
        assert_eq!(summary.forced_groups, summary.acknowledged_groups);
    }

    /// A record and its mark as the barrier writes them: `in_doubt` sets the mark and
    /// says so in the value, which is what the seed below reads.
    fn marked_record(key: &str, in_doubt: bool) -> WriteBatch {
        let mut batch = WriteBatch::new();
        batch.insert(key.as_bytes().to_vec(), vec![u8::from(in_doubt)]);
        if in_doubt {
            batch.mark(key.as_bytes().to_vec());
        } else {
            batch.unmark(key.as_bytes().to_vec());
        }
        batch
    }

    /// The keys whose records `db` holds in doubt.
    fn read_in_doubt(db: &sled::Db) -> Result<std::collections::BTreeSet<Vec<u8>>, StoreError> {
        let mut keys = std::collections::BTreeSet::new();
        for entry in db.iter() {
            let (key, value) = entry.map_err(|e| StoreError::Read(e.to_string()))?;
            if value.as_ref() == [1] {
                keys.insert(key.to_vec());
            }
        }
        Ok(keys)
    }

    #[test]
    fn a_compaction_switch_while_the_first_listing_reads_loses_no_mark() {
        use futures::executor::block_on;
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for (key, in_doubt) in [("a", true), ("b", true), ("c", false)] {
            block_on(store.write(marked_record(key, in_doubt), Durability::Forced)).unwrap();
        }
        let listed = store
            .marked(None, 10, |db| {
                // While the records are read, the logger goes on: a branch marked, then
                // the switch to a new generation, then a branch settled and another
                // marked that only the new generation holds.
                block_on(store.write(marked_record("x", true), Durability::Forced)).unwrap();
                block_on(store.compact()).unwrap();
                block_on(store.write(marked_record("b", false), Durability::Forced)).unwrap();
                block_on(store.write(marked_record("y", true), Durability::Forced)).unwrap();
                // The database read is the one current when the seed began: the
                // interleaving happened as intended.
                assert!(dir.path().join(POINTER_FILE).exists(), "no switch");
                assert_eq!(db.get(b"y").unwrap(), None);
                assert_eq!(db.get(b"b").unwrap().as_deref(), Some(&[1u8][..]));
                read_in_doubt(db)
            })
            .unwrap();
        let expected: Vec<Vec<u8>> = ["a", "x", "y"].map(|k| k.as_bytes().to_vec()).into();
        assert_eq!(listed, expected);
        // The new generation's records, read afresh after a reopen, agree.
        store.close().unwrap();
        drop(store);
        let reopened = open(dir.path());
        assert_eq!(reopened.marked(None, 10, read_in_doubt).unwrap(), expected);
    }

    #[tokio::test]
    async fn a_reader_keeps_the_old_generation_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .write(insert_batch(0..10, b"v"), Durability::Forced)
            .await
            .unwrap();
        let held = store.db();
        store.compact().await.unwrap();
        std::thread::sleep(std::time::Duration::from_secs(3));
        assert!(
            dir.path().join(LOG_FILE_NAME).exists(),
            "deleted under a reader"
        );
        assert_eq!(held.get(b"k000003").unwrap().as_deref(), Some(&b"v"[..]));
        drop(held);
        wait_for("the replaced generation is deleted", || {
            !dir.path().join(LOG_FILE_NAME).exists()
        });
    }

    fn compacting_at_any_size(min_removed_records: u64) -> StoreOptions {
        StoreOptions {
            compaction: Some(CompactionPolicy {
                min_bytes: 1,
                growth_factor: 1,
                min_removed_records,
                check_interval_ms: 50,
            }),
            ..StoreOptions::default()
        }
    }

    /// Polls (at most 20 s) until the store has switched to a compacted generation.
    fn wait_for_a_compaction(dir: &Path) {
        wait_for("a compaction", || dir.join(POINTER_FILE).exists());
    }

    /// Removes one record.
    async fn remove_one(store: &DurableStore, key: &[u8]) {
        let mut removal = WriteBatch::new();
        removal.remove(key.to_vec());
        store.write(removal, Durability::Forced).await.unwrap();
    }

    /// Asserts that no compaction starts in 2 s: about 40 of the policy's looks at
    /// `compacting_at_any_size`'s interval, each of which would compact on size alone.
    async fn no_compaction_starts(dir: &Path, why: &str) {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(!a_compaction_started(dir), "{why}");
    }

    #[tokio::test]
    async fn the_store_compacts_itself_when_it_has_grown() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), compacting_at_any_size(0)).unwrap();
        store
            .write(insert_batch(0..5_000, &[1u8; 100]), Durability::Forced)
            .await
            .unwrap();
        wait_for_a_compaction(dir.path());
        assert_eq!(contents(&store).len(), 5_000);
    }

    /// Whether a compaction has started: its generation's directory is made first.
    fn a_compaction_started(dir: &Path) -> bool {
        generations::dir_of(dir, 1).exists()
    }

    #[tokio::test]
    async fn a_store_holding_removed_records_compacts_only_after_the_removals_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        // A removal with no policy, so that the store's size is not taken as a base at
        // its first removals under the policy below: it holds removed records already.
        let store = open(dir.path());
        store
            .write(insert_batch(0..5_000, &[1u8; 100]), Durability::Forced)
            .await
            .unwrap();
        remove_one(&store, b"k004999").await;
        store.close().unwrap();
        drop(store);
        let store = DurableStore::open(dir.path(), compacting_at_any_size(2)).unwrap();
        remove_one(&store, b"k000000").await;
        no_compaction_starts(
            dir.path(),
            "compacted after one removal of the two the policy asks for",
        )
        .await;
        remove_one(&store, b"k000001").await;
        wait_for_a_compaction(dir.path());
        assert_eq!(contents(&store).len(), 4_997);
    }

    #[tokio::test]
    async fn a_store_created_empty_and_reopened_before_its_first_removal_takes_a_base() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), compacting_at_any_size(1)).unwrap();
        store
            .write(insert_batch(0..5_000, &[1u8; 100]), Durability::Forced)
            .await
            .unwrap();
        // Its files as a crash now would leave them: not closed.
        copy_tree(dir.path(), crashed.path());
        drop(store);
        let store = DurableStore::open(crashed.path(), compacting_at_any_size(1)).unwrap();
        remove_one(&store, b"k000000").await;
        wait_for("a base taken", || {
            compaction::baseline_bytes(&store.generation().meta) > 0
        });
        no_compaction_starts(
            crashed.path(),
            "compacted at its first removal after a reopen",
        )
        .await;
        assert_eq!(contents(&store).len(), 4_999);
    }

    #[tokio::test]
    async fn a_store_created_empty_takes_its_size_at_its_first_removal_as_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), compacting_at_any_size(1)).unwrap();
        let mut one_removal = insert_batch(0..5_000, &[1u8; 100]);
        one_removal.remove(b"k000000".to_vec());
        store.write(one_removal, Durability::Forced).await.unwrap();
        wait_for("a base taken", || {
            compaction::baseline_bytes(&store.generation().meta) > 0
        });
        let base = compaction::baseline_bytes(&store.generation().meta);
        let awaited = store.generation().meta.contains_key(BASE_AWAITED_KEY);
        assert!(
            !awaited.unwrap(),
            "still marked as awaiting the base it has"
        );
        // Many more of the policy's looks: the store is at its base, not past twice it.
        no_compaction_starts(dir.path(), "compacted at its first removal").await;
        // Opened again, it keeps the base: no compaction before twice it either.
        store.close().unwrap();
        drop(store);
        let store = DurableStore::open(dir.path(), compacting_at_any_size(1)).unwrap();
        assert_eq!(compaction::baseline_bytes(&store.generation().meta), base);
        remove_one(&store, b"k000001").await;
        no_compaction_starts(dir.path(), "compacted below twice its base after a reopen").await;
        // Past twice the base (the least growth factor).
        let mut written = 5_000;
        while store.size_on_disk_bytes().unwrap() <= 2 * base && written < 200_000 {
            store
                .write(
                    insert_batch(written..written + 5_000, &[1u8; 100]),
                    Durability::Forced,
                )
                .await
                .unwrap();
            written += 5_000;
        }
        assert!(store.size_on_disk_bytes().unwrap() > 2 * base);
        wait_for_a_compaction(dir.path());
        assert_eq!(contents(&store).len(), written as usize - 2);
    }

    #[test]
    fn an_unfinished_rebuild_is_removed_and_the_old_generation_opened() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        futures::executor::block_on(store.write(insert_batch(0..10, b"v"), Durability::Forced))
            .unwrap();
        store.close().unwrap();
        drop(store);
        // What a crash in the middle of a copy leaves: a generation nobody names.
        let unfinished = dir.path().join("gen-1");
        std::fs::create_dir(&unfinished).unwrap();
        std::fs::write(unfinished.join(LOG_FILE_NAME), b"half a database").unwrap();
        let store = open(dir.path());
        assert_eq!(contents(&store).len(), 10);
        assert!(!unfinished.exists());
    }

    #[tokio::test]
    async fn a_switch_survives_a_crash_before_the_old_generation_is_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        store
            .write(insert_batch(0..10, b"v"), Durability::Forced)
            .await
            .unwrap();
        let held = store.db();
        store.compact().await.unwrap();
        // The disk as a crash now would leave it: both generations and the pointer.
        copy_tree(dir.path(), copy.path());
        drop(held);
        let reopened = open(copy.path());
        assert_eq!(contents(&reopened).len(), 10);
        assert!(
            !copy.path().join(LOG_FILE_NAME).exists(),
            "old generation kept"
        );
        drop(reopened);
        // Without its pointer the compacted store is damage, not a new empty store.
        std::fs::remove_file(copy.path().join(POINTER_FILE)).unwrap();
        assert!(matches!(
            DurableStore::open(copy.path(), StoreOptions::default()),
            Err(StoreError::Damaged { .. })
        ));
    }

    fn copy_tree(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    #[test]
    fn unfinished_snapshot_files_are_removed_before_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(open(dir.path()));
        let leftover = dir.path().join("snap.00000000000000FF.generating");
        std::fs::write(&leftover, b"partial").unwrap();
        let store = open(dir.path());
        assert!(!leftover.exists());
        store.close().unwrap();
    }
}
