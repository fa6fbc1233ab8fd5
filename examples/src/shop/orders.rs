//! Placing orders as sagas. An order is submitted with an idempotency key made from its
//! number, so the driver can simply retry through coordinator crashes: a retry finds the
//! saga already submitted instead of charging twice.

use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;
use treaty_sdk::client::{Transaction, TransactionState};
use treaty_sdk::{ClientError, SagaStep, SubmitOptions, TreatyClient};

use super::{Charge, Reservation, Shipment};

/// The three services' endpoints.
#[derive(Debug, Clone)]
pub struct Shop {
    pub payment: String,
    pub inventory: String,
    pub shipping: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// Unique within a run; part of the idempotency key.
    pub id: String,
    pub customer: String,
    pub amount: i64,
    pub sku: String,
    pub quantity: i64,
    pub address: String,
}

impl Order {
    /// A random order from these customers and SKUs.
    pub fn random(id: String, customers: &[String], skus: &[String], rng: &mut StdRng) -> Self {
        Self {
            customer: customers[rng.random_range(0..customers.len())].clone(),
            amount: rng.random_range(10..=300),
            sku: skus[rng.random_range(0..skus.len())].clone(),
            quantity: rng.random_range(1..=3),
            address: format!("{} Saga Street", rng.random_range(1..=999)),
            id,
        }
    }

    /// What the payment step charges (and its compensation refunds).
    pub fn charge(&self) -> Charge {
        Charge {
            order: self.id.clone(),
            customer: self.customer.clone(),
            amount: self.amount,
        }
    }

    /// charge ∥ reserve, then schedule.
    pub fn steps(&self, shop: &Shop) -> Vec<SagaStep> {
        let charge = self.charge();
        let reservation = Reservation {
            order: self.id.clone(),
            sku: self.sku.clone(),
            quantity: self.quantity,
        };
        let shipment = Shipment {
            order: self.id.clone(),
            address: self.address.clone(),
        };
        vec![
            SagaStep::new("charge", &shop.payment, json(&charge)).compensation(json(&charge)),
            SagaStep::new("reserve", &shop.inventory, json(&reservation))
                .compensation(json(&reservation)),
            SagaStep::new("schedule", &shop.shipping, json(&shipment))
                .compensation(json(&shipment))
                .after(["charge", "reserve"]),
        ]
    }
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    // Serializing the shop's plain payloads cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// How an order ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    pub order: Order,
    pub transaction: Transaction,
}

impl Placed {
    pub fn state(&self) -> TransactionState {
        TransactionState::try_from(self.transaction.state).unwrap_or(TransactionState::Unspecified)
    }

    /// Calls beyond the first, forward and compensation, over all steps.
    pub fn retries(&self) -> u32 {
        self.transaction
            .branches
            .iter()
            .map(|b| b.attempts.saturating_sub(1) + b.compensation_attempts.saturating_sub(1))
            .sum()
    }
}

/// Failures that a retry may cure: the coordinator is down, restarting or busy.
fn retryable(error: &ClientError) -> bool {
    match error.code() {
        Some(code) => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::ResourceExhausted
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
        ),
        None => true,
    }
}

/// Places `order` and waits (at most `patience`) until it is COMPLETED or COMPENSATED,
/// retrying through coordinator outages.
pub async fn place(
    client: &TreatyClient,
    shop: &Shop,
    order: Order,
    patience: Duration,
) -> Result<Placed, String> {
    let deadline = Instant::now() + patience;
    let options = SubmitOptions {
        idempotency_key: Some(format!("order-{}", order.id)),
        ..SubmitOptions::default()
    };
    let submitted = loop {
        match client.submit_saga(order.steps(shop), options.clone()).await {
            Ok(submitted) => break submitted,
            Err(error) if retryable(&error) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(format!("order {}: {error}", order.id)),
        }
    };
    let id = submitted.transaction_id;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(format!(
                "order {}: no outcome within {patience:?}",
                order.id
            ));
        }
        match client.wait_until_finished(&id, remaining).await {
            Ok(Some(transaction))
                if TransactionState::try_from(transaction.state).is_ok_and(|s| {
                    matches!(
                        s,
                        TransactionState::Completed | TransactionState::Compensated
                    )
                }) =>
            {
                return Ok(Placed { order, transaction });
            }
            // Not final yet, unknown for a moment, or the coordinator is restarting.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
