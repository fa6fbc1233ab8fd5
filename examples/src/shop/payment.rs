//! The payment service: customer accounts and the shop's revenue.
//!
//! - step `charge`: prepare holds the amount if the customer's unheld balance covers it
//!   (else NO, "insufficient funds"); commit moves it from the customer to `revenue` and
//!   records `charge/<order>`.
//! - compensation `refund`: moves a recorded charge back and records `refund/<order>`.
//!
//! Money is conserved: balances + revenue = the initial balances, always.

use std::sync::Arc;

use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::{Charge, Faults, Hold, available, hold_key, parse};
use crate::ledger::{Changes, Ledger};

pub const REVENUE: &str = "revenue";

pub fn account_key(customer: &str) -> String {
    format!("acct/{customer}")
}

#[derive(Debug)]
pub struct Payment {
    ledger: Ledger,
    faults: Faults,
}

impl Payment {
    pub fn new(store: Arc<DurableStore>, faults: Faults) -> Self {
        Self {
            ledger: Ledger::new(store),
            faults,
        }
    }

    /// Opens the customers' accounts (and the revenue account) that do not exist yet.
    pub async fn open_accounts(&self, accounts: &[(String, i64)]) -> Result<(), ParticipantError> {
        let mut counters: Vec<(String, i64)> = accounts
            .iter()
            .map(|(customer, balance)| (account_key(customer), *balance))
            .collect();
        counters.push((account_key(REVENUE), 0));
        self.ledger.open_counters(&counters).await
    }

    async fn settle(&self, branch: &BranchContext, apply: bool) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        let _guard = self.ledger.lock().await;
        let Some(hold) = self.ledger.json::<Hold<Charge>>(&hold_key(branch))? else {
            return Ok(());
        };
        let mut changes = Changes::default();
        changes.remove(&hold_key(branch));
        if apply {
            let charge = hold.work;
            let customer = self.ledger.i64(&hold.counter)?.unwrap_or(0);
            let revenue = self.ledger.i64(&account_key(REVENUE))?.unwrap_or(0);
            changes.set_i64(&hold.counter, customer - charge.amount);
            changes.set_i64(&account_key(REVENUE), revenue + charge.amount);
            changes.put(&format!("charge/{}", charge.order), &charge);
        }
        self.ledger.apply(changes).await
    }
}

impl Participant for Payment {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        self.faults.enter().await?;
        let charge: Charge = match parse(payload) {
            Ok(charge) => charge,
            Err(reason) => return Ok(Vote::no(reason)),
        };
        let _guard = self.ledger.lock().await;
        let counter = account_key(&charge.customer);
        let Some(available) = available(&self.ledger, &counter)? else {
            return Ok(Vote::no(format!("no account for {}", charge.customer)));
        };
        if available < charge.amount {
            return Ok(Vote::no(format!(
                "insufficient funds: {} has {available}, needs {}",
                charge.customer, charge.amount
            )));
        }
        let mut changes = Changes::default();
        changes.put(
            &hold_key(branch),
            &Hold {
                counter,
                amount: charge.amount,
                work: charge,
            },
        );
        self.ledger.apply(changes).await?;
        Ok(Vote::Yes)
    }

    async fn commit(
        &self,
        branch: &BranchContext,
        _payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.settle(branch, true).await
    }

    async fn abort(&self, branch: &BranchContext, _payload: &[u8]) -> Result<(), ParticipantError> {
        self.settle(branch, false).await
    }

    async fn compensate(
        &self,
        _branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.faults.enter_compensation().await?;
        let refund: Charge = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        let charge_key = format!("charge/{}", refund.order);
        let refund_key = format!("refund/{}", refund.order);
        let Some(charge) = self.ledger.json::<Charge>(&charge_key)? else {
            return Ok(());
        };
        if self.ledger.json::<Charge>(&refund_key)?.is_some() {
            return Ok(());
        }
        let customer_key = account_key(&charge.customer);
        let customer = self.ledger.i64(&customer_key)?.unwrap_or(0);
        let revenue = self.ledger.i64(&account_key(REVENUE))?.unwrap_or(0);
        let mut changes = Changes::default();
        changes.set_i64(&customer_key, customer + charge.amount);
        changes.set_i64(&account_key(REVENUE), revenue - charge.amount);
        changes.put(&refund_key, &charge);
        self.ledger.apply(changes).await
    }
}
