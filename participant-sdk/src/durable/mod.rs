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

mod api;
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

pub use api::{
    CompactionObserver, DEFAULT_GROUP_COMMIT_HOLD, DEFAULT_GROUP_COMMIT_HOLD_AFTER_WRITES,
    DEFAULT_GROUP_COMMIT_MAX_HOLDS, DEFAULT_PATIENT_SYNC_WAIT, Durability, DurabilityCounters,
    GroupCommitted, GroupObserver, MAX_GROUP_COMMIT_HOLD, StoreError, StoreOptions, StoreSummary,
    SyncObserver, WriteBatch, WriteProgress,
};
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
    progress: Arc<WriteProgress>,
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
        // keeps every generation it had. (Not every byte: sled's own recovery, which runs
        // before the checks, has already zeroed what followed the point where it stopped
        // reading and removed the blob files past it; docs/decisions.md, "Power loss and
        // damage".)
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
        let progress = Arc::new(WriteProgress::default());
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
            last_forced_group_at: std::time::Instant::now(),
            patient_sync_wait: options.patient_sync_wait.min(MAX_GROUP_COMMIT_HOLD),
            patient: logger::PatientWrites::default(),
            unwritten: false,
            sync_observer: options.sync_observer.clone(),
            group_observer: options.group_observer.clone(),
            counters: counters.clone(),
            progress: progress.clone(),
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
            progress,
            marks,
        })
    }

    /// What this store has made durable since it opened.
    pub fn durability_counters(&self) -> Arc<DurabilityCounters> {
        self.counters.clone()
    }

    /// How many writes were queued and how many of them are applied, since it opened.
    pub fn write_progress(&self) -> &WriteProgress {
        &self.progress
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
                // Counted before the logger can apply it, so `applied` never passes
                // `queued`; taken back if it was not queued after all.
                self.progress.note_queued();
                if let Err(mpsc::SendError(request)) = sender.send(request) {
                    self.progress.unqueued();
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
mod file_tests;
#[cfg(test)]
mod patient_tests;
#[cfg(test)]
mod tests;
