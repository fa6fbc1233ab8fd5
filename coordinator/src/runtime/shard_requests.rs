//! The API's requests to a shard: a new two-phase commit or saga (admitted against the
//! limits), its commands, what the API may read (a transaction shown only once it is
//! durable), an operator's verbs, forgetting and listing. Same invariants as [`super`]:
//! only this shard touches its transactions.

use super::*;

impl Shard {
    /// Counts a new transaction of `owner` holding `payload_bytes` in progress, or
    /// refuses it past a limit.
    fn admit(&self, owner: Option<&str>, payload_bytes: usize) -> Result<(), RuntimeError> {
        self.load.admit(
            owner,
            payload_bytes,
            Limits {
                max_total: self.config.max_active_transactions,
                max_per_owner: self.config.max_active_per_principal,
                max_payload_bytes: self.config.max_payload_memory_bytes,
            },
        )
    }

    pub(super) fn begin(
        &mut self,
        id: TxnId,
        params: BeginParams,
        now: UnixMs,
    ) -> Result<(), RuntimeError> {
        let _span = txn_span(id).entered();
        let payload_bytes = params.branches.iter().map(|b| b.payload.len()).sum();
        self.admit(params.owner.as_deref(), payload_bytes)?;
        let (mut txn, actions) = TwoPhaseCommit::begin(NewTransaction {
            id,
            created_unix_ms: now,
            deadline_unix_ms: params.deadline_unix_ms,
            prepare_timeout_ms: params.prepare_timeout_ms,
            max_branches: self.config.max_branches,
            owner: params.owner,
            parallel_commit: self.config.parallel_commit,
        });
        for branch in params.branches {
            // Enlisting into a new ACTIVE transaction emits no actions.
            if let Err(refusal) = txn.handle_command(Command::Enlist(branch), now) {
                self.load.release(txn.owner(), payload_bytes);
                return Err(refusal.into());
            }
        }
        let trace = parent_span(params.trace);
        tracing::debug!(branches = txn.branches().len(), trace_id = %trace.trace_id_hex(), "begun");
        self.txns
            .insert(id, Entry::new(Machine::TwoPhase(txn), payload_bytes, trace));
        self.execute(id, Actions::TwoPhase(actions));
        Ok(())
    }

    /// A new saga, or the one already submitted with the same idempotency key.
    pub(super) fn submit(
        &mut self,
        id: TxnId,
        params: SagaParams,
        now: UnixMs,
    ) -> Result<SubmitReply, RuntimeError> {
        if let Some(key) = &params.idempotency_key {
            if let Some(existing) = self.existing_saga(key, &params)? {
                return Ok(existing);
            }
        }
        if let Some(error) = params.refused_if_new {
            return Err(RuntimeError::Invalid(error));
        }
        let _span = txn_span(id).entered();
        let payload_bytes = definition_bytes(&params.definition);
        self.admit(params.owner.as_deref(), payload_bytes)?;
        let (saga, actions) = Saga::submit(NewSaga {
            id,
            created_unix_ms: now,
            definition: params.definition,
            idempotency_key: params.idempotency_key.clone(),
            owner: params.owner,
            deadline_unix_ms: params.deadline_unix_ms,
        });
        let trace = parent_span(params.trace);
        tracing::debug!(
            steps = saga.definition().steps.len(),
            key = params.idempotency_key.as_deref().unwrap_or(""),
            trace_id = %trace.trace_id_hex(),
            "saga submitted"
        );
        if let Some(key) = params.idempotency_key {
            self.keys.insert(key, id);
        }
        let mut entry = Entry::new(Machine::Saga(saga), payload_bytes, trace);
        let updates = entry.subscribe();
        self.txns.insert(id, entry);
        self.execute(id, Actions::Saga(actions));
        Ok(SubmitReply::Here(Submitted {
            id,
            created: true,
            updates,
        }))
    }

    /// The saga submitted earlier with `key`: in memory if unfinished or recent, else in
    /// the log. Its steps must be the ones submitted now, as the client sent them.
    fn existing_saga(
        &mut self,
        key: &str,
        params: &SagaParams,
    ) -> Result<Option<SubmitReply>, RuntimeError> {
        let same_steps = |recorded: &[StepDefinition]| {
            let same = recorded.len() == params.definition.steps.len()
                && recorded
                    .iter()
                    .zip(&params.definition.steps)
                    .all(|(a, b)| a.same_request(b));
            if same {
                Ok(())
            } else {
                Err(RuntimeError::IdempotencyConflict(key.to_string()))
            }
        };
        if let Some(&id) = self.keys.get(key) {
            if let Some(entry) = self.txns.get_mut(&id) {
                if let Machine::Saga(saga) = &entry.machine {
                    same_steps(&saga.definition().steps)?;
                }
                return Ok(Some(SubmitReply::Here(Submitted {
                    id,
                    created: false,
                    updates: entry.subscribe(),
                })));
            }
        }
        let Some(id) = self.log.find_by_key(key)? else {
            return Ok(None);
        };
        // Purged since the lookup: as if it had never been.
        let Some(record) = self.log.get(&id)? else {
            return Ok(None);
        };
        if let Some(saga) = &record.saga {
            same_steps(&saga.steps)?;
        }
        if !record.state.is_final() {
            return Ok(Some(SubmitReply::LivesOn(id)));
        }
        // Final and out of memory: a snapshot that will not change.
        let (_, updates) = watch::channel(Arc::new(record));
        Ok(Some(SubmitReply::Here(Submitted {
            id,
            created: false,
            updates,
        })))
    }

    pub(super) fn command(
        &mut self,
        id: TxnId,
        command: Command,
        now: UnixMs,
    ) -> Result<(), RuntimeError> {
        let _span = txn_span(id).entered();
        let entry = self
            .txns
            .get_mut(&id)
            .ok_or(RuntimeError::UnknownTransaction(id))?;
        let before = entry.machine.state();
        let txn = entry
            .machine
            .as_two_phase()
            .ok_or(RuntimeError::NotTwoPhase(id))?;
        // A branch enlisted later brings its payload under the memory budget.
        let added_bytes = match &command {
            Command::Enlist(branch) => branch.payload.len(),
            _ => 0,
        };
        self.load
            .reserve(added_bytes, self.config.max_payload_memory_bytes)?;
        let actions = match txn.handle_command(command, now) {
            Ok(actions) => actions,
            Err(refusal) => {
                self.load.unreserve(added_bytes);
                return Err(refusal.into());
            }
        };
        entry.payload_bytes += added_bytes;
        self.execute(id, Actions::TwoPhase(actions));
        self.after_step(id, before, now);
        Ok(())
    }

    /// Carries out an operator's request and returns the transaction as it is now.
    pub(super) fn operate(
        &mut self,
        id: TxnId,
        request: OperatorRequest,
        now: UnixMs,
    ) -> Result<Operated, RuntimeError> {
        let _span = txn_span(id).entered();
        let participants = self.participants.clone();
        let entry = self.visible_mut(id)?;
        let before = entry.machine.state();
        let actions = match &mut entry.machine {
            Machine::TwoPhase(txn) => Actions::TwoPhase(txn.handle_operator(&request, now)?),
            Machine::Saga(saga) => Actions::Saga(saga.handle_operator(&request, now)?),
        };
        let sends = matches!(
            request.command,
            OperatorCommand::RetryNow | OperatorCommand::Resume
        ) && !actions.is_empty();
        if sends {
            // What is sent now must not be refused by a circuit still cooling down (the
            // next call to the endpoint probes it, this one or another's).
            for endpoint in entry.machine.endpoints() {
                participants.probe_now(endpoint);
            }
        }
        tracing::info!(command = ?request.command, by = %request.by, reason = %request.reason, "operator request carried out");
        self.execute(id, actions);
        self.after_step(id, before, now);
        let entry = self
            .txns
            .get(&id)
            .ok_or(RuntimeError::UnknownTransaction(id))?;
        // A resolution is reported once it is durable where the decision is (a logged
        // decision, a saga): work done by hand has no barrier record to answer a replay,
        // so after a crash it must not be sent again. A YES stated while the votes decide
        // (after a restart) is kept with the intent, and not asked again after the next.
        // A resolution of a transaction that has ended is forced too, though the
        // protocol logged nothing of it (an abort without an intent): the operator's
        // statement is answered once it will outlast a crash. A statement of an outcome
        // is counted once durable, or now if nothing is written (an undecided
        // transaction without an intent, which a crash aborts anyway).
        let resolved = matches!(request.command, OperatorCommand::Resolve { .. });
        let written = entry.machine.is_logged() || entry.machine.state().is_final();
        let durable = match (resolved, written) {
            (true, true) => Some(crate::runtime::operator::counted_when_durable(
                self.log
                    .write(&entry.machine.log_record(), Durability::Forced),
                self.config.metrics.clone(),
            )),
            (true, false) => {
                self.config.metrics.heuristic_outcome();
                None
            }
            (false, _) => None,
        };
        Ok(Operated {
            record: entry.machine.record(),
            durable,
        })
    }

    /// The initiator's cancel of a saga: compensation is decided unless it already was,
    /// or the saga completed. The caller learns which from the updates.
    pub(super) fn cancel_saga(
        &mut self,
        id: TxnId,
        reason: String,
        now: UnixMs,
    ) -> Result<watch::Receiver<Arc<TxnRecord>>, RuntimeError> {
        let _span = txn_span(id).entered();
        let entry = self.visible_mut(id)?;
        let before = entry.machine.state();
        let Machine::Saga(saga) = &mut entry.machine else {
            return Err(RuntimeError::NotSaga(id));
        };
        // A refusal says it is compensating or completed already: the updates show it.
        if let Ok(actions) = saga.cancel(reason) {
            self.execute(id, Actions::Saga(actions));
            self.after_step(id, before, now);
        }
        self.subscribe(id)
    }

    /// Drops a final transaction from memory (an operator's `forget`; the runtime then
    /// forgets its log record). An unfinished one is refused: its decision is needed.
    pub(super) fn forget(&mut self, id: TxnId) -> Result<Option<TxnRecord>, RuntimeError> {
        let Some(entry) = self.txns.get(&id).filter(|e| e.machine.is_visible()) else {
            return Ok(None);
        };
        let state = entry.machine.state();
        if !state.is_final() {
            return Err(Refusal::Unfinished(state).into());
        }
        let record = entry.machine.record();
        self.remove(id);
        self.retained.remove(id);
        Ok(Some(record))
    }

    /// A transaction users may see, to act on.
    fn visible_mut(&mut self, id: TxnId) -> Result<&mut Entry, RuntimeError> {
        self.txns
            .get_mut(&id)
            .map(|e| &mut **e)
            .filter(|e| e.machine.is_visible())
            .ok_or(RuntimeError::UnknownTransaction(id))
    }

    pub(super) fn visible(&self, id: TxnId) -> Option<&Entry> {
        self.txns
            .get(&id)
            .map(|e| &**e)
            .filter(|e| e.machine.is_visible())
    }

    pub(super) fn lookup<T>(&self, id: TxnId, view: impl FnOnce(&Entry) -> T) -> Lookup<T> {
        match self.txns.get(&id) {
            Some(entry) if entry.machine.is_visible() => Lookup::Visible(view(entry)),
            Some(_) => Lookup::Hidden,
            None => Lookup::Absent,
        }
    }

    pub(super) fn subscribe(
        &mut self,
        id: TxnId,
    ) -> Result<watch::Receiver<Arc<TxnRecord>>, RuntimeError> {
        self.txns
            .get_mut(&id)
            .map(|e| e.subscribe())
            .ok_or(RuntimeError::UnknownTransaction(id))
    }

    pub(super) fn list(
        &self,
        filter: &ListFilter,
        after: Option<TxnId>,
        limit: usize,
        known: Vec<TxnId>,
    ) -> Listed {
        let mut found: Vec<&Entry> = self
            .txns
            .iter()
            .filter(|(id, e)| {
                after.is_none_or(|after| **id > after)
                    && e.machine.is_visible()
                    && e.machine.matches(filter)
            })
            .map(|(_, e)| &**e)
            .collect();
        // Only the `limit` smallest ids are needed: select, then sort those.
        if found.len() > limit {
            found.select_nth_unstable_by_key(limit, |e| e.machine.id());
            found.truncate(limit);
        }
        found.sort_by_key(|e| e.machine.id());
        Listed {
            matching: found.into_iter().map(|e| e.machine.record()).collect(),
            present: known
                .into_iter()
                .filter(|id| self.txns.contains_key(id))
                .collect(),
        }
    }
}
