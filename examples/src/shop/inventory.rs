//! The inventory service: stock per SKU.
//!
//! - step `reserve`: prepare holds the quantity if the unheld stock covers it (else NO,
//!   "out of stock"; also, with `out_of_stock_rate`, for no reason at all; an order is
//!   reserved at most once); commit takes it from the stock and records
//!   `reservation/<order>` with the branch that made it.
//! - compensation `release`: puts a reservation made by this branch back and records
//!   `release/<order>`. An abort releases the hold and such a reservation, if any.
//!
//! Stock is conserved: stock + unreleased reservations = the initial stock, per SKU.

use std::sync::Arc;

use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::{
    Applied, Faults, Hold, Reservation, available, hold_key, holds_already, parse, prune_orders,
};
use crate::ledger::{Changes, Ledger, Pass};
use crate::retention::{Prune, PruneRound};

pub fn stock_key(sku: &str) -> String {
    format!("stock/{sku}")
}

const RESERVATIONS: &str = "reservation/";
const RELEASES: &str = "release/";

fn reservation_key(order: &str) -> String {
    format!("{RESERVATIONS}{order}")
}

fn release_key(order: &str) -> String {
    format!("{RELEASES}{order}")
}

/// The counter under `settled/` that sums a SKU's pruned, unreleased reservations.
pub fn settled_reservations_counter(sku: &str) -> String {
    format!("reserved/{sku}")
}

#[derive(Debug)]
pub struct Inventory {
    ledger: Ledger,
    faults: Faults,
    out_of_stock_rate: f64,
    prune_pass: Pass,
}

impl Inventory {
    pub fn new(store: Arc<DurableStore>, faults: Faults, out_of_stock_rate: f64) -> Self {
        Self {
            ledger: Ledger::new(store),
            faults,
            out_of_stock_rate,
            prune_pass: Pass::default(),
        }
    }

    pub async fn open_stock(&self, stock: &[(String, i64)]) -> Result<(), ParticipantError> {
        let counters: Vec<(String, i64)> = stock
            .iter()
            .map(|(sku, quantity)| (stock_key(sku), *quantity))
            .collect();
        self.ledger.open_counters(&counters).await
    }

    /// Releases the reservation this branch made for `order`, once. Lock held.
    fn release(
        &self,
        branch: &BranchContext,
        order: &str,
        changes: &mut Changes,
    ) -> Result<(), ParticipantError> {
        let Some(reservation) = self
            .ledger
            .json::<Applied<Reservation>>(&reservation_key(order))?
        else {
            return Ok(());
        };
        if !reservation.by(branch)
            || self
                .ledger
                .json::<Reservation>(&release_key(order))?
                .is_some()
        {
            return Ok(());
        }
        let counter = stock_key(&reservation.work.sku);
        let stock = self.ledger.i64(&counter)?.unwrap_or(0);
        changes.set_i64(&counter, stock + reservation.work.quantity);
        changes.put(&release_key(order), &reservation.work);
        Ok(())
    }
}

impl Participant for Inventory {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        self.faults.enter().await?;
        let reservation: Reservation = match parse(payload) {
            Ok(reservation) => reservation,
            Err(reason) => return Ok(Vote::no(reason)),
        };
        let _guard = self.ledger.lock().await;
        if holds_already(&self.ledger, branch)? {
            return Ok(Vote::Yes);
        }
        if self.faults.chance(self.out_of_stock_rate) {
            return Ok(Vote::no(format!(
                "out of stock: {} (injected)",
                reservation.sku
            )));
        }
        if self
            .ledger
            .json::<serde_json::Value>(&reservation_key(&reservation.order))?
            .is_some()
        {
            return Ok(Vote::no(format!(
                "order {} was already reserved",
                reservation.order
            )));
        }
        let counter = stock_key(&reservation.sku);
        let Some(available) = available(&self.ledger, &counter)? else {
            return Ok(Vote::no(format!("unknown sku {}", reservation.sku)));
        };
        if available < reservation.quantity {
            return Ok(Vote::no(format!(
                "out of stock: {} has {available}, needs {}",
                reservation.sku, reservation.quantity
            )));
        }
        let mut changes = Changes::default();
        changes.put(
            &hold_key(branch),
            &Hold {
                counter,
                amount: reservation.quantity,
                work: reservation,
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
        let Some(hold) = self.ledger.json::<Hold<Reservation>>(&hold_key(branch))? else {
            return Ok(());
        };
        let mut changes = Changes::default();
        changes.remove(&hold_key(branch));
        let stock = self.ledger.i64(&hold.counter)?.unwrap_or(0);
        changes.set_i64(&hold.counter, stock - hold.amount);
        changes.put(
            &reservation_key(&hold.work.order),
            &Applied::new(branch, hold.work),
        );
        self.ledger.apply_with(branch, changes).await
    }

    async fn abort(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        let reservation: Reservation = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        let mut changes = Changes::default();
        changes.remove(&hold_key(branch));
        self.release(branch, &reservation.order, &mut changes)?;
        self.ledger.apply_with(branch, changes).await
    }

    async fn compensate(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.faults.enter_compensation().await?;
        let release: Reservation = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        let mut changes = Changes::default();
        self.release(branch, &release.order, &mut changes)?;
        self.ledger.apply_with(branch, changes).await
    }
}

impl Prune for Inventory {
    /// Prunes old reservations with their releases, adding each unreleased one to its
    /// SKU's `settled/reserved/<sku>`.
    async fn prune_round(
        &self,
        cutoff_unix_ms: u64,
        limit: usize,
    ) -> Result<PruneRound, ParticipantError> {
        let settle = |reservation: &Reservation, released: bool| {
            (!released).then(|| {
                (
                    settled_reservations_counter(&reservation.sku),
                    reservation.quantity,
                )
            })
        };
        let prefixes = (RESERVATIONS, RELEASES);
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
