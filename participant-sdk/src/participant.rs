//! The trait a service implements to take part in Treaty transactions.
//!
//! The SDK calls these methods through its barrier ([`crate::barrier`]), which guarantees:
//! - each method runs at most once per (transaction, branch, operation) once its result
//!   is recorded: duplicates are answered from the record;
//! - `commit` and `abort` of a two-phase branch are only called after `prepare` voted YES;
//! - `abort` / `compensate` for a branch whose `prepare` / `commit` never ran is answered
//!   without calling you, and a `prepare` / `commit` arriving after it is refused.
//!
//! What you must guarantee:
//! - after voting [`Vote::Yes`], `commit` and `abort` can both succeed: keep whatever
//!   `prepare` reserved until one of them is called. The SDK never aborts a YES vote on its
//!   own; it waits for the coordinator's decision.
//! - an `Err` means "no answer": the coordinator will ask again (phase 2, compensation) or
//!   give up on the transaction (prepare). Return it for transient trouble only; business
//!   refusals are [`Vote::No`].

use std::future::Future;

/// Which transaction and branch an operation is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BranchContext {
    pub transaction_id: String,
    pub branch_id: String,
}

/// A participant's answer to `prepare`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    /// Ready to commit; will neither commit nor abort until told.
    Yes,
    /// Refuses the work (a business failure); the transaction aborts.
    No { reason: String },
    /// Nothing to commit or abort: the branch drops out of phase 2.
    ReadOnly,
}

impl Vote {
    pub fn no(reason: impl Into<String>) -> Self {
        Self::No {
            reason: reason.into(),
        }
    }
}

/// A transient failure of participant code: the caller may ask again.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{message}")]
pub struct ParticipantError {
    pub message: String,
}

impl ParticipantError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// The four operations of a participant. `payload` is always the bytes the initiator
/// attached to the branch (for `compensate`, the saga step's compensation payload).
///
/// A one-phase commit (the transaction's only branch) and a saga step arrive as
/// `prepare` followed at once by `commit`; a NO vote then means "rejected".
pub trait Participant: Send + Sync + 'static {
    fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<Vote, ParticipantError>> + Send;

    fn commit(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), ParticipantError>> + Send;

    fn abort(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), ParticipantError>> + Send;

    /// Undoes a committed saga step. Participants that only take part in two-phase
    /// commits need not implement it.
    fn compensate(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> impl Future<Output = Result<(), ParticipantError>> + Send {
        let _ = (branch, payload);
        async {
            Err(ParticipantError::new(
                "this participant does not support compensation",
            ))
        }
    }
}
