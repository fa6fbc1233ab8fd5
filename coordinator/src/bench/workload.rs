//! The load of one workload: `concurrency` initiators, each running one transaction after
//! another until the duration is up or the transaction cap is reached, with a progress
//! line on stderr every second.
//!
//! The workloads:
//! - `twopc`: a two-phase commit with a branch on each participant (one Begin that
//!   carries the commit and answers with the outcome: 1 call to the coordinator). With
//!   `--saga-every N`, every Nth is a saga instead (the soak's mix, docs/limits.md).
//! - `saga`: a saga of [`SAGA_STEPS`] steps over the participants in turn, completed
//!   (one SubmitSaga call, waiting for the outcome).
//! - `compensating`: the same saga whose last step is rejected, so the steps before it
//!   are compensated.
//! - `ceiling`: the cheapest call the same participant servers answer, through the same
//!   client stack (the SDK's `endpoint_with` channel, one per participant, shared by
//!   every initiator): the standard gRPC health service's `Check`, which reads one map
//!   entry and writes nothing. Its calls per second bound what any protocol over these
//!   servers could do.
//!
//! Latencies are kept for the percentiles up to [`MAX_LATENCIES`] in all. With a rate
//! (`--rate-per-s`), a transaction's latency is timed from when it was due, not from
//! when it started, so that a late start (a slow system holding the initiators back)
//! counts against the system, not out of the figures (coordinated omission).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use treaty_proto::v1 as pb;
use treaty_sdk::client::{
    BeginOptions, BranchSpec, ClientOptions, Outcome, SagaStep, SubmitOptions, TreatyClient,
    endpoint_with,
};

use super::participant::REJECT;

/// Steps of a saga in the `saga` and `compensating` workloads.
pub const SAGA_STEPS: usize = 3;
/// Most latencies kept for the percentiles, over all initiators.
pub const MAX_LATENCIES: usize = 10_000_000;
/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The longest one transaction of the load may take; past it, it counts as failed.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    Twopc,
    Saga,
    Compensating,
    Ceiling,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::Twopc,
        Workload::Saga,
        Workload::Compensating,
        Workload::Ceiling,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Twopc => "twopc",
            Workload::Saga => "saga",
            Workload::Compensating => "compensating",
            Workload::Ceiling => "ceiling",
        }
    }

    /// `--workloads`: names separated by commas, each at most once, run in the order
    /// given.
    pub fn parse_list(list: &str) -> Result<Vec<Workload>, String> {
        let mut workloads = Vec::new();
        for name in list.split(',').map(str::trim) {
            let workload = Workload::ALL
                .into_iter()
                .find(|w| w.name() == name)
                .ok_or_else(|| {
                    format!(
                        "--workloads: unknown workload {name:?} (twopc, saga, compensating, \
                         ceiling)"
                    )
                })?;
            if workloads.contains(&workload) {
                return Err(format!("--workloads: {name} is named twice"));
            }
            workloads.push(workload);
        }
        Ok(workloads)
    }
}

/// How the load runs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub concurrency: usize,
    pub duration: Duration,
    /// Stop once this many transactions have started.
    pub limit: u64,
    pub rate_per_s: Option<u64>,
    /// `twopc` only: every Nth is a saga (0: none).
    pub saga_every: u64,
}

/// How the bench's transactions ended, shared by the initiators and kept over the whole
/// run (the disk sampler reads it across workloads).
#[derive(Debug, Default)]
pub struct Tally {
    /// Transactions of the current workload handed out to initiators (the next one's
    /// number).
    started: AtomicU64,
    pub finished: AtomicU64,
    pub sagas_completed: AtomicU64,
    pub sagas_compensated: AtomicU64,
}

/// What one workload's load did.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Transactions that ended as asked (committed, completed, compensated, SERVING).
    pub succeeded: u64,
    /// Transactions that ended otherwise or failed.
    pub failed: u64,
    pub elapsed: Duration,
    /// Sorted.
    pub latencies: Vec<Duration>,
    /// Calls the initiators made to the coordinator (to participants for the ceiling).
    pub client_calls: u64,
    pub sagas_completed: u64,
    pub sagas_compensated: u64,
}

impl LoadResult {
    /// The `p` quantile of the latencies in milliseconds (0 with none).
    pub fn percentile_ms(&self, p: f64) -> f64 {
        super::stats::percentile_ms(&self.latencies, p)
    }
}

/// Whether the twopc workload's transactions over `participants` branches commit in two
/// phases (a single branch is committed in one).
pub fn commits_in_two_phases(participants: usize) -> bool {
    participants >= 2
}

/// Where the load goes.
#[derive(Debug, Clone)]
pub struct Targets {
    pub coordinator: TreatyClient,
    pub participants: Vec<String>,
    /// One health channel per participant, for the ceiling.
    pub health: Vec<Channel>,
}

impl Targets {
    pub async fn connect(coordinator: &str, participants: &[String]) -> anyhow::Result<Self> {
        let mut health = Vec::with_capacity(participants.len());
        for endpoint in participants {
            health.push(
                endpoint_with(endpoint, &ClientOptions::default())?
                    .connect()
                    .await?,
            );
        }
        Ok(Self {
            coordinator: TreatyClient::connect(coordinator.to_string()).await?,
            participants: participants.to_vec(),
            health,
        })
    }
}

/// Runs `workload` with `options`, printing progress to stderr as `label`.
pub async fn run(
    workload: Workload,
    targets: &Targets,
    options: &LoadOptions,
    tally: Arc<Tally>,
) -> anyhow::Result<LoadResult> {
    tally.started.store(0, Ordering::SeqCst);
    let finished_before = tally.finished.load(Ordering::SeqCst);
    let completed_before = tally.sagas_completed.load(Ordering::SeqCst);
    let compensated_before = tally.sagas_compensated.load(Ordering::SeqCst);
    let started = Instant::now();
    let until = started + options.duration;
    let progress = tokio::spawn(print_progress(workload.name(), started, {
        let tally = tally.clone();
        move || tally.finished.load(Ordering::Relaxed) - finished_before
    }));
    let keep_per_initiator = MAX_LATENCIES / options.concurrency.max(1);
    let mut initiators = Vec::with_capacity(options.concurrency);
    for initiator in 0..options.concurrency {
        let targets = targets.clone();
        let tally = tally.clone();
        let options = options.clone();
        initiators.push(tokio::spawn(async move {
            let mut result = LoadResult::default();
            while Instant::now() < until {
                let number = tally.started.fetch_add(1, Ordering::SeqCst);
                if number >= options.limit {
                    break;
                }
                let begun = match options.rate_per_s {
                    Some(rate) => {
                        let due = started + Duration::from_secs_f64(number as f64 / rate as f64);
                        if due >= until {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                        due
                    }
                    None => Instant::now(),
                };
                let saga_in_mix = workload == Workload::Twopc
                    && options.saga_every > 0
                    && number % options.saga_every == options.saga_every - 1;
                let transaction = async {
                    match workload {
                        Workload::Twopc if saga_in_mix => {
                            let compensate = (number / options.saga_every) % 2 == 1;
                            let steps = targets.participants.len();
                            run_saga(&targets, steps, compensate, &tally).await
                        }
                        Workload::Twopc => run_two_phase(&targets).await,
                        Workload::Saga => run_saga(&targets, SAGA_STEPS, false, &tally).await,
                        Workload::Compensating => {
                            run_saga(&targets, SAGA_STEPS, true, &tally).await
                        }
                        Workload::Ceiling => {
                            let channel = &targets.health[initiator % targets.health.len()];
                            check_health(channel.clone()).await
                        }
                    }
                };
                // A coordinator that keeps the connection but never answers fails the
                // transaction instead of holding the run past its duration.
                let succeeded = tokio::time::timeout(TRANSACTION_TIMEOUT, transaction)
                    .await
                    .unwrap_or(false);
                // One call each: a 2PC is a Begin with commit (`run_two_phase`), a saga
                // one SubmitSaga, the ceiling one health check.
                result.client_calls += 1;
                if succeeded {
                    result.succeeded += 1;
                    if result.latencies.len() < keep_per_initiator {
                        result.latencies.push(begun.elapsed());
                    }
                } else {
                    result.failed += 1;
                }
                tally.finished.fetch_add(1, Ordering::Relaxed);
            }
            result
        }));
    }
    let mut total = LoadResult::default();
    for initiator in initiators {
        let mut result = initiator.await?;
        total.succeeded += result.succeeded;
        total.failed += result.failed;
        total.client_calls += result.client_calls;
        total.latencies.append(&mut result.latencies);
    }
    total.elapsed = started.elapsed();
    progress.abort();
    total.latencies.sort_unstable();
    total.sagas_completed = tally.sagas_completed.load(Ordering::SeqCst) - completed_before;
    total.sagas_compensated = tally.sagas_compensated.load(Ordering::SeqCst) - compensated_before;
    Ok(total)
}

/// Prints every [`PROGRESS_EVERY`] on stderr how many of `label`'s transactions are done
/// (what `done` says) and the rate over the last interval, until aborted.
pub async fn print_progress(label: &'static str, started: Instant, done: impl Fn() -> u64) {
    let mut previous = 0;
    let mut ticks = tokio::time::interval_at((started + PROGRESS_EVERY).into(), PROGRESS_EVERY);
    loop {
        ticks.tick().await;
        let done = done();
        eprintln!(
            "bench {label:<12} {:>6.1} s  {done:>9} done  {:>8.0}/s",
            started.elapsed().as_secs_f64(),
            (done - previous) as f64 / PROGRESS_EVERY.as_secs_f64()
        );
        previous = done;
    }
}

async fn run_two_phase(targets: &Targets) -> bool {
    let branches = targets
        .participants
        .iter()
        .enumerate()
        .map(|(i, endpoint)| BranchSpec::new(format!("p{i}"), endpoint, Vec::new()))
        .collect();
    matches!(
        targets
            .coordinator
            .run_two_phase(branches, BeginOptions::default())
            .await,
        Ok((_, Outcome::Committed))
    )
}

/// One saga of `steps` steps over the participants in turn; `compensate`: the last step
/// is rejected. Returns whether it ended as asked.
async fn run_saga(targets: &Targets, steps: usize, compensate: bool, tally: &Tally) -> bool {
    let last = steps.saturating_sub(1);
    let steps = (0..steps)
        .map(|i| {
            let payload = if compensate && i == last {
                REJECT.to_vec()
            } else {
                Vec::new()
            };
            let endpoint = &targets.participants[i % targets.participants.len()];
            SagaStep::new(format!("s{i}"), endpoint, payload)
        })
        .collect();
    let options = SubmitOptions {
        wait_for_outcome: true,
        ..SubmitOptions::default()
    };
    let Ok(submitted) = targets.coordinator.submit_saga(steps, options).await else {
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

/// The ceiling's call: `grpc.health.v1.Health/Check` for the whole server.
async fn check_health(channel: Channel) -> bool {
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    matches!(answer, Ok(response) if response.get_ref().status == ServingStatus::Serving as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_lists_parse_in_order_and_refuse_unknown_or_repeated_names() {
        assert_eq!(
            Workload::parse_list("ceiling,twopc"),
            Ok(vec![Workload::Ceiling, Workload::Twopc])
        );
        assert!(Workload::parse_list("twopc,2pc").is_err());
        assert!(Workload::parse_list("saga,saga").is_err());
        assert!(Workload::parse_list("").is_err());
    }

    #[test]
    fn percentiles_of_sorted_latencies() {
        let result = LoadResult {
            latencies: (1..=1000).map(Duration::from_millis).collect(),
            ..LoadResult::default()
        };
        assert_eq!(result.percentile_ms(0.5), 501.0);
        assert_eq!(result.percentile_ms(0.999), 999.0);
        assert_eq!(result.percentile_ms(1.0), 1000.0);
    }
}
