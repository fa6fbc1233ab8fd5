//! What `treaty bench` prints: per workload, the figures computed from its load and the
//! difference of two snapshots of the system under test; as a table on stdout, or as one
//! JSON object (`--json`) whose field names carry their units.
//!
//! Definitions (also in docs/limits.md, "Throughput"):
//! - per transaction: per transaction that ended as asked (transactions/s counts only
//!   those), the work of failed ones (ended otherwise than asked) included in it.
//! - RPCs per transaction: calls the initiator made (to the coordinator; to the
//!   participant for the ceiling) plus calls the coordinator made to participants (its
//!   own `treaty_participant_call_duration_seconds_count`), per transaction.
//! - efficiency = transactions/s × RPCs per transaction run (failed ones included, so
//!   their calls are not counted as useful) ÷ the ceiling's calls/s: the share of the
//!   servers' bare call capacity the protocol turns into useful calls.
//! - decisions per fsync: transactions that ended as asked ÷ the coordinator's forced
//!   log groups.
//! - mean fsync: the time the workload's forced groups took from applied in memory to
//!   durable ÷ their number, at the coordinator and over all participants.
//! - CPU per transaction: user+system time of each process over the workload (phase 2
//!   settling included) ÷ transactions, in core-microseconds. In-process, the one
//!   process includes the load generator.

use super::cluster::{COORDINATOR, Observed};
use super::observe::Snapshot;
use super::stats::mean_ms;
use super::workload::{LoadResult, Workload};

#[derive(Debug, serde::Serialize)]
pub struct Report {
    /// `processes` or `in_process`.
    pub mode: &'static str,
    pub participants: usize,
    /// The participants wrote a saga step's (or one-phase commit's) YES unforced
    /// (`--unforced-one-phase-yes`); by default every YES is forced.
    pub unforced_one_phase_yes: bool,
    pub concurrency: usize,
    pub duration_s: u64,
    pub workloads: Vec<WorkloadReport>,
    /// The ceiling workload's calls per second, if it ran.
    pub ceiling_calls_per_s: Option<f64>,
    pub postgres: Option<super::postgres::PostgresReport>,
    /// The started coordinator's RSS over the run (`None` with `--endpoint`).
    pub memory: Option<super::memory::MemoryReport>,
    /// Each data directory's size over the run (`--disk-sample-s`, at least 4 samples).
    pub disk: Option<Vec<super::disk::DirSummary>>,
    /// What a forced write cost on the stores' disk, or `--sync-probe-dir`'s (`None` with
    /// `--sync-probe-ms 0`).
    pub sync_probe: Option<super::sync_probe::SyncProbeReport>,
    /// At one in flight, with twopc, the ceiling and the probe run: issue 11's target.
    pub one_in_flight_target: Option<OneInFlightTarget>,
}

/// Issue 11's target at one in flight, p50 ≤ 2 × (two echo round trips + one fsync),
/// from this run's figures: the echo is the ceiling's p50, the fsync the sync probe's,
/// alone and with the processes on a commit's path syncing at once (the bench puts all
/// their stores on one disk).
#[derive(Debug, PartialEq, serde::Serialize)]
pub struct OneInFlightTarget {
    pub twopc_p50_ms: f64,
    /// One echo round trip.
    pub ceiling_p50_ms: f64,
    /// 2 × (2 × `ceiling_p50_ms` + the probe's p50 alone).
    pub target_with_fsync_alone_ms: f64,
    /// 2 × (2 × `ceiling_p50_ms` + the probe's p50 with `syncs_at_once` writers).
    pub target_with_syncs_at_once_ms: f64,
    pub syncs_at_once: usize,
}

impl OneInFlightTarget {
    fn line(&self) -> String {
        format!(
            "p50 at 1 in flight: twopc {:.3} ms; target 2 × (2 × ceiling p50 {:.3} + fsync) = \
             {:.3} ms with the fsync alone, {:.3} ms with {} syncing at once",
            self.twopc_p50_ms,
            self.ceiling_p50_ms,
            self.target_with_fsync_alone_ms,
            self.target_with_syncs_at_once_ms,
            self.syncs_at_once
        )
    }
}

#[derive(Debug, serde::Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct Rpcs {
    pub client_to_coordinator: f64,
    /// `None` without the coordinator's metrics (`--endpoint`).
    pub coordinator_to_participants: Option<f64>,
    /// The ceiling's own calls (1 per call); 0 for the other workloads.
    pub client_to_participants: f64,
    /// Calls the participant servers answered (their `treaty_participant_operations_total`;
    /// the health calls of the ceiling are not among them).
    pub participant_answers: f64,
    pub total: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
pub struct CoordinatorFigures {
    pub fsyncs_per_transaction: f64,
    /// `None` without a forced group in the workload.
    pub fsync_mean_ms: Option<f64>,
    /// Records written by all the log's group commits, forced and lazy.
    pub log_records_per_transaction: f64,
    pub decisions_per_fsync: Option<f64>,
    /// At the end of the workload (in-process: the whole bench process).
    pub rss_bytes: Option<u64>,
    /// Compactions of the log that ended during the workload. Their copying is in the
    /// coordinator's CPU figures (one that started or ended outside the workload, in
    /// part).
    pub log_compactions_ended: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ParticipantFigures {
    /// Summed over the participants.
    pub fsyncs_per_transaction: f64,
    /// Over all the participants' forced groups; `None` without one.
    pub fsync_mean_ms: Option<f64>,
    pub forced_records_per_transaction: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ProcessCpu {
    pub name: String,
    pub cpu_us_per_transaction: Option<f64>,
}

#[derive(Debug, serde::Serialize)]
pub struct WorkloadReport {
    pub workload: Workload,
    /// Transactions that ended as asked.
    pub transactions: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    pub transactions_per_s: f64,
    pub latency: Latency,
    pub rpcs_per_transaction: Rpcs,
    pub coordinator: Option<CoordinatorFigures>,
    pub participants: ParticipantFigures,
    pub cpu: Vec<ProcessCpu>,
    pub cpu_us_per_transaction: Option<f64>,
    /// In-process, the CPU figures include the load generator.
    pub cpu_includes_load_generator: bool,
    /// The coordinator's CPU is in the figures: false for one `--endpoint` names
    /// without `--coordinator-pid`.
    pub cpu_includes_coordinator: bool,
    /// With `--processes`: the bench process's own CPU (the initiators and their gRPC
    /// clients), not in `cpu_us_per_transaction`.
    pub load_generator_cpu_us_per_transaction: Option<f64>,
    pub efficiency: Option<f64>,
    pub sagas_completed: u64,
    pub sagas_compensated: u64,
}

impl WorkloadReport {
    /// The figures of `workload`, whose load gave `load`, between `before` and `after`.
    pub fn new(
        workload: Workload,
        load: &LoadResult,
        before: &Snapshot,
        after: &Snapshot,
        processes: &[Observed],
        coordinator_rss_bytes: Option<u64>,
    ) -> Self {
        let transactions = load.succeeded;
        // The cost of a transaction that ended as asked: the work of failed ones is in
        // it (efficiency takes the calls per transaction run instead, so that a failed
        // one's calls never count as useful: `Report::compute_efficiency`).
        let per = |count: f64| {
            if transactions == 0 {
                0.0
            } else {
                count / transactions as f64
            }
        };
        let ceiling = workload == Workload::Ceiling;
        let coordinator = match (before.coordinator, after.coordinator) {
            (Some(b), Some(a)) => Some((
                a.participant_calls - b.participant_calls,
                CoordinatorFigures {
                    fsyncs_per_transaction: per(a.fsyncs - b.fsyncs),
                    fsync_mean_ms: mean_ms(a.fsync_seconds - b.fsync_seconds, a.fsyncs - b.fsyncs),
                    log_records_per_transaction: per(a.log_records - b.log_records),
                    decisions_per_fsync: (!ceiling && a.fsyncs > b.fsyncs)
                        .then(|| transactions as f64 / (a.fsyncs - b.fsyncs)),
                    rss_bytes: coordinator_rss_bytes,
                    log_compactions_ended: a.log_compactions - b.log_compactions,
                },
            )),
            _ => None,
        };
        let participant_delta = |field: fn(&super::observe::ParticipantCounts) -> f64| {
            after
                .participants
                .iter()
                .zip(&before.participants)
                .map(|(a, b)| field(a) - field(b))
                .sum::<f64>()
        };
        let (client_to_coordinator, client_to_participants) = if ceiling {
            (0.0, per(load.client_calls as f64))
        } else {
            (per(load.client_calls as f64), 0.0)
        };
        let coordinator_to_participants = coordinator.as_ref().map(|(calls, _)| per(*calls));
        let total = if ceiling {
            Some(client_to_participants)
        } else {
            coordinator_to_participants.map(|calls| calls + client_to_coordinator)
        };
        let cpu: Vec<ProcessCpu> = processes
            .iter()
            .zip(before.cpu_us.iter().zip(&after.cpu_us))
            .map(|(process, (b, a))| ProcessCpu {
                name: process.name.clone(),
                cpu_us_per_transaction: b.zip(*a).map(|(b, a)| per(a.saturating_sub(b) as f64)),
            })
            .collect();
        let cpu_total = cpu
            .iter()
            .map(|p| p.cpu_us_per_transaction)
            .sum::<Option<f64>>();
        let elapsed_s = load.elapsed.as_secs_f64();
        Self {
            workload,
            transactions,
            failed: load.failed,
            elapsed_s,
            transactions_per_s: transactions as f64 / elapsed_s.max(f64::EPSILON),
            latency: Latency {
                p50_ms: load.percentile_ms(0.50),
                p99_ms: load.percentile_ms(0.99),
                p999_ms: load.percentile_ms(0.999),
                max_ms: load.percentile_ms(1.0),
            },
            rpcs_per_transaction: Rpcs {
                client_to_coordinator,
                coordinator_to_participants,
                client_to_participants,
                participant_answers: per(participant_delta(|p| p.operations)),
                total,
            },
            coordinator: coordinator.map(|(_, figures)| figures),
            participants: ParticipantFigures {
                fsyncs_per_transaction: per(participant_delta(|p| p.fsyncs)),
                fsync_mean_ms: mean_ms(
                    participant_delta(|p| p.fsync_seconds),
                    participant_delta(|p| p.fsyncs),
                ),
                forced_records_per_transaction: per(participant_delta(|p| p.forced_records)),
            },
            cpu,
            cpu_us_per_transaction: cpu_total,
            cpu_includes_load_generator: processes.iter().any(|p| p.pid.is_none()),
            cpu_includes_coordinator: processes
                .iter()
                .any(|p| p.pid.is_none() || p.name == COORDINATOR),
            load_generator_cpu_us_per_transaction: before
                .load_generator_cpu_us
                .zip(after.load_generator_cpu_us)
                .map(|(b, a)| per(a.saturating_sub(b) as f64)),
            efficiency: None,
            sagas_completed: load.sagas_completed,
            sagas_compensated: load.sagas_compensated,
        }
    }
}

impl Report {
    /// Fills in every workload's efficiency from the ceiling's calls per second.
    pub fn compute_efficiency(&mut self) {
        self.ceiling_calls_per_s = self
            .workloads
            .iter()
            .find(|w| w.workload == Workload::Ceiling)
            .map(|w| w.transactions_per_s);
        let Some(ceiling) = self.ceiling_calls_per_s.filter(|c| *c > 0.0) else {
            return;
        };
        for workload in &mut self.workloads {
            // Calls per transaction run: those of failed transactions are not useful.
            let run = workload.transactions + workload.failed;
            let useful = if run == 0 {
                0.0
            } else {
                workload.transactions as f64 / run as f64
            };
            workload.efficiency = workload
                .rpcs_per_transaction
                .total
                .map(|rpcs| workload.transactions_per_s * rpcs * useful / ceiling);
        }
    }

    /// Fills in the target at one in flight, if this run can tell it: at one in flight,
    /// with two-phase commits (2 participants or more, no sagas mixed in), the ceiling
    /// and the sync probe.
    pub fn compute_one_in_flight_target(&mut self) {
        let p50 = |name: Workload| {
            self.workloads
                .iter()
                .find(|w| {
                    w.workload == name
                        && w.transactions > 0
                        && w.sagas_completed + w.sagas_compensated == 0
                })
                .map(|w| w.latency.p50_ms)
        };
        let two_phase = super::workload::commits_in_two_phases(self.participants);
        self.one_in_flight_target = match (
            self.concurrency == 1 && two_phase,
            p50(Workload::Twopc),
            p50(Workload::Ceiling),
            &self.sync_probe,
        ) {
            (true, Some(twopc_p50_ms), Some(ceiling_p50_ms), Some(probe)) => {
                let target = |fsync_ms: f64| 2.0 * (2.0 * ceiling_p50_ms + fsync_ms);
                Some(OneInFlightTarget {
                    twopc_p50_ms,
                    ceiling_p50_ms,
                    target_with_fsync_alone_ms: target(probe.alone.p50_ms),
                    target_with_syncs_at_once_ms: target(probe.at_once.p50_ms),
                    syncs_at_once: probe.at_once.writers,
                })
            }
            _ => None,
        };
    }

    /// The report as the table printed on stdout.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mode = match self.mode {
            "processes" => "coordinator and participants as separate processes",
            _ => "coordinator and participants in this process",
        };
        let yes = if self.unforced_one_phase_yes {
            " (saga and one-phase YES unforced)"
        } else {
            ""
        };
        out.push_str(&format!(
            "treaty bench: {mode}; {} participant(s){yes}, {} in flight, {} s per workload\n\n",
            self.participants, self.concurrency, self.duration_s
        ));
        out.push_str(&format!(
            "{:<13}{:>9}{:>7}{:>10}{:>8}{:>8}{:>8}{:>10}{:>11}{:>11}{:>10}{:>11}{:>11}\n",
            "workload",
            "txn",
            "failed",
            "txn/s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "rpc/txn",
            "c.fsync/t",
            "p.fsync/t",
            "dec/fsync",
            "cpu µs/t",
            "efficiency"
        ));
        for w in &self.workloads {
            let coordinator_fsyncs = w
                .coordinator
                .as_ref()
                .map(|c| format!("{:.2}", c.fsyncs_per_transaction));
            let decisions = w
                .coordinator
                .as_ref()
                .and_then(|c| c.decisions_per_fsync)
                .map(|d| format!("{d:.1}"));
            out.push_str(&format!(
                "{:<13}{:>9}{:>7}{:>10.0}{:>8.2}{:>8.2}{:>8.2}{:>10}{:>11}{:>11.2}{:>10}{:>11}{:>11}\n",
                w.workload.name(),
                w.transactions,
                w.failed,
                w.transactions_per_s,
                w.latency.p50_ms,
                w.latency.p99_ms,
                w.latency.p999_ms,
                or_na(w.rpcs_per_transaction.total.map(|r| format!("{r:.2}"))),
                or_na(coordinator_fsyncs),
                w.participants.fsyncs_per_transaction,
                or_na(decisions),
                or_na(w.cpu_us_per_transaction.map(|c| format!("{c:.0}"))),
                or_na(w.efficiency.map(|e| format!("{:.0}%", e * 100.0))),
            ));
        }
        out.push('\n');
        for w in &self.workloads {
            let r = &w.rpcs_per_transaction;
            out.push_str(&format!(
                "{}: rpc/txn client→coordinator {:.2}, coordinator→participants {}, \
                 client→participants {:.2} (participants answered {:.2}); records/txn: \
                 coordinator log {} (forced and lazy groups), participants {:.2} (forced)",
                w.workload.name(),
                r.client_to_coordinator,
                or_na(r.coordinator_to_participants.map(|c| format!("{c:.2}"))),
                r.client_to_participants,
                r.participant_answers,
                or_na(
                    w.coordinator
                        .as_ref()
                        .map(|c| format!("{:.2}", c.log_records_per_transaction))
                ),
                w.participants.forced_records_per_transaction,
            ));
            let mean = |ms: Option<f64>| or_na(ms.map(|ms| format!("{ms:.3}")));
            out.push_str(&format!(
                "; mean fsync ms: coordinator {}, participants {}",
                mean(w.coordinator.as_ref().and_then(|c| c.fsync_mean_ms)),
                mean(w.participants.fsync_mean_ms),
            ));
            out.push_str(&format!(
                "; latency max {:.2} ms; coordinator RSS {}; log compactions ended {}",
                w.latency.max_ms,
                or_na(
                    w.coordinator
                        .as_ref()
                        .and_then(|c| c.rss_bytes)
                        .map(|b| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0)))
                ),
                or_na(
                    w.coordinator
                        .as_ref()
                        .map(|c| format!("{:.0}", c.log_compactions_ended))
                )
            ));
            let cpu: Vec<String> = w
                .cpu
                .iter()
                .map(|p| {
                    format!(
                        "{} {}",
                        p.name,
                        or_na(p.cpu_us_per_transaction.map(|c| format!("{c:.0}")))
                    )
                })
                .collect();
            out.push_str(&format!("; cpu µs/txn: {}", cpu.join(", ")));
            if let Some(generator) = w.load_generator_cpu_us_per_transaction {
                out.push_str(&format!(" (load generator {generator:.0}, not counted)"));
            }
            if w.sagas_completed + w.sagas_compensated > 0 {
                out.push_str(&format!(
                    "; sagas {} completed, {} compensated",
                    w.sagas_completed, w.sagas_compensated
                ));
            }
            out.push('\n');
        }
        out.push_str(
            "\nrpc/txn: client→coordinator + coordinator→participants (the ceiling: its own \
             call). c./p.fsync/t: forced log groups per transaction at the coordinator and at \
             all participants (mean fsync: the mean time of their syncs). dec/fsync: \
             transactions per coordinator fsync. efficiency: \
             txn/s × rpc/txn ÷ ceiling calls/s",
        );
        if self.ceiling_calls_per_s.is_none() {
            out.push_str(" (n/a: the ceiling was not run)");
        }
        out.push_str(".\n");
        if self.workloads.iter().any(|w| !w.cpu_includes_coordinator) {
            out.push_str(
                "The coordinator --endpoint names is not in the CPU figures (--coordinator-pid \
                 counts it).\n",
            );
        }
        if self.workloads.iter().any(|w| w.cpu_includes_load_generator) {
            out.push_str(
                "In-process, the CPU figures are this whole process's, load generator included \
                 (--processes separates them).\n",
            );
        }
        if let Some(postgres) = &self.postgres {
            out.push('\n');
            out.push_str(&postgres.line());
            out.push('\n');
        }
        if let Some(probe) = &self.sync_probe {
            out.push('\n');
            out.push_str(&probe.line());
            out.push('\n');
        }
        if let Some(target) = &self.one_in_flight_target {
            out.push_str(&target.line());
            out.push('\n');
        }
        out
    }
}

fn or_na(value: Option<String>) -> String {
    value.unwrap_or_else(|| "n/a".into())
}

#[cfg(test)]
mod tests;
