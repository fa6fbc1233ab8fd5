//! The shop's invariants, checked from each service's own data (read from their sled
//! directories once they have stopped, or the Python shipping service's SQLite file)
//! against how the coordinator says each order ended.
//!
//! Records pruned past the journal retention are in the services' `settled/` totals: the
//! sums (money, stock) count them, and the checks of single orders cover the orders
//! created after the latest `settled/before` of the three (older ones may have no records
//! left; see [`super::prune_orders`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use treaty_sdk::client::TransactionState;
use treaty_sdk::durable::DurableStore;

use super::orders::Placed;
use super::python_shipping::Records;
use super::{Applied, Charge, Reservation};
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
    /// Totals folded in from pruned records, and `before`.
    settled: BTreeMap<String, i64>,
    holds: usize,
    store: DurableStore,
}

impl Data {
    fn settled(&self, counter: &str) -> i64 {
        self.settled.get(counter).copied().unwrap_or(0)
    }
}

fn open(dir: &Path, prefix: &str) -> Result<Data, String> {
    let store = DurableStore::open(dir, Default::default()).map_err(|e| e.to_string())?;
    let counters = counters(&store, prefix).map_err(|e| e.to_string())?;
    let initial =
        crate::ledger::counters(&store, &format!("initial/{prefix}")).map_err(|e| e.to_string())?;
    let holds = store.db().scan_prefix("hold/").count();
    let settled = crate::ledger::counters(&store, super::SETTLED).map_err(|e| e.to_string())?;
    Ok(Data {
        counters,
        initial,
        settled,
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

/// Work records (charges, reservations, shipments), without who applied them.
fn applied<T: serde::de::DeserializeOwned>(
    data: &Data,
    prefix: &str,
) -> Result<BTreeMap<String, T>, String> {
    let records: BTreeMap<String, Applied<T>> = recorded(data, prefix)?;
    Ok(records
        .into_iter()
        .map(|(order, a)| (order, a.work))
        .collect())
}

/// Where the shipping service kept its records: the Rust service in its sled directory,
/// the Python one (`demo --python-shipping`) in a table of its SQLite file.
#[derive(Debug, Clone, Copy)]
pub enum ShippingData<'a> {
    /// The Rust service's data directory.
    Sled(&'a Path),
    /// The Python service's data directory (see [`super::python_shipping`]).
    Sqlite(&'a Path),
}

impl ShippingData<'_> {
    /// The shipments and cancellations, and the service's `settled/before` (0 for the
    /// Python service, which prunes nothing).
    fn read(self) -> Result<(Records, i64), String> {
        match self {
            Self::Sled(dir) => {
                let data = open(dir, "none/")?;
                let records = Records {
                    shipments: applied(&data, "shipment/")?,
                    cancels: recorded(&data, "cancel/")?,
                };
                let settled_before = data.settled("before");
                data.store.close().map_err(|e| e.to_string())?;
                Ok((records, settled_before))
            }
            Self::Sqlite(dir) => Ok((super::python_shipping::records(dir)?, 0)),
        }
    }
}

/// Checks every invariant; an error only if a directory cannot be read.
pub fn audit(
    payment_dir: &Path,
    inventory_dir: &Path,
    shipping_data: ShippingData<'_>,
    placed: &[Placed],
) -> Result<Vec<Check>, String> {
    let payment = open(payment_dir, "acct/")?;
    let inventory = open(inventory_dir, "stock/")?;
    let (Records { shipments, cancels }, shipping_settled_before) = shipping_data.read()?;
    // Orders of transactions created before this may have had their records pruned.
    let settled_before = [&payment, &inventory]
        .iter()
        .map(|data| data.settled("before"))
        .chain([shipping_settled_before])
        .max()
        .unwrap_or(0);
    let all_placed = placed;
    let placed: Vec<&Placed> = all_placed
        .iter()
        .filter(|p| p.transaction.created_unix_ms as i64 >= settled_before)
        .collect();
    let charges: BTreeMap<String, Charge> = applied(&payment, "charge/")?;
    let refunds: BTreeMap<String, Charge> = recorded(&payment, "refund/")?;
    let reservations: BTreeMap<String, Reservation> = applied(&inventory, "reservation/")?;
    let releases: BTreeMap<String, Reservation> = recorded(&inventory, "release/")?;

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

    // Every balance is its opening balance minus the customer's unrefunded charges, and
    // the revenue is the sum of those charges: money neither created nor lost, and every
    // movement accounted for by a charge or a refund.
    let mut money = Vec::new();
    let mut charged_to: BTreeMap<&str, i64> = BTreeMap::new();
    for (order, charge) in &charges {
        if charged.contains(order) {
            *charged_to.entry(charge.customer.as_str()).or_default() += charge.amount;
        }
    }
    for (customer, initial) in &payment.initial {
        if customer == super::payment::REVENUE {
            continue;
        }
        let settled = payment.settled(&super::payment::settled_charges_counter(customer));
        let expected = initial - charged_to.get(customer.as_str()).copied().unwrap_or(0) - settled;
        let actual = payment.counters.get(customer).copied().unwrap_or(0);
        if actual != expected {
            money.push(format!("{customer} has {actual}, expected {expected}"));
        }
    }
    let revenue = payment
        .counters
        .get(super::payment::REVENUE)
        .copied()
        .unwrap_or(0);
    let settled_total: i64 = payment
        .settled
        .iter()
        .filter(|(counter, _)| counter.starts_with("charged/"))
        .map(|(_, amount)| amount)
        .sum();
    let charged_total: i64 = charged_to.values().sum::<i64>() + settled_total;
    if revenue != charged_total {
        money.push(format!(
            "revenue is {revenue}, unrefunded charges total {charged_total}"
        ));
    }
    let before: i64 = payment.initial.values().sum();
    let after: i64 = payment.counters.values().sum();
    if before != after {
        money.push(format!("{before} in all before, {after} after"));
    }
    checks.push(Check {
        name: "money conserved (each balance and the revenue match the charges)",
        violations: money,
    });
    let amounts: Vec<String> = placed
        .iter()
        .filter_map(|p| {
            let charge = charges.get(&p.order.id)?;
            (charge.amount != p.order.amount || charge.customer != p.order.customer).then(|| {
                format!(
                    "order {} charged {} to {}, ordered {} by {}",
                    p.order.id, charge.amount, charge.customer, p.order.amount, p.order.customer
                )
            })
        })
        .collect();
    checks.push(Check {
        name: "every charge is the order's amount, to its customer",
        violations: amounts,
    });

    let mut stock = Vec::new();
    for (sku, initial) in &inventory.initial {
        let now = inventory.counters.get(sku).copied().unwrap_or(0);
        let held: i64 = reservations
            .iter()
            .filter(|(order, r)| &r.sku == sku && reserved.contains(order))
            .map(|(_, r)| r.quantity)
            .sum::<i64>()
            + inventory.settled(&super::inventory::settled_reservations_counter(sku));
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
    for order in &placed {
        let outcome = match order.state() {
            TransactionState::Completed => "completed",
            TransactionState::Compensated => "compensated",
            _ => "other",
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
    let known: BTreeSet<&String> = all_placed.iter().map(|p| &p.order.id).collect();
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
    for data in [payment, inventory] {
        data.store.close().map_err(|e| e.to_string())?;
    }
    Ok(checks)
}
