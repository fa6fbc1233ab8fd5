//! Disk that stays bounded, end to end over real gRPC and sled: with short retentions, a
//! coordinator forgets more finished transactions than one purge batch holds within
//! seconds (a round used to purge at most 1,000 a minute), and its participants collect
//! every barrier record of them.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;

use treaty_sdk::barrier_gc::BarrierGcOptions;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::ServeOptions;
use treaty_tests::harness::{Coordinator, coordinator_config, eventually};
use treaty_tests::scripted::Scripted;

/// More than one purge batch (1,000).
const TRANSACTIONS: usize = 1_200;
const WORKERS: usize = 16;
const RETENTION_MS: u64 = 500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_transactions_leave_neither_the_log_nor_the_barriers() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.log_retention_ms = RETENTION_MS;
    config.memory_retention_ms = 100;
    config.sweep_interval_ms = 100;
    let coordinator = Coordinator::start_with(config).await;

    let mut stores = Vec::new();
    let mut endpoints = Vec::new();
    let mut stops = Vec::new();
    let mut servers = Vec::new();
    for index in 0..2 {
        let store = Arc::new(
            DurableStore::open(&dir.path().join(format!("p{index}")), Default::default()).unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        endpoints.push(format!("http://{}", listener.local_addr().unwrap()));
        let options = ServeOptions {
            barrier_gc: BarrierGcOptions {
                retention_ms: RETENTION_MS,
                interval_ms: 100,
                ..BarrierGcOptions::default()
            },
            ..ServeOptions::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        servers.push(tokio::spawn(treaty_sdk::serve(
            Arc::new(Scripted::new()),
            store.clone(),
            listener,
            options,
            async {
                let _ = stopped.await;
            },
        )));
        stores.push(store);
        stops.push(stop);
    }

    let client = coordinator.client().await;
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (client, endpoints) = (client.clone(), endpoints.clone());
        workers.push(tokio::spawn(async move {
            for _ in (worker..TRANSACTIONS).step_by(WORKERS) {
                let branches = endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, endpoint)| BranchSpec::new(format!("b{i}"), endpoint, Vec::new()))
                    .collect();
                let (_, outcome) = client
                    .run_two_phase(branches, BeginOptions::default())
                    .await
                    .unwrap();
                assert_eq!(outcome, Outcome::Committed);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }

    for (index, store) in stores.iter().enumerate() {
        eventually(&format!("participant {index}'s barrier is empty"), || {
            let left = store.db().scan_prefix(b"b/").count();
            async move { (left == 0).then_some(()) }
        })
        .await;
    }
    eventually(
        "the coordinator's log holds no finished transaction",
        || {
            let client = client.clone();
            async move {
                let (listed, _) = client.list(&[], 1_000, "").await.unwrap();
                listed.is_empty().then_some(())
            }
        },
    )
    .await;

    coordinator.stop().await.unwrap();
    for stop in stops {
        stop.send(()).unwrap();
    }
    for server in servers {
        server.await.unwrap().unwrap();
    }
}
