//! `treaty bench` as a process: every workload runs and is measured, with the coordinator
//! and participants as child processes and in process. Speed is never asserted (that is
//! what the bench is for); that it measured, and counted what the protocols must do, is.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use serde_json::Value;
use treaty_tests::process::workspace_binary;

/// A bench of a few seconds per workload, with process starts and a debug build on a
/// shared machine: generous.
const BENCH_PATIENCE: Duration = Duration::from_secs(180);

/// Runs `treaty bench ARGS --json` and returns its report.
async fn bench(args: &[&str]) -> Value {
    let run = tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .env("TREATY_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BENCH_PATIENCE, run)
        .await
        .expect("the bench ends in time")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(" done "),
        "no progress on stderr:\n{stderr}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: not JSON:\n{stdout}"))
}

fn workload<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workload"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report:#}"))
}

fn number(value: &Value, path: &[&str]) -> f64 {
    let mut at = value;
    for key in path {
        at = &at[key];
    }
    at.as_f64()
        .unwrap_or_else(|| panic!("{} is not a number in {value:#}", path.join(".")))
}

/// Within a tenth of `expected`: retries are allowed, but not a different protocol.
fn about(value: f64, expected: f64) -> bool {
    (value - expected).abs() <= expected * 0.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_is_measured_with_separate_processes() {
    let report = bench(&["--processes", "--duration-s", "2", "--concurrency", "4"]).await;
    assert_eq!(report["mode"], "processes", "{report:#}");
    for name in ["twopc", "saga", "compensating", "ceiling"] {
        let w = workload(&report, name);
        assert!(number(w, &["transactions"]) > 0.0, "{w:#}");
        assert_eq!(number(w, &["failed"]), 0.0, "{w:#}");
        assert!(number(w, &["transactions_per_s"]) > 0.0, "{w:#}");
        assert!(number(w, &["latency", "p999_ms"]) >= number(w, &["latency", "p50_ms"]));
        assert!(number(w, &["efficiency"]) > 0.0, "{w:#}");
        // The coordinator and both participants, each on its own.
        assert_eq!(w["cpu"].as_array().unwrap().len(), 3, "{w:#}");
        assert!(number(w, &["coordinator", "rss_bytes"]) > 0.0, "{w:#}");
        if name == "ceiling" {
            assert_eq!(number(w, &["rpcs_per_transaction", "total"]), 1.0, "{w:#}");
            continue;
        }
        assert!(
            number(w, &["coordinator", "fsyncs_per_transaction"]) > 0.0,
            "{w:#}"
        );
        assert!(
            number(w, &["participants", "fsyncs_per_transaction"]) > 0.0,
            "{w:#}"
        );
        assert!(number(w, &["cpu_us_per_transaction"]) > 0.0, "{w:#}");
    }
    let rpcs =
        |name: &str, side: &str| number(workload(&report, name), &["rpcs_per_transaction", side]);
    // Two-phase commit over 2 participants: one Begin with commit; Prepare and Commit on
    // each.
    assert_eq!(rpcs("twopc", "client_to_coordinator"), 1.0);
    assert!(
        about(rpcs("twopc", "coordinator_to_participants"), 4.0),
        "{report:#}"
    );
    // A 3-step saga: one SubmitSaga; one call per step.
    assert_eq!(rpcs("saga", "client_to_coordinator"), 1.0);
    assert!(
        about(rpcs("saga", "coordinator_to_participants"), 3.0),
        "{report:#}"
    );
    // Its last step rejected: three steps, then the two before it compensated.
    assert!(
        about(rpcs("compensating", "coordinator_to_participants"), 5.0),
        "{report:#}"
    );
    assert_eq!(
        number(workload(&report, "compensating"), &["sagas_compensated"]),
        number(workload(&report, "compensating"), &["transactions"])
    );
    assert!(number(&report, &["ceiling_calls_per_s"]) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_twopc_alone_has_no_efficiency() {
    let report = bench(&[
        "--workloads",
        "twopc",
        "--duration-s",
        "1",
        "--concurrency",
        "4",
    ])
    .await;
    assert_eq!(report["mode"], "in_process", "{report:#}");
    assert_eq!(report["workloads"].as_array().unwrap().len(), 1);
    let w = workload(&report, "twopc");
    assert!(number(w, &["transactions"]) > 0.0, "{w:#}");
    assert_eq!(number(w, &["failed"]), 0.0, "{w:#}");
    assert!(w["efficiency"].is_null(), "{w:#}");
    assert_eq!(w["cpu_includes_load_generator"], true, "{w:#}");
    assert!(
        number(w, &["participants", "fsyncs_per_transaction"]) > 0.0,
        "{w:#}"
    );
}
