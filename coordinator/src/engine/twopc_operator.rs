//! An operator's verbs on a two-phase commit (retry now, pause, resume, cancel, resolve)
//! and its retry control: the part of the state machine the admin API drives. Same
//! invariants as [`super`]: an operator may only state the decided outcome of a branch,
//! or, while the votes decide after a restart, the vote of a branch that cannot answer.

use super::*;

impl TwoPhaseCommit {
    /// Handles an operator's request (the API checked the caller is an admin).
    pub fn handle_operator(
        &mut self,
        request: &OperatorRequest,
        now: UnixMs,
    ) -> Result<Vec<Action>, Refusal> {
        let state = self.state();
        match &request.command {
            OperatorCommand::Cancel => match self.phase {
                Phase::Preparing if self.votes_decide => Err(Refusal::VotesDecide),
                Phase::Active | Phase::Preparing => {
                    Ok(self.decide_abort(request.describe("cancelled"), now))
                }
                Phase::OnePhase { .. } | Phase::Deciding | Phase::Concluding { .. } => {
                    Err(Refusal::CommitInFlight)
                }
                Phase::DecidingAbort { .. } => Err(Refusal::DecisionInFlight),
                Phase::Committing | Phase::Committed => Err(Refusal::AlreadyCommitting),
                Phase::Aborting | Phase::Aborted => Err(Refusal::AlreadyEnding(state)),
            },
            _ if state.is_final()
                && !matches!(request.command, OperatorCommand::Resolve { .. }) =>
            {
                Err(Refusal::Final(state))
            }
            OperatorCommand::RetryNow | OperatorCommand::Pause | OperatorCommand::Resume => {
                self.control_retries(request, now)
            }
            OperatorCommand::Resolve { branch_id, outcome } => {
                self.resolve(request, branch_id, *outcome, now)
            }
        }
    }

    /// An operator states a branch's outcome: a branch that never acknowledged phase 2
    /// (its participant is gone), a one-phase commit whose participant never answers,
    /// or a heuristic answer repaired by hand. Only the decided outcome can be stated, and
    /// not while any call for a branch still owed phase 2 (or a one-phase probe) is in
    /// flight (its answer may settle it; work done by hand could be done again).
    fn resolve(
        &mut self,
        request: &OperatorRequest,
        branch_id: &str,
        outcome: Resolution,
        now: UnixMs,
    ) -> Result<Vec<Action>, Refusal> {
        let index = self
            .branches
            .iter()
            .position(|b| b.id == branch_id)
            .ok_or_else(|| Refusal::UnknownBranch(branch_id.to_string()))?;
        let resolution = OperatorResolution {
            outcome,
            by: request.by.clone(),
            at_unix_ms: now,
            reason: request.reason.clone(),
        };
        let what = format!("branch {branch_id} resolved as {outcome:?}");
        let decided = match self.phase {
            // Before the deadline the commit may still be on its way: wait for it.
            Phase::OnePhase { probing: false } => return Err(Refusal::CommitInFlight),
            // The participant holds the outcome; the operator asked it.
            Phase::OnePhase { probing: true } => {
                let b = &mut self.branches[index];
                if b.history.in_flight() {
                    // The probe's answer would settle it.
                    return Err(Refusal::CallInFlight(branch_id.to_string()));
                }
                b.awaiting_ack = false;
                b.payload = Vec::new();
                b.resolution = Some(resolution);
                self.note(request.describe(&what), now);
                return Ok(match outcome {
                    Resolution::Commit => {
                        self.branches[index].state = BranchState::Committed;
                        self.phase = Phase::Concluding {
                            at_unix_ms: now,
                            read_only: false,
                        };
                        vec![Action::PersistDecision]
                    }
                    Resolution::Abort => {
                        self.branches[index].state = BranchState::Aborted;
                        let reason = request.describe("one-phase commit resolved as aborted");
                        self.reason = Some(reason.clone());
                        self.finish(Phase::Aborted, reason, now)
                    }
                });
            }
            Phase::Committing | Phase::Committed => Resolution::Commit,
            Phase::Aborting | Phase::Aborted => Resolution::Abort,
            Phase::Deciding | Phase::Concluding { .. } => return Err(Refusal::CommitInFlight),
            Phase::DecidingAbort { .. } => return Err(Refusal::DecisionInFlight),
            // The operator states the vote its participant cannot give.
            Phase::Preparing if self.votes_decide => {
                let b = &mut self.branches[index];
                if b.state != BranchState::Preparing {
                    return Err(Refusal::NothingToResolve {
                        branch: branch_id.to_string(),
                        state: b.state,
                    });
                }
                b.resolution = Some(resolution);
                b.history
                    .abandon_open("no answer: an operator stated the vote", now);
                // Handled, unless another branch still fails to answer.
                self.stuck = self.branches.iter().enumerate().any(|(i, b)| {
                    i != index && b.state == BranchState::Preparing && b.failing_since.is_some()
                });
                self.note(request.describe(&what), now);
                let vote = match outcome {
                    Resolution::Commit => Vote::Yes,
                    Resolution::Abort => Vote::no(request.describe("NO stated")),
                };
                return Ok(self.on_vote(index, vote, now));
            }
            Phase::Active | Phase::Preparing => return Err(Refusal::Undecided(self.state())),
        };
        if outcome != decided {
            return Err(Refusal::contradicts(branch_id, outcome, decided));
        }
        let b = &mut self.branches[index];
        if b.awaiting_ack && b.history.in_flight() {
            // Its answer may settle it, and work the operator did by hand could be done
            // again by the call.
            return Err(Refusal::CallInFlight(branch_id.to_string()));
        }
        if b.awaiting_ack {
            b.awaiting_ack = false;
            b.state = match outcome {
                Resolution::Commit => BranchState::Committed,
                Resolution::Abort => BranchState::Aborted,
            };
        } else if b.heuristic.is_none() || b.resolution.is_some() {
            return Err(Refusal::NothingToResolve {
                branch: branch_id.to_string(),
                state: b.state,
            });
        }
        b.resolution = Some(resolution);
        self.note(request.describe(&what), now);
        let end = match self.phase {
            Phase::Committing => Some(Phase::Committed),
            Phase::Aborting => Some(Phase::Aborted),
            _ => None,
        };
        let mut actions = match end {
            Some(end) => self.finish_when_all_acked(end, now),
            None => Vec::new(),
        };
        if actions.is_empty() {
            // Nothing ended: a logged decision keeps the resolution in its record now;
            // an abort without an intent (never logged unfinished) gets its history
            // written when it ends, or again now if it already has.
            actions.extend(self.write_again());
        }
        Ok(actions)
    }
}

impl RetryControl for TwoPhaseCommit {
    type Action = Action;

    fn paused_mut(&mut self) -> &mut bool {
        &mut self.paused
    }

    /// Sends now every delivery that waits (for a retry timer, or for `Resume`): each
    /// branch still awaiting one with no call in flight. Stale timers are ignored later.
    fn send_waiting(&mut self, now: UnixMs) -> Vec<Action> {
        let Some(operation) = self.delivery_operation() else {
            return Vec::new();
        };
        let mut actions = Vec::new();
        for (branch, b) in self.branches.iter_mut().enumerate() {
            if b.awaiting_ack && !b.history.in_flight() {
                actions.push(b.send_phase_two(branch, operation, now));
            }
        }
        actions
    }

    /// A notable event in the history (an operator's action, a stuck flag), without a
    /// change of state.
    fn note(&mut self, reason: String, now: UnixMs) {
        self.transitions.push(Transition {
            state: self.state(),
            at_unix_ms: now,
            reason,
        });
    }
}
