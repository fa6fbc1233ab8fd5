//! A shard's upkeep between requests: the cap on undelivered aborts kept in memory, the
//! undecided two-phase commits aborted at shutdown, the sweep that sends again calls
//! whose answers were lost, final transactions evicted past their retention or the
//! memory budget's share, and a transaction dropped from memory with its idempotency
//! key.

use super::*;

impl Shard {
    /// Keeps at most `max_undelivered_aborts` aborts undelivered past their deadline in
    /// memory (per shard, its share): the oldest beyond are forgotten, which presumed
    /// abort allows — a participant in doubt asks and hears ABORT.
    pub(super) fn forget_undelivered_beyond_cap(&mut self) {
        // Ids of aborts that ended since are dropped at housekeeping; until then they
        // count here too, so one may be forgotten a little early (which is safe).
        let cap = (self.config.max_undelivered_aborts / self.config.shards.max(1)).max(1);
        while self.undelivered_aborts.len() > cap {
            let Some(oldest) = self.undelivered_aborts.pop_front() else {
                break;
            };
            let live = self
                .txns
                .get(&oldest)
                .is_some_and(|e| e.machine.state() == TxnState::Aborting);
            if live {
                // One whose intent is in the log ends there too (presumed abort holds
                // for the others: they left no record).
                let logged = match self.txns.get_mut(&oldest).map(|e| &mut e.machine) {
                    Some(Machine::TwoPhase(txn)) if txn.intent_logged() => {
                        Some(txn.give_up_undelivered_abort(now_unix_ms()))
                    }
                    _ => None,
                };
                if let Some(actions) = logged {
                    self.execute(oldest, Actions::TwoPhase(actions));
                }
                // Its watchers' streams end with it.
                self.remove(oldest);
                let _span = txn_span(oldest).entered();
                tracing::warn!(
                    cap,
                    "too many aborts undelivered past their deadline: the oldest is forgotten; its participants learn ABORT when they ask"
                );
            }
        }
    }

    pub(super) fn abort_undecided(&mut self) {
        let now = now_unix_ms();
        let undecided: Vec<TxnId> = self
            .txns
            .iter()
            .filter(|(_, e)| {
                matches!(e.machine, Machine::TwoPhase(_)) && !e.machine.state().is_decided()
            })
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

    /// The safety net: looks at up to `sweep_batch` unfinished transactions (continuing
    /// where the last sweep stopped) and sends again every call that has had no answer
    /// for `stale_after_ms` (its answer was lost; in a paused transaction it is marked
    /// lost and not sent). Deadlines and retries have their own timers; this catches
    /// what slipped through.
    pub(super) fn sweep(&mut self, now: UnixMs) {
        let batch = self.config.sweep_batch.max(1);
        let mut unfinished: Vec<TxnId> = self
            .txns
            .iter()
            .filter(|(id, e)| {
                !e.machine.state().is_final() && self.sweep_after.is_none_or(|after| **id > after)
            })
            .map(|(id, _)| *id)
            .collect();
        unfinished.sort_unstable();
        unfinished.truncate(batch);
        self.sweep_after = if unfinished.len() < batch {
            None
        } else {
            unfinished.last().copied()
        };
        let stale_after_ms = self.config.stale_after_ms;
        for id in unfinished {
            let Some(entry) = self.txns.get_mut(&id) else {
                continue;
            };
            let before = entry.machine.state();
            let actions = match &mut entry.machine {
                Machine::TwoPhase(txn) => {
                    Actions::TwoPhase(txn.handle_event(Event::Nudge { stale_after_ms }, now))
                }
                Machine::Saga(saga) => {
                    Actions::Saga(saga.handle_event(SagaEvent::Nudge { stale_after_ms }, now))
                }
            };
            if actions.is_empty() {
                continue;
            }
            let _span = txn_span(id).entered();
            tracing::warn!(
                stale_after_ms,
                "calls without an answer; sending them again"
            );
            self.execute(id, actions);
            self.after_step(id, before, now);
        }
    }

    /// This shard's share of the limits on final transactions kept in memory.
    pub(super) fn retain_limits(&self) -> RetainLimits {
        let shards = self.config.shards.max(1);
        RetainLimits {
            retention_ms: self.config.memory_retention_ms,
            max_transactions: (self.config.max_retained_transactions / shards).max(1),
            max_bytes: self
                .config
                .max_retained_bytes
                .min(self.config.retained_allowance.bytes())
                / shards,
        }
    }

    /// Forgets final transactions past their retention, or beyond the count or bytes
    /// they may hold.
    pub(super) fn evict(&mut self, now: UnixMs) {
        self.evict_with(now, self.retain_limits());
    }

    pub(super) fn evict_with(&mut self, now: UnixMs, limits: RetainLimits) {
        let mut retained = std::mem::take(&mut self.retained);
        // A forgotten transaction is no longer in `txns`: removing it again does nothing.
        let writes_applied = self.log.writes_applied();
        retained.evict(now, limits, writes_applied, |id| self.remove(id));
        self.retained = retained;
    }

    /// Drops a transaction from memory, and its idempotency key with it.
    pub(super) fn remove(&mut self, id: TxnId) {
        if let Some(entry) = self.txns.remove(&id) {
            if let Some(key) = entry.machine.idempotency_key() {
                self.keys.remove(key);
            }
        }
    }
}
