//! User code run under the barrier: the context it sees (the record of its success, for
//! it to include with its own writes), then that record written (forced, but for a
//! patient phase 2 and an opted-in unforced one-phase or saga YES), or left to the
//! user's own transaction if it included it.

use super::*;

impl<S: BarrierStore> Barrier<S> {
    /// Runs the user's `prepare` with the record of a YES vote in its context, then
    /// records the vote it gave (unless the user included that record with its own
    /// writes). Returns the vote and the record. Called only for a branch that has no
    /// record, under its lock: the record it writes is the branch's first (counted).
    pub(super) async fn prepare_user<P: Participant>(
        &self,
        participant: &P,
        branch: &BranchContext,
        mode: BranchMode,
        payload: &[u8],
        coordinator_endpoint: &str,
    ) -> Result<(Vote, BranchRecord), BarrierError> {
        let mut prepared = new_record(mode, BranchStatus::Prepared, coordinator_endpoint);
        prepared.payload = payload.to_vec();
        let (context, slot) = self.context_for(branch, &prepared);
        let vote = match participant.prepare(&context, payload).await {
            Ok(vote) => bounded(vote),
            Err(error) => {
                // User code that included the record and then failed may have written it.
                // A failed read here must not turn the user's error into a store error.
                if slot.included() && matches!(self.store.load(&branch_key(branch)), Ok(Some(_))) {
                    self.metrics.barrier_record_created();
                }
                return Err(error.into());
            }
        };
        if vote == Vote::Yes {
            if !slot.included() {
                // A two-phase YES is heard by the coordinator: durable first. A one-phase
                // or saga YES is heard by nobody; where the participant opted in (its
                // effects commit with its records), the commit's forced record that
                // follows carries it to disk.
                if mode != BranchMode::TwoPhase && self.unforced_one_phase_yes {
                    self.store
                        .save_unforced(write_for(branch, &prepared))
                        .await?;
                } else {
                    self.save(branch, &prepared).await?;
                }
            }
            self.metrics.barrier_record_created();
            return Ok((vote, prepared));
        }
        if slot.included() {
            tracing::error!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?vote,
                "participant included the barrier record of a YES vote, then voted otherwise");
        }
        let record = new_record(mode, status_after_vote(&vote), coordinator_endpoint);
        self.save(branch, &record).await?;
        self.metrics.barrier_record_created();
        Ok((vote, record))
    }

    /// Runs user code with `success` (the record of its success) in its context; once
    /// it succeeded, writes that record, unless the user included it with its own writes
    /// (then both are on disk already, atomically). With `patient` (a two-phase
    /// commit's phase 2, answering the coordinator) it is written with `save_phase_two`;
    /// a one-phase commit's, a saga step's or a compensation's answer is waited for.
    pub(super) async fn apply_user<F, Fut>(
        &self,
        branch: &BranchContext,
        success: &BranchRecord,
        patient: bool,
        operation: F,
    ) -> Result<(), BarrierError>
    where
        F: FnOnce(BranchContext) -> Fut,
        Fut: std::future::Future<Output = Result<(), ParticipantError>>,
    {
        let (context, slot) = self.context_for(branch, success);
        operation(context).await?;
        if slot.included() {
            return Ok(());
        }
        if patient {
            self.store
                .save_phase_two(write_for(branch, success))
                .await?;
        } else {
            self.save(branch, success).await?;
        }
        Ok(())
    }

    /// Writes the record (and the in-doubt mark) and waits until it is durable.
    pub(super) async fn save(
        &self,
        branch: &BranchContext,
        record: &BranchRecord,
    ) -> Result<(), BarrierError> {
        Ok(self.store.save(write_for(branch, record)).await?)
    }

    /// A copy of `branch` carrying the write that records `success`, for user code to
    /// include with its own.
    fn context_for(
        &self,
        branch: &BranchContext,
        success: &BranchRecord,
    ) -> (BranchContext, Arc<crate::participant::RecordSlot>) {
        branch.with_barrier_write(write_for(branch, success), self.store.takes_write_batches())
    }
}

/// The write that records `record`: the record, and whether the branch is in doubt.
fn write_for(branch: &BranchContext, record: &BranchRecord) -> BarrierWrite {
    BarrierWrite {
        key: branch_key(branch),
        record: encode(record),
        in_doubt: is_in_doubt(record),
    }
}

/// The vote with its reason cut to the documented limit, before it is kept or sent.
fn bounded(vote: Vote) -> Vote {
    match vote {
        Vote::No { reason } => Vote::No {
            reason: truncate_reason(reason),
        },
        other => other,
    }
}
