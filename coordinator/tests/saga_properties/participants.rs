//! The simulated participants of the saga's property test: each obeys its barrier (a
//! repeat answered from its record, a null compensation remembered so that the step
//! never runs after it) and commits, rejects or fails as scripted.

use super::*;

impl World {
    /// The participant's barrier handles a call; returns the answer event.
    pub(super) fn participant(&mut self, call: &Call) -> SagaEvent {
        match *call {
            Call::Step(step, call) => {
                assert!(
                    !self.by_hand[step],
                    "step {step}, applied by hand, was sent again"
                );
                let answer = match self.barriers[step] {
                    Barrier::None => {
                        for &d in &self.after[step] {
                            assert!(
                                self.barriers[d] == Barrier::Committed || self.by_hand[d],
                                "step {step} ran before step {d} it runs after had committed"
                            );
                        }
                        match self.scripts[step] {
                            Script::Commit => {
                                self.barriers[step] = Barrier::Committed;
                                StepAnswer::Committed
                            }
                            Script::Reject => {
                                self.barriers[step] = Barrier::Rejected;
                                StepAnswer::Rejected {
                                    reason: "scripted".into(),
                                }
                            }
                        }
                    }
                    Barrier::Committed => StepAnswer::Committed,
                    Barrier::Rejected => StepAnswer::Rejected {
                        reason: "scripted".into(),
                    },
                    // Anti-hanging: compensated first, the forward action is refused.
                    Barrier::Compensated => StepAnswer::AlreadyCompensated,
                };
                SagaEvent::StepAnswered { step, call, answer }
            }
            Call::Compensate(step, call) => {
                assert!(
                    !self.undone_by_hand[step],
                    "step {step}, undone by hand, was compensated again"
                );
                if self.barriers[step] == Barrier::Committed {
                    for (j, after) in self.after.iter().enumerate() {
                        if after.contains(&step) {
                            assert!(
                                !self.applied(j),
                                "step {step} compensated while step {j} after it is applied"
                            );
                        }
                    }
                }
                if self.barriers[step] != Barrier::Rejected {
                    self.barriers[step] = Barrier::Compensated;
                }
                SagaEvent::Compensated { step, call }
            }
        }
    }

    pub(super) fn failure(call: &Call) -> SagaEvent {
        match *call {
            Call::Step(step, call) => SagaEvent::StepFailed {
                step,
                call,
                error: "lost".into(),
            },
            Call::Compensate(step, call) => SagaEvent::CompensationFailed {
                step,
                call,
                error: "lost".into(),
                // Some failures are for good: that flags the saga stuck and must change
                // nothing else.
                permanent: step % 2 == 1,
            },
        }
    }
}
