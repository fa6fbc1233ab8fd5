//! The chaos suite's audit: once the chaos stopped and every process runs clean, waits
//! (bounded) for every transaction to finish, then checks the invariants of issue 4
//! against what the client was told, the coordinator's answers, each bank's barrier
//! records, its journal of effects and its balances.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use treaty_examples::bank::{self, Effect, JournalEntry};
use treaty_sdk::barrier::{Barrier, BranchStatus};
use treaty_sdk::client::TransactionState;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, TreatyClient};

use super::cluster::{Cluster, Role};
use super::workload::{Kind, Told, Transfer, Workload};

/// How long the audit waits for everything to finish after the chaos.
const SETTLE_PATIENCE: Duration = Duration::from_secs(120);
/// Most pages of ListTransactions read.
const MAX_PAGES: usize = 10_000;

/// What the audit counted.
#[derive(Debug, Default)]
pub struct Tally {
    pub transactions_checked: usize,
    pub committed: usize,
    pub aborted: usize,
    pub completed: usize,
    pub compensated: usize,
    /// Two-phase commits whose Begin never answered (nothing to check: no id).
    pub never_begun: usize,
    pub told_nothing: usize,
    pub journal_entries: usize,
}

#[derive(Debug)]
pub struct Audit<'a> {
    pub cluster: &'a mut Cluster,
    pub workload: &'a Workload,
    pub initial_balances: BTreeMap<(usize, String), i64>,
    violations: Vec<String>,
    tally: Tally,
}

/// The final state of a transaction at the coordinator; `None`: it does not know it
/// (a two-phase commit forgotten before its decision: presumed abort).
type Finals = HashMap<String, Option<TransactionState>>;

impl<'a> Audit<'a> {
    pub fn new(
        cluster: &'a mut Cluster,
        workload: &'a Workload,
        initial_balances: BTreeMap<(usize, String), i64>,
    ) -> Self {
        Self {
            cluster,
            workload,
            initial_balances,
            violations: Vec::new(),
            tally: Tally::default(),
        }
    }

    fn violation(&mut self, message: String) {
        if self.violations.len() < 200 {
            self.violations.push(message);
        }
    }

    /// Runs every check; returns the tally, or every violation found.
    pub async fn run(mut self, transfers: &mut [Transfer]) -> Result<Tally, Vec<String>> {
        let client = TreatyClient::connect(self.cluster.endpoint(Role::Coordinator))
            .await
            .expect("connect to the coordinator after the chaos");
        self.learn_unanswered_sagas(&client, transfers).await;
        let finals = self.wait_until_finished(&client, transfers).await;
        self.check_the_coordinator(&client).await;
        self.wait_until_no_bank_is_in_doubt().await;
        self.cluster.stop_all().await;
        let banks = self.open_banks();
        self.check_transfers(transfers, &finals, &banks);
        self.check_journals(transfers, &banks);
        if self.violations.is_empty() {
            Ok(self.tally)
        } else {
            Err(self.violations)
        }
    }

    /// Sagas whose submit never answered: submitting again with the same key finds the
    /// saga if it was accepted (and runs it if it was not).
    async fn learn_unanswered_sagas(&mut self, client: &TreatyClient, transfers: &mut [Transfer]) {
        for transfer in transfers.iter_mut() {
            if transfer.kind != Kind::Saga || transfer.transaction_id.is_some() {
                continue;
            }
            for _ in 0..3 {
                if let Some((id, _)) = self.workload.submit(client, transfer).await {
                    transfer.transaction_id = Some(id);
                    break;
                }
            }
            if transfer.transaction_id.is_none() {
                let key = transfer.idempotency_key.clone().unwrap_or_default();
                self.violation(format!("saga {key}: no answer to a submit after the chaos"));
            }
        }
    }

    /// Polls the coordinator until every known transaction is final (or unknown), for at
    /// most SETTLE_PATIENCE; returns the final states.
    async fn wait_until_finished(
        &mut self,
        client: &TreatyClient,
        transfers: &[Transfer],
    ) -> Finals {
        let started = Instant::now();
        let mut finals = Finals::new();
        let ids: Vec<String> = transfers
            .iter()
            .filter_map(|t| t.transaction_id.clone())
            .collect();
        loop {
            let mut unfinished = Vec::new();
            for id in &ids {
                if finals.contains_key(id) {
                    continue;
                }
                match client.get(id).await {
                    Ok(None) => {
                        finals.insert(id.clone(), None);
                    }
                    Ok(Some(txn)) => match TransactionState::try_from(txn.state) {
                        Ok(
                            state @ (TransactionState::Committed
                            | TransactionState::Aborted
                            | TransactionState::Completed
                            | TransactionState::Compensated),
                        ) => {
                            finals.insert(id.clone(), Some(state));
                        }
                        _ => unfinished.push(format!("{id} ({:?})", txn.state)),
                    },
                    Err(error) => unfinished.push(format!("{id} (asking failed: {error})")),
                }
            }
            if unfinished.is_empty() {
                return finals;
            }
            if started.elapsed() > SETTLE_PATIENCE {
                for txn in unfinished {
                    self.violation(format!(
                        "{txn}: not finished {SETTLE_PATIENCE:?} after the chaos"
                    ));
                }
                return finals;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Every transaction the coordinator knows (also those the client never learned of)
    /// is final and not stuck; no two sagas share an idempotency key.
    async fn check_the_coordinator(&mut self, client: &TreatyClient) {
        let mut keys: HashMap<String, String> = HashMap::new();
        let mut token = String::new();
        for _ in 0..MAX_PAGES {
            let (page, next) = match client.list(&[], 1_000, &token).await {
                Ok(answer) => answer,
                Err(error) => {
                    self.violation(format!("listing transactions failed: {error}"));
                    return;
                }
            };
            for txn in page {
                let state = TransactionState::try_from(txn.state);
                let finished = matches!(
                    state,
                    Ok(TransactionState::Committed
                        | TransactionState::Aborted
                        | TransactionState::Completed
                        | TransactionState::Compensated)
                );
                if !finished || txn.stuck {
                    self.violation(format!(
                        "{}: {state:?}, stuck {} after the chaos",
                        txn.transaction_id, txn.stuck
                    ));
                }
                if !txn.idempotency_key.is_empty() {
                    if let Some(other) =
                        keys.insert(txn.idempotency_key.clone(), txn.transaction_id.clone())
                    {
                        self.violation(format!(
                            "sagas {other} and {} share the key {}",
                            txn.transaction_id, txn.idempotency_key
                        ));
                    }
                }
            }
            match next {
                Some(next) => token = next,
                None => return,
            }
        }
        self.violation(format!("more than {MAX_PAGES} pages of transactions"));
    }

    /// Banks resolve their in-doubt branches by asking the coordinator. Stops each bank
    /// to look into its store (sled is single-process) and starts it again while it still
    /// has a branch in doubt or a hold open, for at most SETTLE_PATIENCE.
    async fn wait_until_no_bank_is_in_doubt(&mut self) {
        let started = Instant::now();
        let banks: Vec<Role> = self
            .cluster
            .roles()
            .into_iter()
            .filter(|r| *r != Role::Coordinator)
            .collect();
        for role in banks {
            loop {
                self.cluster.stop(role).await;
                let (in_doubt, holds) = {
                    let store = open_store(self.cluster.data_dir(role));
                    let in_doubt = Barrier::new(store.clone())
                        .in_doubt(usize::MAX)
                        .expect("read the in-doubt branches");
                    (in_doubt.len(), bank::open_holds(&store))
                };
                if in_doubt == 0 && holds == 0 {
                    self.cluster.start_clean(role).await;
                    break;
                }
                if started.elapsed() > SETTLE_PATIENCE {
                    self.violation(format!(
                        "{role}: {in_doubt} branches in doubt and {holds} holds open \
                         {SETTLE_PATIENCE:?} after the chaos"
                    ));
                    self.cluster.start_clean(role).await;
                    break;
                }
                self.cluster.start_clean(role).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }

    fn open_banks(&self) -> Vec<Arc<DurableStore>> {
        self.cluster
            .roles()
            .into_iter()
            .filter(|r| *r != Role::Coordinator)
            .map(|role| open_store(self.cluster.data_dir(role)))
            .collect()
    }

    /// Agreement, irreversibility and validity, transaction by transaction.
    fn check_transfers(
        &mut self,
        transfers: &[Transfer],
        finals: &Finals,
        banks: &[Arc<DurableStore>],
    ) {
        let barriers: Vec<Barrier> = banks.iter().map(|s| Barrier::new(s.clone())).collect();
        for transfer in transfers {
            let Some(id) = &transfer.transaction_id else {
                if transfer.kind == Kind::TwoPhase {
                    self.tally.never_begun += 1;
                }
                continue;
            };
            let Some(state) = finals.get(id) else {
                continue; // reported as not finished
            };
            self.tally.transactions_checked += 1;
            if transfer.told == Told::Nothing {
                self.tally.told_nothing += 1;
            }
            let statuses: Vec<Option<BranchStatus>> = transfer
                .legs
                .iter()
                .map(|leg| {
                    barriers[leg.bank]
                        .record(&BranchContext::new(id.clone(), leg.branch_id))
                        .expect("read a barrier record")
                        .map(|record| record.status)
                })
                .collect();
            let applied = |status: &Option<BranchStatus>| status == &Some(BranchStatus::Committed);
            let outcome_committed = match (transfer.kind, state) {
                (Kind::TwoPhase, Some(TransactionState::Committed)) => {
                    self.tally.committed += 1;
                    true
                }
                (Kind::TwoPhase, Some(TransactionState::Aborted) | None) => {
                    self.tally.aborted += 1;
                    false
                }
                (Kind::Saga, Some(TransactionState::Completed)) => {
                    self.tally.completed += 1;
                    true
                }
                (Kind::Saga, Some(TransactionState::Compensated)) => {
                    self.tally.compensated += 1;
                    false
                }
                (kind, state) => {
                    self.violation(format!("{id}: a {kind:?} ended {state:?}"));
                    continue;
                }
            };
            if outcome_committed && !statuses.iter().all(applied) {
                self.violation(format!(
                    "{id}: {state:?} at the coordinator, but the banks hold {statuses:?}"
                ));
            }
            if !outcome_committed && statuses.iter().any(applied) {
                self.violation(format!(
                    "{id}: {state:?} at the coordinator, but a bank still has it applied: \
                     {statuses:?}"
                ));
            }
            if statuses.contains(&Some(BranchStatus::Prepared)) {
                self.violation(format!("{id}: a branch is still prepared: {statuses:?}"));
            }
            let told_right = match transfer.told {
                Told::Committed => outcome_committed,
                Told::Aborted => !outcome_committed,
                Told::Nothing => true,
            };
            if !told_right {
                self.violation(format!(
                    "{id}: the client was told {:?}, the outcome is {state:?}",
                    transfer.told
                ));
            }
        }
    }

    /// Exactly-once effects, from each bank's journal: no leg held, applied, released or
    /// compensated twice; nothing applied without its hold (a YES vote), nothing
    /// compensated without its forward step; a committed two-phase transfer was voted YES
    /// at every leg; balances are what the journal adds up to, and their sum is unchanged.
    fn check_journals(&mut self, transfers: &[Transfer], banks: &[Arc<DurableStore>]) {
        let mut effects: HashMap<(usize, String, String), Vec<Effect>> = HashMap::new();
        for (bank_index, store) in banks.iter().enumerate() {
            let journal = bank::journal(store).expect("read a bank's journal");
            self.tally.journal_entries += journal.len();
            let mut expected: BTreeMap<String, i64> = self
                .initial_balances
                .iter()
                .filter(|((bank, _), _)| *bank == bank_index)
                .map(|((_, account), balance)| (account.clone(), *balance))
                .collect();
            for JournalEntry {
                transaction_id,
                branch_id,
                effect,
                account,
                amount,
            } in journal
            {
                if matches!(effect, Effect::Commit | Effect::Compensate) {
                    *expected.entry(account.clone()).or_default() += amount;
                }
                let seen = effects
                    .entry((bank_index, transaction_id.clone(), branch_id.clone()))
                    .or_default();
                let first_of_kind = !seen.contains(&effect);
                let in_order = match effect {
                    Effect::Hold => seen.is_empty(),
                    Effect::Commit | Effect::Release => {
                        seen.contains(&Effect::Hold)
                            && !seen.contains(&Effect::Commit)
                            && !seen.contains(&Effect::Release)
                    }
                    Effect::Compensate => seen.contains(&Effect::Commit),
                };
                seen.push(effect);
                if !first_of_kind || !in_order {
                    let seen = seen.clone();
                    self.violation(format!(
                        "bank{bank_index}: {transaction_id}/{branch_id}: effects {seen:?}"
                    ));
                }
            }
            let balances = bank::balances(store).expect("read a bank's balances");
            if balances != expected {
                self.violation(format!(
                    "bank{bank_index}: balances {balances:?}, but the journal adds up to \
                     {expected:?}"
                ));
            }
        }
        let initial: i64 = self.initial_balances.values().sum();
        let total: i64 = banks
            .iter()
            .map(|store| {
                bank::balances(store)
                    .expect("read a bank's balances")
                    .values()
                    .sum::<i64>()
            })
            .sum();
        if total != initial {
            self.violation(format!(
                "money was created or lost: {initial} before, {total} after"
            ));
        }
        // A committed two-phase transfer has a YES (a hold) at every leg; every effect
        // belongs to a transfer the client started.
        let mut legs_of: HashMap<&str, &Transfer> = HashMap::new();
        for transfer in transfers {
            if let Some(id) = &transfer.transaction_id {
                legs_of.insert(id.as_str(), transfer);
            }
        }
        for (bank, id, branch) in effects.keys() {
            let known = legs_of.get(id.as_str()).is_some_and(|t| {
                t.legs
                    .iter()
                    .any(|leg| leg.bank == *bank && leg.branch_id == branch)
            });
            if !known {
                self.violation(format!(
                    "bank{bank}: effects for {id}/{branch}, which no transfer has"
                ));
            }
        }
        for transfer in transfers {
            let (Kind::TwoPhase, Some(id)) = (transfer.kind, &transfer.transaction_id) else {
                continue;
            };
            let effects_of = |leg: &super::workload::Leg| {
                effects
                    .get(&(leg.bank, id.clone(), leg.branch_id.to_string()))
                    .cloned()
                    .unwrap_or_default()
            };
            let committed_somewhere = transfer
                .legs
                .iter()
                .any(|leg| effects_of(leg).contains(&Effect::Commit));
            let voted_everywhere = transfer
                .legs
                .iter()
                .all(|leg| effects_of(leg).contains(&Effect::Hold));
            if committed_somewhere && !voted_everywhere {
                self.violation(format!("{id}: committed without a YES from every leg"));
            }
        }
    }
}

fn open_store(dir: &std::path::Path) -> Arc<DurableStore> {
    Arc::new(
        DurableStore::open(dir, Default::default())
            .unwrap_or_else(|e| panic!("open the store in {}: {e}", dir.display())),
    )
}
