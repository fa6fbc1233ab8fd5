//! A saga's steps: forward actions started as their dependencies commit, the forward
//! answers and failures that move them, the decision to compensate, and compensations
//! sent in reverse dependency order, with their answers and failures. Same
//! invariants as [`super`]: no forward action after the decision to compensate, which
//! is forced before anything is undone, and every step that may have run is compensated.

use super::*;

impl Saga {
    pub(super) fn on_step_answer(
        &mut self,
        step: usize,
        call: CallNumber,
        answer: StepAnswer,
        now: UnixMs,
    ) -> Vec<SagaAction> {
        let result = match &answer {
            StepAnswer::Committed => "committed".to_string(),
            StepAnswer::Rejected { reason } => format!("rejected: {reason}"),
            StepAnswer::AlreadyCompensated => "already compensated".to_string(),
        };
        let finished = self.finish_call(step, call, Operation::Step, result, now);
        let Some(s) = self.steps.get_mut(step) else {
            return Vec::new();
        };
        s.failing_since = None;
        if finished == Some(true) {
            return vec![SagaAction::PersistLazy];
        }
        if s.state != BranchState::Running {
            // A late or repeated answer: the step has moved on (compensation under way).
            return Vec::new();
        }
        match answer {
            StepAnswer::Committed => {
                s.state = BranchState::Committed;
                let mut actions = vec![SagaAction::PersistLazy];
                match self.phase {
                    SagaPhase::Running => {
                        if self.steps.iter().all(|s| s.state == BranchState::Committed) {
                            actions.extend(self.finish(false, now));
                        } else {
                            actions.extend(self.start_runnable_steps(now, false));
                        }
                    }
                    // It will be compensated with the others.
                    SagaPhase::Compensating => actions.extend(self.compensate_what_is_left(now)),
                    _ => {}
                }
                actions
            }
            StepAnswer::Rejected { reason } => {
                s.state = BranchState::Rejected;
                let id = &self.definition.steps[step].id;
                let why = format!("step {id} was rejected: {reason}");
                match self.phase {
                    SagaPhase::Running => self.decide_compensation(why),
                    SagaPhase::Compensating => self.compensate_what_is_left(now),
                    _ => Vec::new(),
                }
            }
            StepAnswer::AlreadyCompensated => {
                // Compensated before it ran, so it never will: the saga cannot complete.
                s.state = BranchState::Uncertain;
                let id = &self.definition.steps[step].id;
                let why = format!("step {id} was compensated before it could run");
                match self.phase {
                    SagaPhase::Running => self.decide_compensation(why),
                    SagaPhase::Compensating => self.compensate_what_is_left(now),
                    _ => Vec::new(),
                }
            }
        }
    }

    pub(super) fn on_step_failure(
        &mut self,
        step: usize,
        call: CallNumber,
        error: String,
        now: UnixMs,
    ) -> Vec<SagaAction> {
        let running = self.phase == SagaPhase::Running;
        let result = format!("error: {error}");
        match self.finish_call(step, call, Operation::Step, result, now) {
            // A call given up, and sent again since: nothing to retry.
            None => return Vec::new(),
            Some(true) => return vec![SagaAction::PersistLazy],
            Some(false) => {}
        }
        let s = &mut self.steps[step];
        // A late failure of a step no longer running (stated committed, or compensating)
        // asks nothing more, and is no retry waiting.
        if s.state != BranchState::Running {
            return Vec::new();
        }
        s.failing_since.get_or_insert(now);
        s.last_error = Some(error.clone());
        if !running {
            // Compensation is decided; this step will be compensated, not retried.
            return Vec::new();
        }
        let policy = self.definition.steps[step].retry;
        if s.attempts < policy.max_attempts {
            return vec![SagaAction::ScheduleStepRetry {
                step,
                attempt: s.attempts,
                policy,
            }];
        }
        s.state = BranchState::Uncertain;
        let attempts = s.attempts;
        let id = &self.definition.steps[step].id;
        let why = format!("step {id} failed {attempts} times (last: {error})");
        self.decide_compensation(why)
    }

    /// Starts every pending step whose dependencies have all committed. After a restart
    /// (`again`), steps that were running are sent again too.
    pub(super) fn start_runnable_steps(&mut self, now: UnixMs, again: bool) -> Vec<SagaAction> {
        let mut actions = Vec::new();
        for step in 0..self.steps.len() {
            let state = self.steps[step].state;
            let startable =
                state == BranchState::Pending || (again && state == BranchState::Running);
            let ready = self.definition.steps[step]
                .after
                .iter()
                .all(|&d| self.steps[d].state == BranchState::Committed);
            if startable && ready {
                let s = &mut self.steps[step];
                s.state = BranchState::Running;
                s.attempts += 1;
                let call = s.history.start(Operation::Step, now);
                actions.push(SagaAction::SendStep { step, call });
            }
        }
        actions
    }

    /// After a restart, sends every step that was running or may run now. A saga with
    /// nothing left to send either completed (its final write was lost) or cannot go on.
    pub(super) fn resume_forward(&mut self, now: UnixMs) -> Vec<SagaAction> {
        let actions = self.start_runnable_steps(now, true);
        if !actions.is_empty() {
            return actions;
        }
        if self.steps.iter().all(|s| s.state == BranchState::Committed) {
            return self.finish(false, now);
        }
        self.decide_compensation("the saga could not be resumed after a restart".into())
    }

    /// The decision to compensate: forced before anything is undone or anyone is told.
    pub(super) fn decide_compensation(&mut self, reason: String) -> Vec<SagaAction> {
        self.reason = Some(reason);
        self.phase = SagaPhase::DecidingCompensation;
        vec![SagaAction::PersistForced]
    }

    /// Sends the compensations that may go now (every dependent step is undone), and
    /// finishes the saga when nothing is left to undo.
    pub(super) fn compensate_what_is_left(&mut self, now: UnixMs) -> Vec<SagaAction> {
        // Steps that never started never will: nothing to wait for, nothing to undo.
        // After a restart the log's "pending" may be stale (progress is lazy): such a step
        // may have run, so it is compensated like any uncertain one (the barrier makes
        // that a recorded no-op if it never ran).
        let recovered = self.recovered;
        for step in &mut self.steps {
            if step.state == BranchState::Pending {
                step.state = if recovered {
                    BranchState::Uncertain
                } else {
                    BranchState::Skipped
                };
            }
        }
        let mut actions = Vec::new();
        for step in 0..self.steps.len() {
            let s = &self.steps[step];
            let needs = s.state.may_have_run()
                || (s.state == BranchState::Compensating
                    && s.compensation == CompensationProgress::Unsent);
            if !needs {
                continue;
            }
            let dependents_undone = self
                .definition
                .steps
                .iter()
                .enumerate()
                .filter(|(_, d)| d.after.contains(&step))
                .all(|(d, _)| self.steps[d].undone());
            if dependents_undone {
                let s = &mut self.steps[step];
                s.state = BranchState::Compensating;
                s.compensation = CompensationProgress::Sent;
                s.compensation_attempts += 1;
                let call = s.history.start(Operation::Compensate, now);
                actions.push(SagaAction::SendCompensation { step, call });
            }
        }
        if self.phase == SagaPhase::Compensating && self.steps.iter().all(Step::undone) {
            actions.extend(self.finish(true, now));
        }
        actions
    }

    /// A compensation's answer: the step is compensated, or, stated committed by an
    /// operator, waits for one to say its work by hand is undone too.
    pub(super) fn on_compensated(
        &mut self,
        step: usize,
        call: CallNumber,
        now: UnixMs,
    ) -> Vec<SagaAction> {
        let result = "compensated".to_string();
        let finished = self.finish_call(step, call, Operation::Compensate, result, now);
        let Some(s) = self.steps.get_mut(step) else {
            return Vec::new();
        };
        s.failing_since = None;
        if finished == Some(true) {
            return vec![SagaAction::PersistLazy];
        }
        if s.state != BranchState::Compensating
            || self.phase != SagaPhase::Compensating
            || s.awaits_operator()
        {
            return Vec::new();
        }
        s.compensation = CompensationProgress::Unsent;
        if s.stated_committed() {
            // The participant's answer covers what it applied; what was done by
            // hand only an operator can say is undone.
            s.compensation = CompensationProgress::AwaitsOperator;
            s.last_error = None;
            self.stuck = true;
            let id = &self.definition.steps[step].id;
            self.note(
                format!(
                    "stuck: step {id} was stated committed by an operator; its \
                     participant has undone what it applied, if anything, but \
                     work done by hand only an operator can undo: undo any, then \
                     resolve the step --abort"
                ),
                now,
            );
            return vec![SagaAction::PersistLazy, SagaAction::WarnStuck { step }];
        }
        s.state = BranchState::Compensated;
        let mut actions = vec![SagaAction::PersistLazy];
        actions.extend(self.compensate_what_is_left(now));
        actions
    }

    /// A compensation's failure: retried without limit, the saga flagged stuck after
    /// `stuck_after_attempts` failures, or at once when it cannot succeed.
    pub(super) fn on_compensation_failure(
        &mut self,
        step: usize,
        call: CallNumber,
        error: String,
        permanent: bool,
        now: UnixMs,
    ) -> Vec<SagaAction> {
        let stuck_after = self.definition.stuck_after_attempts;
        let result = format!("error: {error}");
        match self.finish_call(step, call, Operation::Compensate, result, now) {
            // A call given up, and sent again since: nothing to retry.
            None => return Vec::new(),
            Some(true) => return vec![SagaAction::PersistLazy],
            Some(false) => {}
        }
        let s = &mut self.steps[step];
        // A late failure of a step that waits for an operator asks nothing more.
        if s.awaits_operator() {
            return Vec::new();
        }
        s.failing_since.get_or_insert(now);
        if s.state != BranchState::Compensating {
            return Vec::new();
        }
        let attempt = s.compensation_attempts;
        s.last_error = Some(error.clone());
        let mut actions = vec![SagaAction::ScheduleCompensationRetry {
            step,
            attempt,
            policy: self.definition.steps[step].retry,
        }];
        if (attempt >= stuck_after || permanent) && !self.stuck {
            self.stuck = true;
            let id = &self.definition.steps[step].id;
            let what = format!("compensating step {id}");
            self.note(stuck_note(&what, attempt, &error, permanent), now);
            actions.push(SagaAction::WarnStuck { step });
        }
        actions
    }
}
