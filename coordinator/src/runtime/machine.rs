//! The two kinds of transaction a shard runs, behind one type: what the shard needs to
//! know of either (state, records) and how their inputs reach them.

use super::ListFilter;
use crate::engine::saga::{Saga, SagaEvent};
use crate::engine::twopc::{Event, TwoPhaseCommit};
use crate::metrics::Health;
use crate::model::{BranchState, Operation, Transition, TxnId, TxnKind, TxnRecord, TxnState};

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
    Retry { branch: usize, attempt: u32 },
    StepRetry { step: usize, attempt: u32 },
    CompensationRetry { step: usize, attempt: u32 },
    SagaDeadline,
}

impl Timer {
    /// The engine input this timer becomes when it fires.
    pub(super) fn input(self) -> Input {
        match self {
            Timer::Deadline => Input::TwoPhase(Event::DeadlineReached),
            Timer::Prepare => Input::TwoPhase(Event::PrepareTimerFired),
            Timer::Retry { branch, attempt } => {
                Input::TwoPhase(Event::RetryDue { branch, attempt })
            }
            Timer::StepRetry { step, attempt } => {
                Input::Saga(SagaEvent::StepRetryDue { step, attempt })
            }
            Timer::CompensationRetry { step, attempt } => {
                Input::Saga(SagaEvent::CompensationRetryDue { step, attempt })
            }
            Timer::SagaDeadline => Input::Saga(SagaEvent::DeadlineReached),
        }
    }
}

/// When the transaction entered `state`, its current one: the first of the transitions
/// at its end in that state (notes, such as an operator's pause, repeat the state).
fn entered(transitions: &[Transition], state: TxnState) -> Option<u64> {
    transitions
        .iter()
        .rev()
        .take_while(|t| t.state == state)
        .last()
        .map(|t| t.at_unix_ms)
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

    /// What its state holds on the heap, estimated (see `engine::footprint`).
    pub(super) fn heap_bytes(&self) -> usize {
        match self {
            Machine::TwoPhase(txn) => txn.heap_bytes(),
            Machine::Saga(saga) => saga.heap_bytes(),
        }
    }

    /// What of [`heap_bytes`](Self::heap_bytes) the records built from it share rather
    /// than copy: a saga's definition.
    pub(super) fn shared_heap_bytes(&self) -> usize {
        match self {
            Machine::TwoPhase(_) => 0,
            Machine::Saga(saga) => saga.shared_heap_bytes(),
        }
    }

    /// How many transitions its history holds (it only grows in memory).
    pub(super) fn transition_count(&self) -> usize {
        match self {
            Machine::TwoPhase(txn) => txn.transitions().len(),
            Machine::Saga(saga) => saga.transitions().len(),
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

    /// Whether a write of its record now keeps what an operator stated: a saga (from
    /// its definition on), a two-phase commit decided to commit, or to abort after its
    /// intent was logged (other aborts are never logged unfinished), or one whose votes
    /// decide after a restart (a stated YES is kept with its intent).
    pub(super) fn is_logged(&self) -> bool {
        match self {
            Machine::TwoPhase(txn) => txn.decision_is_logged() || txn.votes_decide(),
            Machine::Saga(saga) => saga.is_accepted(),
        }
    }

    /// Past its deadline and only waiting on a participant (see
    /// `TwoPhaseCommit::waits_past_deadline`); sagas have no such state.
    pub(super) fn waits_past_deadline(&self, now: u64) -> bool {
        match self {
            Machine::TwoPhase(txn) => txn.waits_past_deadline(now),
            Machine::Saga(_) => false,
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

    pub(super) fn kind(&self) -> TxnKind {
        match self {
            Machine::TwoPhase(_) => TxnKind::TwoPhase,
            Machine::Saga(_) => TxnKind::Saga,
        }
    }

    /// Adds this transaction to the shard's [`Health`] summary.
    pub(super) fn add_health(&self, health: &mut Health) {
        let state = self.state();
        if state.is_final() {
            return;
        }
        let older = |current: &mut Option<u64>, candidate: Option<u64>| {
            if let Some(candidate) = candidate {
                *current = Some(current.map_or(candidate, |c| c.min(candidate)));
            }
        };
        match self {
            Machine::TwoPhase(txn) => {
                health.two_phase_in_progress += 1;
                if state.is_decided() {
                    health.in_doubt += 1;
                    older(
                        &mut health.oldest_in_doubt_unix_ms,
                        entered(txn.transitions(), state),
                    );
                } else if txn.votes_decide() {
                    // Its participants may hold YES votes since before the restart, and
                    // the outcome they wait for is not known here yet: in doubt since
                    // it began, at the latest.
                    health.in_doubt += 1;
                    older(
                        &mut health.oldest_in_doubt_unix_ms,
                        Some(txn.created_unix_ms()),
                    );
                }
                if txn.is_stuck() {
                    health.stuck_two_phase_commits += 1;
                }
                let waiting = txn.branches().iter().filter(|b| b.awaiting_ack);
                for branch in waiting {
                    older(&mut health.oldest_retry_unix_ms, branch.failing_since);
                }
                let abort_failed = |b: &crate::engine::twopc::Branch| {
                    b.awaiting_ack
                        && b.history.attempts().last().is_some_and(|a| {
                            a.operation == Operation::Abort
                                && a.result.as_deref().is_some_and(|r| r.starts_with("error"))
                        })
                };
                if state == TxnState::Aborting && txn.branches().iter().any(abort_failed) {
                    health.undelivered_aborts += 1;
                }
            }
            Machine::Saga(saga) => {
                health.sagas_in_progress += 1;
                if saga.is_stuck() {
                    health.stuck_sagas += 1;
                }
                let busy = saga.steps().iter().filter(|s| {
                    matches!(s.state, BranchState::Running | BranchState::Compensating)
                });
                for step in busy {
                    older(&mut health.oldest_retry_unix_ms, step.failing_since);
                }
            }
        }
    }

    /// The participant endpoints it calls, once per branch or step.
    pub(super) fn endpoints(&self) -> Vec<&str> {
        match self {
            Machine::TwoPhase(txn) => txn.branches().iter().map(|b| b.endpoint.as_str()).collect(),
            Machine::Saga(saga) => saga
                .definition()
                .steps
                .iter()
                .map(|s| s.endpoint.as_str())
                .collect(),
        }
    }

    /// Whether a list with `filter` shows it (without building its record).
    pub(super) fn matches(&self, filter: &ListFilter) -> bool {
        let (created_unix_ms, stuck) = match self {
            Machine::TwoPhase(txn) => (txn.created_unix_ms(), txn.is_stuck()),
            Machine::Saga(saga) => (saga.created_unix_ms(), saga.is_stuck()),
        };
        filter.matches(
            self.state(),
            self.owner(),
            created_unix_ms,
            stuck,
            self.endpoints().into_iter(),
        )
    }

    pub(super) fn as_two_phase(&mut self) -> Option<&mut TwoPhaseCommit> {
        match self {
            Machine::TwoPhase(txn) => Some(txn),
            Machine::Saga(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_entered_where_its_run_begins_not_at_a_later_note() {
        let at = |state, at_unix_ms| Transition {
            state,
            at_unix_ms,
            reason: String::new(),
        };
        let history = [
            at(TxnState::Preparing, 1),
            at(TxnState::Committing, 2),
            at(TxnState::Committing, 9),
            at(TxnState::Committing, 12),
        ];
        assert_eq!(entered(&history, TxnState::Committing), Some(2));
        assert_eq!(entered(&history, TxnState::Aborting), None);
    }
}
