//! The demos run to completion and their checks pass: the order saga demo (the README's
//! first command, with a coordinator crash half-way), the same with TLS and tokens on
//! every hop (`--secure`), the same with the shipping service in Python on the Python
//! participant SDK (`--python-shipping`), and the two-phase bank demo.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use treaty_tests::process::workspace_binary;

async fn run(binary: &str, args: &[&str]) -> String {
    let run = tokio::process::Command::new(workspace_binary("treaty-examples", binary))
        .args(args)
        .env("CARGO", env!("CARGO"))
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the demo finishes within 5 minutes")
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{binary} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// What every run of the order demo prints: the crash, both outcomes, the invariants.
const ORDER_DEMO_LINES: [&str; 10] = [
    "! coordinator killed with SIGKILL",
    "! coordinator back",
    "completed",
    "compensated",
    "✓ money conserved",
    "✓ stock conserved (stock + reserved)",
    "✓ no refund without a charge",
    "✓ no shipment for a compensated order",
    "✓ every order finished",
    "✓ every charge is the order's amount",
];

fn assert_lines(stdout: &str, expected: &[&str]) {
    for line in expected {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains('✗'), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_demo_survives_a_coordinator_crash_and_its_invariants_hold() {
    let stdout = run("demo", &["--orders", "40", "--concurrency", "8"]).await;
    assert_lines(&stdout, &ORDER_DEMO_LINES);
    assert!(!stdout.contains("https://"), "the default run is cleartext");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_demo_runs_with_tls_and_tokens_on_every_hop() {
    let stdout = run(
        "demo",
        &["--secure", "--orders", "40", "--concurrency", "8"],
    )
    .await;
    assert_lines(&stdout, &ORDER_DEMO_LINES);
    assert_lines(
        &stdout,
        &[
            "TLS on every hop and a token on every call",
            "coordinator  https://127.0.0.1:",
            "payment      https://127.0.0.1:",
            "✓ a caller without the coordinator's token is refused",
            "✓ a client without a token is refused by the coordinator",
        ],
    );
    assert!(
        !stdout.contains("http://"),
        "a hop ran cleartext:\n{stdout}"
    );
}

/// Shipping in Python (its SQLite file audited like the Rust services' sled data), with TLS
/// and tokens so that the Python SDK's secure path runs too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_demo_holds_with_the_shipping_service_in_python() {
    let stdout = run(
        "demo",
        &[
            "--python-shipping",
            "--secure",
            "--orders",
            "40",
            "--concurrency",
            "8",
        ],
    )
    .await;
    assert_lines(&stdout, &ORDER_DEMO_LINES);
    assert_lines(
        &stdout,
        &[
            "in Python (examples/python/shipping.py",
            "✓ completed orders are charged, reserved and shipped",
        ],
    );
    let shipping = stdout
        .lines()
        .find(|line| line.trim_start().starts_with("shipping "))
        .expect("the demo names the shipping service");
    assert!(shipping.contains("https://127.0.0.1:"), "{shipping}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bank_demo_commits_one_transfer_aborts_the_other_and_balances_hold() {
    let stdout = run("bank-demo", &[]).await;
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
