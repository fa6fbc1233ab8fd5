//! The shipping service: deliveries.
//!
//! - step `schedule`: prepare refuses with `rejection_rate` ("no courier available");
//!   commit records `shipment/<order>` with the branch that scheduled it (an order ships
//!   at most once).
//! - compensation `cancel`: records `cancel/<order>` for a shipment this branch
//!   scheduled. An abort does the same, in case the commit ran before a crash.
//!
//! A shipment is active while it has no cancellation; no compensated order may have one.

use std::sync::Arc;

use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::{Applied, Faults, Shipment, parse, prune_orders};
use crate::ledger::{Changes, Ledger, Pass};
use crate::retention::{Prune, PruneRound};

const SHIPMENTS: &str = "shipment/";
const CANCELS: &str = "cancel/";

fn shipment_key(order: &str) -> String {
    format!("{SHIPMENTS}{order}")
}

fn cancel_key(order: &str) -> String {
    format!("{CANCELS}{order}")
}

#[derive(Debug)]
pub struct Shipping {
    ledger: Ledger,
    faults: Faults,
    rejection_rate: f64,
    prune_pass: Pass,
}

impl Shipping {
    pub fn new(store: Arc<DurableStore>, faults: Faults, rejection_rate: f64) -> Self {
        Self {
            ledger: Ledger::new(store),
            faults,
            rejection_rate,
            prune_pass: Pass::default(),
        }
    }

    /// Cancels the shipment this branch scheduled for `order`, once. Lock held.
    fn cancel(
        &self,
        branch: &BranchContext,
        order: &str,
    ) -> Result<Option<Changes>, ParticipantError> {
        let Some(shipment) = self
            .ledger
            .json::<Applied<Shipment>>(&shipment_key(order))?
        else {
            return Ok(None);
        };
        if !shipment.by(branch) || self.ledger.json::<Shipment>(&cancel_key(order))?.is_some() {
            return Ok(None);
        }
        let mut changes = Changes::default();
        changes.put(&cancel_key(order), &shipment.work);
        Ok(Some(changes))
    }

    async fn undo(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        let shipment: Shipment = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        match self.cancel(branch, &shipment.order)? {
            Some(changes) => self.ledger.apply_with(branch, changes).await,
            None => Ok(()),
        }
    }
}

impl Participant for Shipping {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        self.faults.enter().await?;
        let shipment: Shipment = match parse(payload) {
            Ok(shipment) => shipment,
            Err(reason) => return Ok(Vote::no(reason)),
        };
        let shipped = self
            .ledger
            .json::<Applied<Shipment>>(&shipment_key(&shipment.order))?;
        if shipped.is_some_and(|s| !s.by(branch)) {
            return Ok(Vote::no(format!(
                "order {} was already shipped",
                shipment.order
            )));
        }
        if self.faults.chance(self.rejection_rate) {
            return Ok(Vote::no(format!(
                "no courier available for {}",
                shipment.address
            )));
        }
        Ok(Vote::Yes)
    }

    async fn commit(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        let shipment: Shipment = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        let key = shipment_key(&shipment.order);
        if let Some(existing) = self.ledger.json::<Applied<Shipment>>(&key)? {
            if existing.by(branch) {
                return Ok(());
            }
            return Err(ParticipantError::new(format!(
                "order {} is already shipped by another transaction",
                shipment.order
            )));
        }
        let mut changes = Changes::default();
        changes.put(&key, &Applied::new(branch, shipment));
        self.ledger.apply_with(branch, changes).await
    }

    async fn abort(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        self.undo(branch, payload).await
    }

    async fn compensate(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.faults.enter_compensation().await?;
        self.undo(branch, payload).await
    }
}

impl Prune for Shipping {
    /// Prunes old shipments with their cancellations (no totals: the audit sums nothing
    /// from them).
    async fn prune_round(
        &self,
        cutoff_unix_ms: u64,
        limit: usize,
    ) -> Result<PruneRound, ParticipantError> {
        let settle = |_: &Shipment, _: bool| None;
        let prefixes = (SHIPMENTS, CANCELS);
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
