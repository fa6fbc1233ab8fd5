//! The shipping service: deliveries.
//!
//! - step `schedule`: prepare refuses with `rejection_rate` ("no courier available");
//!   commit records `shipment/<order>`.
//! - compensation `cancel`: records `cancel/<order>` for a recorded shipment.
//!
//! A shipment is active while it has no cancellation; no compensated order may have one.

use std::sync::Arc;

use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use super::{Faults, Shipment, parse};
use crate::ledger::{Changes, Ledger};

#[derive(Debug)]
pub struct Shipping {
    ledger: Ledger,
    faults: Faults,
    rejection_rate: f64,
}

impl Shipping {
    pub fn new(store: Arc<DurableStore>, faults: Faults, rejection_rate: f64) -> Self {
        Self {
            ledger: Ledger::new(store),
            faults,
            rejection_rate,
        }
    }
}

impl Participant for Shipping {
    async fn prepare(
        &self,
        _branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        self.faults.enter().await?;
        let shipment: Shipment = match parse(payload) {
            Ok(shipment) => shipment,
            Err(reason) => return Ok(Vote::no(reason)),
        };
        if self.faults.chance(self.rejection_rate) {
            return Ok(Vote::no(format!(
                "no courier available for {}",
                shipment.address
            )));
        }
        Ok(Vote::Yes)
    }

    async fn commit(
        &self,
        _branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.faults.enter().await?;
        let shipment: Shipment = parse(payload).map_err(ParticipantError::new)?;
        let mut changes = Changes::default();
        changes.put(&format!("shipment/{}", shipment.order), &shipment);
        self.ledger.apply(changes).await
    }

    async fn abort(
        &self,
        _branch: &BranchContext,
        _payload: &[u8],
    ) -> Result<(), ParticipantError> {
        // Prepare holds nothing here.
        Ok(())
    }

    async fn compensate(
        &self,
        _branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.faults.enter_compensation().await?;
        let cancel: Shipment = parse(payload).map_err(ParticipantError::new)?;
        let _guard = self.ledger.lock().await;
        if self
            .ledger
            .json::<Shipment>(&format!("shipment/{}", cancel.order))?
            .is_none()
        {
            return Ok(());
        }
        let mut changes = Changes::default();
        changes.put(&format!("cancel/{}", cancel.order), &cancel);
        self.ledger.apply(changes).await
    }
}
