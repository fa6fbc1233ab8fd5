//! The chaos suite's workload: workers that move money between accounts held by several
//! banks, as two-phase commits and as sagas, and remember what the client was told.
//! Every call has a time limit; a call that fails or runs out of time told the client
//! nothing.
//!
//! Half the transfers have a third leg at the rewards service (its data in SQLite): the
//! payer earns points, or now and then redeems some and may have too few, so rewards
//! votes NO or rejects its step and the other legs are aborted or compensated. One
//! transfer in five carries big payloads (a `memo` of padding the services ignore): 16
//! KiB per two-phase branch, the most a branch may carry, kept in the participant's
//! barrier record while it is prepared; and a saga's steps share its 48 KiB budget,
//! logged with its definition by the coordinator. Values that size make sled write blob
//! files, so that path is killed with SIGKILL too.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use treaty_examples::{bank, rewards};
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome, TransactionState};
use treaty_sdk::limits::{MAX_PAYLOAD_BYTES, MAX_SAGA_PAYLOAD_BYTES};
use treaty_sdk::{SagaStep, SubmitOptions, TreatyClient};

use super::cluster::Service;

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
/// How often a transfer has a leg at the rewards service.
const REWARDS_RATE: f64 = 0.5;
/// How often that leg redeems points rather than earning them.
const REDEMPTION_RATE: f64 = 0.2;
/// The most points redeemed at once (members start with
/// [`super::ChaosConfig::initial_points`]).
const MAX_REDEMPTION: i64 = 60;
/// How often a transfer carries big payloads.
const BIG_PAYLOAD_RATE: f64 = 0.2;

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

/// One side of a transfer: a branch (saga step) at a participant — money on an account
/// at a bank, or points of a member (named as the account) at rewards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leg {
    pub service: Service,
    pub branch_id: &'static str,
    pub account: String,
    pub amount: i64,
}

impl Leg {
    /// What the participant is sent to apply `amount`: the leg, or (negated) its undo.
    fn payload(&self, amount: i64) -> Vec<u8> {
        match self.service {
            Service::Bank(_) => bank::Leg {
                account: &self.account,
                amount,
            }
            .payload(),
            Service::Rewards => rewards::PointsLeg {
                member: &self.account,
                points: amount,
            }
            .payload(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Transfer {
    pub kind: Kind,
    /// The debit, the credit and perhaps the payer's points at rewards. Branch ids are
    /// unique within a transfer.
    pub legs: Vec<Leg>,
    /// Whether its forward payloads are padded to the limit (see the module docs).
    pub big: bool,
    /// `None` if the client never learned it (Begin failed; a saga never acknowledged).
    pub transaction_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub told: Told,
}

impl Transfer {
    /// The forward payloads, one per leg: padded to 16 KiB each for a big two-phase
    /// transfer; for a big saga, to an equal share of what its compensation payloads
    /// leave of the saga budget.
    pub fn payloads(&self) -> Vec<Vec<u8>> {
        let plain: Vec<Vec<u8>> = self
            .legs
            .iter()
            .map(|leg| leg.payload(leg.amount))
            .collect();
        if !self.big {
            return plain;
        }
        let size = match self.kind {
            Kind::TwoPhase => MAX_PAYLOAD_BYTES,
            Kind::Saga => {
                let undo: usize = self.compensations().iter().map(Vec::len).sum();
                let share = MAX_SAGA_PAYLOAD_BYTES.saturating_sub(undo) / self.legs.len();
                share.min(MAX_PAYLOAD_BYTES)
            }
        };
        plain
            .into_iter()
            .map(|payload| padded(payload, size))
            .collect()
    }

    /// The compensation payloads (sagas), one per leg: the opposite leg.
    pub fn compensations(&self) -> Vec<Vec<u8>> {
        self.legs
            .iter()
            .map(|leg| leg.payload(-leg.amount))
            .collect()
    }

    /// The leg at `service` with `branch_id`, if the transfer has one.
    pub fn leg(&self, service: Service, branch_id: &str) -> Option<&Leg> {
        self.legs
            .iter()
            .find(|leg| leg.service == service && leg.branch_id == branch_id)
    }
}

/// `payload` (a JSON object) with a `"memo"` of padding that makes it `size` bytes
/// long, or unchanged if it would not fit.
pub fn padded(mut payload: Vec<u8>, size: usize) -> Vec<u8> {
    const OPEN: &[u8] = br#","memo":""#;
    const CLOSE: &[u8] = br#""}"#;
    if payload.last() != Some(&b'}') {
        return payload;
    }
    let Some(room) = size.checked_sub(payload.len() - 1 + OPEN.len() + CLOSE.len()) else {
        return payload;
    };
    payload.pop();
    payload.extend_from_slice(OPEN);
    payload.resize(payload.len() + room, b'.');
    payload.extend_from_slice(CLOSE);
    payload
}

#[derive(Debug)]
pub struct Workload {
    pub seed: u64,
    pub coordinator: String,
    pub bank_endpoints: Vec<String>,
    pub rewards_endpoint: String,
    pub accounts: Vec<Account>,
}

impl Workload {
    fn endpoint(&self, service: Service) -> &str {
        match service {
            Service::Bank(i) => &self.bank_endpoints[i],
            Service::Rewards => &self.rewards_endpoint,
        }
    }
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
            let big = rng.random_bool(BIG_PAYLOAD_RATE);
            let transfer = if rng.random_bool(0.5) {
                self.two_phase(&client, legs, big).await
            } else {
                let key = format!("chaos-{}-w{worker}-{}", self.seed, transfers.len());
                self.saga(&client, legs, big, key, &mut stop).await
            };
            if transfer.told == Told::Nothing {
                // Something is down: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            transfers.push(transfer);
        }
        transfers
    }

    fn pick_legs(&self, rng: &mut StdRng) -> Vec<Leg> {
        let from = rng.random_range(0..self.accounts.len());
        let mut to = rng.random_range(0..self.accounts.len() - 1);
        if to >= from {
            to += 1;
        }
        let amount = rng.random_range(1..=MAX_AMOUNT);
        let leg = |account: &Account, branch_id, amount| Leg {
            service: Service::Bank(account.bank),
            branch_id,
            account: account.name.clone(),
            amount,
        };
        let mut credit = leg(&self.accounts[to], "credit", amount);
        if rng.random_bool(CLOSED_ACCOUNT_RATE) {
            // The bank refuses it: a saga then compensates its debit.
            credit.account = format!("closed{}", credit.account);
        }
        let mut legs = vec![leg(&self.accounts[from], "debit", -amount), credit];
        if rng.random_bool(REWARDS_RATE) {
            // A redemption may find too few points: rewards refuses it.
            let points = if rng.random_bool(REDEMPTION_RATE) {
                -rng.random_range(1..=MAX_REDEMPTION)
            } else {
                amount / 10 + 1
            };
            legs.push(Leg {
                service: Service::Rewards,
                branch_id: "points",
                account: self.accounts[from].name.clone(),
                amount: points,
            });
        }
        legs
    }

    async fn two_phase(&self, client: &TreatyClient, legs: Vec<Leg>, big: bool) -> Transfer {
        let mut transfer = Transfer {
            kind: Kind::TwoPhase,
            legs,
            big,
            transaction_id: None,
            idempotency_key: None,
            told: Told::Nothing,
        };
        let branches = transfer
            .legs
            .iter()
            .zip(transfer.payloads())
            .map(|(leg, payload)| {
                BranchSpec::new(leg.branch_id, self.endpoint(leg.service), payload)
            })
            .collect();
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
        legs: Vec<Leg>,
        big: bool,
        key: String,
        stop: &mut watch::Receiver<bool>,
    ) -> Transfer {
        let mut transfer = Transfer {
            kind: Kind::Saga,
            legs,
            big,
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
    /// outcome; `None` if no answer came. The debit runs first; the credit and the points
    /// after it, side by side (so a refused redemption compensates a credit).
    pub async fn submit(
        &self,
        client: &TreatyClient,
        transfer: &Transfer,
    ) -> Option<(String, Told)> {
        let steps = transfer
            .legs
            .iter()
            .zip(transfer.payloads())
            .zip(transfer.compensations())
            .map(|((leg, payload), compensation)| {
                let step = SagaStep::new(leg.branch_id, self.endpoint(leg.service), payload)
                    .compensation(compensation)
                    .retry(10, 100, 1_000);
                if leg.branch_id == "debit" {
                    step
                } else {
                    step.after(["debit"])
                }
            })
            .collect();
        let options = SubmitOptions {
            idempotency_key: transfer.idempotency_key.clone(),
            wait_for_outcome: true,
            ..SubmitOptions::default()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn transfer(kind: Kind, with_points: bool) -> Transfer {
        let leg = |service, branch_id, amount| Leg {
            service,
            branch_id,
            account: "acct0x1".into(),
            amount,
        };
        let mut legs = vec![
            leg(Service::Bank(0), "debit", -400),
            leg(Service::Bank(1), "credit", 400),
        ];
        if with_points {
            legs.push(leg(Service::Rewards, "points", -60));
        }
        Transfer {
            kind,
            legs,
            big: true,
            transaction_id: None,
            idempotency_key: None,
            told: Told::Nothing,
        }
    }

    #[test]
    fn padding_keeps_the_leg_and_reaches_the_size() {
        let payload = padded(br#"{"account":"a","amount":-3}"#.to_vec(), 100);
        assert_eq!(payload.len(), 100);
        let leg: bank::Leg = serde_json::from_slice(&payload).unwrap();
        assert_eq!((leg.account, leg.amount), ("a", -3));
        let short = br#"{"account":"a","amount":-3}"#.to_vec();
        assert_eq!(padded(short.clone(), 10), short);
    }

    #[test]
    fn big_payloads_fill_the_limits_without_passing_them() {
        for with_points in [false, true] {
            let two_phase = transfer(Kind::TwoPhase, with_points);
            assert!(
                two_phase
                    .payloads()
                    .iter()
                    .all(|p| p.len() == MAX_PAYLOAD_BYTES)
            );
            let saga = transfer(Kind::Saga, with_points);
            let forward: Vec<usize> = saga.payloads().iter().map(Vec::len).collect();
            let total: usize = forward.iter().sum::<usize>()
                + saga.compensations().iter().map(Vec::len).sum::<usize>();
            assert!(total <= MAX_SAGA_PAYLOAD_BYTES, "{total}");
            // Big enough for sled to write blobs (values of ~7.5 KiB and up).
            assert!(forward.iter().all(|&len| len >= 15 * 1024), "{forward:?}");
        }
    }
}
