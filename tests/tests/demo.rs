//! The README's first command: the demo runs to completion and its checks of the banks'
//! own data pass.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use treaty_tests::process::workspace_binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_commits_one_transfer_aborts_the_other_and_balances_hold() {
    let demo = workspace_binary("treaty-examples", "demo");
    let run = tokio::process::Command::new(demo)
        .env("CARGO", env!("CARGO"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the demo finishes within 5 minutes")
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "Outcome: COMMITTED",
        "Outcome: ABORTED (branch alice voted NO: insufficient funds",
        "✓ money conserved: 150 before, 150 after",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
