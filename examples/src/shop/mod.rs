//! The showcase shop: an order is a saga across three services, each its own process with
//! its own data.
//!
//! ```text
//!   charge (payment) ──┐
//!                      ├──▶ schedule (shipping)
//!   reserve (inventory)┘
//! ```
//! Compensations: refund, release, cancel. Payment and inventory place a hold at
//! prepare and apply it at commit, so that concurrent orders can never spend the same
//! money or stock; shipping may refuse (no courier).
//!
//! - [`payment`], [`inventory`], [`shipping`]: the participants.
//! - [`orders`]: the driver that places orders through a coordinator.
//! - [`audit`]: the invariants, checked from each service's own data.
//! - [`strangers`]: callers without a token, refused (`demo --secure`).
//!
//! Each service keeps a record per order (a charge, a reservation, a shipment, and their
//! undoing). Records of orders whose transaction is older than the journal retention are
//! deleted in the background ([`prune_orders`]), and what the audit sums from them is
//! added to `settled/<counter>` totals in the same write, with `settled/before` saying
//! which orders' records may be gone: the audit's sums still balance, and its per-order
//! checks cover the orders after that instant.

pub mod audit;
pub mod inventory;
pub mod orders;
pub mod payment;
pub mod python_shipping;
pub mod shipping;
pub mod strangers;

use std::sync::Mutex;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use treaty_sdk::{BranchContext, ParticipantError};

use crate::ledger::{Changes, Ledger, Pass};
use crate::retention::{PruneRound, created_before};

/// Where a shop service keeps the totals folded in from the records it pruned.
pub const SETTLED: &str = "settled/";
/// `settled/before`: the orders of transactions created before this instant (Unix ms)
/// may have had their records pruned.
pub const SETTLED_BEFORE: &str = "settled/before";

/// What the payment step does: charge `amount` to `customer` for `order`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    pub order: String,
    pub customer: String,
    pub amount: i64,
}

/// What the inventory step does: reserve `quantity` of `sku` for `order`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub order: String,
    pub sku: String,
    pub quantity: i64,
}

/// What the shipping step does: schedule a delivery of `order` to `address`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    pub order: String,
    pub address: String,
}

/// Failure injection, shared by the three services.
#[derive(Debug, Clone, clap::Args)]
pub struct FaultArgs {
    /// Chance (0..1) that a call fails without an answer (retried by the coordinator).
    #[arg(long, default_value_t = 0.0)]
    pub transient_error_rate: f64,
    /// Delay added to every call.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Seed of the random choices (a random one if absent).
    #[arg(long)]
    pub seed: Option<u64>,
    /// An outage of compensations: from the first compensation on, every compensation
    /// fails for this long (sagas get flagged stuck, then recover).
    #[arg(long, default_value_t = 0)]
    pub compensation_outage_ms: u64,
}

/// Checks a rate flag.
pub fn check_rate(name: &str, rate: f64) -> Result<(), String> {
    if (0.0..=1.0).contains(&rate) {
        Ok(())
    } else {
        Err(format!("--{name} must be between 0 and 1, not {rate}"))
    }
}

#[derive(Debug)]
pub struct Faults {
    transient_error_rate: f64,
    latency: Duration,
    rng: Mutex<StdRng>,
    compensation_outage: Duration,
    /// When the first compensation came (the outage starts then).
    first_compensation: Mutex<Option<std::time::Instant>>,
}

impl Faults {
    pub fn new(args: &FaultArgs) -> Result<Self, String> {
        check_rate("transient-error-rate", args.transient_error_rate)?;
        Ok(Self {
            transient_error_rate: args.transient_error_rate,
            latency: Duration::from_millis(args.latency_ms),
            rng: Mutex::new(match args.seed {
                Some(seed) => StdRng::seed_from_u64(seed),
                None => StdRng::from_os_rng(),
            }),
            compensation_outage: Duration::from_millis(args.compensation_outage_ms),
            first_compensation: Mutex::new(None),
        })
    }

    /// No faults at all.
    pub fn none() -> Self {
        Self {
            transient_error_rate: 0.0,
            latency: Duration::ZERO,
            rng: Mutex::new(StdRng::seed_from_u64(0)),
            compensation_outage: Duration::ZERO,
            first_compensation: Mutex::new(None),
        }
    }

    /// True with probability `rate`.
    pub fn chance(&self, rate: f64) -> bool {
        rate > 0.0
            && self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .random_bool(rate.min(1.0))
    }

    /// At the start of every compensation: as [`Faults::enter`], and during the outage
    /// window a failure.
    pub async fn enter_compensation(&self) -> Result<(), ParticipantError> {
        self.enter().await?;
        if self.compensation_outage.is_zero() {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let started = *self
            .first_compensation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(now);
        if now.duration_since(started) < self.compensation_outage {
            return Err(ParticipantError::new(
                "compensations are down (injected outage)",
            ));
        }
        Ok(())
    }

    /// At the start of every call: the added latency, then maybe a transient failure.
    pub async fn enter(&self) -> Result<(), ParticipantError> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        if self.chance(self.transient_error_rate) {
            return Err(ParticipantError::new("injected transient error"));
        }
        Ok(())
    }
}

/// A hold on a counter (money, stock), placed at prepare and applied or released later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold<T> {
    pub counter: String,
    pub amount: i64,
    pub work: T,
}

pub fn hold_key(branch: &BranchContext) -> String {
    format!("hold/{}/{}", branch.transaction_id, branch.branch_id)
}

/// Work a branch applied (a charge, a reservation, a shipment), with who applied it: an
/// undo only ever undoes its own branch's work, whatever its payload says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied<T> {
    pub transaction_id: String,
    pub branch_id: String,
    pub work: T,
}

impl<T> Applied<T> {
    pub fn new(branch: &BranchContext, work: T) -> Self {
        Self {
            transaction_id: branch.transaction_id.clone(),
            branch_id: branch.branch_id.clone(),
            work,
        }
    }

    pub fn by(&self, branch: &BranchContext) -> bool {
        self.transaction_id == branch.transaction_id && self.branch_id == branch.branch_id
    }
}

/// Whether this branch already placed its hold: a prepare repeated after a crash (before
/// the barrier recorded the vote) must not count its own hold against itself.
pub fn holds_already(ledger: &Ledger, branch: &BranchContext) -> Result<bool, ParticipantError> {
    Ok(ledger
        .json::<serde_json::Value>(&hold_key(branch))?
        .is_some())
}

/// What a counter has that no hold has claimed; `None` if the counter does not exist.
/// Call with the ledger lock held.
pub fn available(ledger: &Ledger, counter: &str) -> Result<Option<i64>, ParticipantError> {
    let Some(value) = ledger.i64(counter)? else {
        return Ok(None);
    };
    let holds: std::collections::BTreeMap<String, Hold<serde_json::Value>> =
        crate::ledger::records(ledger.store(), "hold/")?;
    let held: i64 = holds
        .values()
        .filter(|hold| hold.counter == counter)
        .map(|hold| hold.amount)
        .sum();
    Ok(Some(value - held))
}

pub fn parse<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| format!("malformed payload: {e}"))
}

/// Prunes the next (at most `limit`) work records `<work_prefix><order>` (an
/// [`Applied`] work) of transactions created before `cutoff_unix_ms`, with the undo
/// records `<undo_prefix><order>` of the same orders. For each, `settle(work, undone)`
/// may name a counter and an amount to add to `settled/<counter>`; the totals, the
/// raised `settled/before` and the deletions are one write, under the ledger's lock.
pub async fn prune_orders<T: for<'de> Deserialize<'de>>(
    ledger: &Ledger,
    pass: &Pass,
    prefixes: (&str, &str),
    cutoff_unix_ms: u64,
    limit: usize,
    settle: impl Fn(&T, bool) -> Option<(String, i64)>,
) -> Result<PruneRound, ParticipantError> {
    let (work_prefix, undo_prefix) = prefixes;
    let _guard = ledger.lock().await;
    let (page, more) = pass.next_page(ledger.store(), work_prefix, limit)?;
    let mut changes = Changes::default();
    let mut totals: std::collections::BTreeMap<String, i64> = Default::default();
    let mut pruned = 0;
    for (key, value) in page {
        let applied: Applied<T> = serde_json::from_slice(&value).map_err(crate::ledger::failed)?;
        if !created_before(&applied.transaction_id, cutoff_unix_ms) {
            continue;
        }
        let undo_key = format!("{undo_prefix}{}", &key[work_prefix.len()..]);
        let undone = ledger.json::<serde_json::Value>(&undo_key)?.is_some();
        if let Some((counter, amount)) = settle(&applied.work, undone) {
            *totals.entry(counter).or_default() += amount;
        }
        changes.remove(&key);
        changes.remove(&undo_key);
        pruned += 1;
    }
    if pruned > 0 {
        for (counter, amount) in totals {
            let key = format!("{SETTLED}{counter}");
            let before = ledger.i64(&key)?.unwrap_or(0);
            changes.set_i64(&key, before + amount);
        }
        let settled_before = ledger.i64(SETTLED_BEFORE)?.unwrap_or(0);
        let cutoff = i64::try_from(cutoff_unix_ms).unwrap_or(i64::MAX);
        changes.set_i64(SETTLED_BEFORE, settled_before.max(cutoff));
        ledger.apply(changes).await?;
    }
    Ok(PruneRound { pruned, more })
}
