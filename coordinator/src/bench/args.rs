//! `treaty bench`'s command line: its flags ([`BenchArgs`]) and their checks, each
//! refusal naming its flag, all made before anything starts ([`validate`]).

use std::time::{Duration, Instant};

use anyhow::Context;

use super::cluster;
use super::observe::{cpu_us, listens_on};
use super::postgres;
use super::workload::Workload;

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Workloads to run, one after another, separated by commas: twopc, saga,
    /// compensating, ceiling. Default: all four (only twopc with --saga-every or
    /// --disk-sample-s, the soak).
    #[arg(long)]
    pub workloads: Option<String>,
    /// Run the coordinator and each participant as a separate child process (of this
    /// executable) instead of inside this process.
    #[arg(long)]
    pub processes: bool,
    /// Print one JSON object with every figure instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also run PostgreSQL's own two-phase commit (PREPARE TRANSACTION / COMMIT
    /// PREPARED) at the same concurrency against this server (URL or key=value string;
    /// it needs max_prepared_transactions ≥ --concurrency), and print the ratio.
    #[arg(long)]
    pub postgres: Option<String>,
    /// A running coordinator to measure; by default one is started (its figures are
    /// n/a with this unless --coordinator-metrics says where its metrics are).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// The metrics address (HOST:PORT, plain HTTP) of the coordinator --endpoint names,
    /// so that its calls, fsyncs, log records and memory are measured too.
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator_metrics: Option<std::net::SocketAddr>,
    /// The process id of the coordinator --endpoint names, when it runs on this machine,
    /// so that its CPU time is counted too (read from /proc, as for the processes the
    /// bench starts). Refused unless that process listens on --endpoint's port (within
    /// 5 s, while it starts).
    #[arg(long)]
    pub coordinator_pid: Option<u32>,
    /// Participants (branches) per two-phase commit; 1 measures one-phase commits.
    #[arg(long, default_value_t = 2)]
    pub participants: usize,
    /// Transactions in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long each workload runs (at most; see --transactions).
    #[arg(long, default_value_t = 10)]
    pub duration_s: u64,
    /// Stop each workload once this many transactions have run (before --duration-s if
    /// sooner).
    #[arg(long)]
    pub transactions: Option<u64>,
    /// Before each workload is measured, run it this long uncounted, so that connections
    /// opened on first use and caches filled on first use are not in its figures (0: no
    /// warm-up; none with --transactions, whose every transaction counts).
    #[arg(long, default_value_t = 500)]
    pub warm_up_ms: u64,
    /// Start at most this many transactions a second (a steady rate keeps the data that
    /// retention holds constant, so a disk that grows is a leak, not a faster run).
    #[arg(long)]
    pub rate_per_s: Option<u64>,
    /// In twopc, every Nth transaction is a saga with a step on each participant instead
    /// of a two-phase commit; every other saga's last step is rejected, so it compensates.
    #[arg(long, default_value_t = 0)]
    pub saga_every: u64,
    /// The started coordinator's `--log-retention-ms`.
    #[arg(long)]
    pub log_retention_ms: Option<u64>,
    /// The participants' barrier retention (records of final branches are collected
    /// this long after their transaction was created).
    #[arg(long)]
    pub barrier_retention_ms: Option<u64>,
    /// The participants write a saga step's (or one-phase commit's) YES unforced, so a
    /// step waits for one forced write instead of two (the SDK's
    /// `ServeOptions::unforced_one_phase_yes`, right for participants whose effects
    /// commit with their barrier records; the bench's have none).
    #[arg(long, conflicts_with = "recovery")]
    pub unforced_one_phase_yes: bool,
    /// Sample the size of every data directory this often, print it, and summarize at
    /// the end whether it stayed flat.
    #[arg(long, conflicts_with = "recovery")]
    pub disk_sample_s: Option<u64>,
    /// Also write the samples to this CSV file (created before the run).
    #[arg(long, requires = "disk_sample_s")]
    pub disk_csv: Option<std::path::PathBuf>,
    /// Sample the started coordinator's RSS this often through the run, and report it
    /// per quarter after a warm-up (the first tenth, or until its log first purged if
    /// that is later and within the first half), with its flatness.
    #[arg(long, default_value_t = 1_000)]
    pub rss_sample_ms: u64,
    /// Also write those samples to this CSV file (seconds since the load began,
    /// transactions finished by then, resident bytes: what the quarters average over),
    /// each with the coordinator's log and retained-transaction gauges read beside it.
    #[arg(long, conflicts_with_all = ["endpoint", "recovery"])]
    pub rss_csv: Option<std::path::PathBuf>,
    /// The started coordinator's `--memory-budget-bytes` (its default if not given).
    #[arg(long)]
    pub memory_budget_bytes: Option<u64>,
    /// Instead of the workloads: put --in-flight transactions in flight, kill -9 the
    /// coordinator, start it again, and measure until all are resolved (needs
    /// --processes).
    #[arg(long)]
    pub recovery: bool,
    /// `--recovery`: transactions in flight at the kill (half decided, half undecided).
    #[arg(long, default_value_t = 10_000, requires = "recovery")]
    pub in_flight: usize,
    /// `--recovery`: the participants' in-doubt poll interval (the SDK's 2 s if not
    /// given).
    #[arg(long, requires = "recovery")]
    pub in_doubt_poll_ms: Option<u64>,
    /// Before the workloads, time 8 KiB writes and `fdatasync`s in the stores'
    /// directory (or `--sync-probe-dir`), alone and then as many at once as the processes
    /// whose stores the bench placed there force on a two-phase commit's path, each part
    /// for this long, so that the target at one in flight is computed from this run (0:
    /// no probe).
    #[arg(long, default_value_t = 1_000, conflicts_with = "recovery")]
    pub sync_probe_ms: u64,
    /// Where the sync probe writes, in a directory of its own that it makes there and
    /// removes after (default: beside the stores). With `--endpoint` the coordinator's
    /// log is wherever its `--data-dir` is, and the stores may be on another file
    /// system: name a directory on the disk whose lone sync the target is to count. The
    /// probe's "at once" part still counts the processes whose stores the bench placed,
    /// as if they shared that disk.
    #[arg(long, conflicts_with = "recovery")]
    pub sync_probe_dir: Option<std::path::PathBuf>,
    /// `--recovery`: the longest the whole run may take.
    #[arg(long, default_value_t = 600, requires = "recovery")]
    pub recovery_timeout_s: u64,
}

/// A new directory for the sync probe under `--sync-probe-dir`, made for this run alone
/// (the probe removes the directory it wrote in, so it must never be one that was there
/// before).
pub(super) fn sync_probe_dir_in(dir: &std::path::Path) -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("treaty-sync-probe-")
        .tempdir_in(dir)
        .with_context(|| format!("--sync-probe-dir {}: cannot write there", dir.display()))
}

/// The workloads to run: `--workloads`, or the default (see `bench`'s module docs).
fn workloads(args: &BenchArgs) -> anyhow::Result<Vec<Workload>> {
    let soak = args.saga_every > 0 || args.disk_sample_s.is_some();
    let workloads = match &args.workloads {
        Some(list) => Workload::parse_list(list).map_err(|message| anyhow::anyhow!(message))?,
        None if soak => vec![Workload::Twopc],
        None => Workload::ALL.to_vec(),
    };
    anyhow::ensure!(
        args.saga_every == 0 || workloads.contains(&Workload::Twopc),
        "--saga-every mixes sagas into the twopc workload, which --workloads leaves out"
    );
    Ok(workloads)
}

/// Checks every flag, naming it.
pub(super) fn validate(args: &BenchArgs) -> anyhow::Result<Vec<Workload>> {
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
        args.transactions.is_none_or(|t| t >= 1),
        "--transactions must be at least 1"
    );
    anyhow::ensure!(
        args.rate_per_s.is_none_or(|r| (1..=1_000_000).contains(&r)),
        "--rate-per-s must be 1..=1000000"
    );
    anyhow::ensure!(
        args.disk_sample_s.is_none_or(|s| (1..=3_600).contains(&s)),
        "--disk-sample-s must be 1..=3600"
    );
    anyhow::ensure!(
        args.log_retention_ms.is_none_or(|ms| ms >= 1),
        "--log-retention-ms must be at least 1"
    );
    anyhow::ensure!(
        args.sync_probe_ms <= 60_000,
        "--sync-probe-ms must be 0..=60000"
    );
    anyhow::ensure!(args.warm_up_ms <= 60_000, "--warm-up-ms must be 0..=60000");
    if let Some(dir) = &args.sync_probe_dir {
        anyhow::ensure!(
            args.sync_probe_ms > 0,
            "--sync-probe-dir needs the probe: --sync-probe-ms is 0"
        );
        anyhow::ensure!(
            dir.is_dir(),
            "--sync-probe-dir {}: not a directory",
            dir.display()
        );
        // Refused now if the probe could not write there, rather than after the start.
        sync_probe_dir_in(dir)?;
    }
    anyhow::ensure!(
        (10..=3_600_000).contains(&args.rss_sample_ms),
        "--rss-sample-ms must be 10..=3600000"
    );
    if let Some(budget) = args.memory_budget_bytes {
        let mut config = crate::config::ServeConfig::new(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            "bench",
        );
        config.memory_budget_bytes = budget;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("--memory-budget-bytes: {}", e.message))?;
    }
    if let Some(retention_ms) = args.barrier_retention_ms {
        cluster::barrier_gc(retention_ms)?;
    }
    if let Some(url) = &args.postgres {
        postgres::check_url(url)?;
        anyhow::ensure!(
            args.concurrency <= 1_000,
            "--postgres: --concurrency must be 1..=1000 (one PostgreSQL connection each)"
        );
    }
    if let Some(endpoint) = &args.endpoint {
        treaty_sdk::limits::check_endpoint("--endpoint", endpoint)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    anyhow::ensure!(
        args.coordinator_metrics.is_none() || args.endpoint.is_some(),
        "--coordinator-metrics needs --endpoint (a coordinator the bench starts is measured \
         through its own metrics address)"
    );
    if let Some(pid) = args.coordinator_pid {
        // --endpoint itself was checked above; whether the pid serves it is checked by
        // check_coordinator_pid.
        anyhow::ensure!(
            args.endpoint.is_some(),
            "--coordinator-pid needs --endpoint (the bench knows the coordinators it starts)"
        );
        anyhow::ensure!(
            cpu_us(Some(pid)).is_some(),
            "--coordinator-pid {pid}: no such process on this machine"
        );
    }
    if args.recovery {
        anyhow::ensure!(
            args.processes && args.endpoint.is_none(),
            "--recovery needs --processes (it kills the coordinator's process) and no --endpoint"
        );
        anyhow::ensure!(
            (1..=100_000).contains(&args.in_flight),
            "--in-flight must be 1..=100000"
        );
        anyhow::ensure!(
            args.participants >= 2,
            "--recovery needs --participants 2 or more: its transactions are two-phase commits \
             (one branch would commit in one phase)"
        );
        anyhow::ensure!(
            args.in_doubt_poll_ms
                .is_none_or(|ms| (10..=60_000).contains(&ms)),
            "--in-doubt-poll-ms must be 10..=60000"
        );
        anyhow::ensure!(
            (1..=86_400).contains(&args.recovery_timeout_s),
            "--recovery-timeout-s must be 1..=86400"
        );
    }
    workloads(args)
}

/// How long the bench waits for `--coordinator-pid` to listen on `--endpoint`'s port: a
/// coordinator started a moment before binds it first thing, so this is its process's
/// start-up.
const COORDINATOR_LISTEN_PATIENCE: Duration = Duration::from_secs(5);
/// How often it looks meanwhile.
const COORDINATOR_LISTEN_POLL: Duration = Duration::from_millis(100);

/// Refuses a `--coordinator-pid` that is not the process serving `--endpoint` (which
/// [`validate`] checked): one that does not listen on the endpoint's port on this machine
/// within [`COORDINATOR_LISTEN_PATIENCE`], whose CPU would be counted as the
/// coordinator's. Nothing has started when it is called.
pub(super) async fn check_coordinator_pid(args: &BenchArgs) -> anyhow::Result<()> {
    let (Some(pid), Some(endpoint)) = (args.coordinator_pid, &args.endpoint) else {
        return Ok(());
    };
    let port = treaty_sdk::limits::parse_endpoint("--endpoint", endpoint)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .port();
    let deadline = Instant::now() + COORDINATOR_LISTEN_PATIENCE;
    loop {
        match listens_on(pid, port) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
                anyhow::bail!(
                    "--coordinator-pid {pid}: cannot read its open files to check that it \
                     serves --endpoint ({error}); run the bench as the coordinator's user"
                )
            }
            Err(_) if cpu_us(Some(pid)).is_none() => {
                anyhow::bail!("--coordinator-pid {pid}: the process ended")
            }
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("--coordinator-pid {pid}: cannot read its sockets in /proc")
                });
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "--coordinator-pid {pid}: that process does not listen on port {port} of \
             --endpoint {endpoint} (waited {} s for it to start)",
            COORDINATOR_LISTEN_PATIENCE.as_secs()
        );
        tokio::time::sleep(COORDINATOR_LISTEN_POLL).await;
    }
}
