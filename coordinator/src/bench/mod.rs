//! `treaty bench`: measures Treaty side by side over real gRPC on loopback, in one run:
//! (a) `twopc`, two-phase commits over the participants (2 by default); (b) `saga`,
//! 3-step sagas; (c) `compensating`, 3-step sagas whose last step is rejected; (d)
//! `ceiling`, the cheapest call the same participant servers answer, at the same
//! concurrency (see [`workload`]). Each runs `--duration-s` (or `--transactions`), one
//! after another, with `--concurrency` initiators.
//!
//! The system under test is its own ([`cluster`]): participants that vote YES and do
//! nothing else, each a real SDK server with a durable barrier in a temporary directory,
//! and a coordinator (unless `--endpoint` names a running one); in this process, or with
//! `--processes` as child processes, so that each one's CPU and memory are its own.
//! Around each workload it reads the servers' counters and `/proc` ([`observe`]) and
//! reports, per transaction, calls, forced writes and fsyncs at the coordinator and the
//! participants, CPU time, and efficiency against the ceiling ([`report`]). Before the
//! workloads it times a sync on the stores' disk (or `--sync-probe-dir`'s), alone and as
//! many at once as a commit's path forces ([`sync_probe`]), for the target at one in
//! flight. With `--postgres URL` it also runs PostgreSQL's own 2PC as a yardstick
//! ([`postgres`]).
//! Progress goes to stderr; the results to stdout, as a table or (`--json`) one object.
//!
//! It is also the soak run of docs/limits.md, "Disk": `--saga-every` mixes sagas into
//! `twopc` (every other one compensated), `--log-retention-ms` and
//! `--barrier-retention-ms` shorten the retentions, and `--disk-sample-s` samples the
//! size of every data directory as the run goes, then says whether they stayed flat
//! ([`disk`]). Either of the first and the last makes `twopc` the only default workload,
//! so the soak's command line means what it always did.
//!
//! The flags, and the checks that refuse a bad one by name before anything starts, are
//! in [`args`].

mod args;
mod cluster;
mod disk;
mod memory;
mod observe;
mod participant;
mod postgres;
mod recovery;
mod report;
mod stats;
mod sync_probe;
mod workload;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use args::BenchArgs;
use args::{check_coordinator_pid, sync_probe_dir_in, validate};
pub use observe::cpu_us;
pub use participant::{BenchParticipantArgs, run as run_participant};
use workload::{LoadOptions, Tally, Targets, Workload};

use crate::runtime::METRICS_REUSE;

/// Samples the directories every `every` until stopped (and once more then), printing
/// each sample (to stderr with `--json`, whose stdout is the report alone); returns them.
async fn sample_disk(
    json: bool,
    watched: disk::Watched,
    every: Duration,
    started: Instant,
    tally: Arc<Tally>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<disk::Sample> {
    let mut samples = Vec::new();
    loop {
        let watched_now = watched.clone();
        let elapsed = started.elapsed();
        let transactions = tally.finished.load(Ordering::Relaxed);
        let sampled = tokio::task::spawn_blocking(move || {
            let sample = watched_now.sample(elapsed, transactions);
            let line = watched_now.line(&sample);
            (sample, line)
        })
        .await;
        if let Ok((sample, line)) = sampled {
            if json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            if samples.len() < disk::MAX_SAMPLES {
                samples.push(sample);
            }
        }
        if *stop.borrow() {
            return samples;
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
    }
}

/// Runs the bench; Ctrl-C stops it, and every child process with it.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    tokio::select! {
        result = run_to_end(args) => result,
        interrupted = tokio::signal::ctrl_c() => {
            interrupted?;
            anyhow::bail!("interrupted (the bench's child processes are killed)")
        }
    }
}

/// How long, after a workload's load ends, its last transactions may take to finish
/// phase 2 before the counters are read.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

async fn run_to_end(args: BenchArgs) -> anyhow::Result<()> {
    let workloads = validate(&args)?;
    check_coordinator_pid(&args).await?;
    // Created now, so that a path that cannot be written fails before the run, not
    // after it; written at the end.
    let rss_csv = create_csv("--rss-csv", args.rss_csv.as_deref())?;
    let disk_csv = create_csv("--disk-csv", args.disk_csv.as_deref())?;
    if args.recovery {
        let report = recovery::run(&recovery::RecoveryOptions {
            in_flight: args.in_flight,
            participants: args.participants,
            in_doubt_poll_ms: args.in_doubt_poll_ms,
            memory_budget_bytes: args.memory_budget_bytes,
            timeout: Duration::from_secs(args.recovery_timeout_s),
        })
        .await?;
        if args.json {
            for line in report.lines() {
                eprintln!("{line}");
            }
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            for line in report.lines() {
                println!("{line}");
            }
        }
        return Ok(());
    }
    if let Some(url) = &args.postgres {
        postgres::check_server(url, args.concurrency).await?;
    }
    let cluster = cluster::Cluster::start(&cluster::ClusterOptions {
        processes: args.processes,
        participants: args.participants,
        max_active_transactions: args.concurrency.max(1_000),
        log_retention_ms: args.log_retention_ms,
        memory_budget_bytes: args.memory_budget_bytes,
        hold: false,
        participant: cluster::ParticipantSettings {
            barrier_retention_ms: args.barrier_retention_ms,
            in_doubt_poll_ms: None,
            unforced_one_phase_yes: args.unforced_one_phase_yes,
        },
        endpoint: args.endpoint.clone(),
        coordinator_metrics: args.coordinator_metrics,
        coordinator_pid: args.coordinator_pid,
    })
    .await?;
    let endpoints: Vec<String> = cluster
        .participants
        .iter()
        .map(|p| p.endpoint.clone())
        .collect();
    let targets = Targets::connect(&cluster.coordinator_endpoint, &endpoints).await?;
    let names: Vec<&str> = workloads.iter().map(|w| w.name()).collect();
    eprintln!(
        "bench: {}; {} participant(s), {} in flight, {} s per workload ({}); coordinator {}",
        if args.processes {
            "separate processes"
        } else {
            "in process"
        },
        args.participants,
        args.concurrency,
        args.duration_s,
        names.join(", "),
        cluster.coordinator_endpoint
    );
    // On a two-phase commit's path the coordinator's intent and each participant's YES
    // are forced about together (the coordinator's only if its log is in this
    // directory); a one-phase commit forces its participant's write alone.
    let sync_probe = match args.sync_probe_ms {
        0 => None,
        ms => {
            let coordinator_writes =
                workload::commits_in_two_phases(args.participants) && args.endpoint.is_none();
            let writers = args.participants + usize::from(coordinator_writes);
            let probe_dir = match &args.sync_probe_dir {
                Some(dir) => sync_probe_dir_in(dir)?.keep(),
                None => cluster.data_dir().join("sync-probe"),
            };
            let probe =
                sync_probe::run_blocking(probe_dir, writers, Duration::from_millis(ms)).await?;
            eprintln!("bench {}", probe.line());
            Some(probe)
        }
    };
    let started = Instant::now();
    let tally = Arc::new(Tally::default());
    let sampler = args.disk_sample_s.map(|every_s| {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(sample_disk(
            args.json,
            cluster.watched.clone(),
            Duration::from_secs(every_s),
            started,
            tally.clone(),
            stopped,
        ));
        (stop, task)
    });
    let options = LoadOptions {
        concurrency: args.concurrency,
        duration: Duration::from_secs(args.duration_s),
        limit: args.transactions.unwrap_or(u64::MAX),
        rate_per_s: args.rate_per_s,
        saga_every: args.saga_every,
    };
    // Whose resident set is sampled: the coordinator the bench started (a child by its
    // pid, or this process); none for one `--endpoint` names.
    let rss_of = match (&args.endpoint, args.processes) {
        (Some(_), _) => None,
        (None, true) => Some(cluster.processes.first().and_then(|p| p.pid)),
        (None, false) => Some(None),
    };
    let rss_sampler = rss_of.map(|pid| {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        // The coordinator's gauges until the log's first purge, which ends the warm-up;
        // with each sample for the CSV.
        let task = tokio::spawn(memory::sample(
            pid,
            cluster.coordinator_metrics,
            rss_csv.is_some(),
            Duration::from_millis(args.rss_sample_ms),
            started,
            tally.clone(),
            stopped,
        ));
        (stop, task)
    });
    let mut report = report::Report {
        mode: if args.processes {
            "processes"
        } else {
            "in_process"
        },
        participants: args.participants,
        unforced_one_phase_yes: args.unforced_one_phase_yes,
        concurrency: args.concurrency,
        duration_s: args.duration_s,
        workloads: Vec::new(),
        ceiling_calls_per_s: None,
        postgres: None,
        memory: None,
        disk: None,
        sync_probe,
        one_in_flight_target: None,
    };
    // No warm-up with --transactions: the soak counts every transaction it runs.
    let warm_up = (args.transactions.is_none() && args.warm_up_ms > 0).then(|| LoadOptions {
        duration: Duration::from_millis(args.warm_up_ms),
        ..options.clone()
    });
    for workload in workloads {
        if let Some(warm_up) = &warm_up {
            workload::run(workload, &targets, warm_up, tally.clone()).await?;
            if !settle(&cluster).await {
                eprintln!("bench {:<12} its warm-up did not settle", workload.name());
            }
        }
        let before = observe::Snapshot::take(&cluster).await?;
        let load = workload::run(workload, &targets, &options, tally.clone()).await?;
        let settled = settle(&cluster).await;
        if !settled {
            eprintln!(
                "bench {:<12} transactions still in progress {SETTLE_TIMEOUT:?} after its \
                 load ended: their phase 2 is not all in its figures",
                workload.name()
            );
        }
        let after = observe::Snapshot::take(&cluster).await?;
        let rss_bytes = rss_of.and_then(crate::runtime::memory::resident_bytes_of);
        let figures = report::WorkloadReport::new(
            workload,
            &load,
            &before,
            &after,
            &cluster.processes,
            rss_bytes,
        );
        eprintln!(
            "bench {:<12} {} done, {} failed: {:.0}/s",
            workload.name(),
            figures.transactions,
            figures.failed,
            figures.transactions_per_s
        );
        report.workloads.push(figures);
    }
    if let Some((stop, task)) = rss_sampler {
        let _ = stop.send(true);
        let (samples, taken) = task.await?;
        let mut memory = memory::summarize(&samples, args.rss_sample_ms, taken);
        // Linux updates the high-water mark lazily (not when memory is given back by
        // madvise), so it can read below a sample: the larger of the two.
        memory.peak_bytes = rss_of
            .and_then(crate::runtime::memory::peak_resident_bytes_of)
            .map(|peak| peak.max(memory.max_bytes));
        if let Some(csv) = rss_csv {
            csv.write("RSS", &memory::csv(&samples))?;
        }
        if let Some(address) = cluster.coordinator_metrics {
            let text = observe::scrape(address).await?;
            let gauge = |name: &str| Some(observe::sum(&text, name));
            memory.budget_bytes = gauge("treaty_memory_budget_bytes{part=\"total\"}");
            memory.retained_transactions = gauge("treaty_retained_transactions");
            memory.retained_estimated_bytes = gauge("treaty_retained_transactions_estimated_bytes");
            memory.retained_allowed_bytes = gauge("treaty_retained_transactions_allowed_bytes");
            memory.log_finished = gauge("treaty_log_finished_transactions");
            memory.log_finished_limit = gauge("treaty_log_finished_transactions_limit");
            memory.log_purged_for_limit = gauge("treaty_log_purged_total{reason=\"limit\"}");
        }
        for line in memory.lines() {
            if args.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
        report.memory = Some(memory);
    }
    if let Some((stop, task)) = sampler {
        let _ = stop.send(true);
        let samples = task.await?;
        report.disk = cluster.watched.summarize(&samples);
        for line in cluster.watched.summary(&samples) {
            if args.json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
        if let Some(csv) = disk_csv {
            csv.write("disk", &cluster.watched.csv(&samples))?;
        }
    }
    cluster.stop().await?;
    if let Some(url) = &args.postgres {
        eprintln!("bench postgresql 2pc: {} in flight", args.concurrency);
        let mut postgres =
            postgres::run(url, args.concurrency, options.duration, options.limit).await?;
        postgres.treaty_twopc_ratio = report
            .workloads
            .iter()
            .find(|w| w.workload == Workload::Twopc)
            .filter(|_| postgres.transactions_per_s > 0.0)
            .map(|w| w.transactions_per_s / postgres.transactions_per_s);
        report.postgres = Some(postgres);
    }
    report.compute_efficiency();
    report.compute_one_in_flight_target();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// A CSV file a flag asked for, created before the run and written after it.
struct CsvFile<'a> {
    flag: &'static str,
    path: &'a std::path::Path,
    file: std::fs::File,
}

fn create_csv<'a>(
    flag: &'static str,
    path: Option<&'a std::path::Path>,
) -> anyhow::Result<Option<CsvFile<'a>>> {
    path.map(|path| {
        std::fs::File::create(path)
            .map(|file| CsvFile { flag, path, file })
            .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))
    })
    .transpose()
}

impl CsvFile<'_> {
    fn write(mut self, what: &str, text: &str) -> anyhow::Result<()> {
        std::io::Write::write_all(&mut self.file, text.as_bytes())
            .map_err(|e| anyhow::anyhow!("{} {}: {e}", self.flag, self.path.display()))?;
        eprintln!("{what} samples written to {}", self.path.display());
        Ok(())
    }
}

/// Waits (up to [`SETTLE_TIMEOUT`]) until the coordinator has no transaction in
/// progress: phase 2 of the last commits is counted with the workload that caused it.
/// Its metrics are rendered at most once per [`METRICS_REUSE`], so it first waits that
/// long: a rendering from before the load ended, between two transactions at one in
/// flight, can show none in progress, and the snapshot after it would then miss the
/// load's last moments. Returns false if transactions were still in progress at the end.
async fn settle(cluster: &cluster::Cluster) -> bool {
    let Some(address) = cluster.coordinator_metrics else {
        return true;
    };
    tokio::time::sleep(METRICS_REUSE + Duration::from_millis(50)).await;
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while Instant::now() < deadline {
        match observe::coordinator_counts(address).await {
            Ok(counts) if counts.in_progress > 0.0 => {}
            _ => return true,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}
