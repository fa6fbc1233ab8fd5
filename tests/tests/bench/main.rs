//! `treaty bench` as a process: every workload runs and is measured, with the coordinator
//! and participants as child processes and in process. Speed is never asserted (that is
//! what the bench is for); that it measured, and counted what the protocols must do, is.
//! What a run leaves behind (memory, disk, a restart after kill -9) is in [`resources`].

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use serde_json::Value;
use treaty_tests::process::workspace_binary;

mod resources;

/// A bench of a few seconds per workload, with process starts and a debug build on a
/// shared machine: generous.
const BENCH_PATIENCE: Duration = Duration::from_secs(180);

/// Runs `treaty bench ARGS --json` and returns its report, checking that it told on
/// stderr how each workload ended. (Not its progress lines: they come a second apart
/// from the workload's start, so a one-second workload may end before the first; the
/// workloads of `every_workload_is_measured_with_separate_processes` run long enough
/// to check them.)
async fn bench(args: &[&str]) -> Value {
    let (report, stderr) = bench_with_stderr(args).await;
    let workloads = report["workloads"].as_array().expect("workloads");
    for workload in workloads {
        let name = workload["workload"].as_str().expect("a workload's name");
        assert!(
            stderr
                .lines()
                .any(|line| line.starts_with(&format!("bench {name} "))
                    && line.contains(" done, ")),
            "no end of {name} on stderr:\n{stderr}"
        );
    }
    report
}

/// Runs `treaty bench ARGS --json` and returns its report and what it printed on stderr.
async fn bench_with_stderr(args: &[&str]) -> (Value, String) {
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
    let report =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: not JSON:\n{stdout}"));
    (report, stderr.into_owned())
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

/// One second of two-phase commits, 4 in flight.
const QUICK_TWOPC: [&str; 6] = [
    "--workloads",
    "twopc",
    "--duration-s",
    "1",
    "--concurrency",
    "4",
];

/// Within a tenth of `expected`: retries are allowed, but not a different protocol.
fn about(value: f64, expected: f64) -> bool {
    (value - expected).abs() <= expected * 0.1
}

/// Runs `treaty bench ARGS`, which must fail; returns what it printed on stderr.
async fn bench_refused(args: &[&str]) -> String {
    let output = tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
        .arg("bench")
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(BENCH_PATIENCE, output)
        .await
        .expect("the bench ends in time")
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workload_is_measured_with_separate_processes() {
    let (report, stderr) =
        bench_with_stderr(&["--processes", "--duration-s", "2", "--concurrency", "4"]).await;
    assert!(
        stderr.contains(" done "),
        "no progress on stderr:\n{stderr}"
    );
    // Stopped participants first, none of them saw the coordinator's stream break.
    assert!(!stderr.contains("a call stream broke"), "{stderr}");
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
        assert!(
            number(w, &["coordinator", "log_compactions_ended"]) >= 0.0,
            "{w:#}"
        );
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
        // The syncs' time, read from each server's `/metrics`.
        assert!(number(w, &["coordinator", "fsync_mean_ms"]) > 0.0, "{w:#}");
        assert!(number(w, &["participants", "fsync_mean_ms"]) > 0.0, "{w:#}");
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
    let report = bench(&QUICK_TWOPC).await;
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
    // The sync probe runs by default; the target it serves is only told at one in
    // flight.
    assert!(number(&report, &["sync_probe", "at_once", "rounds"]) > 0.0);
    assert!(report["one_in_flight_target"].is_null(), "{report:#}");
}

/// One saga at a time, its three steps at once: the first and third on one participant,
/// the second on the other. By default a step's YES and its commit are each forced, one
/// after the other, so each participant syncs at least twice per saga (4 or more in
/// all). With the YES unforced, only the three commits are forced: at most 3 syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_step_waits_for_one_forced_write_with_the_yes_unforced() {
    for mode in [&["--processes"][..], &[]] {
        let mut args = vec![
            "--workloads",
            "saga",
            "--duration-s",
            "2",
            "--concurrency",
            "1",
            "--unforced-one-phase-yes",
        ];
        args.extend(mode);
        let report = bench(&args).await;
        assert_eq!(report["unforced_one_phase_yes"], true, "{report:#}");
        let w = workload(&report, "saga");
        assert!(number(w, &["transactions"]) > 0.0, "{w:#}");
        assert_eq!(number(w, &["failed"]), 0.0, "{w:#}");
        let fsyncs = number(w, &["participants", "fsyncs_per_transaction"]);
        assert!(fsyncs > 0.0 && fsyncs <= 3.0, "{mode:?}: {w:#}");
    }
}

/// At one in flight the bench computes the target from its own run: the ceiling's p50
/// and the sync probe's fsync, timed alone and with the coordinator and both
/// participants syncing at once, in the directory that holds their stores or in one
/// named for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_one_in_flight_the_target_comes_from_the_ceiling_and_a_sync_probe() {
    let (report, stderr) = bench_with_stderr(&[
        "--processes",
        "--workloads",
        "twopc,ceiling",
        "--duration-s",
        "1",
        "--concurrency",
        "1",
        "--sync-probe-ms",
        "200",
    ])
    .await;
    let probe = &report["sync_probe"];
    assert_eq!(number(probe, &["alone", "writers"]), 1.0, "{probe:#}");
    assert_eq!(number(probe, &["at_once", "writers"]), 3.0, "{probe:#}");
    for part in ["alone", "at_once"] {
        assert!(number(probe, &[part, "rounds"]) > 0.0, "{probe:#}");
        assert!(number(probe, &[part, "p50_ms"]) > 0.0, "{probe:#}");
    }
    assert!(stderr.contains("bench fsync in "), "{stderr}");
    let target = &report["one_in_flight_target"];
    let ceiling_p50 = number(workload(&report, "ceiling"), &["latency", "p50_ms"]);
    assert_eq!(number(target, &["ceiling_p50_ms"]), ceiling_p50);
    assert_eq!(
        number(target, &["twopc_p50_ms"]),
        number(workload(&report, "twopc"), &["latency", "p50_ms"])
    );
    for (field, part) in [
        ("target_with_fsync_alone_ms", "alone"),
        ("target_with_syncs_at_once_ms", "at_once"),
    ] {
        let expected = 2.0 * (2.0 * ceiling_p50 + number(probe, &[part, "p50_ms"]));
        assert!(
            (number(target, &[field]) - expected).abs() < 1e-9,
            "{field}: {report:#}"
        );
    }
    assert_eq!(number(target, &["syncs_at_once"]), 3.0);
    // Nor without the probe (`in_process_twopc_alone_has_no_efficiency`: nor at another
    // concurrency).
    let report = bench(&[&QUICK_TWOPC[..], &["--sync-probe-ms", "0"]].concat()).await;
    assert!(report["sync_probe"].is_null(), "{report:#}");
    assert!(report["one_in_flight_target"].is_null(), "{report:#}");
    let stderr = bench_refused(&["--sync-probe-ms", "60001"]).await;
    assert!(stderr.contains("--sync-probe-ms"), "{stderr}");
    // Where it is told to (with `--endpoint`, the stores need not share the disk whose
    // sync the target counts), in a directory of its own that it removes, leaving what
    // was there.
    let probe_in = tempfile::tempdir().unwrap();
    let kept = probe_in.path().join("kept");
    std::fs::write(&kept, b"not the probe's").unwrap();
    let probe_in_arg = probe_in.path().to_string_lossy().into_owned();
    let told = ["--sync-probe-ms", "50", "--sync-probe-dir", &probe_in_arg];
    let report = bench(&[&QUICK_TWOPC[..], &told].concat()).await;
    let written_in = report["sync_probe"]["dir"]
        .as_str()
        .expect("the probe's directory");
    let written_in = std::path::Path::new(written_in);
    assert!(
        written_in.starts_with(probe_in.path()) && written_in != probe_in.path(),
        "{report:#}"
    );
    let left: Vec<_> = std::fs::read_dir(probe_in.path())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(left, vec![kept.clone()]);
    assert_eq!(std::fs::read(&kept).unwrap(), b"not the probe's");
    // Refused by name before anything starts: a file, or the probe switched off.
    let kept_arg = kept.to_string_lossy().into_owned();
    let stderr = bench_refused(&["--sync-probe-dir", &kept_arg]).await;
    assert!(
        stderr.contains("--sync-probe-dir") && stderr.contains("not a directory"),
        "{stderr}"
    );
    let off = ["--sync-probe-ms", "0", "--sync-probe-dir", &probe_in_arg];
    let stderr = bench_refused(&off).await;
    assert!(
        stderr.contains("--sync-probe-dir needs the probe"),
        "{stderr}"
    );
}

/// A coordinator the bench did not start is measured through the metrics address it is
/// given, and its CPU through the process id it is given; without `--endpoint` either is
/// refused, and so is a process id of a process that does not serve the endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_coordinator_is_measured_through_its_metrics_address() {
    let dir = tempfile::tempdir().unwrap();
    let (daemon, metrics) = treaty_tests::scrape::start_treaty_with_metrics(dir.path(), &[]).await;
    let metrics = metrics.to_string();
    let endpoint = daemon.endpoint();
    let pid = daemon.id().expect("the coordinator runs").to_string();
    let coordinator = [
        "--endpoint",
        &endpoint,
        "--coordinator-metrics",
        &metrics,
        "--coordinator-pid",
        &pid,
    ];
    let report = bench(&[&coordinator[..], &QUICK_TWOPC[..]].concat()).await;
    let w = workload(&report, "twopc");
    assert!(number(w, &["transactions"]) > 0.0, "{w:#}");
    assert_eq!(number(w, &["failed"]), 0.0, "{w:#}");
    let cpu = w["cpu"].as_array().expect("CPU per process");
    assert_eq!(cpu[0]["name"], "coordinator", "{w:#}");
    assert!(number(&cpu[0], &["cpu_us_per_transaction"]) > 0.0, "{w:#}");
    // Counted by the coordinator: a 2PC over two participants is 4 calls to them and 4
    // log records (the intent, the decision, the end and its retention entry), and its
    // intent is forced.
    assert!(
        about(
            number(w, &["rpcs_per_transaction", "coordinator_to_participants"]),
            4.0
        ),
        "{w:#}"
    );
    assert!(
        about(
            number(w, &["coordinator", "log_records_per_transaction"]),
            4.0
        ),
        "{w:#}"
    );
    assert!(
        number(w, &["coordinator", "fsyncs_per_transaction"]) > 0.0,
        "{w:#}"
    );

    let stderr = bench_refused(&["--coordinator-metrics", &metrics]).await;
    assert!(
        stderr.contains("--coordinator-metrics needs --endpoint"),
        "{stderr}"
    );
    let stderr = bench_refused(&["--coordinator-pid", &pid]).await;
    assert!(
        stderr.contains("--coordinator-pid needs --endpoint"),
        "{stderr}"
    );
    // A process id with no process behind it (pid_max is at most 2^22).
    let gone = [&coordinator[..4], &["--coordinator-pid", "4194305"]].concat();
    let stderr = bench_refused(&gone).await;
    assert!(stderr.contains("no such process"), "{stderr}");
    // A process that runs but does not serve the endpoint: this test's own.
    let this_test = std::process::id().to_string();
    let other = [&coordinator[..4], &["--coordinator-pid", &this_test]].concat();
    let stderr = bench_refused(&other).await;
    assert!(
        stderr.contains(&format!(
            "--coordinator-pid {this_test}: that process does not listen on port"
        )),
        "{stderr}"
    );
}
