//! The `treaty txn …` commands against a running coordinator.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome};
use treaty_tests::harness::{Coordinator, PATIENCE, ParticipantServer};
use treaty_tests::process::workspace_binary;

async fn treaty(endpoint: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
        .arg("txn")
        .args(args)
        .args(["--endpoint", endpoint])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, output)
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_list_show_watch_and_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    let (committed, outcome) = client
        .run_two_phase(
            vec![BranchSpec::new("solo", &participant.endpoint, "yes")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let active = client
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("x", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    let endpoint = coordinator.endpoint.as_str();

    let (ok, out) = treaty(endpoint, &["list"]).await;
    assert!(ok, "{out}");
    assert!(out.contains(&format!("{committed}  COMMITTED")), "{out}");
    assert!(out.contains(&format!("{active}  ACTIVE")), "{out}");

    let (ok, out) = treaty(endpoint, &["list", "--state", "active"]).await;
    assert!(
        ok && out.contains(&active) && !out.contains(&committed),
        "{out}"
    );

    let (ok, out) = treaty(endpoint, &["show", &committed]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("branch solo") && out.contains("-> COMMITTED"),
        "{out}"
    );

    let (ok, out) = treaty(endpoint, &["watch", &committed]).await;
    assert!(ok && out.contains("COMMITTED"), "{out}");

    let (ok, out) = treaty(endpoint, &["outcome", &committed]).await;
    assert!(ok && out.trim() == "COMMIT", "{out}");
    let (ok, out) = treaty(endpoint, &["outcome", &active]).await;
    assert!(ok && out.trim() == "PENDING", "{out}");

    // Errors are reported, with a non-zero exit.
    let (ok, out) = treaty(endpoint, &["show", "not-an-id"]).await;
    assert!(!ok && out.contains("transaction_id"), "{out}");

    participant.stop().await;
    coordinator.stop().await.unwrap();
}
