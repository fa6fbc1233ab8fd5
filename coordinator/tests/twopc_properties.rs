//! Property tests of the two-phase commit state machine against a simulated world:
//! participants that vote as scripted and obey the barrier, messages delivered in any
//! order, duplicated or lost, timers firing at any moment, and coordinator crashes that
//! lose everything but the durable log. Also participants past their barrier retention:
//! one that has no record of a branch refuses every call about it for good, including
//! one that collected a final record while the coordinator still needed it (a retention
//! shorter than the horizon, against the rule); an operator then states what is true,
//! or, at moments the schedule picks, YES whatever is true (an operator in error, who
//! later states the truth: the engine must not have reported a commit it cannot keep).
//! (With such a Prepare answered NO instead, as until 2026-12-06, this test finds a
//! commit reported and then aborted after a restart.)
//!
//! Invariants, checked after every step:
//! - no participant is told COMMIT unless every branch voted YES or READ_ONLY, or had
//!   YES stated for it by an operator;
//! - no participant is told both COMMIT and ABORT (agreement);
//! - once the commit decision is durable, the coordinator (and every restart of it)
//!   stays on commit, and reports commit only after that (irreversibility);
//! - an outcome once reported (COMMITTED or ABORTED) is never followed by the other,
//!   across restarts;
//! - all of it with the classic protocol and with parallel commit (the intent logged
//!   alongside the prepares; a restart asks the votes again).
//! - when the world settles (the sweeper recovering answers that vanished), every branch
//!   that voted YES knows the outcome, and the last record the coordinator issued holds
//!   what it does (late answers included).
//!
//! The simulated participants are in `twopc_properties/participants.rs`, the operators
//! in `twopc_properties/operators.rs`, what must hold once settled in
//! `twopc_properties/settled.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use proptest::prelude::*;
use treaty_coordinator::engine::twopc::{
    Action, Answer, BranchSpec, Command, Event, NewTransaction, OperatorCommand, OperatorRequest,
    TwoPhaseCommit, Vote,
};
use treaty_coordinator::model::{BranchState, CallNumber, Resolution, TxnId, TxnRecord, TxnState};

#[path = "twopc_properties/operators.rs"]
mod operators;
#[path = "twopc_properties/participants.rs"]
mod participants;
#[path = "twopc_properties/settled.rs"]
mod settled;

use settled::settled_as_it_should;

const T0: u64 = 1_700_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Yes,
    No,
    ReadOnly,
}

/// A message on its way between the coordinator and a participant (or the log).
#[derive(Debug, Clone, PartialEq, Eq)]
enum InFlight {
    /// A call to a branch, and the call's number.
    Prepare(usize, CallNumber),
    Commit(usize, CallNumber),
    OnePhaseCommit(usize, CallNumber),
    Abort(usize, CallNumber),
    /// A forced log write: the record as it was when the write was issued, its place in
    /// the log's order, and what its completion feeds back.
    Persist {
        record: Box<TxnRecord>,
        order: u64,
        completion: Event,
    },
}

impl InFlight {
    /// The branch a call is to, and its number (`None` for a log write).
    fn call(&self) -> Option<(usize, CallNumber)> {
        match *self {
            InFlight::Prepare(branch, call)
            | InFlight::Commit(branch, call)
            | InFlight::OnePhaseCommit(branch, call)
            | InFlight::Abort(branch, call) => Some((branch, call)),
            InFlight::Persist { .. } => None,
        }
    }
}

/// What a participant's barrier holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Barrier {
    None,
    Prepared,
    VotedNo,
    ReadOnly,
    Committed,
    Aborted,
}

/// One scheduling choice of the environment.
#[derive(Debug, Clone)]
enum Step {
    /// Deliver the message at this index (mod the number in flight).
    Deliver(usize),
    /// Deliver it, but lose the answer (the sender sees a failure).
    LoseAnswer(usize),
    /// Deliver it twice.
    Duplicate(usize),
    /// Deliver it, and lose the answer without a trace (no failure either): only the
    /// sweeper's nudge can recover.
    Vanish(usize),
    /// Deliver it; a Prepare to a participant with no record of the branch is refused
    /// for good (FAILED_PRECONDITION: past its barrier retention), and so is every call
    /// about that branch after it. Anything else is delivered as usual.
    Refuse(usize),
    /// A participant whose retention is shorter than the coordinator's horizon (against
    /// the rule) collects the final record of this branch (mod the number of branches):
    /// from then on it refuses every call about it. A prepared record is never collected.
    Collect(usize),
    /// An operator states YES for a branch that waits for one (the given one, mod the
    /// number waiting; see `state_refused_votes`), whatever its participant's record
    /// says.
    StateYes(usize),
    /// The sweeper's nudge, with every open call taken as stale.
    Nudge,
    PrepareTimer,
    Deadline,
    /// Fire a pending retry.
    Retry(usize),
    /// The coordinator process dies; only the durable log survives.
    Crash,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => any::<usize>().prop_map(Step::Deliver),
        1 => any::<usize>().prop_map(Step::LoseAnswer),
        1 => any::<usize>().prop_map(Step::Duplicate),
        1 => any::<usize>().prop_map(Step::Vanish),
        1 => any::<usize>().prop_map(Step::Refuse),
        1 => any::<usize>().prop_map(Step::Collect),
        1 => any::<usize>().prop_map(Step::StateYes),
        1 => Just(Step::Nudge),
        1 => Just(Step::PrepareTimer),
        1 => Just(Step::Deadline),
        2 => any::<usize>().prop_map(Step::Retry),
        1 => Just(Step::Crash),
    ]
}

fn script() -> impl Strategy<Value = Script> {
    prop_oneof![6 => Just(Script::Yes), 1 => Just(Script::No), 1 => Just(Script::ReadOnly)]
}

struct World {
    scripts: Vec<Script>,
    /// `None` once the coordinator crashed without a durable decision (presumed abort:
    /// it knows nothing of the transaction any more).
    coordinator: Option<TwoPhaseCommit>,
    in_flight: Vec<InFlight>,
    /// Calls whose answer vanished: the coordinator still waits for them.
    vanished: Vec<(usize, CallNumber)>,
    retries: Vec<(usize, u32)>,
    durable: Option<TxnRecord>,
    /// The order of the write `durable` came from: the log applies writes in the order
    /// they were issued, so a write that completes later but was issued earlier is
    /// already in the log, under the later one.
    durable_order: u64,
    writes_issued: u64,
    /// The record of the latest write the coordinator running now issued, lazy ones
    /// included: what its log holds once they are applied (a crash may lose them).
    last_issued: Option<TxnRecord>,
    /// What the coordinator reported, across restarts: COMMITTED, ABORTED.
    reported_commit: bool,
    reported_abort: bool,
    barriers: Vec<Barrier>,
    /// Branches whose participant refuses every call (past its retention, no record).
    refused: Vec<bool>,
    /// What a collected record said.
    collected: Vec<Option<Barrier>>,
    /// Branches an operator stated YES for, whatever was true, as the coordinator (or,
    /// after a crash, its log) holds it: a statement lost in a crash relaxes nothing.
    stated_yes: Vec<bool>,
    told_commit: Vec<bool>,
    told_abort: Vec<bool>,
    now: u64,
}

impl World {
    fn new(scripts: Vec<Script>, parallel_commit: bool) -> Self {
        let (mut txn, _) = TwoPhaseCommit::begin(NewTransaction {
            id: TxnId::generate(T0),
            created_unix_ms: T0,
            deadline_unix_ms: T0 + 60_000,
            prepare_timeout_ms: 1_000,
            max_branches: 8,
            owner: None,
            parallel_commit,
        });
        for i in 0..scripts.len() {
            txn.handle_command(
                Command::Enlist(BranchSpec {
                    id: format!("b{i}"),
                    endpoint: "http://127.0.0.1:1".into(),
                    payload: Vec::new(),
                }),
                T0,
            )
            .unwrap();
        }
        let n = scripts.len();
        let mut world = Self {
            scripts,
            coordinator: Some(txn),
            in_flight: Vec::new(),
            vanished: Vec::new(),
            retries: Vec::new(),
            durable: None,
            durable_order: 0,
            writes_issued: 0,
            last_issued: None,
            reported_commit: false,
            reported_abort: false,
            barriers: vec![Barrier::None; n],
            refused: vec![false; n],
            collected: vec![None; n],
            stated_yes: vec![false; n],
            told_commit: vec![false; n],
            told_abort: vec![false; n],
            now: T0,
        };
        let actions = world
            .coordinator
            .as_mut()
            .unwrap()
            .handle_command(Command::Commit, T0)
            .unwrap();
        world.carry_out(actions);
        world
    }

    fn carry_out(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendPrepare { branch, call } => {
                    self.in_flight.push(InFlight::Prepare(branch, call))
                }
                Action::SendCommit { branch, call } => {
                    self.in_flight.push(InFlight::Commit(branch, call))
                }
                Action::SendOnePhaseCommit { branch, call } => {
                    self.in_flight.push(InFlight::OnePhaseCommit(branch, call))
                }
                Action::SendAbort { branch, call } => {
                    self.in_flight.push(InFlight::Abort(branch, call))
                }
                Action::ScheduleRetry { branch, attempt } => self.retries.push((branch, attempt)),
                Action::PersistDecision => {
                    let record = self.coordinator.as_ref().unwrap().log_record();
                    // A commit decision, a one-phase / read-only commit's final record,
                    // or an abort decided after the intent was written.
                    assert!(
                        record.state.is_commit() || self.writes_issued > 0,
                        "an abort is forced only after an intent"
                    );
                    self.issue(record, Event::DecisionPersisted);
                }
                Action::PersistIntent => {
                    let record = self.coordinator.as_ref().unwrap().log_record();
                    assert_eq!(record.state, TxnState::Preparing);
                    self.issue(record, Event::IntentPersisted);
                }
                // Lazy writes may be lost in a crash: taken as always lost, recovery
                // must not need them (history records on).
                Action::NoteDecision
                | Action::PersistEnd
                | Action::PersistProgress
                | Action::RecordHistory => {
                    self.last_issued = Some(self.coordinator.as_ref().unwrap().log_record());
                }
                Action::ReportHeuristic { .. }
                | Action::StartDeadlineTimer { .. }
                | Action::StartPrepareTimer { .. } => {}
            }
        }
    }

    fn issue(&mut self, record: TxnRecord, completion: Event) {
        self.writes_issued += 1;
        self.last_issued = Some(record.clone());
        self.in_flight.push(InFlight::Persist {
            record: Box::new(record),
            order: self.writes_issued,
            completion,
        });
    }

    fn feed(&mut self, event: Event) {
        self.now += 1;
        if let Some(coordinator) = self.coordinator.as_mut() {
            let actions = coordinator.handle_event(event, self.now);
            self.carry_out(actions);
        }
        self.note_reported();
    }

    /// Notes what the coordinator reports now (the API reports its state).
    fn note_reported(&mut self) {
        if let Some(coordinator) = &self.coordinator {
            let state = coordinator.state();
            self.reported_commit |= state.is_commit();
            self.reported_abort |= matches!(state, TxnState::Aborting | TxnState::Aborted);
        }
    }

    fn take(&mut self, index: usize) -> Option<InFlight> {
        if self.in_flight.is_empty() {
            return None;
        }
        let i = index % self.in_flight.len();
        Some(self.in_flight.remove(i))
    }

    fn run(&mut self, step: &Step) {
        match step {
            Step::Deliver(i) => {
                if let Some(message) = self.take(*i) {
                    if let Some(event) = self.participant(&message) {
                        self.feed(event);
                    }
                }
            }
            Step::LoseAnswer(i) => {
                if let Some(message) = self.take(*i) {
                    // The request reached the participant; its answer did not come back.
                    // (A log write is not lost: it completes.)
                    let answer = self.participant(&message);
                    let event = match message {
                        InFlight::Persist { .. } => answer.unwrap(),
                        _ => Self::failure(&message),
                    };
                    self.feed(event);
                }
            }
            Step::Duplicate(i) => {
                if let Some(message) = self.take(*i) {
                    for _ in 0..2 {
                        if let Some(event) = self.participant(&message) {
                            self.feed(event);
                        }
                    }
                }
            }
            Step::Vanish(i) => {
                if let Some(message) = self.take(*i) {
                    self.vanished.extend(message.call());
                    let answer = self.participant(&message);
                    // A log write is not lost; it completes.
                    if let (InFlight::Persist { .. }, Some(event)) = (&message, answer) {
                        self.feed(event);
                    }
                }
            }
            Step::Refuse(i) => {
                if let Some(message) = self.take(*i) {
                    if let InFlight::Prepare(branch, _) = message {
                        if self.barriers[branch] == Barrier::None {
                            self.refused[branch] = true;
                        }
                    }
                    if let Some(event) = self.participant(&message) {
                        self.feed(event);
                    }
                }
            }
            // (Not of a one-phase commit's only branch: its outcome is that participant's,
            // and an operator settles it by the deadline's probe, not modelled here.)
            Step::Collect(i) if self.barriers.len() > 1 => {
                let b = i % self.barriers.len();
                if !matches!(self.barriers[b], Barrier::None | Barrier::Prepared) {
                    self.collected[b] = Some(self.barriers[b]);
                    self.barriers[b] = Barrier::None;
                    self.refused[b] = true;
                }
            }
            Step::Collect(_) => {}
            Step::StateYes(pick) => {
                self.state_refused_votes(Some(*pick));
            }
            Step::Nudge => self.feed(Event::Nudge { stale_after_ms: 0 }),
            Step::PrepareTimer => self.feed(Event::PrepareTimerFired),
            Step::Deadline => self.feed(Event::DeadlineReached),
            Step::Retry(i) => {
                if !self.retries.is_empty() {
                    let (branch, attempt) = self.retries.remove(i % self.retries.len());
                    self.feed(Event::RetryDue { branch, attempt });
                }
            }
            Step::Crash => {
                self.last_issued = None;
                self.in_flight.clear();
                self.vanished.clear();
                self.retries.clear();
                self.now += 1;
                // Writes issued but not complete may or may not be in the log: taken as
                // lost (the ones that completed are in `durable`).
                self.coordinator = match self.durable.clone() {
                    Some(record)
                        if matches!(
                            record.state,
                            TxnState::Committing | TxnState::Preparing | TxnState::Aborting
                        ) =>
                    {
                        let (txn, actions) = TwoPhaseCommit::recover(record, 8, self.now);
                        self.coordinator = Some(txn);
                        self.carry_out(actions);
                        self.coordinator.take()
                    }
                    // Presumed abort: no record, no transaction.
                    _ => None,
                };
                let durable = self.durable.as_ref();
                for (b, stated) in self.stated_yes.iter_mut().enumerate() {
                    *stated = durable
                        .and_then(|record| record.branches.get(b)?.resolution.as_ref())
                        .is_some_and(|r| r.outcome == Resolution::Commit);
                }
                self.note_reported();
            }
        }
        self.check();
    }

    fn check(&self) {
        assert!(
            !(self.reported_commit && self.reported_abort),
            "both COMMITTED and ABORTED were reported"
        );
        // A call the coordinator shows in flight was made, under that number, and has
        // not been answered (or its answer vanished).
        if let Some(coordinator) = &self.coordinator {
            for (b, branch) in coordinator.branches().iter().enumerate() {
                let history = branch.history.attempts();
                for attempt in history.iter().filter(|a| a.finished_unix_ms.is_none()) {
                    let call = (b, attempt.call);
                    assert!(
                        self.in_flight.iter().any(|m| m.call() == Some(call))
                            || self.vanished.contains(&call),
                        "branch {b} shows call {} in flight, which is not: {history:?}",
                        attempt.call
                    );
                }
            }
        }
        let every_vote_yes =
            (0..self.scripts.len()).all(|b| self.scripts[b] != Script::No || self.stated_yes[b]);
        for b in 0..self.scripts.len() {
            assert!(
                !(self.told_commit[b] && self.told_abort[b]),
                "branch {b} was told both commit and abort"
            );
            if self.told_commit[b] || self.barriers[b] == Barrier::Committed {
                assert!(every_vote_yes, "a commit without every vote YES");
            }
        }
        let held = |barrier: Barrier| {
            (0..self.barriers.len())
                .filter(move |&b| self.barriers[b] == barrier || self.collected[b] == Some(barrier))
        };
        let committed_anywhere = held(Barrier::Committed).next().is_some();
        let aborted_anywhere = held(Barrier::Aborted).any(|b| self.scripts[b] == Script::Yes);
        assert!(
            !(committed_anywhere && aborted_anywhere),
            "disagreement: {:?}",
            self.barriers
        );
        if let (Some(durable), Some(coordinator)) = (&self.durable, &self.coordinator) {
            if durable.state == TxnState::Committing {
                assert!(
                    coordinator.state().is_commit() || coordinator.state() == TxnState::Preparing,
                    "a durable commit decision turned into {:?}",
                    coordinator.state()
                );
            }
        }
        // Every commit, one-phase and all-read-only included, is reported only once
        // durable, so that no restart can contradict it.
        if let Some(coordinator) = &self.coordinator {
            if coordinator.state().is_commit() {
                assert!(
                    self.durable.is_some(),
                    "commit reported before it was durable"
                );
            }
        }
    }

    /// Lets everything still pending happen, without losses.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            // A refusing participant's vote only an operator can state, and aborts
            // nobody will take are retried until the runtime gives them up.
            if self.state_refused_votes(None) || self.give_up_refused_aborts() {
                self.check();
                continue;
            }
            // Retries of calls a participant refuses for good change nothing: they are
            // left for last, so that the others (and the sweeper) get their turn.
            let retry = self
                .retries
                .iter()
                .position(|(branch, _)| !self.refused[*branch]);
            if let Some(message) = self.take(0) {
                if let Some(event) = self.participant(&message) {
                    self.feed(event);
                }
            } else if let Some(retry) = retry {
                let (branch, attempt) = self.retries.remove(retry);
                self.feed(Event::RetryDue { branch, attempt });
            } else if self
                .coordinator
                .as_ref()
                .is_some_and(|c| !c.state().is_final())
            {
                // Nothing pending, yet not finished: the timers fire, and answers that
                // vanished are recovered by the sweeper sending their calls again.
                self.feed(Event::PrepareTimerFired);
                self.feed(Event::DeadlineReached);
                self.feed(Event::Nudge { stale_after_ms: 0 });
            } else {
                break;
            }
            self.check();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_schedule_keeps_the_decision_and_the_agreement(
        scripts in prop::collection::vec(script(), 1..5),
        steps in prop::collection::vec(step(), 0..60),
        parallel_commit in any::<bool>(),
    ) {
        let mut world = World::new(scripts, parallel_commit);
        for step in &steps {
            world.run(step);
        }
        world.settle();
        settled_as_it_should(&world)?;
    }
}

/// Schedules that reach an operator's statement: refusals, statements and crashes
/// weighted up (with the mix above, a statement in error followed by the crash that
/// would undo it is too rare to be found).
fn operator_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<usize>().prop_map(Step::Deliver),
        2 => any::<usize>().prop_map(Step::Refuse),
        2 => any::<usize>().prop_map(Step::StateYes),
        2 => Just(Step::Crash),
        1 => any::<usize>().prop_map(Step::Retry),
        1 => Just(Step::Nudge),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// A YES an operator states in error (its participant holds no record: it never
    /// voted) may commit the transaction; once that commit is reported, no restart and
    /// no later statement of the truth may turn it into an abort. (Before 1c47143 a
    /// stated YES that completed the votes decided the commit lazily, and this finds it.)
    #[test]
    fn a_commit_an_operator_helped_decide_survives_restarts(
        scripts in prop::collection::vec(script(), 2..4),
        steps in prop::collection::vec(operator_step(), 0..40),
    ) {
        let mut world = World::new(scripts, true);
        for step in &steps {
            world.run(step);
        }
        world.settle();
        settled_as_it_should(&world)?;
    }
}
