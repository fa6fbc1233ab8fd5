//! Tests of the report: what a workload's figures are made of, and the target at one
//! in flight.

use super::*;
use crate::bench::observe::{CoordinatorCounts, ParticipantCounts};
use std::time::Duration;

/// `transactions` that ended as asked in one second, 2 ms each.
fn one_second_of(transactions: u64) -> LoadResult {
    one_second_taking(transactions, Duration::from_millis(2))
}

/// `transactions` that ended as asked in one second, each taking `latency`.
fn one_second_taking(transactions: u64, latency: Duration) -> LoadResult {
    LoadResult {
        succeeded: transactions,
        failed: 0,
        elapsed: Duration::from_secs(1),
        latencies: vec![latency; transactions as usize],
        client_calls: transactions,
        sagas_completed: 0,
        sagas_compensated: 0,
    }
}

fn snapshot(coordinator: CoordinatorCounts) -> Snapshot {
    Snapshot {
        coordinator: Some(coordinator),
        ..Snapshot::default()
    }
}

/// A report of `workloads` from processes, two participants, 4 in flight, a second each,
/// nothing else measured.
fn report_of(workloads: Vec<WorkloadReport>) -> Report {
    Report {
        mode: "processes",
        participants: 2,
        unforced_one_phase_yes: false,
        concurrency: 4,
        duration_s: 1,
        workloads,
        ceiling_calls_per_s: None,
        postgres: None,
        memory: None,
        disk: None,
        sync_probe: None,
        one_in_flight_target: None,
    }
}

/// A compaction that ended during a workload is in its figures and its line: its
/// copying is in the coordinator's CPU per transaction.
#[test]
fn a_log_compaction_during_a_workload_is_reported_with_it() {
    let load = one_second_of(100);
    let before = snapshot(CoordinatorCounts {
        fsyncs: 10.0,
        fsync_seconds: 1.0,
        log_compactions: 2.0,
        ..CoordinatorCounts::default()
    });
    let after = snapshot(CoordinatorCounts {
        fsyncs: 20.0,
        fsync_seconds: 1.005,
        log_compactions: 3.0,
        ..CoordinatorCounts::default()
    });
    let workload = WorkloadReport::new(Workload::Twopc, &load, &before, &after, &[], None);
    let figures = workload.coordinator.as_ref().unwrap();
    assert_eq!(figures.log_compactions_ended, 1.0);
    assert_eq!(figures.decisions_per_fsync, Some(10.0));
    let report = report_of(vec![workload]);
    let table = report.table();
    assert!(table.contains("log compactions ended 1;"), "{table}");
    assert!(
        table.contains("mean fsync ms: coordinator 0.500, participants n/a;"),
        "{table}"
    );
}

/// The mean sync is the sync time over the syncs made during the workload, at the
/// coordinator and over all participants; with no sync there is no mean.
#[test]
fn the_mean_fsync_is_the_workload_s_sync_time_over_its_syncs() {
    let load = one_second_of(10);
    // (fsyncs, their seconds) at the coordinator, then at each participant.
    let syncs = |coordinator: (f64, f64), participants: [(f64, f64); 2]| Snapshot {
        coordinator: Some(CoordinatorCounts {
            fsyncs: coordinator.0,
            fsync_seconds: coordinator.1,
            ..CoordinatorCounts::default()
        }),
        participants: participants
            .map(|(fsyncs, fsync_seconds)| ParticipantCounts {
                fsyncs,
                fsync_seconds,
                ..ParticipantCounts::default()
            })
            .to_vec(),
        ..Snapshot::default()
    };
    let before = syncs((100.0, 2.0), [(5.0, 1.0), (7.0, 3.0)]);
    // 4 syncs in 2 ms at the coordinator; 4 in 4 ms at the first participant, none
    // at the second.
    let after = syncs((104.0, 2.002), [(9.0, 1.004), (7.0, 3.0)]);
    let workload = WorkloadReport::new(Workload::Saga, &load, &before, &after, &[], None);
    let coordinator = workload
        .coordinator
        .as_ref()
        .unwrap()
        .fsync_mean_ms
        .unwrap();
    assert!((coordinator - 0.5).abs() < 1e-9, "{coordinator}");
    let participants = workload.participants.fsync_mean_ms.unwrap();
    assert!((participants - 1.0).abs() < 1e-9, "{participants}");
    let idle = WorkloadReport::new(Workload::Saga, &load, &before, &before, &[], None);
    assert_eq!(idle.participants.fsync_mean_ms, None);
    assert_eq!(idle.coordinator.unwrap().fsync_mean_ms, None);
}

/// At one in flight, the target is 2 × (2 × the ceiling's p50 + a sync), with the
/// probe's sync alone and with its syncs at once; it is not told at another
/// concurrency, for one-phase commits or without the probe.
#[test]
fn the_target_at_one_in_flight_comes_from_the_ceiling_and_the_sync_probe() {
    let idle = Snapshot::default();
    let workload = |name, latency_us| {
        let load = one_second_taking(100, Duration::from_micros(latency_us));
        WorkloadReport::new(name, &load, &idle, &idle, &[], None)
    };
    let probe = |writers, p50_ms| crate::bench::sync_probe::SyncTimes {
        writers,
        rounds: 10,
        p50_ms,
        mean_ms: p50_ms,
    };
    let mut report = Report {
        mode: "processes",
        participants: 2,
        unforced_one_phase_yes: false,
        concurrency: 1,
        duration_s: 1,
        workloads: vec![
            workload(Workload::Twopc, 800),
            workload(Workload::Ceiling, 100),
        ],
        ceiling_calls_per_s: None,
        postgres: None,
        memory: None,
        disk: None,
        sync_probe: Some(crate::bench::sync_probe::SyncProbeReport {
            dir: "/tmp/bench".into(),
            alone: probe(1, 0.1),
            at_once: probe(3, 0.25),
        }),
        one_in_flight_target: None,
    };
    report.compute_one_in_flight_target();
    let target = report.one_in_flight_target.as_ref().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(target.twopc_p50_ms, 0.8), "{target:?}");
    assert!(close(target.ceiling_p50_ms, 0.1), "{target:?}");
    assert!(close(target.target_with_fsync_alone_ms, 0.6), "{target:?}");
    assert!(
        close(target.target_with_syncs_at_once_ms, 0.9),
        "{target:?}"
    );
    assert_eq!(target.syncs_at_once, 3);
    let table = report.table();
    assert!(
        table.contains("target 2 × (2 × ceiling p50 0.100 + fsync) = 0.600 ms with the fsync alone, 0.900 ms with 3 syncing at once"),
        "{table}"
    );
    assert!(table.contains("fsync in /tmp/bench "), "{table}");

    report.concurrency = 4;
    report.compute_one_in_flight_target();
    assert_eq!(report.one_in_flight_target, None);
    report.concurrency = 1;
    report.participants = 1;
    report.compute_one_in_flight_target();
    assert_eq!(report.one_in_flight_target, None, "a one-phase commit");
    report.participants = 2;
    report.sync_probe = None;
    report.compute_one_in_flight_target();
    assert_eq!(report.one_in_flight_target, None);
}

/// Efficiency counts only the calls of transactions that ended as asked: a workload
/// whose every fourth transaction failed, making its calls all the same, is three
/// quarters as efficient as its call rate alone would say.
#[test]
fn the_calls_of_failed_transactions_are_not_counted_as_useful() {
    let mut load = one_second_of(75);
    load.failed = 25;
    load.client_calls = 100;
    let before = snapshot(CoordinatorCounts::default());
    let after = snapshot(CoordinatorCounts {
        participant_calls: 400.0,
        ..CoordinatorCounts::default()
    });
    let twopc = WorkloadReport::new(Workload::Twopc, &load, &before, &after, &[], None);
    let ceiling = WorkloadReport::new(
        Workload::Ceiling,
        &one_second_of(1_000),
        &before,
        &before,
        &[],
        None,
    );
    let mut report = report_of(vec![twopc, ceiling]);
    report.compute_efficiency();
    // 500 calls in the second, 375 of them for the 75 that committed.
    let efficiency = report.workloads[0].efficiency.unwrap();
    assert!((efficiency - 0.375).abs() < 1e-9, "{efficiency}");
}
