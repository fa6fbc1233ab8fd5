//! The chaos suite: the real binaries as processes (`treaty serve`, several `bank`s with
//! their data in sled and a `rewards` service with its data in SQLite), a workload of
//! transfers run as two-phase commits and as sagas (some with a third leg at rewards,
//! some with payloads big enough to make sled write blob files), and a seeded schedule
//! of faults — kill -9 at random moments, restarts with a crash point armed so the
//! process dies at a dangerous instant, answers the coordinator loses — then an audit of
//! the invariants once everything runs clean again (see [`audit`]).
//!
//! The seed fixes the schedule (which process, when, how) and each worker's transfers;
//! the operating system's timing is not replayed, so a seed replays the same faults
//! against the same workload, not the same interleaving.
//!
//! `TREATY_CHAOS_SECONDS` (default 20) sets how long faults are injected;
//! `TREATY_CHAOS_SEED` replays a seed.

pub mod audit;
pub mod cluster;
pub mod workload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cluster::{COORDINATOR_CRASH_POINTS, Cluster, PARTICIPANT_CRASH_POINTS, Role, Service};
use workload::{Account, Workload};

/// Default duration of the fault injection, in seconds (the CI's short form).
const DEFAULT_SECONDS: u64 = 20;
/// How long the workers may take to finish their last calls after the chaos.
const WORKERS_PATIENCE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct ChaosConfig {
    pub seed: u64,
    pub duration: Duration,
    pub banks: usize,
    pub accounts_per_bank: usize,
    pub initial_balance: i64,
    /// Every account holder is a rewards member with these points at the start.
    pub initial_points: i64,
    pub workers: usize,
}

impl ChaosConfig {
    /// The short form, or what `TREATY_CHAOS_SECONDS` / `TREATY_CHAOS_SEED` ask for.
    pub fn from_env() -> Self {
        let number = |name: &str| {
            std::env::var(name).ok().map(|value| {
                value
                    .trim()
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("{name}={value:?}: {e}"))
            })
        };
        let seed = number("TREATY_CHAOS_SEED").unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        Self {
            seed,
            duration: Duration::from_secs(
                number("TREATY_CHAOS_SECONDS").unwrap_or(DEFAULT_SECONDS),
            ),
            banks: 3,
            accounts_per_bank: 3,
            initial_balance: 1_000,
            initial_points: 100,
            workers: 4,
        }
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Since the start of the chaos.
    pub at: Duration,
    pub victim: Role,
    pub kind: FaultKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// kill -9, down for this long, then a restart.
    Kill { down: Duration },
    /// kill -9, then a restart with the crash point armed after `skip` passes: it dies
    /// there (and is restarted clean), or is killed by a later fault.
    CrashAt { point: &'static str, skip: u32 },
}

/// The faults a seed stands for, over `duration`, against the coordinator and
/// `participants`.
pub fn schedule(seed: u64, duration: Duration, participants: &[Service]) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    let mut at = Duration::ZERO;
    loop {
        at += Duration::from_millis(rng.random_range(400..=1_500));
        if at >= duration {
            return faults;
        }
        // The coordinator is the victim half of the time.
        let victim = if rng.random_bool(0.5) {
            Role::Coordinator
        } else {
            Role::Participant(participants[rng.random_range(0..participants.len())])
        };
        let kind = if rng.random_bool(0.5) {
            FaultKind::Kill {
                down: Duration::from_millis(rng.random_range(0..=800)),
            }
        } else {
            let points = match victim {
                Role::Coordinator => COORDINATOR_CRASH_POINTS,
                Role::Participant(_) => PARTICIPANT_CRASH_POINTS,
            };
            FaultKind::CrashAt {
                point: points[rng.random_range(0..points.len())],
                skip: rng.random_range(0..4),
            }
        };
        faults.push(Fault { at, victim, kind });
    }
}

/// What a run did, for the report.
#[derive(Debug)]
pub struct ChaosReport {
    pub seed: u64,
    pub faults: usize,
    /// How many faults struck each process.
    pub victims: BTreeMap<String, usize>,
    pub kills: u32,
    pub crash_point_deaths: u32,
    pub transfers: usize,
    pub tally: audit::Tally,
    /// Files in sled's `blobs/` directories once it is over (big values live there),
    /// per process that has any.
    pub blob_files: BTreeMap<String, usize>,
    /// Compactions of the coordinator's log that completed (the generation its
    /// directory names at the end; each compaction adds one).
    pub log_compactions: u64,
    pub elapsed: Duration,
    /// From the end of the chaos until the workers finished, and the audit's time.
    pub workers_finishing: Duration,
    pub auditing: Duration,
}

/// Runs the chaos and the audit in `dir`; the report, or every violation found.
pub async fn run(config: &ChaosConfig, dir: &std::path::Path) -> Result<ChaosReport, String> {
    let started = Instant::now();
    let accounts: Vec<Account> = (0..config.banks)
        .flat_map(|bank| {
            (0..config.accounts_per_bank).map(move |i| Account {
                bank,
                name: format!("acct{bank}x{i}"),
            })
        })
        .collect();
    // What each participant opens on its first start: banks their accounts, rewards a
    // member for every account holder.
    let mut initial: BTreeMap<Service, BTreeMap<String, i64>> = BTreeMap::new();
    for account in &accounts {
        initial
            .entry(Service::Bank(account.bank))
            .or_default()
            .insert(account.name.clone(), config.initial_balance);
        initial
            .entry(Service::Rewards)
            .or_default()
            .insert(account.name.clone(), config.initial_points);
    }
    let opening = |service| -> Vec<(String, i64)> {
        initial
            .get(&service)
            .map(|counters| counters.clone().into_iter().collect())
            .unwrap_or_default()
    };
    let per_bank = (0..config.banks)
        .map(|bank| opening(Service::Bank(bank)))
        .collect();
    let mut cluster = Cluster::start(dir, per_bank, opening(Service::Rewards)).await;
    let workload = Arc::new(Workload {
        seed: config.seed,
        coordinator: cluster.endpoint(Role::Coordinator),
        bank_endpoints: (0..config.banks)
            .map(|i| cluster.endpoint(Role::bank(i)))
            .collect(),
        rewards_endpoint: cluster.endpoint(Role::REWARDS),
        accounts,
    });

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers: Vec<_> = (0..config.workers)
        .map(|worker| tokio::spawn(workload.clone().run_worker(worker, stopped.clone())))
        .collect();

    let faults = schedule(config.seed, config.duration, &cluster.services());
    let chaos_started = Instant::now();
    for fault in &faults {
        tokio::time::sleep_until((chaos_started + fault.at).into()).await;
        cluster.revive_the_dead().await;
        match fault.kind {
            FaultKind::Kill { down } => {
                cluster.kill(fault.victim).await;
                tokio::time::sleep(down).await;
                cluster.restart_in_chaos(fault.victim).await;
            }
            FaultKind::CrashAt { point, skip } => {
                cluster
                    .kill_and_restart(fault.victim, Some((point, skip)))
                    .await;
            }
        }
    }
    tokio::time::sleep_until((chaos_started + config.duration).into()).await;

    // Everything clean again; the workers finish their last calls.
    let chaos_ended = Instant::now();
    cluster.calm_down().await;
    let _ = stop.send(true);
    let mut transfers = Vec::new();
    for worker in workers {
        let done = tokio::time::timeout(WORKERS_PATIENCE, worker)
            .await
            .map_err(|_| format!("a worker did not finish within {WORKERS_PATIENCE:?}"))?
            .map_err(|e| format!("a worker panicked: {e}"))?;
        transfers.extend(done);
    }
    let (kills, crash_point_deaths) = (cluster.kills, cluster.crash_point_deaths);
    let workers_finishing = chaos_ended.elapsed();
    let audit_started = Instant::now();
    let tally = audit::Audit::new(&mut cluster, &workload, initial)
        .run(&mut transfers)
        .await
        .map_err(|violations| violations.join("\n"))?;
    Ok(ChaosReport {
        seed: config.seed,
        faults: faults.len(),
        victims: faults.iter().fold(BTreeMap::new(), |mut victims, fault| {
            *victims.entry(fault.victim.to_string()).or_default() += 1;
            victims
        }),
        kills,
        crash_point_deaths,
        transfers: transfers.len(),
        tally,
        blob_files: blob_files_per_process(dir),
        log_compactions: log_generation(&dir.join("coordinator")),
        elapsed: started.elapsed(),
        workers_finishing,
        auditing: audit_started.elapsed(),
    })
}

/// The generation of the store in `dir` (0: never compacted).
fn log_generation(dir: &std::path::Path) -> u64 {
    std::fs::read_to_string(dir.join(treaty_sdk::durable::POINTER_FILE))
        .ok()
        .and_then(|name| name.trim().strip_prefix("gen-")?.parse().ok())
        .unwrap_or(0)
}

/// The files in sled's `blobs/` directories of each process's data directory in `dir`.
fn blob_files_per_process(dir: &std::path::Path) -> BTreeMap<String, usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .flatten()
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, blob_files(&entry.path(), 3))
        })
        .filter(|(_, files)| *files > 0)
        .collect()
}

/// The files in directories named `blobs` under `dir`, looking `depth` levels down.
fn blob_files(dir: &std::path::Path, depth: u32) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| {
            let path = entry.path();
            if entry.file_name() == "blobs" {
                std::fs::read_dir(&path).map_or(0, |files| files.count())
            } else if depth > 0 {
                blob_files(&path, depth - 1)
            } else {
                0
            }
        })
        .sum()
}
