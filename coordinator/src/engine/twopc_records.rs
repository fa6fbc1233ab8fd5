//! A two-phase commit as the decision log holds it: the records its writes carry (the
//! intent with its payloads, the decisions, the end, and a write again for what is
//! recorded after the last), and the transaction rebuilt from an unfinished one after a
//! restart. Same invariants as [`super`]: a record written while deciding carries the
//! decision, and a recovered transaction delivers it again or, from an intent, lets the
//! votes decide.

use super::*;

impl TwoPhaseCommit {
    /// A transaction found unfinished in the log after a restart:
    /// - a commit decision (`Committing`): phase 2 is delivered again to every branch that
    ///   voted YES (deliveries are idempotent);
    /// - an abort decision written after an intent (`Aborting`): the abort is delivered
    ///   again to every branch that may hold a YES;
    /// - an intent (`Preparing`): every branch is asked to prepare again, with its
    ///   payload (a participant answers a repeat from its record), and the votes decide.
    ///
    /// Whether `record.state` is one of these is for the runtime to check first.
    pub fn recover(record: TxnRecord, max_branches: usize, now: UnixMs) -> (Self, Vec<Action>) {
        // The YES votes an operator stated while the votes decided (each was forced
        // with the intent before the operator heard): not asked again.
        let stated_yes: Vec<usize> = record
            .branches
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                record.state == TxnState::Preparing
                    && b.state == BranchState::Prepared
                    && b.resolution
                        .as_ref()
                        .is_some_and(|r| r.outcome == Resolution::Commit)
            })
            .map(|(i, _)| i)
            .collect();
        let (phase, operation) = match record.state {
            TxnState::Committing => (Phase::Committing, Operation::Commit),
            TxnState::Aborting => (Phase::Aborting, Operation::Abort),
            TxnState::Preparing => (Phase::Preparing, Operation::Prepare),
            other => panic!(
                "invariant: only commit, abort and intent records are recovered (the runtime \
                 checks the log first), not {other:?}"
            ),
        };
        let votes_decide = phase == Phase::Preparing;
        let mut txn = Self {
            id: record.id,
            phase,
            created_unix_ms: record.created_unix_ms,
            deadline_unix_ms: record.deadline_unix_ms,
            prepare_timeout_ms: record.prepare_timeout_ms,
            max_branches,
            branches: record
                .branches
                .into_iter()
                .map(|b| {
                    let mut history = b.history;
                    history.abandon_open("unknown: the coordinator restarted", now);
                    let awaiting_ack = match phase {
                        Phase::Committing => b.state == BranchState::Prepared,
                        Phase::Aborting => may_hold_yes(b.state),
                        _ => true,
                    };
                    Branch {
                        awaiting_ack,
                        id: b.id,
                        endpoint: b.endpoint,
                        // Only an intent's record holds any.
                        payload: b.payload,
                        // Asked again: every vote is cast anew (a YES is answered from
                        // the participant's record), but for a YES an operator stated
                        // (counted below).
                        state: if votes_decide {
                            BranchState::Preparing
                        } else {
                            b.state
                        },
                        attempts: b.attempts,
                        last_error: b.last_error,
                        history,
                        failing_since: None,
                        heuristic: b.heuristic,
                        resolution: b.resolution,
                    }
                })
                .collect(),
            reason: record.reason,
            transitions: record.transitions,
            owner: record.owner,
            paused: false,
            stuck: record.stuck,
            deadline_passed: false,
            // Only consulted at Commit, which is over.
            parallel_commit: false,
            // Whatever it is, its record is in the log, and ends there.
            intent: Intent::Durable,
            votes_decide,
        };
        let reason = if votes_decide {
            "recovered after a coordinator restart: its intent is logged, so its participants \
             are asked again and their votes decide"
        } else {
            "recovered after a coordinator restart"
        };
        txn.transitions.push(Transition {
            state: txn.phase.state(),
            at_unix_ms: now,
            reason: reason.into(),
        });
        for &branch in &stated_yes {
            txn.branches[branch].awaiting_ack = false;
        }
        let mut actions = txn.deliver_to_awaiting(operation, now);
        for branch in stated_yes {
            actions.extend(txn.on_vote(branch, Vote::Yes, now));
        }
        (txn, actions)
    }

    /// Whether its last record is issued: the log holds, or is being written, the record
    /// it ends with (for an abort the protocol does not log, its history was written
    /// when it ended, if configured). What is recorded from then on reaches the log only
    /// by a write of its own ([`Self::write_again`]). (A decided abort being forced is
    /// not: an end record follows it.)
    pub(super) fn final_record_issued(&self) -> bool {
        match self.phase {
            Phase::Concluding { .. } => true,
            phase => phase.state().is_final(),
        }
    }

    /// Finishes call `call` of `branch` (one of `answers`) with `result`. `None` if that
    /// call was no longer in flight (given up: sent again, or its vote stated, since);
    /// else whether the last record was already issued (a prepare's answer that raced the
    /// abort whose answer ended the transaction, a phase-2 call sent again), so that the
    /// log lacks it and must be written again ([`Self::write_again`]).
    pub(super) fn finish_call(
        &mut self,
        branch: usize,
        call: CallNumber,
        answers: &[Operation],
        result: String,
        now: UnixMs,
    ) -> Option<bool> {
        let b = self.branches.get_mut(branch)?;
        let was_in_flight = b.history.finish(call, answers, result, now);
        was_in_flight.then(|| self.final_record_issued())
    }

    /// The write that brings the log up to date with what was recorded since its last
    /// write (a late answer, an operator's resolution): the record as it is now if the
    /// log holds it anyway; the history of an ended abort the protocol does not log
    /// (written only if configured); nothing while an unlogged transaction is still
    /// under way (its history is written when it ends).
    pub(super) fn write_again(&self) -> Option<Action> {
        if self.decision_is_logged() || self.intent_logged() {
            Some(Action::PersistProgress)
        } else if self.state().is_final() {
            Some(Action::RecordHistory)
        } else {
            None
        }
    }

    /// What the log stores and GetTransaction shows. The reason of an abort still being
    /// written is left out (a restart before it is durable asks the votes again, and
    /// they may commit); the branches show what each call did (a NO vote, a prepare
    /// that failed), which is what happened, not a decision.
    pub fn record(&self) -> TxnRecord {
        let deciding_abort = matches!(self.phase, Phase::DecidingAbort { .. });
        TxnRecord {
            id: self.id,
            kind: TxnKind::TwoPhase,
            state: self.state(),
            created_unix_ms: self.created_unix_ms,
            deadline_unix_ms: self.deadline_unix_ms,
            prepare_timeout_ms: self.prepare_timeout_ms,
            reason: (!deciding_abort).then(|| self.reason.clone()).flatten(),
            branches: self
                .branches
                .iter()
                .map(|b| BranchRecord {
                    id: b.id.clone(),
                    endpoint: b.endpoint.clone(),
                    // Only the intent carries them (`log_record`).
                    payload: Vec::new(),
                    state: b.state,
                    attempts: b.attempts,
                    compensation_attempts: 0,
                    last_error: b.last_error.clone(),
                    history: b.history.clone(),
                    heuristic: b.heuristic.clone(),
                    resolution: b.resolution.clone(),
                    awaits_operator: false,
                })
                .collect(),
            transitions: self.transitions.clone(),
            ended_unix_ms: self
                .state()
                .is_final()
                .then(|| self.transitions.last().map_or(0, |t| t.at_unix_ms)),
            idempotency_key: None,
            stuck: self.stuck,
            saga: None,
            owner: self.owner.clone(),
            paused: self.paused,
        }
    }

    /// The record `PersistDecision` writes: the transaction as it is, but in state
    /// `Committing`, which is what recovery redelivers. (Until the write returns, users
    /// still see `Preparing`.)
    pub fn decision_record(&self) -> TxnRecord {
        debug_assert_eq!(
            self.phase,
            Phase::Deciding,
            "only a deciding transaction logs a decision"
        );
        TxnRecord {
            state: TxnState::Committing,
            ..self.record()
        }
    }

    /// What a log write issued now must hold: the intent, with the branches' payloads for
    /// asking again, while preparing; the commit decision while deciding, the abort
    /// decision while deciding to abort, the final record while concluding, the
    /// transaction as it is otherwise.
    pub fn log_record(&self) -> TxnRecord {
        match self.phase {
            Phase::Preparing if self.intent_logged() => {
                let mut intent = self.record();
                for (record, branch) in intent.branches.iter_mut().zip(&self.branches) {
                    record.payload.clone_from(&branch.payload);
                }
                intent
            }
            Phase::Deciding => self.decision_record(),
            Phase::DecidingAbort { at_unix_ms } => {
                let mut decided = self.clone();
                let reason = self.reason.clone().unwrap_or_default();
                decided.enter(self.abort_end(), reason, at_unix_ms);
                decided.record()
            }
            Phase::Concluding {
                at_unix_ms,
                read_only,
            } => {
                let mut concluded = self.clone();
                concluded.conclude(at_unix_ms, read_only);
                concluded.record()
            }
            _ => self.record(),
        }
    }

    /// Enters `Committed` as of `at_unix_ms`, when the participant(s) settled it.
    pub(super) fn conclude(&mut self, at_unix_ms: UnixMs, read_only: bool) {
        let reason = if read_only {
            "every branch was read-only".to_string()
        } else {
            String::new()
        };
        self.enter(Phase::Committed, reason, at_unix_ms);
    }
}
