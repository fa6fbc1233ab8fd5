//! The shop's invariants, checked from each service's own data (read from their sled
//! directories once they have stopped) against how the coordinator says each order
//! ended.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use treaty_sdk::client::TransactionState;
use treaty_sdk::durable::DurableStore;

use super::orders::Placed;
use super::{Charge, Reservation, Shipment};
use crate::ledger::{counters, records};

/// One invariant and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    /// Empty when the invariant holds.
    pub violations: Vec<String>,
}

impl Check {
    pub fn holds(&self) -> bool {
        self.violations.is_empty()
    }
}

/// What one service's directory holds.
struct Data {
    counters: BTreeMap<String, i64>,
    initial: BTreeMap<String, i64>,
    holds: usize,
    store: DurableStore,
}

fn open(dir: &Path, prefix: &str) -> Result<Data, String> {
    let store = DurableStore::open(dir, Default::default()).map_err(|e| e.to_string())?;
    let counters = counters(&store, prefix).map_err(|e| e.to_string())?;
    let initial =
        crate::ledger::counters(&store, &format!("initial/{prefix}")).map_err(|e| e.to_string())?;
    let holds = store.db().scan_prefix("hold/").count();
    Ok(Data {
        counters,
        initial,
        holds,
        store,
    })
}

fn recorded<T: serde::de::DeserializeOwned>(
    data: &Data,
    prefix: &str,
) -> Result<BTreeMap<String, T>, String> {
    records(&data.store, prefix).map_err(|e| e.to_string())
}

/// Checks every invariant; an error only if a directory cannot be read.
pub fn audit(
    payment_dir: &Path,
    inventory_dir: &Path,
    shipping_dir: &Path,
    placed: &[Placed],
) -> Result<Vec<Check>, String> {
    let payment = open(payment_dir, "acct/")?;
    let inventory = open(inventory_dir, "stock/")?;
    let shipping = open(shipping_dir, "none/")?;
    let charges: BTreeMap<String, Charge> = recorded(&payment, "charge/")?;
    let refunds: BTreeMap<String, Charge> = recorded(&payment, "refund/")?;
    let reservations: BTreeMap<String, Reservation> = recorded(&inventory, "reservation/")?;
    let releases: BTreeMap<String, Reservation> = recorded(&inventory, "release/")?;
    let shipments: BTreeMap<String, Shipment> = recorded(&shipping, "shipment/")?;
    let cancels: BTreeMap<String, Shipment> = recorded(&shipping, "cancel/")?;

    let charged: BTreeSet<&String> = charges
        .keys()
        .filter(|o| !refunds.contains_key(*o))
        .collect();
    let reserved: BTreeSet<&String> = reservations
        .keys()
        .filter(|o| !releases.contains_key(*o))
        .collect();
    let shipped: BTreeSet<&String> = shipments
        .keys()
        .filter(|o| !cancels.contains_key(*o))
        .collect();

    let mut checks = Vec::new();

    let before: i64 = payment.initial.values().sum();
    let after: i64 = payment.counters.values().sum();
    checks.push(Check {
        name: "money conserved (balances + revenue)",
        violations: (before != after)
            .then(|| format!("{before} before, {after} after"))
            .into_iter()
            .collect(),
    });

    let mut stock = Vec::new();
    for (sku, initial) in &inventory.initial {
        let now = inventory.counters.get(sku).copied().unwrap_or(0);
        let held: i64 = reservations
            .iter()
            .filter(|(order, r)| &r.sku == sku && reserved.contains(order))
            .map(|(_, r)| r.quantity)
            .sum();
        if now + held != *initial {
            stock.push(format!(
                "{sku}: {initial} initially, {now} in stock + {held} reserved"
            ));
        }
    }
    checks.push(Check {
        name: "stock conserved (stock + reserved)",
        violations: stock,
    });

    checks.push(Check {
        name: "no refund without a charge",
        violations: refunds
            .keys()
            .filter(|order| !charges.contains_key(*order))
            .map(|order| format!("order {order} refunded, never charged"))
            .collect(),
    });

    let mut by_outcome: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for order in placed {
        let outcome = match order.state() {
            TransactionState::Completed => "completed",
            TransactionState::Compensated => "compensated",
            _ => "unfinished",
        };
        by_outcome.entry(outcome).or_default().push(&order.order.id);
    }
    let compensated = by_outcome.get("compensated").cloned().unwrap_or_default();
    let completed = by_outcome.get("completed").cloned().unwrap_or_default();

    checks.push(Check {
        name: "no shipment for a compensated order",
        violations: compensated
            .iter()
            .filter(|order| shipped.contains(**order))
            .map(|order| format!("order {order} compensated but shipped"))
            .collect(),
    });
    checks.push(Check {
        name: "compensated orders are neither charged nor reserved",
        violations: compensated
            .iter()
            .filter(|order| charged.contains(**order) || reserved.contains(**order))
            .map(|order| format!("order {order} compensated but still charged or reserved"))
            .collect(),
    });
    checks.push(Check {
        name: "completed orders are charged, reserved and shipped",
        violations: completed
            .iter()
            .filter(|order| {
                !(charged.contains(**order)
                    && reserved.contains(**order)
                    && shipped.contains(**order))
            })
            .map(|order| format!("order {order} completed but not charged, reserved and shipped"))
            .collect(),
    });
    let known: BTreeSet<&String> = placed.iter().map(|p| &p.order.id).collect();
    checks.push(Check {
        name: "no effect without an order",
        violations: charged
            .iter()
            .chain(&reserved)
            .chain(&shipped)
            .filter(|order| !known.contains(**order))
            .map(|order| format!("order {order} has effects but was never placed"))
            .collect(),
    });
    checks.push(Check {
        name: "no hold left behind",
        violations: [("payment", payment.holds), ("inventory", inventory.holds)]
            .into_iter()
            .filter(|(_, holds)| *holds > 0)
            .map(|(service, holds)| format!("{service} has {holds} unsettled holds"))
            .collect(),
    });
    checks.push(Check {
        name: "every order finished",
        violations: by_outcome
            .get("unfinished")
            .map(|orders| {
                orders
                    .iter()
                    .map(|o| format!("order {o} unfinished"))
                    .collect()
            })
            .unwrap_or_default(),
    });
    for data in [payment, inventory, shipping] {
        data.store.close().map_err(|e| e.to_string())?;
    }
    Ok(checks)
}
