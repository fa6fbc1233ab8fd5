//! The example services' retention, on real sled and SQLite files: entries of old
//! transactions are pruned and young ones kept, and the shop's audit still holds once old
//! orders are gone (their sums live on in the `settled/` totals).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use treaty_examples::bank::{self, Bank, Leg};
use treaty_examples::retention::{Prune, PruneRound};
use treaty_examples::rewards::{self, PointsLeg, Rewards, SqliteStore};
use treaty_examples::shop::audit::{ShippingData, audit};
use treaty_examples::shop::inventory::Inventory;
use treaty_examples::shop::orders::{Order, Placed};
use treaty_examples::shop::payment::Payment;
use treaty_examples::shop::shipping::Shipping;
use treaty_examples::shop::{Faults, Reservation, Shipment};
use treaty_sdk::client::{Transaction, TransactionState};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::transaction_age::first_transaction_id_at;
use treaty_sdk::{BranchContext, Participant};

const HOUR_MS: u64 = 3_600_000;

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The `n`th UUIDv7 created at `unix_ms`.
fn txn_id(unix_ms: u64, n: u64) -> String {
    let first = first_transaction_id_at(unix_ms);
    format!("{}{n:012x}", &first[..24])
}

/// Prunes with a batch of 2 until a round says there is no more (bounded).
async fn prune_all(target: &impl Prune, cutoff_unix_ms: u64) -> usize {
    let mut pruned = 0;
    for _ in 0..100 {
        let PruneRound { pruned: now, more } = target.prune_round(cutoff_unix_ms, 2).await.unwrap();
        pruned += now;
        if !more {
            return pruned;
        }
    }
    panic!("pruning a handful of entries did not end");
}

#[tokio::test]
async fn old_bank_journal_entries_and_memos_go_young_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let bank = Bank::new("bank", store.clone()).with_journal();
    bank.open_accounts(&[("alice".into(), 100)]).await.unwrap();
    let now = now_unix_ms();
    let payload = |amount: i64| {
        serde_json::to_vec(&serde_json::json!({"account": "alice", "amount": amount, "memo": "m"}))
            .unwrap()
    };
    for (n, created) in [(1, now - 2 * HOUR_MS), (2, now - 2 * HOUR_MS), (3, now)] {
        let branch = BranchContext::new(txn_id(created, n), "leg");
        bank.prepare(&branch, &payload(-10)).await.unwrap();
        bank.commit(&branch, &payload(-10)).await.unwrap();
    }
    // An id with no age is never pruned.
    let ageless = BranchContext::new("t-ageless", "leg");
    bank.prepare(
        &ageless,
        &Leg {
            account: "alice",
            amount: 5,
        }
        .payload(),
    )
    .await
    .unwrap();
    bank.abort(&ageless, &[]).await.unwrap();
    assert_eq!(bank::journal(&store).unwrap().len(), 8);
    assert_eq!(bank::memos(&store).unwrap().len(), 3);

    // Two old transactions: two journal entries and a memo each.
    assert_eq!(prune_all(&bank, now - HOUR_MS).await, 6);
    let left: Vec<String> = bank::journal(&store)
        .unwrap()
        .into_iter()
        .map(|entry| entry.transaction_id)
        .collect();
    assert_eq!(
        left,
        [
            txn_id(now, 3),
            txn_id(now, 3),
            "t-ageless".into(),
            "t-ageless".into()
        ]
    );
    assert_eq!(bank::memos(&store).unwrap().len(), 1);
    assert_eq!(bank::balances(&store).unwrap()["alice"], 70);
    assert_eq!(prune_all(&bank, now - HOUR_MS).await, 0);
}

#[tokio::test]
async fn old_rewards_journal_rows_go_young_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(rewards::DATABASE_FILE);
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let rewards = Rewards::new(store).with_journal();
    rewards.open_members(&[("bob".into(), 0)]).await.unwrap();
    let now = now_unix_ms();
    for (n, created) in [(1, now - 2 * HOUR_MS), (2, now - 2 * HOUR_MS), (3, now)] {
        let branch = BranchContext::new(txn_id(created, n), "earn");
        let leg = PointsLeg {
            member: "bob",
            points: 10,
        }
        .payload();
        rewards.prepare(&branch, &leg).await.unwrap();
        rewards.commit(&branch, &leg).await.unwrap();
    }
    assert_eq!(rewards::journal(&path).unwrap().len(), 6);
    assert_eq!(prune_all(&rewards, now - HOUR_MS).await, 4);
    let left = rewards::journal(&path).unwrap();
    assert_eq!(left.len(), 2);
    assert!(
        left.iter()
            .all(|entry| entry.transaction_id == txn_id(now, 3))
    );
    assert_eq!(rewards::balances(&path).unwrap()["bob"], 30);
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).unwrap()
}

fn placed(order: Order, created_unix_ms: u64, state: TransactionState) -> Placed {
    Placed {
        order,
        transaction: Transaction {
            created_unix_ms,
            state: state as i32,
            ..Transaction::default()
        },
    }
}

#[tokio::test]
async fn the_shop_audit_holds_after_old_orders_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| {
        Arc::new(DurableStore::open(&dir.path().join(name), Default::default()).unwrap())
    };
    let (payment_store, inventory_store, shipping_store) =
        (open("payment"), open("inventory"), open("shipping"));
    let payment = Payment::new(payment_store.clone(), Faults::none());
    let inventory = Inventory::new(inventory_store.clone(), Faults::none(), 0.0);
    let shipping = Shipping::new(shipping_store.clone(), Faults::none(), 0.0);
    payment
        .open_accounts(&[("alice".into(), 1_000)])
        .await
        .unwrap();
    inventory
        .open_stock(&[("widget".into(), 10)])
        .await
        .unwrap();

    let now = now_unix_ms();
    let old = now - 2 * HOUR_MS;
    let order = |id: &str, amount: i64| Order {
        id: id.into(),
        customer: "alice".into(),
        amount,
        sku: "widget".into(),
        quantity: 2,
        address: "1 Saga Street".into(),
    };
    let mut all_placed = Vec::new();
    // o1 (old) and o3 (young) complete; o2 (old) is compensated after its charge and
    // reservation.
    for (n, id, created, completes) in [
        (1, "o1", old, true),
        (2, "o2", old, false),
        (3, "o3", now, true),
    ] {
        let order = order(id, 100 * n as i64);
        let txn = txn_id(created, n);
        let step = |name: &str| BranchContext::new(txn.clone(), name);
        let charge = json(&order.charge());
        let reservation = json(&Reservation {
            order: order.id.clone(),
            sku: order.sku.clone(),
            quantity: order.quantity,
        });
        let shipment = json(&Shipment {
            order: order.id.clone(),
            address: order.address.clone(),
        });
        payment.prepare(&step("charge"), &charge).await.unwrap();
        payment.commit(&step("charge"), &charge).await.unwrap();
        inventory
            .prepare(&step("reserve"), &reservation)
            .await
            .unwrap();
        inventory
            .commit(&step("reserve"), &reservation)
            .await
            .unwrap();
        let state = if completes {
            shipping
                .prepare(&step("schedule"), &shipment)
                .await
                .unwrap();
            shipping.commit(&step("schedule"), &shipment).await.unwrap();
            TransactionState::Completed
        } else {
            payment.compensate(&step("charge"), &charge).await.unwrap();
            inventory
                .compensate(&step("reserve"), &reservation)
                .await
                .unwrap();
            TransactionState::Compensated
        };
        all_placed.push(placed(order, created, state));
    }

    let cutoff = now - HOUR_MS;
    // o1's and o2's charge and refund (one for o1), reservations and releases, shipment.
    assert_eq!(prune_all(&payment, cutoff).await, 2);
    assert_eq!(prune_all(&inventory, cutoff).await, 2);
    assert_eq!(prune_all(&shipping, cutoff).await, 1);
    for (store, key) in [
        (&payment_store, "charge/o1"),
        (&payment_store, "refund/o2"),
        (&inventory_store, "release/o2"),
        (&shipping_store, "shipment/o1"),
    ] {
        assert!(store.db().get(key).unwrap().is_none(), "{key}");
    }
    assert!(payment_store.db().get("charge/o3").unwrap().is_some());

    drop((payment, inventory, shipping));
    for store in [payment_store, inventory_store, shipping_store] {
        store.close().unwrap();
        drop(store);
    }
    let checks = audit(
        &dir.path().join("payment"),
        &dir.path().join("inventory"),
        ShippingData::Sled(&dir.path().join("shipping")),
        &all_placed,
    )
    .unwrap();
    for check in &checks {
        assert!(check.holds(), "{}: {:?}", check.name, check.violations);
    }
}
