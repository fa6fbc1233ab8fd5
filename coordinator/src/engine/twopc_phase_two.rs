//! Phase 2 of a two-phase commit: the outcome decided (an abort decided here, a commit
//! in `twopc_votes.rs`) delivered to every branch that needs it, again after a failure
//! or a lost answer, until each has acknowledged, and the end it then reaches. Same
//! invariants as [`super`]: deliveries are idempotent and retried until acknowledged;
//! with the intent written, an abort is durable before anyone is told.

use super::*;

impl TwoPhaseCommit {
    /// Sends phase 2 again to every branch whose call has had no answer for
    /// `stale_after_ms` (the answer was lost; deliveries are idempotent, so sending again
    /// is always safe). Branches waiting for a retry have their timer; phase 1 has the
    /// prepare timer (but for a commit its votes decide, whose prepares are sent again
    /// here too, once open past their own deadline and a grace more for the call's
    /// start: a prepare may run for its whole prepare timeout, and one sent again while
    /// it runs would only queue behind it at the participant, its attempt counted as a
    /// failure). Paused, such a call is taken
    /// as lost but not sent: `Resume` sends it, and meanwhile an operator may resolve the
    /// branch, which is refused while a call is in flight.
    pub(super) fn nudge(&mut self, stale_after_ms: u64, now: UnixMs) -> Vec<Action> {
        let Some(operation) = self.delivery_operation() else {
            return Vec::new();
        };
        let stale_after_ms = match operation {
            Operation::Prepare => stale_after_ms.max(
                self.prepare_timeout_ms
                    .saturating_add(2 * PREPARE_CALL_GRACE_MS),
            ),
            _ => stale_after_ms,
        };
        let paused = self.paused;
        let mut actions = Vec::new();
        for (branch, b) in self.branches.iter_mut().enumerate() {
            if !b.awaiting_ack || !b.history.open_for_at_least(stale_after_ms, now) {
                continue;
            }
            if paused {
                b.history.abandon_open(NO_ANSWER_PAUSED, now);
            } else {
                b.history.abandon_open(NO_ANSWER, now);
                actions.push(b.send_phase_two(branch, operation, now));
            }
        }
        actions
    }

    pub(super) fn on_delivered(
        &mut self,
        branch: usize,
        call: CallNumber,
        answer: Answer,
        now: UnixMs,
    ) -> Vec<Action> {
        let phase = self.phase;
        let finished = self.finish_call(branch, call, PHASE_TWO, answer.describe(), now);
        let Some(b) = self.branches.get_mut(branch) else {
            return Vec::new();
        };
        b.failing_since = None;
        if !b.awaiting_ack {
            if finished == Some(true) {
                return self.write_again().into_iter().collect();
            }
            return Vec::new();
        }
        match (phase, answer) {
            (Phase::OnePhase { .. }, Answer::Committed) => {
                b.state = BranchState::Committed;
                b.awaiting_ack = false;
                b.payload = Vec::new();
                self.phase = Phase::Concluding {
                    at_unix_ms: now,
                    read_only: false,
                };
                vec![Action::PersistDecision]
            }
            (Phase::OnePhase { .. }, Answer::Rejected { reason }) => {
                b.state = BranchState::VotedNo;
                b.awaiting_ack = false;
                b.payload = Vec::new();
                let reason = format!("branch {} rejected the one-phase commit: {reason}", b.id);
                self.reason = Some(reason.clone());
                self.finish(Phase::Aborted, reason, now)
            }
            (Phase::OnePhase { .. }, Answer::Aborted | Answer::NotPrepared) => {
                b.state = BranchState::Aborted;
                b.awaiting_ack = false;
                b.payload = Vec::new();
                let reason = format!(
                    "the deadline passed before branch {} committed; it is aborted",
                    b.id
                );
                self.reason = Some(reason.clone());
                self.finish(Phase::Aborted, reason, now)
            }
            (Phase::Committing, answer) => {
                b.awaiting_ack = false;
                if answer == Answer::Committed {
                    b.state = BranchState::Committed;
                } else {
                    // The participant broke the protocol (it lost or overrode its YES
                    // vote). Retrying cannot change that; record it for the operator.
                    b.state = BranchState::Aborted;
                    let said = format!("answered {answer:?} to a commit after voting YES");
                    b.last_error = Some(format!("HEURISTIC: participant {said}"));
                    b.heuristic = Some(said);
                    let mut actions = vec![Action::ReportHeuristic { branch }];
                    actions.extend(self.finish_when_all_acked(Phase::Committed, now));
                    return actions;
                }
                self.finish_when_all_acked(Phase::Committed, now)
            }
            (Phase::Aborting, answer) => {
                b.awaiting_ack = false;
                if answer == Answer::Committed {
                    b.state = BranchState::Committed;
                    let said = "answered committed to an abort".to_string();
                    b.last_error = Some(format!("HEURISTIC: participant {said}"));
                    b.heuristic = Some(said);
                    let mut actions = vec![Action::ReportHeuristic { branch }];
                    actions.extend(self.finish_when_all_acked(Phase::Aborted, now));
                    return actions;
                }
                b.state = BranchState::Aborted;
                self.finish_when_all_acked(Phase::Aborted, now)
            }
            _ => Vec::new(),
        }
    }

    /// A retry timer fired: the branch is sent again, unless the timer is stale (the
    /// branch was sent since) or retries are paused (`Resume` sends it).
    pub(super) fn on_retry_due(&mut self, branch: usize, attempt: u32, now: UnixMs) -> Vec<Action> {
        let Some(operation) = self.delivery_operation() else {
            return Vec::new();
        };
        let paused = self.paused;
        let Some(b) = self.branches.get_mut(branch) else {
            return Vec::new();
        };
        if !b.awaiting_ack || b.attempts != attempt || paused {
            return Vec::new();
        }
        vec![b.send_phase_two(branch, operation, now)]
    }

    /// What a delivery in this phase is, if the phase delivers anything.
    pub(super) fn delivery_operation(&self) -> Option<Operation> {
        match self.phase {
            Phase::OnePhase { probing: false } => Some(Operation::OnePhaseCommit),
            Phase::OnePhase { probing: true } | Phase::Aborting => Some(Operation::Abort),
            Phase::Committing => Some(Operation::Commit),
            Phase::Preparing if self.votes_decide => Some(Operation::Prepare),
            _ => None,
        }
    }

    /// Aborts: every branch that may hold a YES vote (or may yet cast one) is told. With
    /// the intent written, no one is told before the abort is durable: a restart would
    /// otherwise ask the votes again, and they might all be YES by then.
    pub(super) fn decide_abort(&mut self, reason: String, now: UnixMs) -> Vec<Action> {
        self.reason = Some(reason);
        for b in &mut self.branches {
            b.payload = Vec::new();
            b.awaiting_ack = may_hold_yes(b.state);
        }
        if self.intent != Intent::Unlogged {
            self.phase = Phase::DecidingAbort { at_unix_ms: now };
            return vec![Action::PersistDecision];
        }
        self.enter_abort(now)
    }

    /// Enters the abort decided (for `self.reason`): delivers it to every branch that may
    /// hold a YES, or ends at once if none does.
    pub(super) fn enter_abort(&mut self, now: UnixMs) -> Vec<Action> {
        let reason = self.reason.clone().unwrap_or_default();
        match self.abort_end() {
            Phase::Aborting => {
                self.enter(Phase::Aborting, reason, now);
                self.deliver_to_awaiting(Operation::Abort, now)
            }
            end => self.finish(end, reason, now),
        }
    }

    /// Where a decided abort goes: `Aborting` while a branch awaits it, else `Aborted`.
    pub(super) fn abort_end(&self) -> Phase {
        if self.branches.iter().any(|b| b.awaiting_ack) {
            Phase::Aborting
        } else {
            Phase::Aborted
        }
    }

    /// Sends phase 2 (`Commit` or `Abort`) to every branch still awaiting it.
    pub(super) fn deliver_to_awaiting(&mut self, operation: Operation, now: UnixMs) -> Vec<Action> {
        let mut actions = Vec::new();
        for (branch, b) in self.branches.iter_mut().enumerate() {
            if b.awaiting_ack {
                actions.push(b.send_phase_two(branch, operation, now));
            }
        }
        actions
    }

    pub(super) fn finish_when_all_acked(&mut self, end: Phase, now: UnixMs) -> Vec<Action> {
        if self.branches.iter().any(|b| b.awaiting_ack) {
            return Vec::new();
        }
        self.finish(end, String::new(), now)
    }

    /// Enters a final phase. Only a transaction with a record in the log (its commit
    /// decision, or its intent) gets an end record; for other aborts the protocol writes
    /// nothing (the runtime may keep their history). Committed one-phase and read-only
    /// commits end through `Concluding`.
    pub(super) fn finish(&mut self, end: Phase, reason: String, now: UnixMs) -> Vec<Action> {
        let decision_logged = self.phase == Phase::Committing || self.intent != Intent::Unlogged;
        self.stuck = false;
        self.enter(end, reason, now);
        if decision_logged {
            vec![Action::PersistEnd]
        } else {
            vec![Action::RecordHistory]
        }
    }
}
