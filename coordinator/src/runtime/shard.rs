//! One shard: a task that owns a set of transactions and is the only one to touch them.
//!
//! The loop takes, in turn, results of its own work (participant answers, log writes),
//! expired timers, and messages from the API; each goes through the engine, and the
//! actions that come out are carried out here: calls and log writes are spawned and
//! report back as events, timers go into one `DelayQueue`.
//!
//! Log writes are issued in the order the engine asks for them (the log applies them in
//! call order), and a forced write's `DecisionPersisted` event is only sent once the
//! write returned Ok. A failed write goes to the fatal channel and produces no event.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::Instrument;
use treaty_proto::v1::CommitMode;
use treaty_sdk::failpoint::crash_point;

use super::{BeginParams, RuntimeConfig, RuntimeError, now_unix_ms};
use crate::engine::twopc::{Action, BranchSpec, Command, Event, NewTransaction, TwoPhaseCommit};
use crate::log::{DecisionLog, Durability};
use crate::model::{TxnId, TxnRecord, TxnState, UnixMs};
use crate::participants::{Call, Participants, retry_delay};

type Reply<T> = oneshot::Sender<T>;

/// How much longer a prepare call may take than the transaction's prepare timeout.
const PREPARE_CALL_GRACE_MS: u64 = 1_000;

/// Messages from the API to a shard.
#[derive(Debug)]
pub(super) enum ShardMsg {
    Begin {
        id: TxnId,
        params: BeginParams,
        reply: Reply<Result<(), RuntimeError>>,
    },
    Enlist {
        id: TxnId,
        branch: BranchSpec,
        reply: Reply<Result<(), RuntimeError>>,
    },
    Commit {
        id: TxnId,
        reply: Reply<Result<watch::Receiver<Arc<TxnRecord>>, RuntimeError>>,
    },
    Abort {
        id: TxnId,
        reason: String,
        reply: Reply<Result<(), RuntimeError>>,
    },
    Get {
        id: TxnId,
        reply: Reply<Option<TxnRecord>>,
    },
    Watch {
        id: TxnId,
        reply: Reply<Option<watch::Receiver<Arc<TxnRecord>>>>,
    },
    State {
        id: TxnId,
        reply: Reply<Option<TxnState>>,
    },
    /// The `limit` smallest ids after `after` in `states`, and which of `known` (ids
    /// found in the log) this shard holds in memory.
    List {
        states: Vec<TxnState>,
        after: Option<TxnId>,
        limit: usize,
        known: Vec<TxnId>,
        reply: Reply<Listed>,
    },
    Shutdown {
        grace: Duration,
    },
}

/// A shard's answer to `List`.
#[derive(Debug)]
pub(super) struct Listed {
    pub matching: Vec<TxnRecord>,
    pub present: Vec<TxnId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    Deadline,
    Prepare,
    Retry { branch: usize },
}

#[derive(Debug)]
struct Entry {
    txn: TwoPhaseCommit,
    /// Present once someone watches or waits for the outcome.
    updates: Option<watch::Sender<Arc<TxnRecord>>>,
    deadline_timer: Option<delay_queue::Key>,
    prepare_timer: Option<delay_queue::Key>,
}

impl Entry {
    fn new(txn: TwoPhaseCommit) -> Self {
        Self {
            txn,
            updates: None,
            deadline_timer: None,
            prepare_timer: None,
        }
    }

    fn subscribe(&mut self) -> watch::Receiver<Arc<TxnRecord>> {
        let txn = &self.txn;
        self.updates
            .get_or_insert_with(|| watch::channel(Arc::new(txn.record())).0)
            .subscribe()
    }
}

/// What a spawned participant call is for.
#[derive(Debug, Clone, Copy)]
enum CallKind {
    Prepare,
    OnePhaseCommit,
    Commit,
    Abort,
}

#[derive(Debug)]
pub(super) struct Shard {
    txns: HashMap<TxnId, Entry>,
    /// Final transactions in the order they ended, for eviction.
    retained: VecDeque<(UnixMs, TxnId)>,
    timers: DelayQueue<(TxnId, Timer)>,
    events: mpsc::UnboundedSender<(TxnId, Event)>,
    events_in: mpsc::UnboundedReceiver<(TxnId, Event)>,
    commands: mpsc::Receiver<ShardMsg>,
    log: Arc<dyn DecisionLog>,
    participants: Participants,
    config: RuntimeConfig,
    active: Arc<AtomicUsize>,
    fatal: mpsc::UnboundedSender<String>,
}

impl Shard {
    pub(super) fn new(
        log: Arc<dyn DecisionLog>,
        participants: Participants,
        config: RuntimeConfig,
        active: Arc<AtomicUsize>,
        fatal: mpsc::UnboundedSender<String>,
        commands: mpsc::Receiver<ShardMsg>,
    ) -> Self {
        let (events, events_in) = mpsc::unbounded_channel();
        Self {
            txns: HashMap::new(),
            retained: VecDeque::new(),
            timers: DelayQueue::new(),
            events,
            events_in,
            commands,
            log,
            participants,
            config,
            active,
            fatal,
        }
    }

    pub(super) async fn run(mut self, recovered: Vec<TxnRecord>) {
        let now = now_unix_ms();
        for record in recovered {
            let id = record.id;
            tracing::info!(txn_id = %id, "resuming phase 2 of a logged commit");
            let (txn, actions) = TwoPhaseCommit::recover(record, self.config.max_branches, now);
            self.txns.insert(id, Entry::new(txn));
            self.execute(id, actions);
        }
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping_at: Option<Instant> = None;
        loop {
            if stopping_at.is_some() && self.all_final() {
                break;
            }
            tokio::select! {
                Some((id, event)) = self.events_in.recv() => self.on_event(id, event),
                Some(expired) = self.timers.next() => {
                    let (id, timer) = expired.into_inner();
                    self.on_timer(id, timer);
                }
                message = self.commands.recv(), if stopping_at.is_none() => match message {
                    Some(ShardMsg::Shutdown { grace }) => {
                        stopping_at = Some(Instant::now() + grace);
                        self.abort_undecided();
                    }
                    Some(message) => self.on_message(message),
                    // Every handle is gone: nobody can ask for anything any more.
                    None => stopping_at = Some(Instant::now()),
                },
                _ = sleep_until_opt(stopping_at) => {
                    let unfinished = self.txns.values().filter(|e| !e.txn.state().is_final()).count();
                    tracing::warn!(unfinished, "shutdown grace period over; recovery will finish the rest");
                    break;
                }
                _ = housekeeping.tick() => self.evict(now_unix_ms()),
            }
        }
    }

    fn all_final(&self) -> bool {
        self.txns.values().all(|e| e.txn.state().is_final())
    }

    fn on_message(&mut self, message: ShardMsg) {
        let now = now_unix_ms();
        match message {
            ShardMsg::Begin { id, params, reply } => {
                let _ = reply.send(self.begin(id, params, now));
            }
            ShardMsg::Enlist { id, branch, reply } => {
                let result = self.command(id, Command::Enlist(branch), now);
                let _ = reply.send(result);
            }
            ShardMsg::Commit { id, reply } => {
                let result = self
                    .command(id, Command::Commit, now)
                    .and_then(|()| self.subscribe(id));
                let _ = reply.send(result);
            }
            ShardMsg::Abort { id, reason, reply } => {
                let result = self.command(id, Command::Abort { reason }, now);
                let _ = reply.send(result);
            }
            ShardMsg::Get { id, reply } => {
                let _ = reply.send(self.txns.get(&id).map(|e| e.txn.record()));
            }
            ShardMsg::Watch { id, reply } => {
                let _ = reply.send(self.subscribe(id).ok());
            }
            ShardMsg::State { id, reply } => {
                let _ = reply.send(self.txns.get(&id).map(|e| e.txn.state()));
            }
            ShardMsg::List {
                states,
                after,
                limit,
                known,
                reply,
            } => {
                let mut found: Vec<&Entry> = self
                    .txns
                    .iter()
                    .filter(|(id, e)| {
                        after.is_none_or(|after| **id > after)
                            && (states.is_empty() || states.contains(&e.txn.state()))
                    })
                    .map(|(_, e)| e)
                    .collect();
                // Only the `limit` smallest ids are needed: select, then sort those.
                if found.len() > limit {
                    found.select_nth_unstable_by_key(limit, |e| e.txn.id());
                    found.truncate(limit);
                }
                found.sort_by_key(|e| e.txn.id());
                let present = known
                    .into_iter()
                    .filter(|id| self.txns.contains_key(id))
                    .collect();
                let _ = reply.send(Listed {
                    matching: found.into_iter().map(|e| e.txn.record()).collect(),
                    present,
                });
            }
            ShardMsg::Shutdown { .. } => {}
        }
    }

    fn begin(&mut self, id: TxnId, params: BeginParams, now: UnixMs) -> Result<(), RuntimeError> {
        let _span = txn_span(id).entered();
        let active = self.active.fetch_add(1, Ordering::SeqCst);
        if active >= self.config.max_active_transactions {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(RuntimeError::Overloaded(active));
        }
        let admitted = self.create(id, params, now);
        if admitted.is_err() {
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
        admitted
    }

    fn create(&mut self, id: TxnId, params: BeginParams, now: UnixMs) -> Result<(), RuntimeError> {
        let (mut txn, actions) = TwoPhaseCommit::begin(NewTransaction {
            id,
            created_unix_ms: now,
            deadline_unix_ms: params.deadline_unix_ms,
            prepare_timeout_ms: params.prepare_timeout_ms,
            max_branches: self.config.max_branches,
        });
        for branch in params.branches {
            // Enlisting into a new ACTIVE transaction emits no actions.
            txn.handle_command(Command::Enlist(branch), now)?;
        }
        tracing::debug!(txn_id = %id, branches = txn.branches().len(), "begun");
        self.txns.insert(id, Entry::new(txn));
        self.execute(id, actions);
        Ok(())
    }

    fn command(&mut self, id: TxnId, command: Command, now: UnixMs) -> Result<(), RuntimeError> {
        let _span = txn_span(id).entered();
        let entry = self
            .txns
            .get_mut(&id)
            .ok_or(RuntimeError::UnknownTransaction(id))?;
        let before = entry.txn.state();
        let actions = entry.txn.handle_command(command, now)?;
        self.execute(id, actions);
        self.after_step(id, before, now);
        Ok(())
    }

    fn subscribe(&mut self, id: TxnId) -> Result<watch::Receiver<Arc<TxnRecord>>, RuntimeError> {
        self.txns
            .get_mut(&id)
            .map(Entry::subscribe)
            .ok_or(RuntimeError::UnknownTransaction(id))
    }

    fn on_event(&mut self, id: TxnId, event: Event) {
        let _span = txn_span(id).entered();
        let now = now_unix_ms();
        let Some(entry) = self.txns.get_mut(&id) else {
            return;
        };
        let before = entry.txn.state();
        let actions = entry.txn.handle_event(event, now);
        self.execute(id, actions);
        self.after_step(id, before, now);
    }

    fn on_timer(&mut self, id: TxnId, timer: Timer) {
        let Some(entry) = self.txns.get_mut(&id) else {
            return;
        };
        // The key is spent: forget it so that it is never removed again.
        let event = match timer {
            Timer::Deadline => {
                entry.deadline_timer = None;
                Event::DeadlineReached
            }
            Timer::Prepare => {
                entry.prepare_timer = None;
                Event::PrepareTimerFired
            }
            Timer::Retry { branch } => Event::RetryDue { branch },
        };
        self.on_event(id, event);
    }

    /// Publishes the new state and does the bookkeeping of decisions and ends.
    fn after_step(&mut self, id: TxnId, before: TxnState, now: UnixMs) {
        let Some(entry) = self.txns.get_mut(&id) else {
            return;
        };
        let state = entry.txn.state();
        if let Some(updates) = &entry.updates {
            updates.send_replace(Arc::new(entry.txn.record()));
        }
        if state == before {
            return;
        }
        tracing::info!(txn_id = %id, from = ?before, to = ?state, reason = entry.txn.reason().unwrap_or(""), "transaction state changed");
        if state.is_decided() {
            // Deadline and prepare timeout mean nothing once the outcome is fixed.
            let keys = [entry.deadline_timer.take(), entry.prepare_timer.take()];
            for key in keys.into_iter().flatten() {
                self.timers.remove(&key);
            }
        }
        if state.is_final() {
            self.active.fetch_sub(1, Ordering::SeqCst);
            self.retained.push_back((now, id));
        }
    }

    fn execute(&mut self, id: TxnId, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::StartDeadlineTimer { at_unix_ms } => {
                    let delay = Duration::from_millis(at_unix_ms.saturating_sub(now_unix_ms()));
                    let key = self.timers.insert((id, Timer::Deadline), delay);
                    if let Some(entry) = self.txns.get_mut(&id) {
                        entry.deadline_timer = Some(key);
                    }
                }
                Action::StartPrepareTimer { after_ms } => {
                    let key = self
                        .timers
                        .insert((id, Timer::Prepare), Duration::from_millis(after_ms));
                    if let Some(entry) = self.txns.get_mut(&id) {
                        entry.prepare_timer = Some(key);
                    }
                }
                Action::SendPrepare { branch } => self.spawn_call(id, branch, CallKind::Prepare),
                Action::SendOnePhaseCommit { branch } => {
                    self.spawn_call(id, branch, CallKind::OnePhaseCommit)
                }
                Action::SendCommit { branch } => self.spawn_call(id, branch, CallKind::Commit),
                Action::SendAbort { branch } => self.spawn_call(id, branch, CallKind::Abort),
                Action::ScheduleRetry { branch, attempt } => {
                    let delay = retry_delay(
                        attempt,
                        self.config.retry_backoff_initial_ms,
                        self.config.retry_backoff_max_ms,
                        &mut rand::rng(),
                    );
                    self.timers.insert((id, Timer::Retry { branch }), delay);
                }
                Action::PersistDecision => self.persist(id, Durability::Forced),
                Action::PersistEnd => self.persist(id, Durability::Lazy),
            }
        }
    }

    fn spawn_call(&self, id: TxnId, branch_index: usize, kind: CallKind) {
        let Some(entry) = self.txns.get(&id) else {
            return;
        };
        let Some(branch) = entry.txn.branch(branch_index) else {
            return;
        };
        let timeout_ms = match kind {
            // The prepare timer is phase 1's limit; the call's own deadline only bounds
            // the task, so it trails the timer rather than race it.
            CallKind::Prepare => entry
                .txn
                .prepare_timeout_ms()
                .saturating_add(PREPARE_CALL_GRACE_MS),
            _ => self.config.participant_call_timeout_ms,
        };
        let call = Call {
            endpoint: branch.endpoint.clone(),
            transaction_id: id.to_string(),
            branch_id: branch.id.clone(),
            timeout: Duration::from_millis(timeout_ms),
        };
        let payload = match kind {
            CallKind::Prepare | CallKind::OnePhaseCommit => branch.payload.clone(),
            CallKind::Commit | CallKind::Abort => Vec::new(),
        };
        let participants = self.participants.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let event = match kind {
                CallKind::Prepare => match participants.prepare(&call, payload).await {
                    Ok(vote) => Event::PrepareAnswered {
                        branch: branch_index,
                        vote,
                    },
                    Err(error) => Event::PrepareFailed {
                        branch: branch_index,
                        error,
                    },
                },
                CallKind::OnePhaseCommit | CallKind::Commit | CallKind::Abort => {
                    let answer = match kind {
                        CallKind::OnePhaseCommit => {
                            participants
                                .commit(&call, CommitMode::OnePhase, payload)
                                .await
                        }
                        CallKind::Commit => {
                            participants
                                .commit(&call, CommitMode::TwoPhase, payload)
                                .await
                        }
                        _ => participants.abort(&call).await,
                    };
                    match answer {
                        Ok(answer) => Event::Delivered {
                            branch: branch_index,
                            answer,
                        },
                        Err(error) => {
                            tracing::info!(txn_id = %id, branch_id = %call.branch_id, ?kind, %error, "delivery failed; will retry");
                            Event::DeliveryFailed {
                                branch: branch_index,
                                error,
                            }
                        }
                    }
                }
            };
            // The shard outlives every call it starts, except at shutdown: then the
            // event no longer matters (recovery redelivers).
            let _ = events.send((id, event));
        }
        .instrument(txn_span(id)));
    }

    fn persist(&self, id: TxnId, durability: Durability) {
        let Some(entry) = self.txns.get(&id) else {
            return;
        };
        let forced = durability == Durability::Forced;
        let record = if forced {
            entry.txn.decision_record()
        } else {
            entry.txn.record()
        };
        if forced {
            crash_point("coordinator::before_decision_logged");
        }
        let write = self.log.write(&record, durability);
        let events = self.events.clone();
        let fatal = self.fatal.clone();
        tokio::spawn(
            async move {
                match write.await {
                    Ok(()) if forced => {
                        crash_point("coordinator::after_decision_logged");
                        let _ = events.send((id, Event::DecisionPersisted));
                    }
                    Ok(()) => {}
                    Err(error) => {
                        tracing::error!(txn_id = %id, %error, "decision log write failed");
                        let _ = fatal.send(format!("decision log write for {id} failed: {error}"));
                    }
                }
            }
            .instrument(txn_span(id)),
        );
    }

    fn abort_undecided(&mut self) {
        let now = now_unix_ms();
        let undecided: Vec<TxnId> = self
            .txns
            .iter()
            .filter(|(_, e)| !e.txn.state().is_decided())
            .map(|(id, _)| *id)
            .collect();
        for id in undecided {
            let abort = Command::Abort {
                reason: "the coordinator is shutting down".into(),
            };
            // One-phase commits and decisions being written cannot be aborted; they
            // finish within the grace period or are recovered.
            let _ = self.command(id, abort, now);
        }
    }

    /// Forgets final transactions past their retention, or beyond the memory cap.
    fn evict(&mut self, now: UnixMs) {
        let cap = (self.config.max_retained_transactions / self.config.shards.max(1)).max(1);
        while let Some(&(ended, id)) = self.retained.front() {
            let expired = now.saturating_sub(ended) >= self.config.memory_retention_ms;
            if !expired && self.retained.len() <= cap {
                break;
            }
            self.retained.pop_front();
            self.txns.remove(&id);
        }
    }
}

/// The span every log line about one transaction is emitted in.
fn txn_span(id: TxnId) -> tracing::Span {
    tracing::info_span!("txn", txn_id = %id)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
