//! The verbs that act on a saga from outside (the initiator's or an operator's cancel;
//! an operator's retry now, pause, resume and resolve) and its retry control. Same
//! invariants as [`super`]: a cancel is a decision to compensate like any other, forced
//! first, and a stated outcome that contradicts the decision to compensate is refused.

use super::*;

impl Saga {
    /// Compensates a running saga (the initiator's or an operator's cancel): a decision
    /// like any other, forced before anything is undone. A saga already compensating
    /// answers as such; one completed (or completing) cannot be cancelled.
    pub fn cancel(&mut self, reason: String) -> Result<Vec<SagaAction>, Refusal> {
        match self.phase {
            SagaPhase::Running => Ok(self.decide_compensation(reason)),
            SagaPhase::Submitting
            | SagaPhase::DecidingCompensation
            | SagaPhase::Finishing {
                compensated: false, ..
            } => Err(Refusal::DecisionInFlight),
            SagaPhase::Compensating
            | SagaPhase::Finishing {
                compensated: true, ..
            } => Err(Refusal::AlreadyEnding(TxnState::Compensating)),
            SagaPhase::Completed | SagaPhase::Compensated => Err(Refusal::Final(self.state())),
        }
    }

    /// Handles an operator's request (the API checked the caller is an admin).
    pub fn handle_operator(
        &mut self,
        request: &OperatorRequest,
        now: UnixMs,
    ) -> Result<Vec<SagaAction>, Refusal> {
        let state = self.state();
        match &request.command {
            OperatorCommand::Cancel => self.cancel(request.describe("cancelled")),
            _ if state.is_final() => Err(Refusal::Final(state)),
            OperatorCommand::RetryNow | OperatorCommand::Pause | OperatorCommand::Resume => {
                self.control_retries(request, now)
            }
            OperatorCommand::Resolve { branch_id, outcome } => {
                self.resolve(request, branch_id, *outcome, now)
            }
        }
    }

    /// An operator states a step's outcome: a forward action that keeps failing is
    /// taken as committed (applied by hand) or given up (compensated, which the barrier
    /// makes a no-op if it never ran); a compensation that keeps failing, or one that
    /// waits for an operator (a step stated committed: see [`Step::awaits_operator`]),
    /// as done by hand. Committing a step of a saga decided to compensate is refused, and
    /// so is a statement of work done (or undone) while a call for the step is in flight.
    fn resolve(
        &mut self,
        request: &OperatorRequest,
        step_id: &str,
        outcome: Resolution,
        now: UnixMs,
    ) -> Result<Vec<SagaAction>, Refusal> {
        let step = self
            .definition
            .steps
            .iter()
            .position(|d| d.id == step_id)
            .ok_or_else(|| Refusal::UnknownBranch(step_id.to_string()))?;
        let compensating = match self.phase {
            SagaPhase::Running => false,
            SagaPhase::Compensating => true,
            _ => return Err(Refusal::DecisionInFlight),
        };
        let state = self.steps[step].state;
        let expected = if compensating {
            BranchState::Compensating
        } else {
            BranchState::Running
        };
        if compensating && outcome == Resolution::Commit {
            return Err(Refusal::ContradictsDecision {
                branch: step_id.to_string(),
                wanted: outcome,
                decided: "compensate",
            });
        }
        if state != expected {
            return Err(Refusal::NothingToResolve {
                branch: step_id.to_string(),
                state,
            });
        }
        // A statement that the work stands, or was undone, may be about work done by
        // hand: a call in flight could do it again. (Giving up a running step is safe:
        // its compensation undoes the call if that went through, and the participant's
        // barrier refuses the call if it arrives after the compensation.)
        let by_hand = compensating || outcome == Resolution::Commit;
        if by_hand && self.steps[step].history.in_flight() {
            return Err(Refusal::CallInFlight(step_id.to_string()));
        }
        let what = format!("step {step_id} resolved as {outcome:?}");
        self.note(request.describe(&what), now);
        let s = &mut self.steps[step];
        s.resolution = Some(OperatorResolution {
            outcome,
            by: request.by.clone(),
            at_unix_ms: now,
            reason: request.reason.clone(),
        });
        s.failing_since = None;
        if compensating {
            s.state = BranchState::Compensated;
            s.compensation = CompensationProgress::Unsent;
            // Handled, unless another step waits for an operator too, or another
            // compensation is failing (as a two-phase commit keeps it for a failing branch).
            self.stuck = self.steps.iter().any(|s| {
                s.awaits_operator()
                    || (s.state == BranchState::Compensating && s.failing_since.is_some())
            });
            let mut actions = vec![SagaAction::PersistLazy];
            actions.extend(self.compensate_what_is_left(now));
            return Ok(actions);
        }
        match outcome {
            Resolution::Commit => {
                s.state = BranchState::Committed;
                let mut actions = vec![SagaAction::PersistLazy];
                if self.steps.iter().all(|s| s.state == BranchState::Committed) {
                    actions.extend(self.finish(false, now));
                } else {
                    actions.extend(self.start_runnable_steps(now, false));
                }
                Ok(actions)
            }
            Resolution::Abort => {
                s.state = BranchState::Uncertain;
                Ok(self.decide_compensation(request.describe(&what)))
            }
        }
    }
}

impl RetryControl for Saga {
    type Action = SagaAction;

    fn paused_mut(&mut self) -> &mut bool {
        &mut self.paused
    }

    /// Sends now every call that waits (for a retry timer, or for `Resume`): forward
    /// actions of running steps, or compensations, with no call in flight.
    fn send_waiting(&mut self, now: UnixMs) -> Vec<SagaAction> {
        let compensating = match self.phase {
            SagaPhase::Running => false,
            SagaPhase::Compensating => true,
            _ => return Vec::new(),
        };
        let mut actions = Vec::new();
        for (step, s) in self.steps.iter_mut().enumerate() {
            if s.history.in_flight() {
                continue;
            }
            if !compensating && s.state == BranchState::Running {
                s.attempts += 1;
                let call = s.history.start(Operation::Step, now);
                actions.push(SagaAction::SendStep { step, call });
            } else if compensating
                && s.state == BranchState::Compensating
                && s.compensation == CompensationProgress::Sent
            {
                s.compensation_attempts += 1;
                let call = s.history.start(Operation::Compensate, now);
                actions.push(SagaAction::SendCompensation { step, call });
            }
        }
        actions
    }

    /// A notable event in the history, without a change of state.
    fn note(&mut self, reason: String, now: UnixMs) {
        self.transitions.push(Transition {
            state: self.state(),
            at_unix_ms: now,
            reason,
        });
    }
}
