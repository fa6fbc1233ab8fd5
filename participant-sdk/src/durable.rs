//! Durable writes on sled 0.34.7, with group commit.
//!
//! sled alone does not make a write durable when it returns, and its own flushing is
//! unsafe to use concurrently (see `shared/DESIGN.md`, "Durability on sled"). This module
//! is the one place that writes to a Treaty sled database; the coordinator's decision log
//! and the participant barrier both sit on it.
//!
//! Invariants:
//! - One logger thread owns every write. It takes the queued requests in arrival order (up
//!   to [`StoreOptions::max_batch_records`] records), applies them with one `apply_batch`,
//!   and, when any of them is [`Durability::Forced`], calls `flush()` and then `fdatasync`
//!   on the database file before it wakes any waiter of that batch. `flush_async` is never
//!   called.
//! - A forced write's ticket resolves `Ok` only once its records are on disk. Writes are
//!   applied in the order `write` was called, so a lazy write issued after a forced one can
//!   never reach the disk before it.
//! - After the first failed write the store is failed for good: every later write
//!   resolves with [`StoreError::Failed`]. The owner must stop, restart and recover.
//! - `snap.*.generating` files left by a crash during `open()` are removed before opening.

use std::collections::VecDeque;
use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

/// How long a write may stay only in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk (flushed and fdatasync'ed) before the ticket resolves.
    Forced,
    /// Applied (visible to readers) when the ticket resolves; on disk at the next forced
    /// write or sled's background flush, whichever comes first.
    Lazy,
}

/// An ordered set of inserts and removes applied atomically.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
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

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Appends `other`'s writes after this batch's.
    pub fn extend(&mut self, other: WriteBatch) {
        self.ops.extend(other.ops);
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
    #[error("the store failed and accepts no more writes: {0}")]
    Failed(String),
    #[error("the store is closed")]
    Closed,
    #[error("read failed: {0}")]
    Read(String),
}

/// Tunables of a [`DurableStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Most records one group commit applies; more wait for the next one.
    pub max_batch_records: usize,
    /// Most bytes (keys and values) one group commit applies; a single larger write
    /// still goes alone.
    pub max_batch_bytes: usize,
    /// sled's page cache, in bytes.
    pub cache_capacity_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_batch_records: 4096,
            max_batch_bytes: 8 * 1024 * 1024,
            cache_capacity_bytes: 256 * 1024 * 1024,
        }
    }
}

type Done = oneshot::Sender<Result<(), StoreError>>;

/// Writes taken together in one group commit.
type Group = Vec<(WriteBatch, Durability, Done)>;

enum Request {
    Write {
        batch: WriteBatch,
        durability: Durability,
        done: Done,
    },
    /// Replied on a std channel: `close` blocks, and may be called from async code.
    Close {
        done: mpsc::SyncSender<Result<(), StoreError>>,
    },
}

/// A sled database whose writes go through one group-committing logger thread.
#[derive(Debug)]
pub struct DurableStore {
    db: sled::Db,
    path: PathBuf,
    queue: Mutex<Option<mpsc::Sender<Request>>>,
    failure: Arc<OnceLock<String>>,
    failed: Arc<tokio::sync::Notify>,
    logger: Mutex<Option<JoinHandle<()>>>,
}

impl DurableStore {
    /// Opens (creating if needed) the database in `dir`, after removing the
    /// `snap.*.generating` files a crash during a previous open may have left.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: dir.to_path_buf(),
            message,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_error(e.to_string()))?;
        remove_unfinished_snapshots(dir).map_err(|e| open_error(e.to_string()))?;
        let db = open_sled(dir, &options).map_err(|e| open_error(e.to_string()))?;
        // fdatasync through our own descriptor: sled's flush() only calls sync_file_range.
        let db_file = File::open(dir.join("db")).map_err(|e| open_error(e.to_string()))?;
        let (sender, receiver) = mpsc::channel();
        let failure = Arc::new(OnceLock::new());
        let failed = Arc::new(tokio::sync::Notify::new());
        let logger = Logger {
            db: db.clone(),
            db_file,
            receiver,
            failure: failure.clone(),
            failed: failed.clone(),
            max_batch_records: options.max_batch_records.max(1),
            max_batch_bytes: options.max_batch_bytes.max(1),
        };
        let handle = std::thread::Builder::new()
            .name("treaty-logger".into())
            .spawn(move || logger.run())
            .map_err(|e| open_error(format!("cannot start the logger thread: {e}")))?;
        Ok(Self {
            db,
            path: dir.to_path_buf(),
            queue: Mutex::new(Some(sender)),
            failure,
            failed,
            logger: Mutex::new(Some(handle)),
        })
    }

    /// The database, for reads. Writes must go through [`DurableStore::write`]. Reads
    /// may see lazy and not-yet-durable forced writes: never answer a question whose
    /// answer must be durable from a read alone.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `batch`; it is applied after every write queued before it. The ticket
    /// resolves when the batch is applied (`Lazy`) or on disk (`Forced`).
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

    /// The reason the store failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.get().cloned()
    }

    /// Resolves with the reason once the store has failed (at once if it already has).
    pub async fn failed(&self) -> String {
        loop {
            // Registered before the check, so a failure in between still wakes us.
            let notified = self.failed.notified();
            if let Some(message) = self.failure.get() {
                return message.clone();
            }
            notified.await;
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
    }
}

/// How long `open` waits for the file lock of a database that another handle is still
/// letting go of: sled's background IO threads release it shortly after the last handle
/// is dropped, so a quick reopen in the same process can find it still held.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

fn open_sled(dir: &Path, options: &StoreOptions) -> sled::Result<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        let opened = sled::Config::new()
            .path(dir)
            .cache_capacity(options.cache_capacity_bytes)
            .open();
        match opened {
            // sled 0.34.7 reports a held lock as an `Other` I/O error with this text.
            Err(sled::Error::Io(error))
                if error.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_PATIENCE =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
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

struct Logger {
    db: sled::Db,
    db_file: File,
    receiver: mpsc::Receiver<Request>,
    failure: Arc<OnceLock<String>>,
    failed: Arc<tokio::sync::Notify>,
    max_batch_records: usize,
    max_batch_bytes: usize,
}

impl Logger {
    fn run(self) {
        let mut pending: VecDeque<Request> = VecDeque::new();
        loop {
            if pending.is_empty() {
                match self.receiver.recv() {
                    Ok(request) => pending.push_back(request),
                    // Every sender is gone without a close: make what we have durable.
                    Err(mpsc::RecvError) => {
                        let _ = self.make_durable();
                        return;
                    }
                }
            }
            while let Ok(request) = self.receiver.try_recv() {
                pending.push_back(request);
            }
            let (group, close) = self.take_group(&mut pending);
            self.commit_group(group);
            if let Some(done) = close {
                let result = self.make_durable();
                let _ = done.send(result);
                for request in pending.drain(..).chain(self.receiver.try_iter()) {
                    reply(request, Err(StoreError::Closed));
                }
                return;
            }
        }
    }

    /// Takes writes from the front of `pending` up to the record and byte limits,
    /// stopping at a close request (returned separately).
    fn take_group(
        &self,
        pending: &mut VecDeque<Request>,
    ) -> (Group, Option<mpsc::SyncSender<Result<(), StoreError>>>) {
        let mut group = Vec::new();
        let mut records = 0;
        let mut bytes = 0;
        while let Some(request) = pending.pop_front() {
            match request {
                Request::Write {
                    batch,
                    durability,
                    done,
                } => {
                    let too_many = records + batch.len() > self.max_batch_records;
                    let too_big = bytes + batch.byte_len() > self.max_batch_bytes;
                    if !group.is_empty() && (too_many || too_big) {
                        pending.push_front(Request::Write {
                            batch,
                            durability,
                            done,
                        });
                        break;
                    }
                    records += batch.len();
                    bytes += batch.byte_len();
                    group.push((batch, durability, done));
                }
                Request::Close { done } => return (group, Some(done)),
            }
        }
        (group, None)
    }

    fn commit_group(&self, group: Group) {
        if group.is_empty() {
            return;
        }
        let result = match self.failure.get() {
            Some(message) => Err(StoreError::Failed(message.clone())),
            None => {
                let forced = group.iter().any(|(_, d, _)| *d == Durability::Forced);
                let mut sled_batch = sled::Batch::default();
                for (batch, _, _) in &group {
                    for (key, value) in &batch.ops {
                        match value {
                            Some(value) => sled_batch.insert(key.as_slice(), value.as_slice()),
                            None => sled_batch.remove(key.as_slice()),
                        }
                    }
                }
                let applied = self
                    .db
                    .apply_batch(sled_batch)
                    .map_err(|e| format!("apply_batch: {e}"));
                let result = match applied {
                    Ok(()) if forced => self.sync(),
                    other => other,
                };
                result.map_err(|message| self.fail(message))
            }
        };
        for (_, _, done) in group {
            let _ = done.send(result.clone());
        }
    }

    fn make_durable(&self) -> Result<(), StoreError> {
        if let Some(message) = self.failure.get() {
            return Err(StoreError::Failed(message.clone()));
        }
        self.sync().map_err(|message| self.fail(message))
    }

    fn sync(&self) -> Result<(), String> {
        fail::fail_point!(
            "durable::sync",
            |_| Err("injected sync failure".to_string())
        );
        self.db.flush().map_err(|e| format!("flush: {e}"))?;
        self.db_file
            .sync_data()
            .map_err(|e| format!("fdatasync: {e}"))
    }

    fn fail(&self, message: String) -> StoreError {
        tracing::error!(error = %message, "durable store failed; no further writes are accepted");
        let _ = self.failure.set(message);
        self.failed.notify_waiters();
        StoreError::Failed(self.failure.get().cloned().unwrap_or_default())
    }
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
