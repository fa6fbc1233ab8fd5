//! The operator of the saga's property test: states a step's outcome as a careful one
//! would, and does by hand what the statement says was done.

use super::*;

impl World {
    /// Whether step `i`'s work is in place: applied by its participant or by hand, and
    /// not undone (by its participant's compensation or by hand).
    pub(super) fn applied(&self, i: usize) -> bool {
        (self.barriers[i] == Barrier::Committed || self.by_hand[i]) && !self.undone_by_hand[i]
    }

    /// An operator states step `i`'s outcome, as a careful one would: only what is true
    /// (not "it did not happen" of a running step its participant applied), and only
    /// with no call for it in flight where the statement may be of work done by hand;
    /// then does by hand what the statement says was done (the work of a step stated
    /// committed that its participant does not hold; the undoing of a step stated undone
    /// while compensating). The runtime forces the statement to the log before the
    /// operator hears. Returns whether the coordinator took it.
    pub(super) fn resolve(&mut self, i: usize, outcome: Resolution) -> bool {
        let step = i % self.barriers.len();
        let in_flight = self
            .calls
            .iter()
            .any(|call| matches!(call, Call::Step(s, _) | Call::Compensate(s, _) if *s == step));
        let Some(saga) = self.saga.as_mut() else {
            return false;
        };
        let compensating = saga.state() == TxnState::Compensating;
        let untrue = outcome == Resolution::Abort
            && !compensating
            && self.barriers[step] == Barrier::Committed;
        // Work stated done (or undone) by hand could be done again by a call in flight:
        // the operator waits for it to end (the coordinator refuses while it knows of
        // one). Giving up a running step with its call in flight is safe: the barrier
        // orders the call and the step's compensation.
        let by_hand = compensating || outcome == Resolution::Commit;
        if untrue || (in_flight && by_hand) {
            return false;
        }
        self.now += 1;
        let request = OperatorRequest {
            command: OperatorCommand::Resolve {
                branch_id: format!("s{step}"),
                outcome,
            },
            by: "ops".into(),
            reason: "by hand".into(),
        };
        let Ok(actions) = saga.handle_operator(&request, self.now) else {
            return false;
        };
        match outcome {
            Resolution::Commit => self.by_hand[step] |= self.barriers[step] != Barrier::Committed,
            Resolution::Abort if compensating => {
                for (j, after) in self.after.iter().enumerate() {
                    assert!(
                        !after.contains(&step) || !self.applied(j),
                        "step {step} undone by hand while step {j} after it is applied"
                    );
                }
                self.undone_by_hand[step] = true;
            }
            Resolution::Abort => {}
        }
        self.carry_out(actions);
        let record = self.saga.as_ref().unwrap().log_record();
        self.log_queue.push((record, false));
        for _ in 0..1_000 {
            if self.log_queue.is_empty() {
                break;
            }
            self.flush();
        }
        true
    }
}
