//! Phase 1 of a two-phase commit: the prepares sent (with the intent, for parallel
//! commit), the votes taken, and the commit they decide. Same invariants as [`super`]:
//! a commit is decided only once every branch voted YES or READ_ONLY, and reported only
//! once its decision, or its intent with every vote, is durable; a NO decides an abort.

use super::*;

impl TwoPhaseCommit {
    pub(super) fn start_commit(&mut self, now: UnixMs) -> Result<Vec<Action>, Refusal> {
        match self.branches.len() {
            0 => Err(Refusal::NoBranches),
            1 => {
                let branch = &mut self.branches[0];
                branch.state = BranchState::Preparing;
                branch.awaiting_ack = true;
                branch.attempts = 1;
                let call = branch.history.start(Operation::OnePhaseCommit, now);
                self.enter(
                    Phase::OnePhase { probing: false },
                    "one-phase commit".into(),
                    now,
                );
                Ok(vec![Action::SendOnePhaseCommit { branch: 0, call }])
            }
            n => {
                self.enter(Phase::Preparing, String::new(), now);
                let mut actions = vec![Action::StartPrepareTimer {
                    after_ms: self.prepare_timeout_ms,
                }];
                for (index, branch) in self.branches.iter_mut().enumerate() {
                    branch.state = BranchState::Preparing;
                    let call = branch.history.start(Operation::Prepare, now);
                    actions.push(Action::SendPrepare {
                        branch: index,
                        call,
                    });
                }
                debug_assert_eq!(actions.len(), n + 1);
                let payload_bytes: usize = self.branches.iter().map(|b| b.payload.len()).sum();
                if self.parallel_commit && payload_bytes <= MAX_INTENT_PAYLOAD_BYTES {
                    self.intent = Intent::Writing;
                    actions.push(Action::PersistIntent);
                }
                Ok(actions)
            }
        }
    }

    /// A participant's vote, the answer to prepare call `call`.
    pub(super) fn on_vote_answered(
        &mut self,
        branch: usize,
        call: CallNumber,
        vote: Vote,
        now: UnixMs,
    ) -> Vec<Action> {
        let result = match &vote {
            Vote::Yes => "voted YES".to_string(),
            Vote::ReadOnly => "voted READ_ONLY".to_string(),
            Vote::No { reason } => format!("voted NO: {reason}"),
        };
        if self.finish_call(branch, call, &[Operation::Prepare], result, now) == Some(true) {
            return self.write_again().into_iter().collect();
        }
        self.on_vote(branch, vote, now)
    }

    /// A vote, answered or stated by an operator (whose calls were closed).
    pub(super) fn on_vote(&mut self, branch: usize, vote: Vote, now: UnixMs) -> Vec<Action> {
        if self.phase != Phase::Preparing || !self.branch_is(branch, BranchState::Preparing) {
            return Vec::new();
        }
        // Asked again after a restart, it needs asking no more; phase 2 counts its own
        // attempts (the prepares asked again are in the history).
        let b = &mut self.branches[branch];
        b.awaiting_ack = false;
        b.failing_since = None;
        if self.votes_decide {
            b.attempts = 0;
        }
        match vote {
            Vote::Yes => self.branches[branch].state = BranchState::Prepared,
            Vote::ReadOnly => self.branches[branch].state = BranchState::ReadOnly,
            Vote::No { reason } => {
                self.branches[branch].state = BranchState::VotedNo;
                let id = &self.branches[branch].id;
                let reason = if reason.is_empty() {
                    format!("branch {id} voted NO")
                } else {
                    format!("branch {id} voted NO: {reason}")
                };
                return self.decide_abort(reason, now);
            }
        }
        let all_voted = self
            .branches
            .iter()
            .all(|b| matches!(b.state, BranchState::Prepared | BranchState::ReadOnly));
        if !all_voted {
            return Vec::new();
        }
        for b in &mut self.branches {
            b.payload = Vec::new();
        }
        if self
            .branches
            .iter()
            .all(|b| b.state == BranchState::ReadOnly)
        {
            // Nothing to commit anywhere: no phase 2, but the outcome is forced before
            // it is reported (it is final at once).
            self.phase = Phase::Concluding {
                at_unix_ms: now,
                read_only: true,
            };
            return vec![Action::PersistDecision];
        }
        for b in &mut self.branches {
            b.awaiting_ack = b.state == BranchState::Prepared;
        }
        match self.intent {
            Intent::Unlogged => {
                self.phase = Phase::Deciding;
                vec![Action::PersistDecision]
            }
            // Decided once the intent is durable (`IntentPersisted`).
            Intent::Writing => {
                self.phase = Phase::Deciding;
                Vec::new()
            }
            // A YES an operator stated (after a restart) is durable only in this log, and
            // may be in memory alone: the commit it helps decide is forced before phase 2,
            // as a classic decision is.
            Intent::Durable if self.branches.iter().any(|b| b.resolution.is_some()) => {
                self.phase = Phase::Deciding;
                vec![Action::PersistDecision]
            }
            Intent::Durable => self.commit_implied(now),
        }
    }

    /// Every vote is YES / READ_ONLY and the intent is durable: the commit is decided.
    /// Its record is written lazily (a restart would ask the votes again and find the
    /// same), and phase 2 starts.
    pub(super) fn commit_implied(&mut self, now: UnixMs) -> Vec<Action> {
        self.enter(Phase::Committing, String::new(), now);
        let mut actions = vec![Action::NoteDecision];
        actions.extend(self.deliver_to_awaiting(Operation::Commit, now));
        actions
    }

    /// A prepare asked again after a restart failed: it is asked again after a backoff,
    /// without end (the votes decide), and the transaction is flagged stuck after
    /// [`STUCK_AFTER_DELIVERIES`] attempts, or at once when asking again cannot mend it
    /// (`permanent`: an operator must state the vote).
    pub(super) fn ask_again_later(
        &mut self,
        branch: usize,
        error: String,
        permanent: bool,
        now: UnixMs,
    ) -> Vec<Action> {
        let b = &mut self.branches[branch];
        b.failing_since.get_or_insert(now);
        b.last_error = Some(error.clone());
        let attempt = b.attempts;
        let id = b.id.clone();
        if (attempt >= STUCK_AFTER_DELIVERIES || permanent) && !self.stuck {
            self.stuck = true;
            let what = format!("asking branch {id} to prepare again");
            self.note(stuck_note(&what, attempt, &error, permanent), now);
        }
        vec![Action::ScheduleRetry { branch, attempt }]
    }
}
