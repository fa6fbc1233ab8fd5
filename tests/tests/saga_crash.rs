//! A coordinator killed with SIGKILL in the middle of sagas, then restarted on the same
//! data: every saga finishes, and the shop's invariants hold in each service's own data.
//! Everything runs as real processes: `treaty serve` and the payment, inventory and
//! shipping services.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::Path;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use treaty_examples::process::ServerProcess;
use treaty_examples::shop::audit::{ShippingData, audit};
use treaty_examples::shop::orders::{Order, Placed, Shop, place};
use treaty_sdk::TreatyClient;
use treaty_sdk::client::TransactionState;
use treaty_tests::harness::{PATIENCE, eventually};
use treaty_tests::process::{
    exit_status, kill9, killed_by_sigkill, start_server, start_treaty, workspace_binary,
};

struct Services {
    payment: ServerProcess,
    inventory: ServerProcess,
    shipping: ServerProcess,
}

async fn service(dir: &Path, name: &str, extra: &[&str]) -> ServerProcess {
    let mut args: Vec<String> = vec![
        "--data-dir".into(),
        dir.join(name).to_string_lossy().into_owned(),
        // Slow enough that sagas are in flight when the coordinator dies.
        "--latency-ms".into(),
        "150".into(),
        "--seed".into(),
        "11".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    start_server(
        &workspace_binary("treaty-examples", name),
        &args,
        &[("SHOP_LOG", "warn")],
        &format!("{name} listening on"),
        dir.join(format!("{name}.log")),
    )
    .await
}

async fn start_shop(dir: &Path) -> Services {
    Services {
        payment: service(dir, "payment", &["--accounts", "alice=500,bob=500"]).await,
        inventory: service(dir, "inventory", &["--stock", "widget=6,gadget=6"]).await,
        shipping: service(dir, "shipping", &["--rejection-rate", "0.3"]).await,
    }
}

fn orders(count: usize) -> Vec<Order> {
    let customers = ["alice".to_string(), "bob".to_string()];
    let skus = ["widget".to_string(), "gadget".to_string()];
    let mut rng = StdRng::seed_from_u64(5);
    (0..count)
        .map(|n| Order::random(format!("crash-{n}"), &customers, &skus, &mut rng))
        .collect()
}

/// Places every order concurrently through `endpoint`, retrying through outages.
fn place_all(
    endpoint: String,
    shop: Shop,
    orders: Vec<Order>,
) -> tokio::task::JoinHandle<Vec<Placed>> {
    tokio::spawn(async move {
        let client = TreatyClient::connect_lazy(endpoint).unwrap();
        let placing = orders.into_iter().map(|order| {
            let (client, shop) = (client.clone(), shop.clone());
            async move {
                place(&client, &shop, order, Duration::from_secs(120))
                    .await
                    .unwrap()
            }
        });
        futures::future::join_all(placing).await
    })
}

async fn stop_and_audit(dir: &Path, mut services: Services, placed: &[Placed]) {
    for process in [
        &mut services.payment,
        &mut services.inventory,
        &mut services.shipping,
    ] {
        process.terminate();
        assert!(
            exit_status(process).await.success(),
            "{}",
            process.log_tail(40)
        );
    }
    let checks = audit(
        &dir.join("payment"),
        &dir.join("inventory"),
        ShippingData::Sled(&dir.join("shipping")),
        placed,
    )
    .unwrap();
    for check in &checks {
        assert!(check.holds(), "{}: {:?}", check.name, check.violations);
    }
}

fn shop(services: &Services) -> Shop {
    Shop {
        payment: services.payment.endpoint(),
        inventory: services.inventory.endpoint(),
        shipping: services.shipping.endpoint(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_in_flight_when_the_coordinator_is_killed_finish_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let services = start_shop(dir.path()).await;
    let data = dir.path().join("coordinator");
    let mut coordinator = start_treaty(&data, "127.0.0.1:0", None).await;
    let address = coordinator.address;
    let placing = place_all(coordinator.endpoint(), shop(&services), orders(12));

    // Wait until sagas are under way, then kill -9.
    let client = TreatyClient::connect(coordinator.endpoint()).await.unwrap();
    eventually("sagas are running", || async {
        let (running, _) = client
            .list(&[TransactionState::Running], 100, "")
            .await
            .ok()?;
        (running.len() >= 3).then_some(())
    })
    .await;
    assert!(killed_by_sigkill(kill9(&mut coordinator).await));

    let mut restarted = start_treaty(&data, &address.to_string(), None).await;
    let placed = tokio::time::timeout(PATIENCE * 4, placing)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(placed.len(), 12);
    assert!(placed.iter().all(|p| matches!(
        p.state(),
        TransactionState::Completed | TransactionState::Compensated
    )));
    let log = std::fs::read_to_string(&restarted.log_file).unwrap();
    assert!(
        log.contains("resuming a saga"),
        "{}",
        restarted.log_tail(60)
    );
    restarted.terminate();
    assert!(exit_status(&mut restarted).await.success());
    stop_and_audit(dir.path(), services, &placed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_right_after_a_forced_saga_write_resumes_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let services = start_shop(dir.path()).await;
    let data = dir.path().join("coordinator");
    // The 8th forced saga write (a definition, a decision to compensate or a final
    // state) kills the process the moment it is durable.
    let mut coordinator = start_treaty(
        &data,
        "127.0.0.1:0",
        Some("coordinator::after_saga_write=7*off->return"),
    )
    .await;
    let address = coordinator.address;
    let placing = place_all(coordinator.endpoint(), shop(&services), orders(8));
    assert!(
        killed_by_sigkill(exit_status(&mut coordinator).await),
        "{}",
        coordinator.log_tail(40)
    );

    let mut restarted = start_treaty(&data, &address.to_string(), None).await;
    let placed = tokio::time::timeout(PATIENCE * 4, placing)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(placed.len(), 8);
    restarted.terminate();
    assert!(exit_status(&mut restarted).await.success());
    stop_and_audit(dir.path(), services, &placed).await;
}
