//! Tests of the metrics: bounded labels, and what a scrape shows.

use super::*;

#[test]
fn endpoint_labels_are_bounded() {
    let metrics = Metrics::new();
    for i in 0..MAX_ENDPOINT_LABELS + 10 {
        metrics.participant_call(
            &format!("http://10.0.0.1:{}", 1000 + i),
            CallOperation::prepare,
            CallResult::ok,
            0.001,
        );
    }
    let text = metrics.encode(Health::default(), 0).unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("treaty_participant_call_duration_seconds_count"))
        .count();
    assert_eq!(series, MAX_ENDPOINT_LABELS + 1, "{text}");
    assert!(text.contains("endpoint=\"other\""));
}

#[test]
fn circuit_states_are_exported_only_for_endpoints_with_a_label_of_their_own() {
    let metrics = Metrics::new();
    let gauges: Vec<Gauge> = (0..MAX_ENDPOINT_LABELS + 2)
        .map(|i| metrics.circuit_gauge(&format!("http://10.0.0.1:{}", 1000 + i)))
        .collect();
    // Two endpoints past the cap: one open, one closed after it. A shared series
    // would show the last write (closed) for both.
    gauges[MAX_ENDPOINT_LABELS].set(2);
    gauges[MAX_ENDPOINT_LABELS + 1].set(0);
    gauges[0].set(2);
    let text = metrics.encode(Health::default(), 0).unwrap();
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("treaty_circuit_state{"))
        .collect();
    assert_eq!(series.len(), MAX_ENDPOINT_LABELS, "{text}");
    assert!(
        series.contains(&"treaty_circuit_state{endpoint=\"http://10.0.0.1:1000\"} 2"),
        "{series:?}"
    );
    assert!(
        !text.contains("treaty_circuit_state{endpoint=\"other\""),
        "{text}"
    );
    // The endpoints past the cap still have working gauges of their own.
    assert_eq!(gauges[MAX_ENDPOINT_LABELS].get(), 2);
    assert_eq!(gauges[MAX_ENDPOINT_LABELS + 1].get(), 0);
}

#[test]
fn gauges_come_from_the_health_summary() {
    let metrics = Metrics::new();
    metrics.transaction_ended(TxnKind::TwoPhase, TxnState::Committed);
    metrics.transaction_ended(TxnKind::Saga, TxnState::Compensated);
    metrics.transaction_ended(TxnKind::Saga, TxnState::Running);
    let health = Health {
        in_doubt: 3,
        oldest_in_doubt_unix_ms: Some(10_000),
        stuck_two_phase_commits: 2,
        retained_transactions: 7,
        retained_estimated_bytes: 9_000,
        ..Health::default()
    };
    metrics.memory_budget(&crate::defaults::MemoryBudget::of(400));
    metrics.log_purged(3, 2);
    metrics.log_purged(1, 0);
    metrics.set_log_finished(5);
    metrics.log_compacted(true);
    metrics.log_compacted(true);
    metrics.log_compacted(false);
    metrics.set_log_disk_bytes(4096);
    let text = metrics.encode(health, 12_500).unwrap();
    for expected in [
        "treaty_log_compactions_total{result=\"switched\"} 2",
        "treaty_log_compactions_total{result=\"abandoned\"} 1",
        "treaty_log_disk_bytes 4096",
        "treaty_log_purged_total{reason=\"retention\"} 4",
        "treaty_log_purged_total{reason=\"limit\"} 2",
        "treaty_log_finished_transactions 5",
        // (100 bytes of log share − two 12-byte caches) ÷ 256 bytes each.
        "treaty_log_finished_transactions_limit 0",
        "treaty_transactions_total{protocol=\"two_phase\",outcome=\"committed\"} 1",
        "treaty_transactions_total{protocol=\"saga\",outcome=\"compensated\"} 1",
        "treaty_in_doubt_transactions 3",
        "treaty_stuck_two_phase_commits 2",
        "treaty_in_doubt_oldest_age_seconds 2.5",
        "treaty_retry_backlog_oldest_age_seconds 0.0",
        "treaty_retained_transactions 7",
        "treaty_retained_transactions_estimated_bytes 9000",
        "treaty_memory_budget_bytes{part=\"total\"} 400",
        "treaty_memory_budget_bytes{part=\"log\"} 100",
        "treaty_memory_budget_bytes{part=\"retained\"} 100",
        "treaty_memory_budget_bytes{part=\"headroom\"} 200",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
    assert!(!text.contains("outcome=\"running\""));
}
