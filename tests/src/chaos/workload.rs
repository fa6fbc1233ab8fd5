//! The chaos suite's workload: workers that move money between accounts held by several
//! banks, as two-phase commits and as sagas, and remember what the client was told.
//! Every call has a time limit; a call that fails or runs out of time told the client
//! nothing.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use treaty_examples::bank;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome, TransactionState};
use treaty_sdk::{SagaStep, SubmitOptions, TreatyClient};

/// How long a worker waits for one call (a two-phase commit's Commit included).
const CALL_PATIENCE: Duration = Duration::from_secs(20);
/// How long it waits for a saga's outcome.
const SAGA_PATIENCE: Duration = Duration::from_secs(40);
/// Submits of one saga before the worker moves on (the audit asks again by key).
const SUBMIT_ATTEMPTS: u32 = 3;
/// A bound on one worker's transfers, whatever the duration.
const MAX_TRANSFERS_PER_WORKER: usize = 100_000;
/// The largest amount moved; accounts start with more, so most transfers can commit,
/// but some find too little and are refused.
pub const MAX_AMOUNT: i64 = 400;
/// How often a transfer credits an account that does not exist.
const CLOSED_ACCOUNT_RATE: f64 = 0.1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub bank: usize,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TwoPhase,
    Saga,
}

/// What the client learned of the outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Told {
    /// Committed (two-phase) or completed (saga).
    Committed,
    /// Aborted (two-phase) or compensated (saga).
    Aborted,
    Nothing,
}

/// One side of a transfer: a branch (saga step) at a bank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    pub bank: usize,
    pub branch_id: &'static str,
    pub account: String,
    pub amount: i64,
}

impl Leg {
    fn payload(&self, amount: i64) -> Vec<u8> {
        bank::Leg {
            account: &self.account,
            amount,
        }
        .payload()
    }
}

#[derive(Debug, Clone)]
pub struct Transfer {
    pub kind: Kind,
    /// The debit, then the credit.
    pub legs: [Leg; 2],
    /// `None` if the client never learned it (Begin failed; a saga never acknowledged).
    pub transaction_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub told: Told,
}

#[derive(Debug)]
pub struct Workload {
    pub seed: u64,
    pub coordinator: String,
    pub bank_endpoints: Vec<String>,
    pub accounts: Vec<Account>,
}

impl Workload {
    /// Transfers from worker `worker` until `stop` turns true.
    pub async fn run_worker(
        self: Arc<Self>,
        worker: usize,
        mut stop: watch::Receiver<bool>,
    ) -> Vec<Transfer> {
        let mut rng =
            StdRng::seed_from_u64(self.seed ^ (worker as u64 + 1).wrapping_mul(0x9e37_79b9));
        let client = TreatyClient::connect_lazy(self.coordinator.clone())
            .expect("the coordinator's endpoint is valid");
        let mut transfers = Vec::new();
        while !*stop.borrow() && transfers.len() < MAX_TRANSFERS_PER_WORKER {
            let legs = self.pick_legs(&mut rng);
            let transfer = if rng.random_bool(0.5) {
                self.two_phase(&client, legs).await
            } else {
                let key = format!("chaos-{}-w{worker}-{}", self.seed, transfers.len());
                self.saga(&client, legs, key, &mut stop).await
            };
            if transfer.told == Told::Nothing {
                // Something is down: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            transfers.push(transfer);
        }
        transfers
    }

    fn pick_legs(&self, rng: &mut StdRng) -> [Leg; 2] {
        let from = rng.random_range(0..self.accounts.len());
        let mut to = rng.random_range(0..self.accounts.len() - 1);
        if to >= from {
            to += 1;
        }
        let amount = rng.random_range(1..=MAX_AMOUNT);
        let leg = |account: &Account, branch_id, amount| Leg {
            bank: account.bank,
            branch_id,
            account: account.name.clone(),
            amount,
        };
        let mut credit = leg(&self.accounts[to], "credit", amount);
        if rng.random_bool(CLOSED_ACCOUNT_RATE) {
            // The bank refuses it: a saga then compensates its debit.
            credit.account = format!("closed{}", credit.account);
        }
        [leg(&self.accounts[from], "debit", -amount), credit]
    }

    async fn two_phase(&self, client: &TreatyClient, legs: [Leg; 2]) -> Transfer {
        let branches = legs
            .iter()
            .map(|leg| {
                BranchSpec::new(
                    leg.branch_id,
                    &self.bank_endpoints[leg.bank],
                    leg.payload(leg.amount),
                )
            })
            .collect();
        let mut transfer = Transfer {
            kind: Kind::TwoPhase,
            legs,
            transaction_id: None,
            idempotency_key: None,
            told: Told::Nothing,
        };
        let begun = tokio::time::timeout(
            CALL_PATIENCE,
            client.begin(BeginOptions::default(), branches),
        )
        .await;
        let Ok(Ok(id)) = begun else {
            return transfer;
        };
        transfer.transaction_id = Some(id.clone());
        transfer.told = match tokio::time::timeout(CALL_PATIENCE, client.commit(&id)).await {
            Ok(Ok(Outcome::Committed)) => Told::Committed,
            Ok(Ok(Outcome::Aborted { .. })) => Told::Aborted,
            _ => Told::Nothing,
        };
        transfer
    }

    async fn saga(
        &self,
        client: &TreatyClient,
        legs: [Leg; 2],
        key: String,
        stop: &mut watch::Receiver<bool>,
    ) -> Transfer {
        let mut transfer = Transfer {
            kind: Kind::Saga,
            legs,
            transaction_id: None,
            idempotency_key: Some(key),
            told: Told::Nothing,
        };
        for attempt in 0..SUBMIT_ATTEMPTS {
            if attempt > 0 {
                if *stop.borrow() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if let Some((id, told)) = self.submit(client, &transfer).await {
                transfer.transaction_id = Some(id);
                transfer.told = told;
                break;
            }
        }
        transfer
    }

    /// Submits (or, with the same key, finds) the transfer's saga and waits for its
    /// outcome; `None` if no answer came.
    pub async fn submit(
        &self,
        client: &TreatyClient,
        transfer: &Transfer,
    ) -> Option<(String, Told)> {
        let steps = transfer
            .legs
            .iter()
            .map(|leg| {
                let step = SagaStep::new(
                    leg.branch_id,
                    &self.bank_endpoints[leg.bank],
                    leg.payload(leg.amount),
                )
                .compensation(leg.payload(-leg.amount))
                .retry(10, 100, 1_000);
                if leg.branch_id == "credit" {
                    step.after(["debit"])
                } else {
                    step
                }
            })
            .collect();
        let options = SubmitOptions {
            idempotency_key: transfer.idempotency_key.clone(),
            wait_for_outcome: true,
        };
        let submitted = tokio::time::timeout(SAGA_PATIENCE, client.submit_saga(steps, options))
            .await
            .ok()?
            .ok()?;
        let told = match TransactionState::try_from(submitted.transaction.state) {
            Ok(TransactionState::Completed) => Told::Committed,
            Ok(TransactionState::Compensated) => Told::Aborted,
            _ => Told::Nothing,
        };
        Some((submitted.transaction_id, told))
    }
}
