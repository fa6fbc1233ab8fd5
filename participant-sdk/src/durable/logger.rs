//! The logger thread: the one writer of a [`DurableStore`](super::DurableStore).
//!
//! It takes the queued requests in arrival order, applies a group with one
//! `apply_batch`, and, when the group holds a forced write, makes it durable before it
//! wakes anyone: sled's `flush()`, then every new file sled created (blobs, snapshots)
//! and the directories that changed, then `fdatasync` of the log file, then the group's
//! number in the high-water mark (written there without a sync of its own; the mark is
//! synced within [`MARK_SYNC_INTERVAL`] and at close). A lazy group's new files are
//! synced before the next group is written. `flush_async` is never called. A patient
//! write is applied with its group and acknowledged after the next sync: the next forced
//! group's, or one of its own once `patient_sync_wait` has passed (numbered like a forced
//! group), whichever comes first; at close and before a compaction switch, every waiting
//! patient write is synced first. Under load
//! (the previous forced group held several forced writes) a group with a forced write
//! first waits a little for more, so that one sync serves more of them; a lone writer
//! never waits.
//! Between groups it does compaction's work, one bounded step at a time (see
//! `compaction`). Any error it meets, and a panic of the thread itself, fails the store
//! (`DurableStore::failed`): writes nobody awaits rely on that to be reported.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock, RwLock};

use super::compaction::Compaction;
use super::files::{SyncedFiles, SyncedPath};
use super::high_water::HighWater;
use super::{
    Durability, FORCED_GROUPS_KEY, Generation, GroupCommitted, GroupObserver,
    MAX_GROUP_COMMIT_HOLD, Request, StoreError, SyncObserver, reply,
};

mod disk;

use disk::synced_file;

type Done = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// The longest the high-water mark's file goes unsynced after a forced group noted a
/// newer number in it (see `high_water`): the cost is one small sync a second under
/// load, instead of one per forced group.
pub(super) const MARK_SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes taken together in one group commit.
type Group = Vec<(super::WriteBatch, Durability, Done)>;

/// Patient writes applied and not yet durable: their tickets, their records, and when
/// they must be synced at the latest.
#[derive(Default)]
pub(super) struct PatientWrites {
    waiting: Vec<Done>,
    records: usize,
    sync_due: Option<std::time::Instant>,
}

impl PatientWrites {
    fn add(&mut self, records: usize, done: Done, wait: std::time::Duration) {
        if self.sync_due.is_none() {
            let now = std::time::Instant::now();
            self.sync_due = Some(now.checked_add(wait).unwrap_or(now));
        }
        self.records += records;
        self.waiting.push(done);
    }

    /// How long until their sync is due, if any wait.
    fn wait(&self) -> Option<std::time::Duration> {
        self.sync_due
            .map(|due| due.saturating_duration_since(std::time::Instant::now()))
    }

    fn due(&self) -> bool {
        self.sync_due
            .is_some_and(|due| std::time::Instant::now() >= due)
    }

    fn resolve(self, result: &Result<(), StoreError>) {
        for done in self.waiting {
            let _ = done.send(result.clone());
        }
    }
}

/// What the next group holds so far, while it waits for company.
#[derive(Debug, Default)]
struct NextGroup {
    records: usize,
    bytes: usize,
    forced: bool,
}

pub(super) struct Logger {
    /// The store's directory.
    pub(super) root: std::path::PathBuf,
    /// The database written to (with, in its `meta` tree, the number of the last forced
    /// group), and where readers find it.
    pub(super) generation: Arc<Generation>,
    pub(super) shared: Arc<RwLock<Arc<Generation>>>,
    pub(super) cache_capacity_bytes: u64,
    pub(super) compaction: Compaction,
    pub(super) db_file: File,
    pub(super) db_path: std::path::PathBuf,
    pub(super) files: SyncedFiles,
    pub(super) high_water: HighWater,
    /// The number the high-water mark's file holds durably, and when it was synced.
    pub(super) mark_synced: u64,
    pub(super) mark_synced_at: std::time::Instant,
    /// The number of the last forced group made durable.
    pub(super) forced_groups: u64,
    pub(super) receiver: mpsc::Receiver<Request>,
    pub(super) failure: Arc<OnceLock<String>>,
    pub(super) failed: Arc<tokio::sync::Notify>,
    pub(super) max_batch_records: usize,
    pub(super) max_batch_bytes: usize,
    /// How long a forced group waits for more writes under load, and what counts as
    /// load: the previous forced group's writes (see `StoreOptions::group_commit_hold`).
    pub(super) hold: std::time::Duration,
    pub(super) hold_after_writes: usize,
    /// The most holds one group waits (see [`hold_after`]).
    pub(super) max_holds: u32,
    /// Forced writes in the last forced group; 0 after a spell longer than `hold` without
    /// a forced group.
    pub(super) last_forced_writes: usize,
    /// When the last forced group was committed: the start of the idle spell that ends
    /// the load, however many lazy groups or timed wake-ups (a patient sync, the mark's
    /// sync, compaction) fall inside it.
    pub(super) last_forced_group_at: std::time::Instant,
    /// The longest a patient write waits for a forced group to share its sync (zero: it
    /// is synced as a forced write), and the patient writes waiting.
    pub(super) patient_sync_wait: std::time::Duration,
    pub(super) patient: PatientWrites,
    /// Lazy or patient writes were applied since sled last wrote its buffers out (see
    /// `write_behind`).
    pub(super) unwritten: bool,
    pub(super) sync_observer: Option<SyncObserver>,
    pub(super) group_observer: Option<GroupObserver>,
    pub(super) counters: Arc<super::DurabilityCounters>,
    /// Counts the writes applied (the store counts those queued).
    pub(super) progress: Arc<super::WriteProgress>,
    /// The marked keys (see `marks`): changed once a group's batches are in sled.
    pub(super) marks: Arc<super::marks::Marks>,
}

/// Fails the store if the logger thread panics, before the writes it holds are dropped
/// (their tickets then resolve `Closed`): a write nobody awaits is reported through the
/// store's failure only, so a dead logger must be a failed store.
struct FailOnPanic {
    failure: Arc<OnceLock<String>>,
    failed: Arc<tokio::sync::Notify>,
}

impl Drop for FailOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = self
                .failure
                .set("the durable store's logger thread panicked".to_string());
            self.failed.notify_waiters();
        }
    }
}

/// How long a forced group waits for company after a forced group of
/// `last_forced_writes`: nothing if that is fewer than `hold_after_writes`, then one
/// `hold` for every `hold_after_writes` of them, up to `max_holds` holds and
/// [`MAX_GROUP_COMMIT_HOLD`].
pub(super) fn hold_after(
    hold: std::time::Duration,
    hold_after_writes: usize,
    max_holds: u32,
    last_forced_writes: usize,
) -> Option<std::time::Duration> {
    if hold.is_zero() || last_forced_writes < hold_after_writes {
        return None;
    }
    let max_holds = max_holds.max(1);
    let holds = last_forced_writes / hold_after_writes.max(1);
    let holds = u32::try_from(holds)
        .unwrap_or(max_holds)
        .clamp(1, max_holds);
    Some(hold.saturating_mul(holds).min(MAX_GROUP_COMMIT_HOLD))
}

impl Logger {
    pub(super) fn run(mut self) {
        let mut pending: VecDeque<Request> = VecDeque::new();
        // Declared after `pending` (and `self`, a parameter), so dropped before them.
        let _fail_on_panic = FailOnPanic {
            failure: self.failure.clone(),
            failed: self.failed.clone(),
        };
        loop {
            if pending.is_empty() {
                self.write_behind(&mut pending);
            }
            if pending.is_empty() {
                let wait = [
                    self.compaction.idle_wait(),
                    self.mark_sync_wait(),
                    self.patient.wait(),
                ]
                .into_iter()
                .flatten()
                .min();
                let received = match wait {
                    None => self.receiver.recv().map_err(|_| true),
                    Some(wait) => self
                        .receiver
                        .recv_timeout(wait)
                        .map_err(|error| matches!(error, mpsc::RecvTimeoutError::Disconnected)),
                };
                // No forced group for longer than a hold: whatever load there was is
                // over (lazy writes need no company).
                if self.last_forced_group_at.elapsed() > self.hold {
                    self.last_forced_writes = 0;
                }
                match received {
                    Ok(request) => pending.push_back(request),
                    Err(false) => {}
                    // Every sender is gone without a close: make what we have durable.
                    Err(true) => {
                        self.stop_compacting();
                        let _ = self.make_durable();
                        return;
                    }
                }
            }
            while let Ok(request) = self.receiver.try_recv() {
                pending.push_back(request);
            }
            self.hold_for_more(&mut pending);
            let (group, close) = self.take_group(&mut pending);
            self.commit_group(group);
            if self.patient.due() {
                self.sync_patient();
            }
            if let Some(done) = close {
                self.stop_compacting();
                let result = self.make_durable();
                let _ = done.send(result);
                for request in pending.drain(..).chain(self.receiver.try_iter()) {
                    reply(request, Err(StoreError::Closed));
                }
                return;
            }
            if let Err(message) = self.sync_mark(false) {
                let _ = self.fail(message);
            }
            self.compaction_step();
        }
    }

    /// How long until the mark's noted number is due to be synced, if it is newer than
    /// the synced one (and the store has not failed).
    fn mark_sync_wait(&self) -> Option<std::time::Duration> {
        (self.forced_groups > self.mark_synced && self.failure.get().is_none())
            .then(|| MARK_SYNC_INTERVAL.saturating_sub(self.mark_synced_at.elapsed()))
    }

    /// Syncs the high-water mark's file if it holds a newer number than it durably did,
    /// once [`MARK_SYNC_INTERVAL`] has passed since its last sync (or now, with `now`).
    fn sync_mark(&mut self, now: bool) -> Result<(), String> {
        if self.failure.get().is_some() || self.forced_groups <= self.mark_synced {
            return Ok(());
        }
        if !now && self.mark_synced_at.elapsed() < MARK_SYNC_INTERVAL {
            return Ok(());
        }
        self.high_water
            .sync()
            .map_err(|e| format!("syncing the high-water mark: {e}"))?;
        self.mark_synced = self.forced_groups;
        self.mark_synced_at = std::time::Instant::now();
        if let Some(observer) = &self.sync_observer {
            observer(&[synced_file(self.high_water.path())]);
        }
        Ok(())
    }

    /// At close: a rebuild in progress is given up (its directory goes at the next
    /// open) and whoever waits for one hears that it will not happen.
    fn stop_compacting(&mut self) {
        if let Some(rebuild) = self.compaction.rebuild.take() {
            drop(rebuild);
            self.compaction.ended(&Err(
                "the store closed before the compaction finished".into()
            ));
        }
        self.compaction.refuse_waiters("the store closed");
    }

    /// Under load (see [`hold_after`]; a spell longer than a hold without a forced group
    /// ends the load), the next group waits for others to share its sync, if it holds a
    /// forced write, until it is full by `take_group`'s limits. Each request is tallied
    /// once. Waiting changes only when writes are acknowledged, never what is durable
    /// before that.
    fn hold_for_more(&mut self, pending: &mut VecDeque<Request>) {
        let Some(hold) = hold_after(
            self.hold,
            self.hold_after_writes,
            self.max_holds,
            self.last_forced_writes,
        ) else {
            return;
        };
        let Some(deadline) = std::time::Instant::now().checked_add(hold) else {
            return;
        };
        let mut next = NextGroup::default();
        if !pending
            .iter()
            .all(|request| self.room_after(&mut next, request))
            || !next.forced
        {
            return;
        }
        loop {
            let now = std::time::Instant::now();
            if now >= deadline {
                return;
            }
            // A disconnect is noticed by the next `recv` in `run`.
            let Ok(request) = self.receiver.recv_timeout(deadline - now) else {
                return;
            };
            let room = self.room_after(&mut next, &request);
            pending.push_back(request);
            if !room {
                return;
            }
        }
    }

    /// Adds `request` to the tally of the group `take_group` would take; whether that
    /// group still has room after it (a close or compaction request ends the wait too).
    fn room_after(&self, next: &mut NextGroup, request: &Request) -> bool {
        match request {
            Request::Write {
                batch, durability, ..
            } => {
                next.records += batch.len();
                next.bytes += batch.byte_len();
                next.forced |= self.syncs_at_once(*durability);
                next.records < self.max_batch_records && next.bytes < self.max_batch_bytes
            }
            Request::Close { .. } | Request::Compact { .. } => false,
        }
    }

    /// Takes writes from the front of `pending` up to the record and byte limits,
    /// stopping at a close request (returned separately).
    fn take_group(
        &mut self,
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
                Request::Compact { done } => self.compaction.request(done),
            }
        }
        (group, None)
    }

    fn commit_group(&mut self, group: Group) {
        if group.is_empty() {
            return;
        }
        if let Some(message) = self.failure.get() {
            let error = StoreError::Failed(message.clone());
            self.refuse(group, error);
            return;
        }
        let forced = group
            .iter()
            .any(|(_, durability, _)| self.syncs_at_once(*durability));
        let result = self.apply(&group, forced).and_then(|()| {
            self.progress.note_applied(group.len());
            if !forced {
                self.sync_new_files()?;
                return Ok(None);
            }
            self.sync_forced_group().map(Some)
        });
        let sync_time = match result {
            Ok(sync_time) => sync_time,
            Err(message) => {
                let error = self.fail(message);
                self.refuse(group, error);
                return;
            }
        };
        let records = group.iter().map(|(batch, _, _)| batch.len()).sum();
        if let Some(sync_time) = sync_time {
            // The sync made every patient write applied before this group durable too.
            let patient = std::mem::take(&mut self.patient);
            self.counters
                .forced_group(records + patient.records, sync_time);
            patient.resolve(&Ok(()));
            self.last_forced_writes = group
                .iter()
                .filter(|(_, durability, _)| self.syncs_at_once(*durability))
                .count();
            self.last_forced_group_at = std::time::Instant::now();
        }
        if let Some(observer) = &self.group_observer {
            observer(GroupCommitted {
                records,
                writes: group.len(),
                sync_seconds: sync_time.map(|time| time.as_secs_f64()),
            });
        }
        if sync_time.is_none() {
            self.unwritten = true;
        }
        for (batch, durability, done) in group {
            if durability == Durability::Patient && sync_time.is_none() {
                self.patient.add(batch.len(), done, self.patient_sync_wait);
            } else {
                let _ = done.send(Ok(()));
            }
        }
    }

    /// Answers `error` to the group's writes and to the patient writes waiting: none of
    /// them is known to be durable.
    fn refuse(&mut self, group: Group, error: StoreError) {
        let error = Err(error);
        for (_, _, done) in group {
            let _ = done.send(error.clone());
        }
        std::mem::take(&mut self.patient).resolve(&error);
    }

    /// Whether a write of this durability makes its group sync before it is
    /// acknowledged (a patient one may wait for a later sync, unless waiting is off).
    fn syncs_at_once(&self, durability: Durability) -> bool {
        match durability {
            Durability::Forced => true,
            Durability::Patient => self.patient_sync_wait.is_zero(),
            Durability::Lazy => false,
        }
    }

    /// With lazy or patient writes applied and nothing queued, has sled write its
    /// buffers out to the OS (its `flush`: a `pwrite`, no sync; see
    /// third_party/sled/TREATY-PATCHES.md), so that the next forced group finds them
    /// written: sled seals and writes the buffer before a batch, so otherwise that
    /// group would write their buffer first. Nothing is acknowledged by it; patient
    /// writes still wait for a sync.
    fn write_behind(&mut self, pending: &mut VecDeque<Request>) {
        if !self.unwritten || self.patient.due() || self.failure.get().is_some() {
            return;
        }
        if let Ok(request) = self.receiver.try_recv() {
            pending.push_back(request);
            return;
        }
        self.unwritten = false;
        if let Err(error) = self.generation.db.flush() {
            let error = self.fail(format!("flush: {error}"));
            self.refuse(Group::new(), error);
        }
    }

    /// Makes the patient writes waiting durable with a sync of their own, numbered like
    /// a forced group so that the high-water mark covers them.
    pub(super) fn sync_patient(&mut self) {
        if self.patient.waiting.is_empty() {
            return;
        }
        let patient = std::mem::take(&mut self.patient);
        if let Some(message) = self.failure.get() {
            patient.resolve(&Err(StoreError::Failed(message.clone())));
            return;
        }
        let result = self
            .apply(&Group::new(), true)
            .and_then(|()| self.sync_forced_group());
        match result {
            Ok(sync_time) => {
                self.counters.forced_group(patient.records, sync_time);
                if let Some(observer) = &self.group_observer {
                    observer(GroupCommitted {
                        records: patient.records,
                        writes: patient.waiting.len(),
                        sync_seconds: Some(sync_time.as_secs_f64()),
                    });
                }
                patient.resolve(&Ok(()));
            }
            Err(message) => patient.resolve(&Err(self.fail(message))),
        }
    }

    pub(super) fn fail(&self, message: String) -> StoreError {
        tracing::error!(error = %message, "durable store failed; no further writes are accepted");
        let _ = self.failure.set(message);
        self.failed.notify_waiters();
        StoreError::Failed(self.failure.get().cloned().unwrap_or_default())
    }
}
