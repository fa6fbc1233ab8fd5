//! The operators of the two-phase commit's property test: what they state for a branch
//! whose participant refuses for good (the truth, or YES in error), and the runtime's
//! giving up an abort that only such branches are owed.

use super::*;

impl World {
    /// A branch whose participant refuses for good waits for an operator, who states
    /// what it knows to be true: while the votes decide after a restart, its vote (YES if
    /// the collected record said it committed or was read-only, else NO: with no record
    /// at all it never voted YES, so no commit can have been decided without it); once
    /// committing, that it committed. With `in_error`, an operator in error states YES
    /// for the branch it picks (mod the number waiting) while the votes decide, whatever
    /// is true. Returns whether something was stated.
    pub(super) fn state_refused_votes(&mut self, in_error: Option<usize>) -> bool {
        let Some(coordinator) = self.coordinator.as_mut() else {
            return false;
        };
        let state = coordinator.state();
        let waits = |b: usize| {
            let branch = coordinator.branch(b).unwrap();
            match state {
                TxnState::Preparing => {
                    coordinator.votes_decide() && branch.state == BranchState::Preparing
                }
                TxnState::Committing => branch.awaiting_ack,
                _ => false,
            }
        };
        let waiting: Vec<usize> = (0..self.refused.len())
            .filter(|&b| self.refused[b] && self.barriers[b] == Barrier::None && waits(b))
            .collect();
        if waiting.is_empty() {
            return false;
        }
        let branch = waiting[in_error.unwrap_or(0) % waiting.len()];
        let agreed = matches!(
            self.collected[branch],
            Some(Barrier::Committed | Barrier::ReadOnly)
        );
        let outcome = if state == TxnState::Committing || agreed || in_error.is_some() {
            Resolution::Commit
        } else {
            Resolution::Abort
        };
        let request = OperatorRequest {
            command: OperatorCommand::Resolve {
                branch_id: format!("b{branch}"),
                outcome,
            },
            by: "ops".into(),
            reason: "its participant holds no record".into(),
        };
        self.now += 1;
        // Refused while a decision is being written, or while a call for the branch is in
        // flight: the operator tries again later.
        let Ok(actions) = coordinator.handle_operator(&request, self.now) else {
            return false;
        };
        self.stated_yes[branch] |= outcome == Resolution::Commit;
        self.carry_out(actions);
        self.note_reported();
        true
    }

    /// An abort whose only undelivered branches refuse it for good (no record there) is
    /// retried until the runtime gives it up (its cap on undelivered aborts past their
    /// deadline): modelled as given up once nothing else is left. Returns whether it was.
    pub(super) fn give_up_refused_aborts(&mut self) -> bool {
        let Some(coordinator) = self.coordinator.as_mut() else {
            return false;
        };
        if coordinator.state() != TxnState::Aborting {
            return false;
        }
        let only_refused = coordinator
            .branches()
            .iter()
            .enumerate()
            .filter(|(_, b)| b.awaiting_ack)
            .all(|(i, _)| self.refused[i] && self.barriers[i] == Barrier::None);
        if !only_refused {
            return false;
        }
        self.now += 1;
        let actions = coordinator.give_up_undelivered_abort(self.now);
        self.carry_out(actions);
        self.note_reported();
        true
    }
}
