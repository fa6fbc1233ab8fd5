//! The two kinds of transaction a shard runs, behind one type: what the shard needs to
//! know of either (state, records) and how their inputs reach them.

use crate::engine::saga::{Saga, SagaEvent};
use crate::engine::twopc::{Event, TwoPhaseCommit};
use crate::model::{TxnId, TxnRecord, TxnState};

#[derive(Debug)]
pub(super) enum Machine {
    TwoPhase(TwoPhaseCommit),
    Saga(Saga),
}

/// An engine input addressed to one transaction.
#[derive(Debug)]
pub(super) enum Input {
    TwoPhase(Event),
    Saga(SagaEvent),
}

/// What a timer in the shard's queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Timer {
    Deadline,
    Prepare,
    Retry { branch: usize },
    StepRetry { step: usize },
    CompensationRetry { step: usize },
}

impl Timer {
    /// The engine input this timer becomes when it fires.
    pub(super) fn input(self) -> Input {
        match self {
            Timer::Deadline => Input::TwoPhase(Event::DeadlineReached),
            Timer::Prepare => Input::TwoPhase(Event::PrepareTimerFired),
            Timer::Retry { branch } => Input::TwoPhase(Event::RetryDue { branch }),
            Timer::StepRetry { step } => Input::Saga(SagaEvent::StepRetryDue { step }),
            Timer::CompensationRetry { step } => {
                Input::Saga(SagaEvent::CompensationRetryDue { step })
            }
        }
    }
}

impl Machine {
    pub(super) fn id(&self) -> TxnId {
        match self {
            Machine::TwoPhase(txn) => txn.id(),
            Machine::Saga(saga) => saga.id(),
        }
    }

    /// Whether users may see it: a saga only once its definition is durable (before
    /// that, a crash would make it vanish; its submitter has not been answered yet).
    pub(super) fn is_visible(&self) -> bool {
        match self {
            Machine::TwoPhase(_) => true,
            Machine::Saga(saga) => saga.is_accepted(),
        }
    }

    pub(super) fn state(&self) -> TxnState {
        match self {
            Machine::TwoPhase(txn) => txn.state(),
            Machine::Saga(saga) => saga.state(),
        }
    }

    /// What users see.
    pub(super) fn record(&self) -> TxnRecord {
        match self {
            Machine::TwoPhase(txn) => txn.record(),
            Machine::Saga(saga) => saga.record(),
        }
    }

    /// What a log write issued now must hold.
    pub(super) fn log_record(&self) -> TxnRecord {
        match self {
            Machine::TwoPhase(txn) => txn.log_record(),
            Machine::Saga(saga) => saga.log_record(),
        }
    }

    pub(super) fn reason(&self) -> Option<&str> {
        match self {
            Machine::TwoPhase(txn) => txn.reason(),
            Machine::Saga(saga) => saga.reason(),
        }
    }

    pub(super) fn owner(&self) -> Option<&str> {
        match self {
            Machine::TwoPhase(txn) => txn.owner(),
            Machine::Saga(saga) => saga.owner(),
        }
    }

    pub(super) fn idempotency_key(&self) -> Option<&str> {
        match self {
            Machine::TwoPhase(_) => None,
            Machine::Saga(saga) => saga.idempotency_key(),
        }
    }

    pub(super) fn as_two_phase(&mut self) -> Option<&mut TwoPhaseCommit> {
        match self {
            Machine::TwoPhase(txn) => Some(txn),
            Machine::Saga(_) => None,
        }
    }
}
