//! The runtime's operator verbs and the initiator's cancel of a saga: a transaction in
//! memory is operated on by its shard; a final one only in the log can have a heuristic
//! branch resolved there, durably, before the operator hears; forgetting removes it from
//! memory and from the log. Same invariants as [`super`]: nothing is answered before
//! the write it depends on is durable. A statement of a branch's outcome is counted
//! among the heuristic outcomes once durable, whether or not its caller still waits.
//!
//! Verbs (resolve, cancel, retry-now, pause, resume, forget) are carried out one at a
//! time, each from its first read until its write is durable, in a task of its own so
//! that a caller who stops waiting stops neither. The log's queued writes are not
//! readable until its logger applies them, so without this a second verb on a record
//! only in the log would read it as the first found it: it would resolve a branch again
//! (counted twice), or write back a record being forgotten. Operators' verbs are rare,
//! and each waits for one forced write at most, so one lock for all of them costs
//! nothing that matters (a cancel waits for its decision without it).

use super::*;
use crate::log::LogWrite;
use std::future::Future;

impl Runtime {
    /// Carries out an operator's request (the API checked the caller is an admin) and
    /// returns the transaction as it is now. A final transaction no longer in memory can
    /// only have a heuristic branch resolved, in its log record.
    pub async fn operate(
        &self,
        id: TxnId,
        request: OperatorRequest,
    ) -> Result<TxnRecord, RuntimeError> {
        let cancel = matches!(request.command, OperatorCommand::Cancel);
        let runtime = self.clone();
        let record = apart(async move { runtime.operate_alone(id, request).await }).await?;
        if !cancel {
            return Ok(record);
        }
        // Answered once the decision (to compensate, or to abort after an intent) is
        // durable, as for the initiator's cancel or abort; waited for without the lock.
        match self.watch(id).await? {
            Some(mut updates) => {
                let decided = updates
                    .wait_for(|record| record.state.is_decided())
                    .await
                    .map_err(|_| RuntimeError::ShuttingDown)?;
                Ok(decided.as_ref().clone())
            }
            None => self
                .get(id)
                .await?
                .ok_or(RuntimeError::UnknownTransaction(id)),
        }
    }

    /// `operate`, with the other verbs held off until its write is durable.
    async fn operate_alone(
        &self,
        id: TxnId,
        request: OperatorRequest,
    ) -> Result<TxnRecord, RuntimeError> {
        let _one_at_a_time = self.operator_verbs.lock().await;
        let resolve = request.clone();
        match self
            .ask(&id, |reply| ShardMsg::Operate { id, request, reply })
            .await?
        {
            Err(RuntimeError::UnknownTransaction(_)) => {}
            Err(error) => return Err(error),
            Ok(operated) => {
                if let Some(durable) = operated.durable {
                    durable.await?;
                }
                return Ok(operated.record);
            }
        }
        // Unfinished records are all in memory (recovered at start).
        let Some(mut record) = self.log.get(&id)?.filter(|r| r.state.is_final()) else {
            return Err(RuntimeError::UnknownTransaction(id));
        };
        if let OperatorCommand::Cancel = resolve.command {
            return Err(match record.state.is_commit() {
                true => Refusal::AlreadyCommitting,
                false => Refusal::AlreadyEnding(record.state),
            }
            .into());
        }
        resolve_logged(&mut record, &resolve, now_unix_ms())?;
        let write = self.log.write(&record, Durability::Forced);
        counted_when_durable(write, self.metrics.clone()).await?;
        Ok(record)
    }

    /// The initiator cancels a saga: once the answer comes, the saga is compensating
    /// (durably), compensated, or it had completed (the record says which).
    pub async fn cancel_saga(&self, id: TxnId, reason: String) -> Result<TxnRecord, RuntimeError> {
        let mut updates = match self
            .ask(&id, |reply| ShardMsg::CancelSaga { id, reason, reply })
            .await?
        {
            Ok(updates) => updates,
            Err(RuntimeError::UnknownTransaction(_)) => {
                return match self.log.get(&id)? {
                    Some(record) if record.kind == TxnKind::Saga => Ok(record),
                    Some(_) => Err(RuntimeError::NotSaga(id)),
                    None => Err(RuntimeError::UnknownTransaction(id)),
                };
            }
            Err(error) => return Err(error),
        };
        let decided = updates
            .wait_for(|record| record.state != TxnState::Running)
            .await
            .map_err(|_| RuntimeError::ShuttingDown)?;
        Ok(decided.as_ref().clone())
    }

    /// Forgets a final transaction, in memory and in the log (durably). Returns its
    /// record as it was. A two-phase commit with a branch an operator resolved without
    /// its participant's answer is refused: that participant may still be in doubt and
    /// ask, and must hear COMMIT (its record stays for the log's retention). A saga's
    /// participants never ask, so a saga is forgotten whatever was resolved.
    pub async fn forget(&self, id: TxnId) -> Result<TxnRecord, RuntimeError> {
        let runtime = self.clone();
        apart(async move { runtime.forget_alone(id).await }).await
    }

    /// `forget`, with the other verbs held off until its write is durable.
    async fn forget_alone(&self, id: TxnId) -> Result<TxnRecord, RuntimeError> {
        let _one_at_a_time = self.operator_verbs.lock().await;
        if let Some(record) = self.get(id).await? {
            let unanswered =
                |b: &crate::model::BranchRecord| b.resolution.is_some() && b.heuristic.is_none();
            // Only a two-phase commit's participants ask about outcomes; a saga's never do.
            if record.kind == TxnKind::TwoPhase
                && record.state.is_commit()
                && record.branches.iter().any(unanswered)
            {
                return Err(Refusal::MayStillAsk.into());
            }
        }
        let in_memory = self
            .ask(&id, |reply| ShardMsg::Forget { id, reply })
            .await??;
        let record = match in_memory {
            Some(record) => record,
            None => match self.log.get(&id)? {
                Some(record) if record.state.is_final() => record,
                Some(record) => return Err(Refusal::Unfinished(record.state).into()),
                None => return Err(RuntimeError::UnknownTransaction(id)),
            },
        };
        self.log.forget(&record).await?;
        tracing::info!(txn_id = %id, "forgotten at an operator's request");
        Ok(record)
    }
}

/// Runs an operator's verb in a task of its own, so that it goes on to its durable write
/// (and keeps the other verbs off until then) even when its caller stops waiting.
async fn apart<T: Send + 'static>(
    verb: impl Future<Output = Result<T, RuntimeError>> + Send + 'static,
) -> Result<T, RuntimeError> {
    // Cancelled: the runtime is shutting down.
    finished(tokio::spawn(verb).await).unwrap_or(Err(RuntimeError::ShuttingDown))
}

/// What a task of its own gave: its output, its panic carried on to the caller, or
/// `None` if it was cancelled (only a runtime shutting down cancels these tasks).
fn finished<T>(outcome: Result<T, tokio::task::JoinError>) -> Option<T> {
    match outcome {
        Ok(output) => Some(output),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => None,
    }
}

/// An operator's statement of a branch's outcome, written by `write`: counted among the
/// heuristic outcomes once durable, by a task of its own, so that the count follows the
/// write even when the caller stops waiting (an admin client that goes away).
pub(super) fn counted_when_durable(write: LogWrite, metrics: Arc<Metrics>) -> LogWrite {
    let counted = tokio::spawn(async move {
        let result = write.await;
        if result.is_ok() {
            metrics.heuristic_outcome();
        }
        result
    });
    // Cancelled: the runtime is shutting down, and the log with it.
    Box::pin(async move { finished(counted.await).unwrap_or(Err(LogError::Closed)) })
}

/// An operator's resolution of a heuristic branch of a final transaction that is only in
/// the log (see `TwoPhaseCommit::resolve` for the same rule in memory).
fn resolve_logged(
    record: &mut TxnRecord,
    request: &OperatorRequest,
    now: UnixMs,
) -> Result<(), Refusal> {
    let OperatorCommand::Resolve { branch_id, outcome } = &request.command else {
        return Err(Refusal::Final(record.state));
    };
    let decided = if record.state.is_commit() {
        Resolution::Commit
    } else {
        Resolution::Abort
    };
    let branch = record
        .branches
        .iter_mut()
        .find(|b| &b.id == branch_id)
        .ok_or_else(|| Refusal::UnknownBranch(branch_id.clone()))?;
    if *outcome != decided {
        return Err(Refusal::contradicts(branch_id, *outcome, decided));
    }
    if branch.heuristic.is_none() || branch.resolution.is_some() {
        return Err(Refusal::NothingToResolve {
            branch: branch_id.clone(),
            state: branch.state,
        });
    }
    branch.resolution = Some(OperatorResolution {
        outcome: *outcome,
        by: request.by.clone(),
        at_unix_ms: now,
        reason: request.reason.clone(),
    });
    record.transitions.push(Transition {
        state: record.state,
        at_unix_ms: now,
        reason: request.describe(&format!("branch {branch_id} resolved as {outcome:?}")),
    });
    Ok(())
}
