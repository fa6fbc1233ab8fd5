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

use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::barrier_store::{BarrierWrite, write_batch};
use crate::durable::WriteBatch;
use crate::trace::{TraceContext, TraceParent};

/// Which transaction and branch an operation is for.
///
/// Inside the SDK it also carries the barrier's record of the operation's success, to be
/// committed together with the participant's own writes: see
/// [`BranchContext::include_barrier_record`] (data in the SDK's `DurableStore`) and
/// [`BranchContext::take_barrier_write`] (data in a store of your own).
///
/// It also carries the W3C trace context the coordinator sent with the call (see
/// [`BranchContext::traceparent`]); two contexts of one branch are equal whatever their
/// trace.
#[derive(Clone)]
pub struct BranchContext {
    pub transaction_id: String,
    pub branch_id: String,
    barrier: Option<Arc<RecordSlot>>,
    trace: Option<TraceContext>,
}

/// The barrier's write for an operation that succeeds, waiting to be included in the
/// participant's own transaction.
#[derive(Debug, Default)]
pub(crate) struct RecordSlot {
    write: Mutex<Option<BarrierWrite>>,
    /// The barrier's store is the SDK's own: a `WriteBatch` of it may carry the record.
    takes_write_batches: bool,
    included: AtomicBool,
}

impl RecordSlot {
    pub(crate) fn included(&self) -> bool {
        self.included.load(Ordering::SeqCst)
    }

    /// The write, once; taking it means the participant writes it.
    fn take(&self) -> Option<BarrierWrite> {
        let write = self.write.lock().unwrap_or_else(|e| e.into_inner()).take();
        if write.is_some() {
            self.included.store(true, Ordering::SeqCst);
        }
        write
    }
}

impl BranchContext {
    pub fn new(transaction_id: impl Into<String>, branch_id: impl Into<String>) -> Self {
        Self {
            transaction_id: transaction_id.into(),
            branch_id: branch_id.into(),
            barrier: None,
            trace: None,
        }
    }

    /// This context with the trace context of the call.
    pub fn with_trace(mut self, trace: Option<TraceContext>) -> Self {
        self.trace = trace;
        self
    }

    /// The `traceparent` the coordinator sent with this call: the transaction's trace id
    /// and the id of the coordinator's span for the call (its `Display` is the header
    /// value). Start your own spans as its children. `None` when the call carried none
    /// (a coordinator without tracing, in-doubt resolution, a direct call).
    pub fn traceparent(&self) -> Option<&TraceParent> {
        self.trace.as_ref().map(TraceContext::traceparent)
    }

    /// The `tracestate` that came with [`traceparent`](Self::traceparent), if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.trace.as_ref().and_then(TraceContext::tracestate)
    }

    /// The whole trace context of the call, to send on with calls of your own.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.trace.as_ref()
    }

    /// A copy carrying the barrier's write for the operation's success.
    pub(crate) fn with_barrier_write(
        &self,
        write: BarrierWrite,
        takes_write_batches: bool,
    ) -> (Self, Arc<RecordSlot>) {
        let slot = Arc::new(RecordSlot {
            write: Mutex::new(Some(write)),
            takes_write_batches,
            included: AtomicBool::new(false),
        });
        let context = Self {
            barrier: Some(slot.clone()),
            ..self.clone()
        };
        (context, slot)
    }

    /// Adds the barrier's record of this operation to `batch`, so that your writes and
    /// the record reach the disk together: exactly-once effects across crashes. Use it
    /// when your data lives in the participant's `DurableStore`:
    ///
    /// - call it in the batch that makes the operation's effect, and only when the
    ///   operation succeeds as it will say (for `prepare`, when voting YES);
    /// - apply that batch with `Durability::Forced` and await it before returning;
    /// - the barrier then writes nothing more for the operation.
    ///
    /// Returns false (and adds nothing) when there is no record to include: outside the
    /// SDK, when it was included already, or when the barrier keeps its records in a
    /// store of yours (use [`BranchContext::take_barrier_write`] then).
    pub fn include_barrier_record(&self, batch: &mut WriteBatch) -> bool {
        match &self.barrier {
            Some(slot) if slot.takes_write_batches => match slot.take() {
                Some(write) => {
                    batch.extend(write_batch(&write));
                    true
                }
                None => false,
            },
            _ => false,
        }
    }

    /// Takes the barrier's record of this operation, for a participant whose barrier
    /// lives in its own database (a [`crate::barrier_store::BarrierStore`] of its own):
    /// write it in the same local transaction as the operation's effect, exactly as
    /// your store's `save` would, and commit that transaction durably before returning.
    /// The rules of [`BranchContext::include_barrier_record`] apply. Once taken, the
    /// barrier writes nothing more for the operation, so a transaction that then fails
    /// must make the operation fail too.
    ///
    /// `None` outside the SDK, or when it was taken already.
    pub fn take_barrier_write(&self) -> Option<BarrierWrite> {
        self.barrier.as_ref().and_then(|slot| slot.take())
    }
}

impl fmt::Debug for BranchContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BranchContext")
            .field("transaction_id", &self.transaction_id)
            .field("branch_id", &self.branch_id)
            .field("traceparent", &self.traceparent())
            .finish()
    }
}

impl PartialEq for BranchContext {
    fn eq(&self, other: &Self) -> bool {
        self.transaction_id == other.transaction_id && self.branch_id == other.branch_id
    }
}

impl Eq for BranchContext {}

impl Hash for BranchContext {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.transaction_id.hash(state);
        self.branch_id.hash(state);
    }
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
