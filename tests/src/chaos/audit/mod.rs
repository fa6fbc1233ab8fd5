//! The chaos suite's audit: once the chaos stopped and every process runs clean, waits
//! (bounded) for every transaction to finish and every participant to settle, stops the
//! cluster, reads what each participant kept in its own store ([`evidence`]) and checks
//! the invariants of issue 4 against it, one per file:
//!
//! - [`coordinator`]: every transaction finished, none stuck, no saga key used twice;
//! - [`records_agree`]: a leg's barrier record says committed iff its transaction did;
//! - [`client_told`]: what the client was told is the outcome;
//! - [`unanimous_votes`]: a two-phase transfer applied anywhere was voted YES everywhere;
//! - [`exactly_once`]: no leg held, applied, released or compensated twice, or out of order;
//! - [`effects_follow_outcomes`]: a leg's effect stands iff its transaction committed
//!   (a compensated saga: never applied, or applied then compensated);
//! - [`provenance`]: every effect is a leg of a transfer the client started;
//! - [`memos_intact`]: a bank kept each applied leg's memo (big values, in sled's blob
//!   files) byte for byte;
//! - [`journal_balances`] and [`outcome_balances`]: each balance (money or points) is its
//!   first value plus the journal's effects, and plus the committed legs;
//! - [`conservation`]: the banks' money, all accounts together, is unchanged.
//!
//! Banks (sled) and rewards (SQLite) are checked alike.

pub mod client_told;
pub mod conservation;
pub mod coordinator;
pub mod effects_follow_outcomes;
pub mod evidence;
pub mod exactly_once;
pub mod journal_balances;
pub mod memos_intact;
pub mod outcome_balances;
pub mod provenance;
pub mod records_agree;
pub mod unanimous_votes;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use treaty_sdk::TreatyClient;
use treaty_sdk::client::TransactionState;

use super::cluster::{Cluster, Role, Service};
use super::workload::{Kind, Transfer, Workload};
use evidence::{Evidence, Finals};

/// How long the audit waits for everything to finish after the chaos.
const SETTLE_PATIENCE: Duration = Duration::from_secs(120);
/// Most violations kept (the first ones tell the story).
const MAX_VIOLATIONS: usize = 200;

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
    /// Checked transfers with a leg at rewards, and how many of them committed.
    pub with_points: usize,
    pub with_points_committed: usize,
    /// Checked transfers with big payloads, and how many of them committed.
    pub big: usize,
    pub big_committed: usize,
    /// Memos of big transfers found intact at the banks.
    pub memos_intact: usize,
    /// Journal entries read, from the banks and from rewards.
    pub bank_journal_entries: usize,
    pub rewards_journal_entries: usize,
}

/// The violations found, in order (at most [`MAX_VIOLATIONS`]).
#[derive(Debug, Default)]
pub struct Violations(Vec<String>);

impl Violations {
    pub fn add(&mut self, message: String) {
        if self.0.len() < MAX_VIOLATIONS {
            self.0.push(message);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug)]
pub struct Audit<'a> {
    pub cluster: &'a mut Cluster,
    pub workload: &'a Workload,
    /// What each participant opened with: accounts' balances, members' points.
    pub initial: BTreeMap<Service, BTreeMap<String, i64>>,
    violations: Violations,
    tally: Tally,
}

impl<'a> Audit<'a> {
    pub fn new(
        cluster: &'a mut Cluster,
        workload: &'a Workload,
        initial: BTreeMap<Service, BTreeMap<String, i64>>,
    ) -> Self {
        Self {
            cluster,
            workload,
            initial,
            violations: Violations::default(),
            tally: Tally::default(),
        }
    }

    /// Runs every check; returns the tally, or every violation found.
    pub async fn run(mut self, transfers: &mut [Transfer]) -> Result<Tally, Vec<String>> {
        let client = TreatyClient::connect(self.cluster.endpoint(Role::Coordinator))
            .await
            .expect("connect to the coordinator after the chaos");
        self.learn_unanswered_sagas(&client, transfers).await;
        let finals = self.wait_until_finished(&client, transfers).await;
        coordinator::check(&client, &mut self.violations).await;
        self.wait_until_no_participant_is_in_doubt().await;
        self.cluster.stop_all().await;

        let evidence = Evidence::read(
            self.cluster,
            &self.initial,
            transfers,
            &finals,
            &mut self.tally,
            &mut self.violations,
        );
        let v = &mut self.violations;
        records_agree::check(&evidence, v);
        client_told::check(&evidence, v);
        unanimous_votes::check(&evidence, v);
        exactly_once::check(&evidence, v);
        effects_follow_outcomes::check(&evidence, v);
        provenance::check(&evidence, v);
        self.tally.memos_intact = memos_intact::check(&evidence, v);
        journal_balances::check(&evidence, v);
        outcome_balances::check(&evidence, v);
        conservation::check(&evidence, v);
        if self.violations.is_empty() {
            Ok(self.tally)
        } else {
            Err(self.violations.0)
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
                self.violations
                    .add(format!("saga {key}: no answer to a submit after the chaos"));
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
                        Ok(state) if coordinator::is_final(state) => {
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
                    self.violations.add(format!(
                        "{txn}: not finished {SETTLE_PATIENCE:?} after the chaos"
                    ));
                }
                return finals;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Participants resolve their in-doubt branches by asking the coordinator. Stops
    /// each to look into its store (sled is single-process; SQLite is read when the
    /// service is down, as after a crash) and starts it again while it still has a
    /// branch in doubt or a hold open, for at most SETTLE_PATIENCE.
    async fn wait_until_no_participant_is_in_doubt(&mut self) {
        let started = Instant::now();
        for service in self.cluster.services() {
            let role = Role::Participant(service);
            loop {
                self.cluster.stop(role).await;
                let (in_doubt, holds) = evidence::unsettled(service, self.cluster.data_dir(role));
                if in_doubt == 0 && holds == 0 {
                    self.cluster.start_clean(role).await;
                    break;
                }
                if started.elapsed() > SETTLE_PATIENCE {
                    self.violations.add(format!(
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
}
