//! `treaty bench`'s measures of what a run leaves behind: the coordinator's memory
//! against its budget, the data directories' sizes, and the restart after kill -9 with
//! transactions in flight; and the refusals of their flags.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_memory_is_sampled_by_quarter_within_its_budget() {
    let budget_bytes: u64 = 64 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let csv_path = dir.path().join("rss.csv");
    let (report, stderr) = bench_with_stderr(&[
        "--processes",
        "--workloads",
        "twopc",
        "--duration-s",
        "4",
        "--concurrency",
        "8",
        "--rss-sample-ms",
        "50",
        "--memory-budget-bytes",
        &budget_bytes.to_string(),
        "--rss-csv",
        csv_path.to_str().unwrap(),
    ])
    .await;
    let memory = &report["memory"];
    assert!(number(memory, &["samples"]) >= 8.0, "{memory:#}");
    // The CSV holds the samples the quarters were made of, in time order.
    let csv = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some(
            "elapsed_s,transactions,rss_bytes,log_compactions,log_disk_bytes,\
             log_finished_transactions,log_purged_transactions,retained_transactions,\
             retained_estimated_bytes"
        )
    );
    let mut gauges: Vec<Vec<f64>> = Vec::new();
    let rows: Vec<(f64, u64, u64)> = lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 9, "{line}");
            // The coordinator's gauges: all six, or none when its /metrics did not
            // answer in time.
            if fields[3..].iter().all(|f| !f.is_empty()) {
                gauges.push(fields[3..].iter().map(|f| f.parse().unwrap()).collect());
            } else {
                assert!(fields[3..].iter().all(|f| f.is_empty()), "{line}");
            }
            (
                fields[0].parse().unwrap(),
                fields[1].parse().unwrap(),
                fields[2].parse().unwrap(),
            )
        })
        .collect();
    // Read beside most samples; the log and the memory fill as the run goes on.
    assert!(gauges.len() * 2 >= rows.len(), "{csv}");
    // Compactions and purges only ever add up.
    assert!(
        gauges
            .windows(2)
            .all(|pair| pair[0][0] <= pair[1][0] && pair[0][3] <= pair[1][3]),
        "{csv}"
    );
    let last = gauges.last().unwrap();
    assert!(last[1] > 0.0, "the log's files: {csv}");
    assert!(last[2] > 0.0, "the log's final transactions: {csv}");
    assert!(last[4] > 0.0 && last[5] > 0.0, "retained: {csv}");
    // The warm-up read the log's purges, found the first where the CSV shows it, and
    // lies between the run's first tenth and its half (the CSV's times are rounded to
    // the millisecond).
    assert_eq!(memory["log_purges_read"], true, "{memory:#}");
    let end_s = rows.last().unwrap().0;
    let warmup_s = number(memory, &["warmup_s"]);
    assert!(
        (end_s * 0.1 - 0.001..=end_s * 0.5 + 0.001).contains(&warmup_s),
        "{memory:#}"
    );
    let first_purge_in_csv = csv.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split(',').collect();
        let purged: f64 = fields[6].parse().ok()?;
        (purged > 0.0).then(|| fields[0].parse::<f64>().unwrap())
    });
    match (first_purge_in_csv, memory["log_first_purge_s"].as_f64()) {
        (None, None) => {}
        (Some(in_csv), Some(reported)) => assert!((in_csv - reported).abs() < 0.001),
        other => panic!("first purge in the CSV and reported: {other:?}, {memory:#}"),
    }
    assert_eq!(rows.len() as f64, number(memory, &["samples"]), "{csv}");
    assert!(
        rows.windows(2)
            .all(|pair| pair[0].0 <= pair[1].0 && pair[0].1 <= pair[1].1)
    );
    assert!(rows.iter().all(|&(_, _, rss_bytes)| rss_bytes > 0), "{csv}");
    let largest = rows
        .iter()
        .map(|&(_, _, rss_bytes)| rss_bytes)
        .max()
        .unwrap();
    assert_eq!(largest as f64, number(memory, &["max_bytes"]), "{csv}");
    let quarters = memory["quarters"].as_array().unwrap();
    assert_eq!(quarters.len(), 4, "{memory:#}");
    for quarter in quarters {
        assert!(number(quarter, &["min_bytes"]) > 0.0, "{memory:#}");
        assert!(number(quarter, &["min_bytes"]) <= number(quarter, &["mean_bytes"]));
        assert!(number(quarter, &["mean_bytes"]) <= number(quarter, &["max_bytes"]));
    }
    assert!(number(memory, &["flatness"]) >= 0.0, "{memory:#}");
    // The coordinator reports the budget it was given and keeps finished transactions
    // within their quarter of it.
    assert_eq!(number(memory, &["budget_bytes"]), budget_bytes as f64);
    assert!(
        number(memory, &["retained_transactions"]) > 0.0,
        "{memory:#}"
    );
    let retained = number(memory, &["retained_estimated_bytes"]);
    assert!(
        retained > 0.0 && retained <= budget_bytes as f64 / 4.0,
        "{memory:#}"
    );
    // What they may hold is at most their share: less if the process went over 15/16
    // of the budget (a debug build can, with this smallest budget).
    let allowed = number(memory, &["retained_allowed_bytes"]);
    assert!(
        (0.0..=budget_bytes as f64 / 4.0).contains(&allowed),
        "{memory:#}"
    );
    assert!(stderr.contains("flatness"), "{stderr}");
    assert!(stderr.contains("largest resident set"), "{stderr}");
    // The peak counts what fell between samples: never below the largest sample.
    assert!(
        number(memory, &["peak_bytes"]) >= number(memory, &["max_bytes"]),
        "{memory:#}"
    );
    let warmup_share = number(memory, &["warmup_transactions_share"]);
    assert!((0.0..=1.0).contains(&warmup_share), "{memory:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_budget_below_the_minimum_is_refused_by_name() {
    let stderr = bench_refused(&["--memory-budget-bytes", "1000"]).await;
    assert!(stderr.contains("--memory-budget-bytes"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rss_csv_that_cannot_be_written_is_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("rss.csv");
    let stderr = bench_refused(&["--rss-csv", path.to_str().unwrap(), "--duration-s", "60"]).await;
    assert!(stderr.contains("--rss-csv"), "{stderr}");
    assert!(!stderr.contains("bench twopc"), "the run started: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directories_sizes_are_written_to_the_disk_csv() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.csv");
    let (report, stderr) = bench_with_stderr(&[
        "--duration-s",
        "3",
        "--concurrency",
        "4",
        "--disk-sample-s",
        "1",
        "--disk-csv",
        path.to_str().unwrap(),
    ])
    .await;
    assert!(stderr.contains("disk samples written to"), "{stderr}");
    let csv = std::fs::read_to_string(&path).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    // Seconds, transactions, then two sizes for each data directory.
    assert_eq!(&header[..2], ["elapsed_s", "transactions"], "{csv}");
    assert!(header.len() >= 4 && header.len() % 2 == 0, "{csv}");
    let rows: Vec<Vec<f64>> = lines
        .map(|line| line.split(',').map(|f| f.parse().unwrap()).collect())
        .collect();
    assert!(rows.len() >= 2, "{csv}");
    assert!(rows.iter().all(|row| row.len() == header.len()), "{csv}");
    assert!(rows.last().unwrap()[1] > 0.0, "{csv}");
    assert!(
        rows.iter()
            .all(|row| row[2..].iter().any(|&bytes| bytes > 0.0)),
        "{csv}"
    );
    // The summary is in the JSON report too, one entry per data directory.
    if rows.len() >= 4 {
        let directories = report["disk"].as_array().expect("a disk summary");
        assert_eq!(directories.len(), (header.len() - 2) / 2, "{report:#}");
        assert!(
            directories.iter().all(|d| d["name"].is_string()),
            "{report:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_csv_that_cannot_be_written_is_refused_before_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing").join("disk.csv");
    let stderr = bench_refused(&[
        "--disk-sample-s",
        "1",
        "--disk-csv",
        path.to_str().unwrap(),
        "--duration-s",
        "60",
    ])
    .await;
    assert!(stderr.contains("--disk-csv"), "{stderr}");
    assert!(!stderr.contains("bench twopc"), "the run started: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_with_transactions_in_flight_the_restart_resolves_them_all() {
    let (report, stderr) = bench_with_stderr(&[
        "--processes",
        "--recovery",
        "--in-flight",
        "200",
        "--in-doubt-poll-ms",
        "200",
        "--recovery-timeout-s",
        "150",
    ])
    .await;
    assert_eq!(number(&report, &["in_flight"]), 200.0, "{report:#}");
    assert_eq!(number(&report, &["decided"]), 100.0, "{report:#}");
    assert_eq!(
        number(&report, &["decided_still_committed"]),
        100.0,
        "{report:#}"
    );
    assert!(
        number(&report, &["in_progress_at_kill"]) >= 200.0,
        "{report:#}"
    );
    assert!(
        number(&report, &["in_doubt_at_kill"]) >= 100.0,
        "{report:#}"
    );
    // The decided half is committed by the restarted coordinator's recovery. The
    // undecided half had its intents logged (parallel commit): the restarted coordinator
    // asks their participants again, released by then, and commits them. One whose
    // intent was not yet durable at the kill would be unknown to it (presumed abort), its
    // participants asking and hearing ABORT (one inquiry per prepared branch at most:
    // 100 transactions × 2 participants).
    let committed = number(&report, &["committed_after_restart"]);
    assert!((100.0..=200.0).contains(&committed), "{report:#}");
    assert_eq!(
        number(&report, &["aborted_after_restart"]),
        0.0,
        "{report:#}"
    );
    let aborts = number(&report, &["participant_inquiries_abort"]);
    assert!(aborts <= 200.0, "{report:#}");
    // Each decided transaction's two branches committed at the participants after the
    // release, and no commit met an aborted branch (the bench itself fails otherwise).
    assert!(
        number(&report, &["participant_commits_committed"]) >= 200.0,
        "{report:#}"
    );
    assert_eq!(
        number(&report, &["participant_commits_already_aborted"]),
        0.0,
        "{report:#}"
    );
    let serving = number(&report, &["restart_to_serving_ms"]);
    let idle = number(&report, &["restart_to_coordinator_idle_ms"]);
    let resolved = number(&report, &["restart_to_all_resolved_ms"]);
    assert!(
        0.0 < serving && serving <= idle && idle <= resolved,
        "{report:#}"
    );
    assert!(stderr.contains("kill -9"), "{stderr}");
}
