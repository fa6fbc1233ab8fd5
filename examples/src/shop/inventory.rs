//! The inventory service: stock per SKU.
//!
//! - step `reserve`: prepare holds the quantity if the unheld stock covers it (else NO,
//!   "out of stock"; also, with `out_of_stock_rate`, for no reason at all); commit takes
//!   it from the stock and records `reservation/<order>`.
//! - compensation `release`: puts a recorded reservation back and records
//!   `release/<order>`.
//!
//! Stock is conserved: stock + unreleased reservations = the initial stock, per SKU.

use std::sync::Arc;

use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::{Faults, Hold, Reservation, available, hold_key, parse};
use crate::ledger::{Changes, Ledger};

pub fn stock_key(sku: &str) -> String {
    format!("stock/{sku}")
}

#[derive(Debug)]
pub struct Inventory {
    ledger: Ledger,
    faults: Faults,
    out_of_stock_rate: f64,
}

impl Inventory {
    pub fn new(store: Arc<DurableStore>, faults: Faults, out_of_stock_rate: f64) -> Self {
        Self {
            ledger: Ledger::new(store),
            faults,
            out_of_stock_rate,
        }
    }

    pub async fn open_stock(&self, stock: &[(String, i64)]) -> Result<(), ParticipantError> {
        let counters: Vec<(String, i64)> = stock
            .iter()
            .map(|(sku, quantity)| (stock_key(sku), *quantity))
            .collect();
        self.ledger.open_counters(&counters).await
    }

    async fn settle(&self, branch: &BranchContext, apply: bool) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        let _guard = self.ledger.lock().await;
        let Some(hold) = self.ledger.json::<Hold<Reservation>>(&hold_key(branch))? else {
            return Ok(());
        };
        let mut changes = Changes::default();
        changes.remove(&hold_key(branch));
        if apply {
            let stock = self.ledger.i64(&hold.counter)?.unwrap_or(0);
            changes.set_i64(&hold.counter, stock - hold.amount);
            changes.put(&format!("reservation/{}", hold.work.order), &hold.work);
        }
        self.ledger.apply(changes).await
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
        if self.faults.chance(self.out_of_stock_rate) {
            return Ok(Vote::no(format!(
                "out of stock: {} (injected)",
                reservation.sku
            )));
        }
        let _guard = self.ledger.lock().await;
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
        let release: Reservation = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        let reservation_key = format!("reservation/{}", release.order);
        let release_key = format!("release/{}", release.order);
        let Some(reservation) = self.ledger.json::<Reservation>(&reservation_key)? else {
            return Ok(());
        };
        if self.ledger.json::<Reservation>(&release_key)?.is_some() {
            return Ok(());
        }
        let counter = stock_key(&reservation.sku);
        let stock = self.ledger.i64(&counter)?.unwrap_or(0);
        let mut changes = Changes::default();
        changes.set_i64(&counter, stock + reservation.quantity);
        changes.put(&release_key, &reservation);
        self.ledger.apply(changes).await
    }
}
