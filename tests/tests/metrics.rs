//! Metrics (issue 9): a real `treaty serve` with `--metrics-listen`, a known workload over
//! real gRPC, and scrapes of `/metrics` whose numbers must match it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome};
use treaty_sdk::{SagaStep, SubmitOptions, TreatyClient};
use treaty_tests::harness::{ParticipantServer, eventually};
use treaty_tests::scrape::{call_count, get, sample, scrape, start_treaty_with_metrics};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_a_known_workload_shows_its_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("participant")).await;
    // Retries back off 20 to 200 ms (start_treaty's settings).
    let (mut daemon, metrics_address) = start_treaty_with_metrics(dir.path(), &[]).await;
    let client = TreatyClient::connect(daemon.endpoint()).await.unwrap();
    let endpoint = participant.endpoint.clone();
    let branches = |second: &str| {
        vec![
            BranchSpec::new("a", &endpoint, "yes"),
            BranchSpec::new("b", &endpoint, second),
        ]
    };

    // 5 commits and 2 aborts (a NO vote) of two branches each; a saga that completes and
    // one that is compensated (its second step is refused).
    for _ in 0..5 {
        let (_, outcome) = client
            .run_two_phase(branches("yes"), BeginOptions::default())
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Committed);
    }
    for _ in 0..2 {
        let (_, outcome) = client
            .run_two_phase(branches("no"), BeginOptions::default())
            .await
            .unwrap();
        assert!(matches!(outcome, Outcome::Aborted { .. }), "{outcome:?}");
    }
    let waiting = SubmitOptions {
        wait_for_outcome: true,
        ..Default::default()
    };
    for second in ["yes", "no"] {
        client
            .submit_saga(
                vec![
                    SagaStep::new("a", &endpoint, "yes").compensation("undo a"),
                    SagaStep::new("b", &endpoint, second)
                        .compensation("undo b")
                        .after(["a"]),
                ],
                waiting.clone(),
            )
            .await
            .unwrap();
    }
    // Aborts and acknowledgements finish after the callers heard the outcome.
    let text = eventually("every transaction is final", || async {
        let text = scrape(metrics_address).await;
        let done = sample(
            &text,
            "treaty_transactions_total{protocol=\"two_phase\",outcome=\"aborted\"}",
        ) == 2.0
            && sample(
                &text,
                "treaty_transactions_total{protocol=\"two_phase\",outcome=\"committed\"}",
            ) == 5.0;
        done.then_some(text)
    })
    .await;
    for (series, expected) in [
        (
            "treaty_transactions_total{protocol=\"saga\",outcome=\"completed\"}",
            1.0,
        ),
        (
            "treaty_transactions_total{protocol=\"saga\",outcome=\"compensated\"}",
            1.0,
        ),
        (
            "treaty_transactions_in_progress{protocol=\"two_phase\"}",
            0.0,
        ),
        ("treaty_transactions_in_progress{protocol=\"saga\"}", 0.0),
        ("treaty_in_doubt_transactions", 0.0),
        ("treaty_stuck_sagas", 0.0),
        ("treaty_stuck_two_phase_commits", 0.0),
        ("treaty_heuristic_outcomes_total", 0.0),
    ] {
        assert_eq!(sample(&text, series), expected, "{series} in\n{text}");
    }
    // Every prepare was answered (a NO vote is an answer); 10 phase-2 commits; 4 saga
    // steps (one refused) and one compensation.
    assert_eq!(
        call_count(&text, &endpoint, "prepare", "ok"),
        14.0,
        "{text}"
    );
    assert_eq!(call_count(&text, &endpoint, "commit", "ok"), 10.0, "{text}");
    assert_eq!(call_count(&text, &endpoint, "step", "ok"), 4.0, "{text}");
    assert_eq!(
        call_count(&text, &endpoint, "compensate", "ok"),
        1.0,
        "{text}"
    );
    // Each commit decision and each saga definition was forced through the log.
    assert!(
        sample(&text, "treaty_log_fsync_duration_seconds_count") >= 7.0,
        "{text}"
    );
    assert!(
        sample(&text, "treaty_log_batch_records_count") >= 7.0,
        "{text}"
    );

    // A participant that fails its commits holds a decided transaction in doubt, and its
    // failed deliveries wait in the retry backlog, until it recovers.
    participant.participant.fail_next_commits(1_000_000);
    let stuck = client
        .begin(BeginOptions::default(), branches("yes"))
        .await
        .unwrap();
    assert_eq!(client.commit(&stuck).await.unwrap(), Outcome::Committed);
    let text = eventually(
        "the transaction shows in doubt with a retry backlog",
        || async {
            let text = scrape(metrics_address).await;
            let backlog = sample(&text, "treaty_retry_backlog_oldest_age_seconds");
            (sample(&text, "treaty_in_doubt_transactions") == 1.0 && backlog > 0.0).then_some(text)
        },
    )
    .await;
    assert!(
        sample(&text, "treaty_in_doubt_oldest_age_seconds") > 0.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "treaty_transactions_in_progress{protocol=\"two_phase\"}"
        ),
        1.0
    );
    assert!(
        call_count(&text, &endpoint, "commit", "error") >= 1.0,
        "{text}"
    );
    participant.participant.fail_next_commits(0);
    let text = eventually(
        "the commit is delivered once the participant recovers",
        || async {
            let text = scrape(metrics_address).await;
            (sample(
                &text,
                "treaty_transactions_total{protocol=\"two_phase\",outcome=\"committed\"}",
            ) == 6.0)
                .then_some(text)
        },
    )
    .await;
    assert_eq!(sample(&text, "treaty_in_doubt_transactions"), 0.0);
    assert_eq!(
        sample(&text, "treaty_retry_backlog_oldest_age_seconds"),
        0.0
    );

    // Only /metrics is served.
    // Every metric the shipped Grafana dashboard queries is one this daemon exposes.
    let dashboard_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/grafana/treaty-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_path).unwrap()).unwrap();
    let queried: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
        .map(|target| target["expr"].as_str().unwrap().to_string())
        .collect();
    assert!(queried.len() >= 10, "{queried:?}");
    for expr in &queried {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("treaty_"))
        {
            let family = ["_bucket", "_sum", "_count", "_total"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                text.contains(&format!("# TYPE {family} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "the dashboard queries {name}, which /metrics does not expose"
            );
        }
    }

    let (head, _) = get(metrics_address, "/").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    daemon.stop(Duration::from_secs(30)).await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_resident_set_and_what_finished_transactions_may_hold_are_shown() {
    let dir = tempfile::tempdir().unwrap();
    let budget_bytes: u64 = 256 * 1024 * 1024;
    let (_daemon, metrics_address) = start_treaty_with_metrics(
        dir.path(),
        &["--memory-budget-bytes", &budget_bytes.to_string()],
    )
    .await;
    // The governor reads the resident set every second.
    let text = eventually("the governor's first reading", || async {
        let text = scrape(metrics_address).await;
        (sample(&text, "treaty_resident_memory_bytes") > 0.0).then_some(text)
    })
    .await;
    let resident = sample(&text, "treaty_resident_memory_bytes");
    assert!(resident < budget_bytes as f64, "{text}");
    // Well under the budget: finished transactions may hold their whole share.
    assert_eq!(
        sample(&text, "treaty_retained_transactions_allowed_bytes"),
        (budget_bytes / 4) as f64,
        "{text}"
    );
}
