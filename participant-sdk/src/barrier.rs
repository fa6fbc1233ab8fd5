//! The participant barrier: a durable record per (transaction, branch) that makes every
//! operation idempotent and keeps user code from running twice or out of order.
//!
//! Rules (shared/DESIGN.md, "The participant contract and the barrier"):
//! - a duplicate is answered from the record without calling user code;
//! - `abort` / `compensate` of a branch whose `prepare` / `commit` never ran is recorded
//!   and answered without calling user code (null compensation);
//! - a `prepare` / `commit` arriving after that is refused without calling user code
//!   (anti-hanging);
//! - concurrent duplicates are serialized per branch by [`KeyedLocks`];
//! - every record is durable (the store's `save`, or the participant's own transaction)
//!   before the reply: a YES vote and a commit survive a crash of the participant right
//!   after it answered. (With [`Barrier::with_unforced_one_phase_yes`], the YES on the
//!   way to a one-phase or saga commit is written unforced: nothing is answered from
//!   it before the commit's forced record, and a Prepare that finds it forces it first.)
//!
//! A branch that voted YES in a two-phase or one-phase commit is also marked in doubt
//! until its outcome is applied; [`crate::in_doubt`] asks the coordinator about it.
//!
//! The records live in a [`BarrierStore`]: the SDK's own [`DurableStore`] by default, or
//! the participant's own database.
//!
//! **Retention.** Records of final branches (every status but `Prepared`) of a
//! transaction created more than `retention_ms` ago (by its UUIDv7 id) may be deleted by
//! the garbage collector ([`crate::barrier_gc`]); `Prepared` records never are. A call
//! for such an old transaction that finds no record cannot tell "never ran" from "ran and
//! was collected", so it never runs user code and never writes a record; it answers only
//! what is true either way:
//!
//! | call, old id, no record | answer | why |
//! |---|---|---|
//! | `prepare` | [`BarrierError::PastRetention`] | NO would be false if the branch had voted YES and committed: a coordinator whose votes decide (parallel commit, asking again after a restart) would abort a commit |
//! | `commit` (any mode) | [`BarrierError::PastRetention`] | COMMITTED, REJECTED, NOT_PREPARED or ALREADY_ABORTED could each be false |
//! | `abort` | [`BarrierError::PastRetention`] | ABORTED would be false if the branch had committed (one-phase, saga step) |
//! | `compensate` | [`BarrierError::PastRetention`] | COMPENSATED would be false if the step's effect is there |
//!
//! The error reaches the coordinator as FAILED_PRECONDITION, "no answer": a first
//! Prepare so refused aborts the transaction (no Abort is sent to the branch); any other
//! call is retried and the transaction waits for an operator. Such a call only comes from a
//! coordinator that broke its delivery horizon, or from clocks further apart than the
//! retention's margin over that horizon (docs/decisions.md, "Bounded disk"). Ids that are
//! not canonical UUIDv7s have no age: their records are kept and their calls answered as
//! usual.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::barrier_store::{BarrierStore, BarrierWrite, BranchKey, branch_key_bytes};
use crate::durable::{DurableStore, StoreError};
use crate::failpoint::crash_point;
use crate::keyed_locks::KeyedLocks;
pub use crate::keyed_locks::{Busy, MAX_WAITING_PER_KEY};
use crate::limits::truncate_reason;
use crate::metrics::ParticipantMetrics;
use crate::participant::{BranchContext, Participant, ParticipantError, Vote};
use crate::run_to_end::Unfinished;
use crate::transaction_age::transaction_created_unix_ms;

mod record;
mod user_code;
pub use record::{BranchMode, BranchRecord, BranchStatus};
pub(crate) use record::{corrupt_error, decode, encode, encoded_is_in_doubt, is_in_doubt};
use record::{new_record, status_after_vote};

/// How long records of final branches are kept by default: 8 days, the coordinator's
/// default delivery horizon (7 days) and a day of margin for clock skew.
pub const DEFAULT_RETENTION_MS: u64 = 8 * 24 * 3_600_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitAnswer {
    Committed,
    Rejected { reason: String },
    NotPrepared,
    AlreadyAborted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortAnswer {
    Aborted,
    AlreadyCommitted,
}

/// A branch waiting for its outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubtBranch {
    pub branch: BranchContext,
    pub coordinator_endpoint: String,
    pub prepared_unix_ms: u64,
}

/// One page of the branches in doubt ([`Barrier::in_doubt_page`]).
#[derive(Debug, Clone)]
pub struct InDoubtPage {
    /// The branches in doubt among the records listed.
    pub branches: Vec<InDoubtBranch>,
    /// Branches listed as in doubt whose record cannot be read in full (another
    /// version's, or damaged after its status), each with why: they may be in doubt, but
    /// whom to ask is unknown.
    pub unreadable: Vec<(BranchContext, BarrierError)>,
    /// Where the next page starts; `None` once the end was reached.
    pub next: Option<BranchKey>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BarrierError {
    #[error("barrier store: {0}")]
    Store(#[from] StoreError),
    #[error("participant: {0}")]
    Participant(#[from] ParticipantError),
    #[error("barrier record for {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    /// Too many calls for the branch wait for one that has not ended (`keyed_locks`).
    #[error(transparent)]
    Busy(#[from] Busy),
    #[error(
        "transaction {transaction_id} was created at {created_unix_ms} (Unix ms), longer ago \
         than this participant's barrier retention of {retention_ms} ms, and branch \
         {branch_id} has no record: it may have been collected, so no answer would be \
         true. Coordinators make no call past their delivery horizon; check the clocks \
         and resolve the transaction by hand (`treaty txn resolve`)"
    )]
    PastRetention {
        transaction_id: String,
        branch_id: String,
        created_unix_ms: u64,
        retention_ms: u64,
    },
}

/// How the record of a two-phase branch's phase 2 is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PhaseTwoWrite {
    /// With [`BarrierStore::save_phase_two`]: an answer to the coordinator, which only
    /// its bookkeeping waits for.
    Patient,
    /// With `save`: somebody waits for it, e.g. the in-doubt resolver, which settles
    /// one branch at a time.
    Forced,
}

/// The durable barrier of one participant, keeping its records in `S`.
pub struct Barrier<S: BarrierStore = DurableStore> {
    store: Arc<S>,
    pub(crate) locks: KeyedLocks,
    /// Operations on the barrier run to their end (`RunToEnd`) and not ended yet.
    pub(crate) unfinished: Unfinished,
    retention_ms: u64,
    /// The highest cutoff the collector has used: transactions created before it are
    /// refused without a record even if the wall clock steps back.
    collected_below_unix_ms: AtomicU64,
    /// Counts the records it creates (see [`crate::metrics`]).
    metrics: Arc<ParticipantMetrics>,
    /// Write a one-phase or saga YES without waiting for the disk (see
    /// [`Barrier::with_unforced_one_phase_yes`]).
    unforced_one_phase_yes: bool,
}

impl<S: BarrierStore> std::fmt::Debug for Barrier<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier")
            .field("store", &self.store.describe())
            .field("retention_ms", &self.retention_ms)
            .field("unforced_one_phase_yes", &self.unforced_one_phase_yes)
            .finish()
    }
}

impl<S: BarrierStore> Barrier<S> {
    /// A barrier keeping final records for [`DEFAULT_RETENTION_MS`].
    pub fn new(store: Arc<S>) -> Self {
        Self {
            store,
            locks: KeyedLocks::new(),
            unfinished: Unfinished::default(),
            retention_ms: DEFAULT_RETENTION_MS,
            collected_below_unix_ms: AtomicU64::new(0),
            metrics: Arc::default(),
            unforced_one_phase_yes: false,
        }
    }

    /// Opt-in: a one-phase commit or a saga step writes its YES on the way to the commit
    /// without waiting for the disk, so that it waits for one forced write instead of
    /// two (the commit's forced write carries the YES to disk too, the store keeping
    /// writes in order).
    ///
    /// Only for a participant whose `prepare` and `commit` write every effect in the same
    /// local transaction as the barrier's record
    /// ([`BranchContext::include_barrier_record`](crate::BranchContext::include_barrier_record)
    /// or [`take_barrier_write`](crate::BranchContext::take_barrier_write)), or that has
    /// none. Otherwise a crash while `commit` runs can lose the YES while its effect stays
    /// (a call to another service, a write elsewhere): a later Abort or Compensate then
    /// finds no record and answers without undoing it.
    pub fn with_unforced_one_phase_yes(mut self, unforced: bool) -> Self {
        self.unforced_one_phase_yes = unforced;
        self
    }

    /// Counts into `metrics` (by default, metrics of its own that nothing reads). Its
    /// record gauge counts only the records this barrier creates and collects: add those
    /// already in the store with [`ParticipantMetrics::barrier_records_found`] before the
    /// first call ([`crate::serve`] does).
    pub fn with_metrics(mut self, metrics: Arc<ParticipantMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn metrics(&self) -> &Arc<ParticipantMetrics> {
        &self.metrics
    }

    /// Keeps records of final branches for `retention_ms` after their transaction was
    /// created (see the module docs). It must be at least the coordinator's delivery
    /// horizon plus the worst skew between the two clocks.
    pub fn with_retention_ms(mut self, retention_ms: u64) -> Self {
        self.retention_ms = retention_ms;
        self
    }

    pub fn retention_ms(&self) -> u64 {
        self.retention_ms
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Transactions created before this instant are past the retention: their final
    /// records may be collected, and their calls without a record are refused.
    pub fn retention_cutoff_unix_ms(&self) -> u64 {
        let by_clock = now_unix_ms().saturating_sub(self.retention_ms);
        by_clock.max(self.collected_below_unix_ms.load(Ordering::SeqCst))
    }

    /// Called by the collector before it deletes records of transactions created before
    /// `cutoff_unix_ms`.
    pub(crate) fn collecting_below(&self, cutoff_unix_ms: u64) {
        self.collected_below_unix_ms
            .fetch_max(cutoff_unix_ms, Ordering::SeqCst);
    }

    /// For a branch without a record: refuses it if its transaction is past the
    /// retention (its record may have been collected).
    fn check_not_past_retention(&self, branch: &BranchContext) -> Result<(), BarrierError> {
        let Some(created_unix_ms) = transaction_created_unix_ms(&branch.transaction_id) else {
            return Ok(());
        };
        if created_unix_ms >= self.retention_cutoff_unix_ms() {
            return Ok(());
        }
        Err(BarrierError::PastRetention {
            transaction_id: branch.transaction_id.clone(),
            branch_id: branch.branch_id.clone(),
            created_unix_ms,
            retention_ms: self.retention_ms,
        })
    }

    /// After a failed write, records may be visible that never reached the disk:
    /// nothing may be answered from them, and no user code may run on them.
    fn ensure_store_healthy(&self) -> Result<(), BarrierError> {
        match self.store.failure() {
            Some(message) => Err(BarrierError::Store(StoreError::Failed(message))),
            None => Ok(()),
        }
    }

    /// What the barrier has recorded for a branch.
    pub fn record(&self, branch: &BranchContext) -> Result<Option<BranchRecord>, BarrierError> {
        let key = branch_key(branch);
        let value = self.store.load(&key)?;
        value.map(|bytes| decode(&key, &bytes)).transpose()
    }

    /// Up to `limit` branches that voted YES and have no outcome yet.
    ///
    /// Blocks the calling thread. With the SDK's own store, the first listing after an
    /// open reads every record to learn which are in doubt (about a second per million
    /// records); later ones read only the branches listed. From async code, call it on a
    /// blocking thread (`tokio::task::spawn_blocking`), as the SDK's resolver does.
    pub fn in_doubt(&self, limit: usize) -> Result<Vec<InDoubtBranch>, BarrierError> {
        Ok(self.in_doubt_after(None, limit)?.0)
    }

    /// In-doubt branches among the next `limit` the store lists after the cursor
    /// (`None`: from the start), and the cursor to continue from; `None` once the end was
    /// reached. A record listed that cannot be read in full fails the page (see
    /// [`in_doubt_page`](Self::in_doubt_page) to go on past it). Blocks as
    /// [`in_doubt`](Self::in_doubt) does.
    pub fn in_doubt_after(
        &self,
        cursor: Option<&BranchKey>,
        limit: usize,
    ) -> Result<(Vec<InDoubtBranch>, Option<BranchKey>), BarrierError> {
        let page = self.in_doubt_page(cursor, limit)?;
        if let Some((_, error)) = page.unreadable.into_iter().next() {
            return Err(error);
        }
        Ok((page.branches, page.next))
    }

    /// As [`in_doubt_after`](Self::in_doubt_after), but a record listed that cannot be
    /// read or decoded is named in the page instead of failing it, so that one such
    /// record does not keep every other branch from being resolved. A failure of the
    /// listing itself, or a store already failed, still fails the page. Blocks as
    /// [`in_doubt`](Self::in_doubt) does.
    pub fn in_doubt_page(
        &self,
        cursor: Option<&BranchKey>,
        limit: usize,
    ) -> Result<InDoubtPage, BarrierError> {
        self.ensure_store_healthy()?;
        let keys = self.store.in_doubt(cursor, limit)?;
        let next = if keys.len() == limit {
            keys.last().cloned()
        } else {
            None
        };
        let mut branches = Vec::new();
        let mut unreadable = Vec::new();
        for key in keys {
            let branch = BranchContext::new(key.transaction_id.clone(), key.branch_id.clone());
            // A store that fails one record's read (a custom one, over a table with a bad
            // row) names it as one that cannot be decoded does; the listing's own
            // failure still fails the page.
            let bytes = match self.store.load(&key) {
                Ok(Some(bytes)) => bytes,
                Ok(None) => continue,
                Err(error) => {
                    unreadable.push((branch, error.into()));
                    continue;
                }
            };
            match decode(&key, &bytes) {
                // The mark and the record are written together; a record that is no
                // longer prepared means the mark is being cleared.
                Ok(record) if record.status == BranchStatus::Prepared => {
                    branches.push(InDoubtBranch {
                        branch,
                        coordinator_endpoint: record.coordinator_endpoint,
                        prepared_unix_ms: record.updated_unix_ms,
                    });
                }
                Ok(_) => {}
                Err(error) => unreadable.push((branch, error)),
            }
        }
        Ok(InDoubtPage {
            branches,
            unreadable,
            next,
        })
    }

    /// Phase 1 of a two-phase commit.
    pub async fn prepare<P: Participant>(
        &self,
        participant: &P,
        branch: &BranchContext,
        payload: &[u8],
        coordinator_endpoint: &str,
    ) -> Result<Vote, BarrierError> {
        let _guard = self.locks.lock(lock_key(branch)).await?;
        self.ensure_store_healthy()?;
        if let Some(record) = self.record(branch)? {
            if record.status == BranchStatus::Prepared
                && record.mode != BranchMode::TwoPhase
                && self.unforced_one_phase_yes
            {
                // A one-phase or saga YES may have been written unforced (its commit
                // failed after it): made durable before a YES is heard from it.
                self.save(branch, &record).await?;
            }
            return Ok(match record.status {
                BranchStatus::Prepared | BranchStatus::Committed => Vote::Yes,
                BranchStatus::VotedNo { reason } => Vote::No { reason },
                BranchStatus::ReadOnly => Vote::ReadOnly,
                BranchStatus::Aborted { .. } | BranchStatus::Compensated { .. } => {
                    Vote::no("the branch was aborted before this prepare arrived")
                }
            });
        }
        self.check_not_past_retention(branch)?;
        let vote = self
            .prepare_user(
                participant,
                branch,
                BranchMode::TwoPhase,
                payload,
                coordinator_endpoint,
            )
            .await?
            .0;
        if vote == Vote::Yes {
            crash_point("participant::after_vote_recorded");
        }
        Ok(vote)
    }

    /// A two-phase commit's phase 2, a one-phase commit, or a saga step's forward action.
    /// Phase 2's record is written patiently ([`BarrierStore::save_phase_two`]): only the
    /// coordinator's bookkeeping waits for that answer.
    pub async fn commit<P: Participant>(
        &self,
        participant: &P,
        branch: &BranchContext,
        mode: BranchMode,
        payload: &[u8],
        coordinator_endpoint: &str,
    ) -> Result<CommitAnswer, BarrierError> {
        self.commit_with(
            participant,
            branch,
            mode,
            payload,
            coordinator_endpoint,
            PhaseTwoWrite::Patient,
        )
        .await
    }

    /// [`commit`](Self::commit), with phase 2's record written as `phase_two` says.
    pub(crate) async fn commit_with<P: Participant>(
        &self,
        participant: &P,
        branch: &BranchContext,
        mode: BranchMode,
        payload: &[u8],
        coordinator_endpoint: &str,
        phase_two: PhaseTwoWrite,
    ) -> Result<CommitAnswer, BarrierError> {
        let _guard = self.locks.lock(lock_key(branch)).await?;
        self.ensure_store_healthy()?;
        let mut record = match self.record(branch)? {
            Some(record) => record,
            None => {
                self.check_not_past_retention(branch)?;
                if mode == BranchMode::TwoPhase {
                    return Ok(CommitAnswer::NotPrepared);
                }
                // One call does both phases; the participant decides.
                self.prepare_user(participant, branch, mode, payload, coordinator_endpoint)
                    .await?
                    .1
            }
        };
        match &record.status {
            BranchStatus::Prepared => {
                let prepared_payload = std::mem::take(&mut record.payload);
                let patient = phase_two == PhaseTwoWrite::Patient
                    && mode == BranchMode::TwoPhase
                    && record.mode == BranchMode::TwoPhase;
                record.status = BranchStatus::Committed;
                record.updated_unix_ms = now_unix_ms();
                self.apply_user(branch, &record, patient, |context| async move {
                    participant.commit(&context, &prepared_payload).await
                })
                .await?;
                crash_point("participant::after_commit_applied");
                Ok(CommitAnswer::Committed)
            }
            BranchStatus::Committed | BranchStatus::ReadOnly => Ok(CommitAnswer::Committed),
            BranchStatus::VotedNo { reason } if mode != BranchMode::TwoPhase => {
                Ok(CommitAnswer::Rejected {
                    reason: reason.clone(),
                })
            }
            BranchStatus::VotedNo { .. }
            | BranchStatus::Aborted { .. }
            | BranchStatus::Compensated { .. } => Ok(CommitAnswer::AlreadyAborted),
        }
    }

    /// Phase 2 abort; for a branch that never prepared, a recorded null abort. The record
    /// of a prepared two-phase branch is written patiently, as in [`commit`](Self::commit).
    pub async fn abort<P: Participant>(
        &self,
        participant: &P,
        branch: &BranchContext,
    ) -> Result<AbortAnswer, BarrierError> {
        self.abort_with(participant, branch, PhaseTwoWrite::Patient)
            .await
    }

    /// [`abort`](Self::abort), with phase 2's record written as `phase_two` says.
    pub(crate) async fn abort_with<P: Participant>(
        &self,
        participant: &P,
        branch: &BranchContext,
        phase_two: PhaseTwoWrite,
    ) -> Result<AbortAnswer, BarrierError> {
        let _guard = self.locks.lock(lock_key(branch)).await?;
        self.ensure_store_healthy()?;
        let Some(mut record) = self.record(branch)? else {
            self.check_not_past_retention(branch)?;
            let record = new_record(
                BranchMode::TwoPhase,
                BranchStatus::Aborted {
                    after_prepare: false,
                },
                "",
            );
            self.save(branch, &record).await?;
            self.metrics.barrier_record_created();
            return Ok(AbortAnswer::Aborted);
        };
        match record.status {
            BranchStatus::Prepared => {
                let prepared_payload = std::mem::take(&mut record.payload);
                let patient =
                    phase_two == PhaseTwoWrite::Patient && record.mode == BranchMode::TwoPhase;
                record.status = BranchStatus::Aborted {
                    after_prepare: true,
                };
                record.updated_unix_ms = now_unix_ms();
                self.apply_user(branch, &record, patient, |context| async move {
                    participant.abort(&context, &prepared_payload).await
                })
                .await?;
                Ok(AbortAnswer::Aborted)
            }
            BranchStatus::Committed => Ok(AbortAnswer::AlreadyCommitted),
            BranchStatus::VotedNo { .. }
            | BranchStatus::ReadOnly
            | BranchStatus::Aborted { .. }
            | BranchStatus::Compensated { .. } => Ok(AbortAnswer::Aborted),
        }
    }

    /// Undoes a committed saga step; for a step that never committed, a recorded null
    /// compensation (a prepared-but-uncommitted step is aborted instead).
    pub async fn compensate<P: Participant>(
        &self,
        participant: &P,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), BarrierError> {
        let _guard = self.locks.lock(lock_key(branch)).await?;
        self.ensure_store_healthy()?;
        let Some(mut record) = self.record(branch)? else {
            self.check_not_past_retention(branch)?;
            let record = new_record(
                BranchMode::SagaStep,
                BranchStatus::Compensated {
                    after_commit: false,
                },
                "",
            );
            self.save(branch, &record).await?;
            self.metrics.barrier_record_created();
            return Ok(());
        };
        let prepared_payload = std::mem::take(&mut record.payload);
        record.updated_unix_ms = now_unix_ms();
        match record.status {
            BranchStatus::Committed => {
                record.status = BranchStatus::Compensated { after_commit: true };
                self.apply_user(branch, &record, false, |context| async move {
                    participant.compensate(&context, payload).await
                })
                .await
            }
            BranchStatus::Prepared => {
                record.status = BranchStatus::Compensated {
                    after_commit: false,
                };
                self.apply_user(branch, &record, false, |context| async move {
                    participant.abort(&context, &prepared_payload).await
                })
                .await
            }
            BranchStatus::VotedNo { .. }
            | BranchStatus::ReadOnly
            | BranchStatus::Aborted { .. }
            | BranchStatus::Compensated { .. } => Ok(()),
        }
    }
}

fn branch_key(branch: &BranchContext) -> BranchKey {
    BranchKey {
        transaction_id: branch.transaction_id.clone(),
        branch_id: branch.branch_id.clone(),
    }
}

/// Operations on one branch are serialized under this key.
pub(crate) fn lock_key(branch: &BranchContext) -> Vec<u8> {
    branch_key_bytes("", &branch.transaction_id, &branch.branch_id)
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests;
