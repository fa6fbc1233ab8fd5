//! `treaty bench`: measures two-phase commits per second and their latency over real gRPC
//! on loopback. It starts its own participants (each a real SDK server with a durable
//! barrier in a temporary directory, voting YES without other work), and its own
//! coordinator unless `--endpoint` names a running one; then `concurrency` initiators
//! each run one transaction after another for `duration_s` seconds, or until
//! `--transactions` have run.
//!
//! It is also the soak run of docs/limits.md, "Disk": `--saga-every` mixes in sagas (every
//! other one compensated), `--log-retention-ms` and `--barrier-retention-ms` shorten the
//! retentions, and `--disk-sample-s` samples the size of every data directory as the run
//! goes, then prints whether they stayed flat ([`disk`]).

mod disk;

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;

use treaty_proto::v1 as pb;
use treaty_sdk::barrier_gc::BarrierGcOptions;
use treaty_sdk::client::{
    BeginOptions, BranchSpec, Outcome, SagaStep, SubmitOptions, TreatyClient,
};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::ServeOptions;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use crate::config::ServeConfig;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A running coordinator to measure; by default one is started in this process.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Participants (branches) per transaction; 1 measures one-phase commits.
    #[arg(long, default_value_t = 2)]
    pub participants: usize,
    /// Transactions in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long to measure (at most; see --transactions).
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Stop once this many transactions have run (before --duration-s if sooner).
    #[arg(long)]
    pub transactions: Option<u64>,
    /// Start at most this many transactions a second (a steady rate keeps the data that
    /// retention holds constant, so a disk that grows is a leak, not a faster run).
    #[arg(long)]
    pub rate_per_s: Option<u64>,
    /// Every Nth transaction is a saga with a step on each participant instead of a
    /// two-phase commit; every other saga's last step is rejected, so it compensates.
    #[arg(long, default_value_t = 0)]
    pub saga_every: u64,
    /// The started coordinator's `--log-retention-ms`.
    #[arg(long)]
    pub log_retention_ms: Option<u64>,
    /// The participants' barrier retention (records of final branches are collected
    /// this long after their transaction was created).
    #[arg(long)]
    pub barrier_retention_ms: Option<u64>,
    /// Sample the size of every data directory this often, print it, and summarize at
    /// the end whether it stayed flat.
    #[arg(long)]
    pub disk_sample_s: Option<u64>,
    /// Also write the samples to this CSV file.
    #[arg(long, requires = "disk_sample_s")]
    pub disk_csv: Option<std::path::PathBuf>,
}

/// A participant that votes YES (NO to the payload `reject`) and does nothing else: what
/// is measured is Treaty.
#[derive(Debug)]
struct NoWork;

/// The payload of a saga step [`NoWork`] rejects.
const REJECT: &[u8] = b"reject";

impl Participant for NoWork {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, ParticipantError> {
        if payload == REJECT {
            return Ok(Vote::no("rejected by the bench"));
        }
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// How the run's transactions ended.
#[derive(Debug, Default)]
struct Tally {
    /// Transactions handed out to initiators (the next one's number).
    started: AtomicU64,
    finished: AtomicU64,
    sagas_completed: AtomicU64,
    sagas_compensated: AtomicU64,
}

/// One saga with a step on each participant; `compensate`: the last step is rejected.
/// Returns whether it ended as asked.
async fn run_saga(
    client: &TreatyClient,
    endpoints: &[String],
    compensate: bool,
    tally: &Tally,
) -> bool {
    let last = endpoints.len().saturating_sub(1);
    let steps = endpoints
        .iter()
        .enumerate()
        .map(|(i, endpoint)| {
            let payload = if compensate && i == last {
                REJECT.to_vec()
            } else {
                Vec::new()
            };
            SagaStep::new(format!("s{i}"), endpoint, payload)
        })
        .collect();
    let options = SubmitOptions {
        wait_for_outcome: true,
        ..SubmitOptions::default()
    };
    let Ok(submitted) = client.submit_saga(steps, options).await else {
        return false;
    };
    match pb::TransactionState::try_from(submitted.transaction.state) {
        Ok(pb::TransactionState::Completed) => {
            tally.sagas_completed.fetch_add(1, Ordering::Relaxed);
            !compensate
        }
        Ok(pb::TransactionState::Compensated) => {
            tally.sagas_compensated.fetch_add(1, Ordering::Relaxed);
            compensate
        }
        _ => false,
    }
}

/// Samples the directories every `every` until stopped (and once more then), printing
/// each sample; returns them.
async fn sample_disk(
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
            println!("{line}");
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

/// Most latencies kept for the percentiles.
const MAX_SAMPLES: usize = 10_000_000;

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=treaty_sdk::limits::MAX_BRANCHES).contains(&args.participants),
        "--participants must be 1..={}",
        treaty_sdk::limits::MAX_BRANCHES
    );
    anyhow::ensure!(
        (1..=100_000).contains(&args.concurrency),
        "--concurrency must be 1..=100000"
    );
    anyhow::ensure!(
        (1..=86_400).contains(&args.duration_s),
        "--duration-s must be 1..=86400"
    );
    anyhow::ensure!(
        args.rate_per_s.is_none_or(|r| (1..=1_000_000).contains(&r)),
        "--rate-per-s must be 1..=1000000"
    );
    anyhow::ensure!(
        args.disk_sample_s.is_none_or(|s| (1..=3_600).contains(&s)),
        "--disk-sample-s must be 1..=3600"
    );
    let workdir = tempfile::tempdir()?;
    let mut stops = Vec::new();
    let mut endpoints = Vec::new();
    let mut watched = disk::Watched {
        names: Vec::new(),
        dirs: Vec::new(),
    };
    let mut serve_options = ServeOptions::default();
    if let Some(retention_ms) = args.barrier_retention_ms {
        serve_options.barrier_gc = BarrierGcOptions {
            retention_ms,
            interval_ms: (retention_ms / 10).clamp(100, 10_000),
            ..BarrierGcOptions::default()
        };
        serve_options
            .barrier_gc
            .validate()
            .map_err(|e| anyhow::anyhow!("--barrier-retention-ms: {e}"))?;
    }
    for index in 0..args.participants {
        let dir = workdir.path().join(format!("participant-{index}"));
        let store = Arc::new(DurableStore::open(&dir, Default::default())?);
        watched.names.push(format!("participant-{index}"));
        watched.dirs.push(dir);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        endpoints.push(format!("http://{}", listener.local_addr()?));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(treaty_sdk::serve(
            Arc::new(NoWork),
            store,
            listener,
            serve_options.clone(),
            async {
                let _ = stopped.await;
            },
        ));
    }
    let (endpoint, coordinator) = match args.endpoint.clone() {
        Some(endpoint) => (endpoint, None),
        None => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let endpoint = format!("http://{}", listener.local_addr()?);
            let dir = workdir.path().join("coordinator");
            let mut config = ServeConfig::new(listener.local_addr()?, dir.clone());
            config.max_active_transactions = args.concurrency.max(1_000);
            if let Some(retention_ms) = args.log_retention_ms {
                config.log_retention_ms = retention_ms;
            }
            watched.names.insert(0, "coordinator".into());
            watched.dirs.insert(0, dir);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(crate::daemon::run_on(config, listener, async {
                let _ = stopped.await;
            }));
            (endpoint, Some((stop, task)))
        }
    };
    let client = TreatyClient::connect(endpoint.clone()).await?;
    println!(
        "bench: {} participant(s) per transaction, {} in flight, {} s, coordinator {endpoint}",
        args.participants, args.concurrency, args.duration_s
    );

    let started = Instant::now();
    let until = started + Duration::from_secs(args.duration_s);
    let limit = args.transactions.unwrap_or(u64::MAX);
    let tally = Arc::new(Tally::default());
    let sampler = args.disk_sample_s.map(|every_s| {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(sample_disk(
            watched.clone(),
            Duration::from_secs(every_s),
            started,
            tally.clone(),
            stopped,
        ));
        (stop, task)
    });
    let mut workers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let client = client.clone();
        let endpoints = endpoints.clone();
        let tally = tally.clone();
        let saga_every = args.saga_every;
        let rate_per_s = args.rate_per_s;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            while Instant::now() < until {
                let number = tally.started.fetch_add(1, Ordering::SeqCst);
                if number >= limit {
                    break;
                }
                if let Some(rate) = rate_per_s {
                    let due = started + Duration::from_secs_f64(number as f64 / rate as f64);
                    tokio::time::sleep_until(due.into()).await;
                }
                if saga_every > 0 && number % saga_every == saga_every - 1 {
                    let compensate = (number / saga_every) % 2 == 1;
                    if !run_saga(&client, &endpoints, compensate, &tally).await {
                        failures += 1;
                    }
                    tally.finished.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let branches = endpoints
                    .iter()
                    .enumerate()
                    .map(|(i, endpoint)| BranchSpec::new(format!("p{i}"), endpoint, Vec::new()))
                    .collect();
                let begun = Instant::now();
                match client
                    .run_two_phase(branches, BeginOptions::default())
                    .await
                {
                    Ok((_, Outcome::Committed)) if latencies.len() < MAX_SAMPLES => {
                        latencies.push(begun.elapsed())
                    }
                    Ok((_, Outcome::Committed)) => {}
                    Ok((_, Outcome::Aborted { .. })) | Err(_) => failures += 1,
                }
                tally.finished.fetch_add(1, Ordering::Relaxed);
            }
            (latencies, failures)
        }));
    }
    let mut latencies = Vec::new();
    let mut failures = 0;
    for worker in workers {
        let (mut worker_latencies, worker_failures) = worker.await?;
        latencies.append(&mut worker_latencies);
        failures += worker_failures;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let percentile = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies[index].as_secs_f64() * 1_000.0
    };
    println!(
        "committed {} in {:.1} s: {:.0} commits/s; {failures} failed or aborted",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
        percentile(0.50),
        percentile(0.90),
        percentile(0.99),
        percentile(1.0)
    );
    if args.saga_every > 0 {
        println!(
            "sagas: {} completed, {} compensated (counted among the {failures} failed only if \
             they ended otherwise)",
            tally.sagas_completed.load(Ordering::SeqCst),
            tally.sagas_compensated.load(Ordering::SeqCst)
        );
    }
    if let Some((stop, task)) = sampler {
        let _ = stop.send(true);
        let samples = task.await?;
        for line in watched.summary(&samples) {
            println!("{line}");
        }
        if let Some(path) = &args.disk_csv {
            std::fs::write(path, watched.csv(&samples))?;
            println!("disk samples written to {}", path.display());
        }
    }
    if let Some((stop, task)) = coordinator {
        let _ = stop.send(());
        task.await??;
    }
    for stop in stops {
        let _ = stop.send(());
    }
    Ok(())
}
