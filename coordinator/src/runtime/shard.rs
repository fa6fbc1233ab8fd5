//! One shard: a task that owns a set of transactions (two-phase commits and sagas) and is
//! the only one to touch them.
//!
//! The loop takes, in turn, results of its own work (participant answers, log writes),
//! expired timers, and messages from the API; each goes through the transaction's engine,
//! and the actions that come out are carried out by `execute.rs`.
//!
//! Sagas submitted with an idempotency key are routed to the shard chosen by the key, so
//! that every submit of one key is decided here, one after the other.

use std::collections::{HashMap, VecDeque};
use std::mem::size_of;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};
use treaty_sdk::trace::TraceContext;

use super::execute::Actions;
use super::load::{Limits, Load};
use super::machine::{Input, Machine, Timer};
use super::retained::{RetainLimits, Retained};
use super::{
    BeginParams, ListFilter, RuntimeConfig, RuntimeError, SagaParams, Submitted, now_unix_ms,
};
use crate::engine::footprint::block_bytes;
use crate::engine::saga::{NewSaga, Saga, SagaEvent};
use crate::engine::twopc::Refusal;
use crate::engine::twopc::{
    BranchSpec, Command, Event, NewTransaction, OperatorCommand, OperatorRequest, TwoPhaseCommit,
};
use crate::log::{DecisionLog, Durability};
use crate::metrics::Health;
use crate::model::{SagaDefinition, StepDefinition, TxnId, TxnKind, TxnRecord, TxnState, UnixMs};
use crate::participants::Participants;

#[path = "shard_messages.rs"]
mod messages;
#[path = "shard_requests.rs"]
mod requests;
#[path = "shard_upkeep.rs"]
mod upkeep;
pub(super) use messages::{Listed, Lookup, Operated, ShardMsg, SubmitReply};

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) machine: Machine,
    /// Present once someone watches or waits.
    updates: Option<watch::Sender<Arc<TxnRecord>>>,
    /// The state and the number of transitions of the record last sent on `updates`.
    published: (TxnState, usize),
    pub(super) deadline_timer: Option<delay_queue::Key>,
    pub(super) prepare_timer: Option<delay_queue::Key>,
    /// Payload bytes counted against the memory budget until the transaction is final.
    payload_bytes: usize,
    /// The W3C trace of the transaction and the span its participant calls are
    /// children of (each call gets a span id of its own).
    pub(super) trace: TraceContext,
    /// No longer counted as work in progress: past its deadline, it only waits on a
    /// participant (see `TwoPhaseCommit::waits_past_deadline`).
    released: bool,
}

impl Entry {
    /// Boxed: the map's slots then hold a pointer, not the whole entry (see
    /// [`Shard::txns`]).
    fn new(machine: Machine, payload_bytes: usize, trace: TraceContext) -> Box<Self> {
        Box::new(Self {
            published: (machine.state(), machine.transition_count()),
            machine,
            payload_bytes,
            trace,
            updates: None,
            deadline_timer: None,
            prepare_timer: None,
            released: false,
        })
    }

    /// The memory a final transaction holds in its shard, estimated: the entry's own
    /// block, its slots in the map ([`MAP_SLOTS_PER_ENTRY`]) and its place in the
    /// retention queue (with the spare room of a queue that doubles when full: half
    /// again, on average), what its state holds on the heap (`engine::footprint`), its
    /// trace state, and, if someone watched it, the last record published to them (a
    /// second copy of the same fields, but for a saga's definition, which the record
    /// shares).
    fn estimated_bytes(&self) -> usize {
        let published = match &self.updates {
            Some(_) => {
                size_of::<TxnRecord>() + self.machine.heap_bytes()
                    - self.machine.shared_heap_bytes()
            }
            None => 0,
        };
        // The map's slots, each with its control byte.
        (size_of::<(TxnId, Box<Entry>)>() + 1) * MAP_SLOTS_PER_ENTRY
            + block_bytes(size_of::<Entry>())
            + Retained::ENTRY_BYTES * 3 / 2
            + self.machine.heap_bytes()
            + self.trace.tracestate().map_or(0, str::len)
            + published
    }

    /// A receiver that starts from the record as it is now.
    fn subscribe(&mut self) -> watch::Receiver<Arc<TxnRecord>> {
        let record = Arc::new(self.machine.record());
        self.published = (record.state, record.transitions.len());
        match &self.updates {
            Some(updates) => {
                updates.send_replace(record);
                updates.subscribe()
            }
            None => {
                let (updates, receiver) = watch::channel(record);
                self.updates = Some(updates);
                receiver
            }
        }
    }

    /// Sends the record to those who listen, if what they wait on moved since the last
    /// one: its state or its transitions. Every waiter's condition is on these, and the
    /// Watch stream sends one message per transition, so a step's progress alone does
    /// not build and send the whole record (a later subscriber starts from it anyway).
    fn publish(&mut self) {
        let Some(updates) = &self.updates else {
            return;
        };
        if updates.receiver_count() == 0 {
            self.updates = None;
            return;
        }
        let now = (self.machine.state(), self.machine.transition_count());
        if now != self.published {
            self.published = now;
            updates.send_replace(Arc::new(self.machine.record()));
        }
    }
}

/// The span every log line about one transaction is emitted in.
pub(super) fn txn_span(id: TxnId) -> tracing::Span {
    tracing::info_span!("txn", txn_id = %id)
}

/// The span a new transaction's participant calls are children of: the caller's, or
/// the root of a new trace (standing for the coordinator's span of the transaction) when
/// the caller sent none.
fn parent_span(caller: Option<TraceContext>) -> TraceContext {
    caller.unwrap_or_else(TraceContext::new_root)
}

/// The slots of [`Shard::txns`] counted for each transaction it holds. The map does
/// not shrink, and it can grow while the number of final transactions it holds stays
/// the same: a removal may leave its slot marked deleted; once those marks use up the
/// spare room, a table more than half full grows instead of being cleaned in place.
/// Just past half full, it doubles to 32/7 (about 4.6) slots per transaction. Seen in
/// a 1,000,000-2PC run: each shard's map went from 32,768 to 65,536 slots while it
/// held about 14,400 (docs/PERFORMANCE.md, "Where the resident set's plateau came
/// from"). 6 are counted, leaving room for the count to fall by up to a quarter while
/// the table keeps its size (as when the memory governor lowers what final
/// transactions may hold; it steers by the resident set itself then).
const MAP_SLOTS_PER_ENTRY: usize = 6;

#[derive(Debug)]
pub(super) struct Shard {
    /// The transactions in memory, unfinished and final. Entries are boxed: a slot is
    /// then 24 bytes rather than 336 (the key and the entry's 320), and the table's
    /// spare and deleted slots, several per transaction (see [`MAP_SLOTS_PER_ENTRY`]),
    /// cost that much less.
    pub(super) txns: HashMap<TxnId, Box<Entry>>,
    /// Sagas in memory by idempotency key.
    keys: HashMap<String, TxnId>,
    /// Final transactions in the order they ended, with their estimated bytes, for
    /// eviction.
    retained: Retained,
    pub(super) timers: DelayQueue<(TxnId, Timer)>,
    pub(super) inputs: mpsc::UnboundedSender<(TxnId, Input)>,
    inputs_in: mpsc::UnboundedReceiver<(TxnId, Input)>,
    commands: mpsc::Receiver<ShardMsg>,
    pub(super) log: Arc<dyn DecisionLog>,
    pub(super) participants: Participants,
    pub(super) config: RuntimeConfig,
    load: Arc<Load>,
    pub(super) fatal: mpsc::UnboundedSender<String>,
    /// Where the next sweep continues.
    sweep_after: Option<TxnId>,
    /// Aborts undelivered past their deadline, oldest first (ids of ones that ended
    /// since are dropped at housekeeping); at most `max_undelivered_aborts` are kept.
    undelivered_aborts: VecDeque<TxnId>,
}

impl Shard {
    pub(super) fn new(
        log: Arc<dyn DecisionLog>,
        participants: Participants,
        config: RuntimeConfig,
        load: Arc<Load>,
        fatal: mpsc::UnboundedSender<String>,
        commands: mpsc::Receiver<ShardMsg>,
    ) -> Self {
        let (inputs, inputs_in) = mpsc::unbounded_channel();
        Self {
            txns: HashMap::new(),
            keys: HashMap::new(),
            retained: Retained::default(),
            timers: DelayQueue::new(),
            inputs,
            inputs_in,
            commands,
            log,
            participants,
            config,
            load,
            fatal,
            sweep_after: None,
            undelivered_aborts: VecDeque::new(),
        }
    }

    pub(super) async fn run(mut self, recovered: Vec<TxnRecord>) {
        let now = now_unix_ms();
        for record in recovered {
            let id = record.id;
            let _span = txn_span(id).entered();
            let payload_bytes = recovered_payload_bytes(&record);
            let (machine, actions) = match record.kind {
                TxnKind::TwoPhase => {
                    tracing::info!(state = ?record.state, "resuming a two-phase commit");
                    let (txn, actions) =
                        TwoPhaseCommit::recover(record, self.config.max_branches, now);
                    (Machine::TwoPhase(txn), Actions::TwoPhase(actions))
                }
                TxnKind::Saga => {
                    tracing::info!(state = ?record.state, "resuming a saga");
                    let (saga, actions) = Saga::recover(record, now);
                    (Machine::Saga(saga), Actions::Saga(actions))
                }
            };
            if let Some(key) = machine.idempotency_key() {
                self.keys.insert(key.to_string(), id);
            }
            // The trace is not logged: resumed work starts a new one.
            self.txns.insert(
                id,
                Entry::new(machine, payload_bytes, TraceContext::new_root()),
            );
            self.execute(id, actions);
        }
        let mut housekeeping = tokio::time::interval(Duration::from_secs(1));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweeping =
            tokio::time::interval(Duration::from_millis(self.config.sweep_interval_ms.max(10)));
        sweeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping_at: Option<Instant> = None;
        loop {
            if stopping_at.is_some() && self.nothing_to_wait_for() {
                break;
            }
            tokio::select! {
                Some((id, input)) = self.inputs_in.recv() => self.on_input(id, input),
                Some(expired) = self.timers.next() => {
                    let (id, timer) = expired.into_inner();
                    self.on_timer(id, timer);
                }
                message = self.commands.recv(), if stopping_at.is_none() => match message {
                    Some(ShardMsg::Shutdown { deadline }) => {
                        stopping_at = Some(deadline);
                        self.abort_undecided();
                    }
                    Some(message) => self.on_message(message),
                    // Every handle is gone: nobody can ask for anything any more.
                    None => stopping_at = Some(Instant::now()),
                },
                _ = sleep_until_opt(stopping_at) => {
                    let unfinished = self.txns.values().filter(|e| !e.machine.state().is_final()).count();
                    tracing::warn!(unfinished, "shutdown grace period over; recovery will finish the rest");
                    break;
                }
                _ = housekeeping.tick() => {
                    self.evict(now_unix_ms());
                    self.undelivered_aborts.retain(|id| self.txns.get(id).is_some_and(|e| !e.machine.state().is_final()));
                }
                _ = sweeping.tick() => self.sweep(now_unix_ms()),
            }
        }
    }

    /// Shutdown may end once every two-phase commit is final. Sagas need no waiting:
    /// everything they decided is in the log (closed durably after the shards stop), and
    /// recovery resumes them.
    fn nothing_to_wait_for(&self) -> bool {
        self.txns.values().all(|e| match e.machine {
            Machine::TwoPhase(_) => e.machine.state().is_final(),
            Machine::Saga(_) => true,
        })
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
            ShardMsg::Submit { id, params, reply } => {
                let _ = reply.send(self.submit(id, params, now));
            }
            ShardMsg::Get { id, reply } => {
                let _ = reply.send(self.lookup(id, |e| e.machine.record()));
            }
            ShardMsg::Watch { id, reply } => {
                let updates = match self.visible(id) {
                    Some(_) => self.subscribe(id).ok(),
                    None => None,
                };
                let _ = reply.send(updates);
            }
            ShardMsg::State { id, reply } => {
                let _ = reply.send(self.lookup(id, |e| e.machine.state()));
            }
            ShardMsg::Operate { id, request, reply } => {
                let _ = reply.send(self.operate(id, request, now));
            }
            ShardMsg::CancelSaga { id, reason, reply } => {
                let _ = reply.send(self.cancel_saga(id, reason, now));
            }
            ShardMsg::Forget { id, reply } => {
                let _ = reply.send(self.forget(id));
            }
            ShardMsg::Health { reply } => {
                let mut health = Health {
                    retained_transactions: self.retained.len() as u64,
                    retained_estimated_bytes: self.retained.bytes() as u64,
                    ..Health::default()
                };
                for entry in self.txns.values() {
                    entry.machine.add_health(&mut health);
                }
                let _ = reply.send(health);
            }
            ShardMsg::List {
                filter,
                after,
                limit,
                known,
                reply,
            } => {
                let _ = reply.send(self.list(&filter, after, limit, known));
            }
            ShardMsg::Shutdown { .. } => {}
        }
    }

    fn on_input(&mut self, id: TxnId, input: Input) {
        let _span = txn_span(id).entered();
        let now = now_unix_ms();
        let Some(entry) = self.txns.get_mut(&id) else {
            return;
        };
        let before = entry.machine.state();
        let actions = match (&mut entry.machine, input) {
            (Machine::TwoPhase(txn), Input::TwoPhase(event)) => {
                Actions::TwoPhase(txn.handle_event(event, now))
            }
            (Machine::Saga(saga), Input::Saga(event)) => {
                Actions::Saga(saga.handle_event(event, now))
            }
            (machine, input) => {
                tracing::error!(
                    ?machine,
                    ?input,
                    "an input for the other kind of transaction; ignored"
                );
                return;
            }
        };
        self.execute(id, actions);
        self.after_step(id, before, now);
    }

    fn on_timer(&mut self, id: TxnId, timer: Timer) {
        let Some(entry) = self.txns.get_mut(&id) else {
            return;
        };
        // The key is spent: forget it so that it is never removed again.
        match timer {
            Timer::Deadline | Timer::SagaDeadline => entry.deadline_timer = None,
            Timer::Prepare => entry.prepare_timer = None,
            _ => {}
        }
        self.on_input(id, timer.input());
    }

    /// Publishes the new state and does the bookkeeping of decisions and ends.
    fn after_step(&mut self, id: TxnId, before: TxnState, now: UnixMs) {
        let Some(entry) = self.txns.get_mut(&id) else {
            return;
        };
        let state = entry.machine.state();
        entry.publish();
        if !entry.released && entry.machine.waits_past_deadline(now) {
            // Presumed abort needs no acknowledgement (a participant in doubt asks and
            // hears ABORT): the aborts left are retried, but no longer hold a slot of
            // the work in progress.
            entry.released = true;
            self.load
                .release(entry.machine.owner(), entry.payload_bytes);
            if state == TxnState::Aborting {
                self.undelivered_aborts.push_back(id);
                self.forget_undelivered_beyond_cap();
            }
            return self.after_step(id, before, now);
        }
        if state == before {
            return;
        }
        tracing::debug!(from = ?before, to = ?state, reason = entry.machine.reason().unwrap_or(""), "transaction state changed");
        if state.is_decided() {
            // The prepare timeout means nothing once the outcome is fixed; the deadline
            // only to an abort still being delivered (it stops holding a slot then).
            let deadline = (state != TxnState::Aborting)
                .then(|| entry.deadline_timer.take())
                .flatten();
            for key in [deadline, entry.prepare_timer.take()].into_iter().flatten() {
                self.timers.remove(&key);
            }
        }
        if state.is_final() {
            self.config
                .metrics
                .transaction_ended(entry.machine.kind(), state);
            if !entry.released {
                self.load
                    .release(entry.machine.owner(), entry.payload_bytes);
            }
            let estimated_bytes = entry.estimated_bytes();
            // Its final writes were issued by `execute` before this step.
            let writes_issued = self.log.writes_queued();
            self.retained.push(now, id, estimated_bytes, writes_issued);
            // Count and bytes are held at once (the retention waits for housekeeping);
            // the transaction just ended is never the one dropped.
            let limits = RetainLimits {
                retention_ms: u64::MAX,
                ..self.retain_limits()
            };
            self.evict_with(now, limits);
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The payload bytes a saga's definition holds in memory: forward and compensation
/// payloads of every step.
pub(super) fn definition_bytes(definition: &SagaDefinition) -> usize {
    definition
        .steps
        .iter()
        .map(|step| step.payload.len() + step.compensation.len())
        .sum()
}

/// The payload bytes a recovered transaction holds in memory: a saga's definition, or a
/// two-phase commit's branch payloads (only an intent has any: phase 1 is asked again).
pub(super) fn recovered_payload_bytes(record: &TxnRecord) -> usize {
    match record.saga.as_deref() {
        Some(definition) => definition_bytes(definition),
        None => record.branches.iter().map(|b| b.payload.len()).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RetryPolicy;

    fn saga_with_payloads(payload_bytes: usize) -> Machine {
        let step = |id: &str| StepDefinition {
            id: id.into(),
            endpoint: "http://127.0.0.1:7001".into(),
            payload: vec![1; payload_bytes],
            compensation: vec![2; payload_bytes],
            timeout_ms: 1_000,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff_ms: 10,
                max_backoff_ms: 100,
            },
            after: Vec::new(),
            requested: Default::default(),
        };
        let (saga, _) = Saga::submit(NewSaga {
            id: TxnId::generate(1),
            created_unix_ms: 1,
            definition: SagaDefinition {
                steps: vec![step("a"), step("b")],
                stuck_after_attempts: 3,
            },
            idempotency_key: None,
            owner: None,
            deadline_unix_ms: None,
        });
        Machine::Saga(saga)
    }

    /// The map's slots per transaction, as [`MAP_SLOTS_PER_ENTRY`] counts them, hold
    /// while final transactions come and go at a steady count: the oldest removed as
    /// each new one is added, as the count and byte limits evict when a transaction
    /// ends. 14,400 is about what each of two shards held in the run that found the
    /// doubling.
    #[test]
    fn the_maps_slots_per_transaction_stay_within_the_estimate_at_a_steady_count() {
        // Fixed ids and hashes: the same run every time.
        type Fixed = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;
        let id = |n: u64| TxnId::from_bytes((u128::from(n) * 0x9e37_79b9_7f4a_7c15).to_be_bytes());
        for count in [100_u64, 1_000, 14_400, 20_000] {
            let mut map: HashMap<TxnId, Box<u8>, Fixed> = HashMap::default();
            let mut most_slots = 0;
            for n in 0..count * 30 {
                map.insert(id(n), Box::new(0));
                if n >= count {
                    map.remove(&id(n - count));
                }
                // A table of 2^k slots holds at most 7/8 of them.
                most_slots = most_slots.max((map.capacity() * 8).div_ceil(7));
            }
            let slots_per_transaction = most_slots as f64 / count as f64;
            assert!(
                slots_per_transaction <= MAP_SLOTS_PER_ENTRY as f64,
                "{count}: {most_slots} slots, {slots_per_transaction:.2} per transaction"
            );
        }
    }

    /// What a slot of the map takes is a key and a pointer, whatever the entry holds.
    #[test]
    fn a_slot_of_the_map_is_a_key_and_a_pointer() {
        assert_eq!(
            size_of::<(TxnId, Box<Entry>)>(),
            size_of::<TxnId>() + size_of::<usize>()
        );
        assert!(size_of::<Entry>() > 4 * size_of::<(TxnId, Box<Entry>)>());
    }

    #[test]
    fn a_watched_sagas_estimate_counts_its_shared_definition_once() {
        let payload_bytes = 8 * 1024;
        let mut entry = Entry::new(
            saga_with_payloads(payload_bytes),
            0,
            TraceContext::new_root(),
        );
        let unwatched = entry.estimated_bytes();
        assert!(unwatched >= 4 * payload_bytes, "{unwatched}");
        let _watcher = entry.subscribe();
        let watched = entry.estimated_bytes();
        // The published record adds its own fields, not a second copy of the payloads
        // it shares with the saga.
        assert!(
            watched >= unwatched + size_of::<TxnRecord>(),
            "{unwatched} {watched}"
        );
        assert!(watched < unwatched + payload_bytes, "{unwatched} {watched}");
    }
}
