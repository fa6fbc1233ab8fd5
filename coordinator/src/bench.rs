//! `treaty bench`: measures two-phase commits per second and their latency over real gRPC
//! on loopback. It starts its own participants (each a real SDK server with a durable
//! barrier in a temporary directory, voting YES without other work), and its own
//! coordinator unless `--endpoint` names a running one; then `concurrency` initiators
//! each run one transaction after another for `duration_s` seconds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome, TreatyClient};
use treaty_sdk::durable::DurableStore;
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
    /// How long to measure.
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
}

/// A participant that votes YES and does nothing else: what is measured is Treaty.
#[derive(Debug)]
struct NoWork;

impl Participant for NoWork {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
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
        (1..=3_600).contains(&args.duration_s),
        "--duration-s must be 1..=3600"
    );
    let workdir = tempfile::tempdir()?;
    let mut stops = Vec::new();
    let mut endpoints = Vec::new();
    for index in 0..args.participants {
        let store = Arc::new(DurableStore::open(
            &workdir.path().join(format!("participant-{index}")),
            Default::default(),
        )?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        endpoints.push(format!("http://{}", listener.local_addr()?));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(treaty_sdk::serve(
            Arc::new(NoWork),
            store,
            listener,
            Default::default(),
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
            let mut config =
                ServeConfig::new(listener.local_addr()?, workdir.path().join("coordinator"));
            config.max_active_transactions = args.concurrency.max(1_000);
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
    let mut workers = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let client = client.clone();
        let endpoints = endpoints.clone();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0u64;
            while Instant::now() < until {
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
    if let Some((stop, task)) = coordinator {
        let _ = stop.send(());
        task.await??;
    }
    for stop in stops {
        let _ = stop.send(());
    }
    Ok(())
}
