//! The payment service: customer accounts and the shop's revenue.
//!
//! - step `charge`: prepare holds the amount if the customer's unheld balance covers it
//!   (else NO, "insufficient funds"; an order is charged at most once); commit moves it
//!   from the customer to `revenue` and records `charge/<order>` with the branch that
//!   charged it.
//! - compensation `refund`: moves a charge made by this branch back and records
//!   `refund/<order>`. An abort (a step compensated while still prepared) releases the
//!   hold, and refunds a charge made by this branch if there is one: it cannot be, as
//!   every change is committed with the barrier's record of it, but the undo does not
//!   rely on that.
//!
//! Money is conserved: balances + revenue = the initial balances, and revenue = the
//! unrefunded charges.

use std::sync::Arc;

use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::{
    Applied, Charge, Faults, Hold, available, hold_key, holds_already, parse, prune_orders,
};
use crate::ledger::{Changes, Ledger, Pass};
use crate::retention::{Prune, PruneRound};

pub const REVENUE: &str = "revenue";

pub fn account_key(customer: &str) -> String {
    format!("acct/{customer}")
}

const CHARGES: &str = "charge/";
const REFUNDS: &str = "refund/";

fn charge_key(order: &str) -> String {
    format!("{CHARGES}{order}")
}

fn refund_key(order: &str) -> String {
    format!("{REFUNDS}{order}")
}

/// The counter under `settled/` that sums a customer's pruned, unrefunded charges.
pub fn settled_charges_counter(customer: &str) -> String {
    format!("charged/{customer}")
}

#[derive(Debug)]
pub struct Payment {
    ledger: Ledger,
    faults: Faults,
    prune_pass: Pass,
}

impl Payment {
    pub fn new(store: Arc<DurableStore>, faults: Faults) -> Self {
        Self {
            ledger: Ledger::new(store),
            faults,
            prune_pass: Pass::default(),
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

    /// Applies the branch's hold: the charge. Call with the ledger lock held.
    fn apply_hold(
        &self,
        branch: &BranchContext,
        changes: &mut Changes,
    ) -> Result<(), ParticipantError> {
        let Some(hold) = self.ledger.json::<Hold<Charge>>(&hold_key(branch))? else {
            return Ok(());
        };
        changes.remove(&hold_key(branch));
        let customer = self.ledger.i64(&hold.counter)?.unwrap_or(0);
        let revenue = self.ledger.i64(&account_key(REVENUE))?.unwrap_or(0);
        changes.set_i64(&hold.counter, customer - hold.amount);
        changes.set_i64(&account_key(REVENUE), revenue + hold.amount);
        changes.put(
            &charge_key(&hold.work.order),
            &Applied::new(branch, hold.work),
        );
        Ok(())
    }

    /// Refunds the charge this branch made for `order`, once. Call with the lock held.
    fn refund(
        &self,
        branch: &BranchContext,
        order: &str,
        changes: &mut Changes,
    ) -> Result<(), ParticipantError> {
        let Some(charge) = self.ledger.json::<Applied<Charge>>(&charge_key(order))? else {
            return Ok(());
        };
        if !charge.by(branch) || self.ledger.json::<Charge>(&refund_key(order))?.is_some() {
            return Ok(());
        }
        let customer_key = account_key(&charge.work.customer);
        let customer = self.ledger.i64(&customer_key)?.unwrap_or(0);
        let revenue = self.ledger.i64(&account_key(REVENUE))?.unwrap_or(0);
        changes.set_i64(&customer_key, customer + charge.work.amount);
        changes.set_i64(&account_key(REVENUE), revenue - charge.work.amount);
        changes.put(&refund_key(order), &charge.work);
        Ok(())
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
        if holds_already(&self.ledger, branch)? {
            return Ok(Vote::Yes);
        }
        if self
            .ledger
            .json::<serde_json::Value>(&charge_key(&charge.order))?
            .is_some()
        {
            return Ok(Vote::no(format!(
                "order {} was already charged",
                charge.order
            )));
        }
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
        self.ledger.apply_with(branch, changes).await?;
        Ok(Vote::Yes)
    }

    async fn commit(
        &self,
        branch: &BranchContext,
        _payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        let _guard = self.ledger.lock().await;
        let mut changes = Changes::default();
        self.apply_hold(branch, &mut changes)?;
        self.ledger.apply_with(branch, changes).await
    }

    async fn abort(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        let charge: Charge = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        let mut changes = Changes::default();
        changes.remove(&hold_key(branch));
        self.refund(branch, &charge.order, &mut changes)?;
        self.ledger.apply_with(branch, changes).await
    }

    async fn compensate(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.faults.enter_compensation().await?;
        let refund: Charge = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        let mut changes = Changes::default();
        self.refund(branch, &refund.order, &mut changes)?;
        self.ledger.apply_with(branch, changes).await
    }
}

impl Prune for Payment {
    /// Prunes old charges with their refunds, adding each unrefunded one to its
    /// customer's `settled/charged/<customer>`.
    async fn prune_round(
        &self,
        cutoff_unix_ms: u64,
        limit: usize,
    ) -> Result<PruneRound, ParticipantError> {
        let settle = |charge: &Charge, refunded: bool| {
            (!refunded).then(|| (settled_charges_counter(&charge.customer), charge.amount))
        };
        let prefixes = (CHARGES, REFUNDS);
        prune_orders(
            &self.ledger,
            &self.prune_pass,
            prefixes,
            cutoff_unix_ms,
            limit,
            settle,
        )
        .await
    }
}
