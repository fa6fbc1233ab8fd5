//! The system `treaty bench` measures: its participants and its coordinator, either in
//! this process (tasks on this runtime, beside the load generator) or, with
//! `--processes`, as child processes of the current executable (`treaty serve` and the
//! hidden `treaty bench-participant`), so that each one's CPU and memory can be read
//! from `/proc` on its own.
//!
//! Either way every member serves `/metrics` on a loopback port, and the bench reads the
//! same counters from both modes ([`super::observe`]). Children are started with
//! `kill_on_drop`: however the bench ends (an error, Ctrl-C dropping the run), none
//! outlives it. Every address is 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, ChildStdout, Command};

use treaty_sdk::barrier_gc::BarrierGcOptions;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::{MetricsListen, ServeOptions};

use super::disk;
use super::participant::NoWork;
use crate::config::ServeConfig;

/// How long a child has to announce its addresses.
const START_PATIENCE: Duration = Duration::from_secs(30);
/// Longest line read from a child's stdout while waiting for its announcements.
const MAX_ANNOUNCEMENT_BYTES: usize = 4_096;

/// What the cluster is started with.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub processes: bool,
    pub participants: usize,
    /// The coordinator's `--max-active-transactions`.
    pub max_active_transactions: usize,
    pub log_retention_ms: Option<u64>,
    /// The coordinator's `--memory-budget-bytes`.
    pub memory_budget_bytes: Option<u64>,
    /// Participants hold branches named for it until SIGUSR1 (`--recovery`; children
    /// only).
    pub hold: bool,
    /// How the participants are served.
    pub participant: ParticipantSettings,
    /// A running coordinator to use instead of starting one.
    pub endpoint: Option<String>,
    /// That coordinator's metrics address (its figures are not measured without it).
    pub coordinator_metrics: Option<SocketAddr>,
    /// That coordinator's process, when it runs here: its CPU time is read too.
    pub coordinator_pid: Option<u32>,
}

/// One participant as the bench reaches it.
#[derive(Debug, Clone)]
pub struct ParticipantAt {
    pub endpoint: String,
    pub metrics: SocketAddr,
}

/// The name the coordinator's process is observed under.
pub const COORDINATOR: &str = "coordinator";

/// A process whose CPU time and memory are read: a child by its pid, a running coordinator
/// by the pid `--coordinator-pid` gives, or this process.
#[derive(Debug, Clone)]
pub struct Observed {
    pub name: String,
    /// `None`: this process.
    pub pid: Option<u32>,
}

#[derive(Debug)]
pub struct Cluster {
    pub coordinator_endpoint: String,
    /// `None` for a coordinator the bench did not start (`--endpoint`).
    pub coordinator_metrics: Option<SocketAddr>,
    pub participants: Vec<ParticipantAt>,
    /// The coordinator first (if started, or named with its pid), then the participants;
    /// in-process, one entry for this whole process after that coordinator.
    pub processes: Vec<Observed>,
    pub watched: disk::Watched,
    /// How the coordinator child was started, with the addresses it announced, so that
    /// it can be started again the same way (`None` in process or with `--endpoint`).
    coordinator_args: Option<Vec<String>>,
    running: Running,
    /// Holds every store (removed with the cluster).
    workdir: tempfile::TempDir,
}

type CoordinatorTask = tokio::task::JoinHandle<Result<(), crate::daemon::DaemonError>>;

#[derive(Debug)]
enum Running {
    InProcess {
        participants: Vec<tokio::sync::oneshot::Sender<()>>,
        coordinator: Option<(tokio::sync::oneshot::Sender<()>, CoordinatorTask)>,
    },
    /// The coordinator first (if started), then the participants.
    Children(Vec<Child>),
}

/// How the bench's participants are served, in this process or as children (each
/// `None` or `false`: the SDK's default).
#[derive(Debug, Clone, Copy, Default)]
pub struct ParticipantSettings {
    /// Records of final branches are collected this long after their transaction was
    /// created.
    pub barrier_retention_ms: Option<u64>,
    /// The in-doubt resolver's poll interval and age before asking.
    pub in_doubt_poll_ms: Option<u64>,
    /// A one-phase commit's or saga step's YES is written unforced
    /// (`ServeOptions::unforced_one_phase_yes`).
    pub unforced_one_phase_yes: bool,
}

impl ParticipantSettings {
    /// The serve options these settings make, metrics on.
    pub fn serve_options(&self, metrics: std::net::TcpListener) -> anyhow::Result<ServeOptions> {
        let mut options = ServeOptions {
            metrics_listen: Some(MetricsListen::from(metrics)),
            unforced_one_phase_yes: self.unforced_one_phase_yes,
            ..ServeOptions::default()
        };
        if let Some(retention_ms) = self.barrier_retention_ms {
            options.barrier_gc = barrier_gc(retention_ms)?;
        }
        if let Some(poll_ms) = self.in_doubt_poll_ms {
            options.in_doubt.poll_interval_ms = poll_ms;
            options.in_doubt.ask_after_ms = poll_ms;
        }
        Ok(options)
    }

    /// The `treaty bench-participant` flags that give a child these settings.
    fn child_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(retention_ms) = self.barrier_retention_ms {
            args.extend(["--barrier-retention-ms".into(), retention_ms.to_string()]);
        }
        if let Some(poll_ms) = self.in_doubt_poll_ms {
            args.extend(["--in-doubt-poll-ms".into(), poll_ms.to_string()]);
        }
        if self.unforced_one_phase_yes {
            args.push("--unforced-one-phase-yes".into());
        }
        args
    }
}

/// The barrier collector for `--barrier-retention-ms`, checked.
pub fn barrier_gc(retention_ms: u64) -> anyhow::Result<BarrierGcOptions> {
    let options = BarrierGcOptions {
        retention_ms,
        interval_ms: (retention_ms / 10).clamp(100, 10_000),
        ..BarrierGcOptions::default()
    };
    options
        .validate()
        .map_err(|e| anyhow::anyhow!("--barrier-retention-ms: {e}"))?;
    Ok(options)
}

impl Cluster {
    pub async fn start(options: &ClusterOptions) -> anyhow::Result<Self> {
        let workdir = tempfile::tempdir().context("creating the bench's temporary directory")?;
        let mut watched = disk::Watched {
            names: Vec::new(),
            dirs: Vec::new(),
        };
        let coordinator_dir = workdir.path().join("coordinator");
        if options.endpoint.is_none() {
            watched.names.push("coordinator".into());
            watched.dirs.push(coordinator_dir.clone());
        }
        let participant_dirs: Vec<PathBuf> = (0..options.participants)
            .map(|index| workdir.path().join(format!("participant-{index}")))
            .collect();
        for (index, dir) in participant_dirs.iter().enumerate() {
            watched.names.push(format!("participant-{index}"));
            watched.dirs.push(dir.clone());
        }
        let started = if options.processes {
            start_children(options, &coordinator_dir, &participant_dirs).await?
        } else {
            start_in_process(options, &coordinator_dir, &participant_dirs).await?
        };
        let mut processes = started.processes;
        if let (Some(_), Some(pid)) = (&options.endpoint, options.coordinator_pid) {
            // First, where a coordinator the bench starts is listed.
            processes.insert(
                0,
                Observed {
                    name: COORDINATOR.into(),
                    pid: Some(pid),
                },
            );
        }
        Ok(Self {
            coordinator_endpoint: started.coordinator_endpoint,
            coordinator_metrics: started.coordinator_metrics,
            participants: started.participants,
            processes,
            watched,
            coordinator_args: started.coordinator_args,
            running: started.running,
            workdir,
        })
    }

    /// The temporary directory under which every store the bench started lives.
    pub fn data_dir(&self) -> &Path {
        self.workdir.path()
    }

    /// Stops every member: in-process ones gracefully, children by SIGKILL (their data
    /// is temporary; what was measured is already read).
    pub async fn stop(self) -> anyhow::Result<()> {
        match self.running {
            Running::InProcess {
                participants,
                coordinator,
            } => {
                if let Some((stop, task)) = coordinator {
                    let _ = stop.send(());
                    task.await??;
                }
                for stop in participants {
                    let _ = stop.send(());
                }
            }
            Running::Children(children) => {
                // The participants first (the coordinator is the first child, put there
                // by `start_children`): a participant that outlives the coordinator
                // sees its call stream break and warns about it, as it should in
                // production, while nothing calls a participant any more by now.
                for mut child in children.into_iter().rev() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
        Ok(())
    }
}

struct Started {
    coordinator_endpoint: String,
    coordinator_metrics: Option<SocketAddr>,
    participants: Vec<ParticipantAt>,
    processes: Vec<Observed>,
    coordinator_args: Option<Vec<String>>,
    running: Running,
}

async fn start_in_process(
    options: &ClusterOptions,
    coordinator_dir: &Path,
    participant_dirs: &[PathBuf],
) -> anyhow::Result<Started> {
    let mut participants = Vec::new();
    let mut stops = Vec::new();
    for dir in participant_dirs {
        let store = Arc::new(DurableStore::open(dir, Default::default())?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")?;
        participants.push(ParticipantAt {
            endpoint: format!("http://{}", listener.local_addr()?),
            metrics: metrics.local_addr()?,
        });
        let serve_options = options.participant.serve_options(metrics)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        stops.push(stop);
        tokio::spawn(treaty_sdk::serve(
            Arc::new(NoWork::default()),
            store,
            listener,
            serve_options,
            async {
                let _ = stopped.await;
            },
        ));
    }
    let (coordinator_endpoint, coordinator_metrics, coordinator) = match &options.endpoint {
        Some(endpoint) => (endpoint.clone(), options.coordinator_metrics, None),
        None => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let mut config =
                ServeConfig::new(listener.local_addr()?, coordinator_dir.to_path_buf());
            config.max_active_transactions = options.max_active_transactions;
            if let Some(retention_ms) = options.log_retention_ms {
                config.log_retention_ms = retention_ms;
            }
            if let Some(budget) = options.memory_budget_bytes {
                config.memory_budget_bytes = budget;
            }
            // Bound here and handed over, so that its address is known and stays ours.
            let metrics_listener = TcpListener::bind("127.0.0.1:0").await?;
            let metrics = metrics_listener.local_addr()?;
            config.metrics_listen = Some(metrics);
            let endpoint = format!("http://{}", listener.local_addr()?);
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let stopped = async {
                let _ = stopped.await;
            };
            // Its addresses are known here; stdout is the report's.
            let task = tokio::spawn(crate::daemon::run_on_listeners(
                config,
                listener,
                Some(metrics_listener),
                stopped,
                false,
            ));
            (endpoint, Some(metrics), Some((stop, task)))
        }
    };
    Ok(Started {
        coordinator_endpoint,
        coordinator_metrics,
        participants,
        processes: vec![Observed {
            name: "this process (load generator included)".into(),
            pid: None,
        }],
        coordinator_args: None,
        running: Running::InProcess {
            participants: stops,
            coordinator,
        },
    })
}

async fn start_children(
    options: &ClusterOptions,
    coordinator_dir: &Path,
    participant_dirs: &[PathBuf],
) -> anyhow::Result<Started> {
    let executable = std::env::current_exe().context("finding the treaty executable")?;
    let mut children = Vec::new();
    let mut processes = Vec::new();
    let mut participants = Vec::new();
    for (index, dir) in participant_dirs.iter().enumerate() {
        let mut args = vec![
            "bench-participant".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.to_string_lossy().into_owned(),
        ];
        args.extend(options.participant.child_args());
        if options.hold {
            args.push("--hold".into());
        }
        let name = format!("participant-{index}");
        // Held commits fail on purpose, each with a warning: errors only, then.
        let log = if options.hold { "error" } else { "warn" };
        let (child, announced) = spawn(
            &executable,
            &name,
            &args,
            &[PARTICIPANT_LISTENING, PARTICIPANT_METRICS],
            log,
        )
        .await?;
        participants.push(ParticipantAt {
            endpoint: format!("http://{}", announced[0]),
            metrics: announced[1],
        });
        processes.push(Observed {
            name,
            pid: child.id(),
        });
        children.push(child);
    }
    let (coordinator_endpoint, coordinator_metrics, coordinator_args) = match &options.endpoint {
        Some(endpoint) => (endpoint.clone(), options.coordinator_metrics, None),
        None => {
            let mut args = vec![
                "serve".to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--metrics-listen".into(),
                "127.0.0.1:0".into(),
                "--data-dir".into(),
                coordinator_dir.to_string_lossy().into_owned(),
                "--max-active-transactions".into(),
                options.max_active_transactions.to_string(),
            ];
            if let Some(retention_ms) = options.log_retention_ms {
                args.extend(["--log-retention-ms".into(), retention_ms.to_string()]);
            }
            if let Some(budget) = options.memory_budget_bytes {
                args.extend(["--memory-budget-bytes".into(), budget.to_string()]);
            }
            let (child, announced) = spawn(
                &executable,
                "coordinator",
                &args,
                &COORDINATOR_ANNOUNCEMENTS,
                "warn",
            )
            .await?;
            // A restart listens where this one does: participants know it by address.
            args[2] = announced[0].to_string();
            args[4] = announced[1].to_string();
            processes.insert(
                0,
                Observed {
                    name: COORDINATOR.into(),
                    pid: child.id(),
                },
            );
            children.insert(0, child);
            (
                format!("http://{}", announced[0]),
                Some(announced[1]),
                Some(args),
            )
        }
    };
    Ok(Started {
        coordinator_endpoint,
        coordinator_metrics,
        participants,
        processes,
        coordinator_args,
        running: Running::Children(children),
    })
}

/// What `treaty serve` prints before its two addresses.
const COORDINATOR_ANNOUNCEMENTS: [&str; 2] = ["treaty listening on ", "treaty metrics on "];

impl Cluster {
    /// The coordinator child and how it was started (`--processes` without `--endpoint`).
    fn coordinator_child(&mut self) -> anyhow::Result<(&mut Child, &[String])> {
        match (&mut self.running, &self.coordinator_args) {
            (Running::Children(children), Some(args)) if !children.is_empty() => {
                Ok((&mut children[0], args.as_slice()))
            }
            _ => anyhow::bail!("the coordinator is not a child process started by the bench"),
        }
    }

    /// Kills the coordinator child with SIGKILL (kill -9) and waits for it to be gone.
    pub async fn kill_coordinator(&mut self) -> anyhow::Result<()> {
        let (child, _) = self.coordinator_child()?;
        child.start_kill().context("killing the coordinator")?;
        child
            .wait()
            .await
            .context("waiting for the coordinator to die")?;
        Ok(())
    }

    /// Starts the coordinator again, on the same data directory and addresses; returns
    /// once it has announced both (it serves from then on).
    pub async fn restart_coordinator(&mut self) -> anyhow::Result<()> {
        let executable = std::env::current_exe().context("finding the treaty executable")?;
        let (_, args) = self.coordinator_child()?;
        let args = args.to_vec();
        let (child, _) = spawn(
            &executable,
            "restarted coordinator",
            &args,
            &COORDINATOR_ANNOUNCEMENTS,
            "warn",
        )
        .await?;
        if let Some(observed) = self.processes.first_mut() {
            observed.pid = child.id();
        }
        let (old, _) = self.coordinator_child()?;
        *old = child;
        Ok(())
    }

    /// Sends `signal` to every participant child.
    pub fn signal_participants(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let Running::Children(children) = &self.running else {
            anyhow::bail!("the participants are not child processes");
        };
        let participants = children
            .iter()
            .skip(usize::from(self.coordinator_args.is_some()));
        for child in participants {
            let pid = child
                .id()
                .ok_or_else(|| anyhow::anyhow!("a participant exited"))?;
            let pid = nix::unistd::Pid::from_raw(
                i32::try_from(pid).context("a participant's pid out of range")?,
            );
            nix::sys::signal::kill(pid, signal).context("signalling a participant")?;
        }
        Ok(())
    }
}

/// What `treaty bench-participant` prints once it serves, before its address.
pub const PARTICIPANT_LISTENING: &str = "bench participant listening on ";
/// What it prints before its metrics address.
pub const PARTICIPANT_METRICS: &str = "bench participant metrics on ";

/// Starts `executable args` (logging at `log`, warnings and errors or errors only, to our
/// stderr) and reads
/// the address after each of `prefixes` from its stdout, in order; the rest of its
/// stdout is read and dropped, so that it never blocks on a full pipe.
async fn spawn(
    executable: &Path,
    name: &str,
    args: &[String],
    prefixes: &[&str],
    log: &str,
) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    let mut child = Command::new(executable)
        .args(args)
        .env("TREATY_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting the {name} ({})", executable.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("the {name}'s stdout is not piped"))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut announced = Vec::new();
    for prefix in prefixes {
        let address = tokio::time::timeout(START_PATIENCE, announcement(&mut lines, prefix))
            .await
            .map_err(|_| {
                anyhow::anyhow!("the {name} did not print {prefix:?} within {START_PATIENCE:?}")
            })?
            .with_context(|| format!("the {name} ({})", executable.display()))?;
        announced.push(address);
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, announced))
}

async fn announcement(
    lines: &mut tokio::io::Lines<BufReader<ChildStdout>>,
    prefix: &str,
) -> anyhow::Result<SocketAddr> {
    loop {
        let Some(line) = lines.next_line().await? else {
            anyhow::bail!("exited (or closed its stdout) before printing {prefix:?}");
        };
        anyhow::ensure!(
            line.len() <= MAX_ANNOUNCEMENT_BYTES,
            "printed a line of {} bytes",
            line.len()
        );
        if let Some(address) = line.strip_prefix(prefix) {
            return address
                .trim()
                .parse()
                .with_context(|| format!("{prefix:?} followed by {address:?}"));
        }
    }
}
