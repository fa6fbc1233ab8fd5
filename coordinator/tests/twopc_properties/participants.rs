//! The simulated participants of the two-phase commit's property test: each obeys its
//! barrier (a repeat answered from its record, an abort before the prepare remembered),
//! votes as scripted, and, past its retention with no record, refuses every call.

use super::*;

impl World {
    /// The participant's barrier handles a request; returns its answer (None: an error).
    pub(super) fn participant(&mut self, message: &InFlight) -> Option<Event> {
        if let Some(refusal) = self.refusal(message) {
            return Some(refusal);
        }
        match *message {
            InFlight::Prepare(b, call) => {
                let vote = match self.barriers[b] {
                    Barrier::None => match self.scripts[b] {
                        Script::Yes => {
                            self.barriers[b] = Barrier::Prepared;
                            Vote::Yes
                        }
                        Script::No => {
                            self.barriers[b] = Barrier::VotedNo;
                            Vote::no("scripted")
                        }
                        Script::ReadOnly => {
                            self.barriers[b] = Barrier::ReadOnly;
                            Vote::ReadOnly
                        }
                    },
                    Barrier::Prepared | Barrier::Committed => Vote::Yes,
                    Barrier::ReadOnly => Vote::ReadOnly,
                    Barrier::VotedNo | Barrier::Aborted => Vote::no("aborted"),
                };
                Some(Event::PrepareAnswered {
                    branch: b,
                    call,
                    vote,
                })
            }
            InFlight::Commit(b, call) => {
                self.told_commit[b] = true;
                let answer = match self.barriers[b] {
                    Barrier::Prepared | Barrier::Committed | Barrier::ReadOnly => {
                        if self.barriers[b] == Barrier::Prepared {
                            self.barriers[b] = Barrier::Committed;
                        }
                        Answer::Committed
                    }
                    Barrier::None => Answer::NotPrepared,
                    Barrier::VotedNo | Barrier::Aborted => Answer::Aborted,
                };
                Some(Event::Delivered {
                    branch: b,
                    call,
                    answer,
                })
            }
            InFlight::OnePhaseCommit(b, call) => {
                let answer = match self.barriers[b] {
                    Barrier::None => match self.scripts[b] {
                        Script::Yes | Script::ReadOnly => {
                            self.barriers[b] = Barrier::Committed;
                            Answer::Committed
                        }
                        Script::No => {
                            self.barriers[b] = Barrier::VotedNo;
                            Answer::Rejected {
                                reason: "scripted".into(),
                            }
                        }
                    },
                    Barrier::Committed | Barrier::Prepared | Barrier::ReadOnly => {
                        self.barriers[b] = Barrier::Committed;
                        Answer::Committed
                    }
                    Barrier::VotedNo => Answer::Rejected {
                        reason: "scripted".into(),
                    },
                    Barrier::Aborted => Answer::Aborted,
                };
                Some(Event::Delivered {
                    branch: b,
                    call,
                    answer,
                })
            }
            InFlight::Abort(b, call) => {
                let answer = match self.barriers[b] {
                    Barrier::Committed => Answer::Committed,
                    _ => {
                        self.told_abort[b] = true;
                        if matches!(self.barriers[b], Barrier::None | Barrier::Prepared) {
                            self.barriers[b] = Barrier::Aborted;
                        }
                        Answer::Aborted
                    }
                };
                Some(Event::Delivered {
                    branch: b,
                    call,
                    answer,
                })
            }
            InFlight::Persist {
                ref record,
                order,
                ref completion,
            } => {
                if order > self.durable_order {
                    self.durable = Some(record.as_ref().clone());
                    self.durable_order = order;
                }
                Some(completion.clone())
            }
        }
    }

    /// What a participant past its retention answers about a branch it has no record of:
    /// FAILED_PRECONDITION to every call.
    fn refusal(&self, message: &InFlight) -> Option<Event> {
        let (InFlight::Prepare(branch, call)
        | InFlight::Commit(branch, call)
        | InFlight::OnePhaseCommit(branch, call)
        | InFlight::Abort(branch, call)) = *message
        else {
            return None;
        };
        if !self.refused[branch] || self.barriers[branch] != Barrier::None {
            return None;
        }
        let error = "past the barrier retention".to_string();
        Some(match message {
            InFlight::Prepare(..) => Event::PrepareFailed {
                branch,
                call,
                error,
                permanent: true,
            },
            // As the runtime passes it: only a phase-2 commit's refusal is for good.
            _ => Event::DeliveryFailed {
                branch,
                call,
                error,
                permanent: matches!(message, InFlight::Commit(..)),
            },
        })
    }

    pub(super) fn failure(message: &InFlight) -> Event {
        match *message {
            InFlight::Prepare(branch, call) => Event::PrepareFailed {
                branch,
                call,
                error: "lost".into(),
                permanent: false,
            },
            InFlight::Commit(branch, call)
            | InFlight::OnePhaseCommit(branch, call)
            | InFlight::Abort(branch, call) => Event::DeliveryFailed {
                branch,
                call,
                error: "lost".into(),
                // Some failures are for good: that flags the transaction stuck and must
                // change nothing else.
                permanent: branch % 2 == 1,
            },
            // A log write does not get lost; it may only be slow.
            InFlight::Persist { .. } => unreachable!("a log write has no failure"),
        }
    }
}
