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
    let line_of = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or("")
            .to_string()
    };
    assert!(line_of(&committed).contains("2pc   COMMITTED"), "{out}");
    assert!(line_of(&active).contains("2pc   ACTIVE"), "{out}");

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
    assert!(
        out.contains("ONE_PHASE_COMMIT") && out.contains("committed"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_transactions_and_reports_them() {
    let run = tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
        .args([
            "bench",
            "--participants",
            "2",
            "--concurrency",
            "4",
            "--duration-s",
            "1",
        ])
        .env("TREATY_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, run).await.unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Speed is not asserted (that is what the bench is for); that it measured is.
    let committed: u64 = stdout
        .lines()
        .find_map(|line| line.strip_prefix("committed "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no committed count in:\n{stdout}"));
    assert!(committed > 0, "{stdout}");
    assert!(stdout.contains("; 0 failed or aborted"), "{stdout}");
    assert!(stdout.contains("latency ms: p50"), "{stdout}");
}
