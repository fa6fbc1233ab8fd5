//! A saga as the decision log holds it: the record GetTransaction shows, the record its
//! writes carry (and when the final one is issued, after which a late answer needs a
//! write of its own), and the saga rebuilt from an unfinished one after a restart. Same
//! invariants as [`super`]: nothing is shown before it is durable, every write after the
//! decision to compensate carries it, and a recovered saga drives its steps again from
//! where the log says they stood (participants answer repeats from their barrier) or
//! resumes its compensation.

use super::*;

impl Saga {
    /// A saga found unfinished in the log after a restart: forward steps are driven
    /// again from where the log says they stood (participants answer replays from their
    /// barrier), or compensation resumes.
    pub fn recover(record: TxnRecord, now: UnixMs) -> (Self, Vec<SagaAction>) {
        let Some(definition) = record.saga.clone() else {
            panic!("invariant: a saga is recovered only with its definition (the runtime checks)");
        };
        let mut steps: Vec<Step> = record
            .branches
            .iter()
            .map(|b| {
                let mut history = b.history.clone();
                history.abandon_open("unknown: the coordinator restarted", now);
                Step {
                    state: b.state,
                    attempts: b.attempts,
                    compensation_attempts: b.compensation_attempts,
                    last_error: b.last_error.clone(),
                    history,
                    compensation: CompensationProgress::Unsent,
                    failing_since: None,
                    resolution: b.resolution.clone(),
                }
            })
            .collect();
        steps.resize_with(definition.steps.len(), || Step::new(BranchState::Pending));
        let mut saga = Self {
            id: record.id,
            phase: SagaPhase::Running,
            created_unix_ms: record.created_unix_ms,
            definition,
            idempotency_key: record.idempotency_key,
            steps,
            reason: record.reason,
            stuck: record.stuck,
            transitions: record.transitions,
            recovered: true,
            owner: record.owner,
            deadline_unix_ms: (record.deadline_unix_ms != 0).then_some(record.deadline_unix_ms),
            paused: false,
        };
        if saga.transitions.is_empty() {
            // Only the definition reached the disk: it was accepted when that write returned.
            saga.transitions.push(Transition {
                state: TxnState::Running,
                at_unix_ms: saga.created_unix_ms,
                reason: String::new(),
            });
        }
        let recovered = "recovered after a coordinator restart".to_string();
        match record.state {
            TxnState::Compensating => {
                saga.phase = SagaPhase::Compensating;
                saga.note(recovered, now);
                let actions = saga.compensate_what_is_left(now);
                (saga, actions)
            }
            TxnState::Running => {
                saga.note(recovered, now);
                // A rejection whose decision had not reached the disk: decide again.
                let rejected = saga
                    .steps
                    .iter()
                    .position(|s| s.state == BranchState::Rejected);
                let actions = match rejected {
                    Some(index) => {
                        let id = &saga.definition.steps[index].id;
                        let why = format!("step {id} was rejected");
                        saga.decide_compensation(why)
                    }
                    None => saga.resume_forward(now),
                };
                let mut actions = actions;
                if saga.phase == SagaPhase::Running {
                    actions.extend(saga.deadline_timer());
                }
                (saga, actions)
            }
            other => panic!(
                "invariant: only RUNNING and COMPENSATING sagas are recovered, not {other:?}"
            ),
        }
    }

    /// Whether the saga's final record is durable or being written: what a step's history
    /// records from then on (a late answer) reaches the log only by a write of its own.
    pub(super) fn final_record_issued(&self) -> bool {
        self.phase.logged_state().is_final()
    }

    /// Finishes call `call` (a `kind` call) of `step` with `result`. `None` if that call
    /// was no longer in flight (given up, and sent again since); else whether the final
    /// record was already issued, so that the log lacks it and needs a lazy write.
    pub(super) fn finish_call(
        &mut self,
        step: usize,
        call: CallNumber,
        kind: Operation,
        result: String,
        now: UnixMs,
    ) -> Option<bool> {
        let ended = self.final_record_issued();
        let s = self.steps.get_mut(step)?;
        s.history
            .finish(call, &[kind], result, now)
            .then_some(ended)
    }

    /// What GetTransaction shows: nothing that is not durable yet (not even the reason
    /// for a decision still being written).
    pub fn record(&self) -> TxnRecord {
        let mut record = self.record_in(self.state(), Shown::Yes);
        if record.state == TxnState::Running {
            record.reason = None;
        }
        record
    }

    /// What the log must hold: the decisions taken, even while their write is in flight,
    /// and while finishing, the final state as it will be shown.
    pub fn log_record(&self) -> TxnRecord {
        let mut record = self.record_in(self.phase.logged_state(), Shown::No);
        if let SagaPhase::Finishing { at, .. } = self.phase {
            record.transitions.push(Transition {
                state: record.state,
                at_unix_ms: at,
                reason: String::new(),
            });
            record.ended_unix_ms = Some(at);
        }
        record
    }

    fn record_in(&self, state: TxnState, shown: Shown) -> TxnRecord {
        TxnRecord {
            id: self.id,
            kind: TxnKind::Saga,
            state,
            created_unix_ms: self.created_unix_ms,
            deadline_unix_ms: self.deadline_unix_ms.unwrap_or(0),
            prepare_timeout_ms: 0,
            reason: self.reason.clone(),
            branches: self
                .steps
                .iter()
                .zip(&self.definition.steps)
                .map(|(step, definition)| BranchRecord {
                    id: definition.id.clone(),
                    endpoint: definition.endpoint.clone(),
                    payload: Vec::new(),
                    state: step.state,
                    attempts: step.attempts,
                    compensation_attempts: step.compensation_attempts,
                    last_error: step.last_error.clone(),
                    history: step.history.clone(),
                    heuristic: None,
                    resolution: step.resolution.clone(),
                    awaits_operator: shown == Shown::Yes && step.awaits_operator(),
                })
                .collect(),
            transitions: self.transitions.clone(),
            ended_unix_ms: state
                .is_final()
                .then(|| self.transitions.last().map_or(0, |t| t.at_unix_ms)),
            idempotency_key: self.idempotency_key.clone(),
            stuck: self.stuck,
            saga: Some(Arc::clone(&self.definition)),
            owner: self.owner.clone(),
            paused: self.paused,
        }
    }
}

/// Whether a record is built to be shown, or to be logged: what is shown only (a step
/// waiting for an operator) stays out of every log, the in-memory one included.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shown {
    Yes,
    No,
}
