//! What the API and a shard say to each other: the messages a shard takes, and the
//! answers it sends back on the channel a message carries (all but `Shutdown`, which
//! has none). A transaction in memory but not shown yet is `Lookup::Hidden`: the log
//! must not be asked about it either.

use super::*;

type Reply<T> = oneshot::Sender<T>;

/// Messages from the API to a shard.
#[derive(Debug)]
pub(in crate::runtime) enum ShardMsg {
    Begin {
        id: TxnId,
        params: BeginParams,
        reply: Reply<Result<(), RuntimeError>>,
    },
    Enlist {
        id: TxnId,
        branch: BranchSpec,
        reply: Reply<Result<(), RuntimeError>>,
    },
    Commit {
        id: TxnId,
        reply: Reply<Result<watch::Receiver<Arc<TxnRecord>>, RuntimeError>>,
    },
    Abort {
        id: TxnId,
        reason: String,
        reply: Reply<Result<(), RuntimeError>>,
    },
    Submit {
        id: TxnId,
        params: SagaParams,
        reply: Reply<Result<SubmitReply, RuntimeError>>,
    },
    Get {
        id: TxnId,
        reply: Reply<Lookup<TxnRecord>>,
    },
    Watch {
        id: TxnId,
        reply: Reply<Option<watch::Receiver<Arc<TxnRecord>>>>,
    },
    State {
        id: TxnId,
        reply: Reply<Lookup<TxnState>>,
    },
    /// An operator's request (the API checked the caller is an admin).
    Operate {
        id: TxnId,
        request: OperatorRequest,
        reply: Reply<Result<Operated, RuntimeError>>,
    },
    /// The initiator cancels a saga; the reply's updates show when the decision is
    /// durable.
    CancelSaga {
        id: TxnId,
        reason: String,
        reply: Reply<Result<watch::Receiver<Arc<TxnRecord>>, RuntimeError>>,
    },
    /// Drops a final transaction from memory: its record if it was there, `None` if not
    /// (the log may still have it).
    Forget {
        id: TxnId,
        reply: Reply<Result<Option<TxnRecord>, RuntimeError>>,
    },
    /// The shard's part of the metrics' summary.
    Health { reply: Reply<Health> },
    /// The `limit` smallest ids after `after` in `states`, and which of `known` (ids
    /// found in the log) this shard holds in memory.
    List {
        filter: ListFilter,
        after: Option<TxnId>,
        limit: usize,
        known: Vec<TxnId>,
        reply: Reply<Listed>,
    },
    /// Abort what is undecided, and stop once nothing is left to wait for or at
    /// `deadline`, whichever comes first.
    Shutdown { deadline: tokio::time::Instant },
}

/// A shard's answer to `Submit`.
#[derive(Debug)]
pub(in crate::runtime) enum SubmitReply {
    Here(Submitted),
    /// The idempotency key names an unfinished saga that lives on the shard of its id
    /// (the shard count changed across a restart): ask that shard.
    LivesOn(TxnId),
}

/// What a shard knows of a transaction.
#[derive(Debug)]
pub(in crate::runtime) enum Lookup<T> {
    Visible(T),
    /// In memory but not shown yet (a saga whose definition is not durable): the log
    /// must not be asked either, as it may show that definition already.
    Hidden,
    /// Not in memory: the log may know it.
    Absent,
}

/// A shard's answer to `Operate`: the transaction as it is now, and the write to wait
/// for before telling the operator, if any.
pub(in crate::runtime) struct Operated {
    pub record: TxnRecord,
    pub durable: Option<crate::log::LogWrite>,
}

impl std::fmt::Debug for Operated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Operated")
            .field("record", &self.record)
            .field("durable", &self.durable.is_some())
            .finish()
    }
}

/// A shard's answer to `List`.
#[derive(Debug)]
pub(in crate::runtime) struct Listed {
    pub matching: Vec<TxnRecord>,
    pub present: Vec<TxnId>,
}
