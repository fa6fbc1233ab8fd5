//! The chaos suite's cluster: one `treaty serve`, several `bank` processes (their data
//! and barrier in sled) and one `rewards` process (its data and barrier in SQLite), each
//! with its own data directory, that can be killed with SIGKILL and restarted on the
//! same address and data — with failpoints armed, to die at a dangerous instant, or clean.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use treaty_examples::process::{ServerProcess, killed_by_sigkill};

use crate::harness::PATIENCE;
use crate::process::workspace_binary;

/// Answers the coordinator loses now and then during the chaos (the sweeper's work).
pub const LOST_ANSWERS: &str =
    "coordinator::lose_delivery_answer=3%return;coordinator::lose_step_answer=3%return";

/// The crash points of each kind of process (see docs/decisions.md, "Failpoints").
pub const COORDINATOR_CRASH_POINTS: &[&str] = &[
    "coordinator::before_intent_logged",
    "coordinator::after_intent_logged",
    "coordinator::commit_implied",
    "coordinator::before_decision_logged",
    "coordinator::after_decision_logged",
    "coordinator::before_saga_write",
    "coordinator::after_saga_write",
    "coordinator::compensation_sent",
];
/// Those of the participant SDK, for every participant (banks and rewards alike).
pub const PARTICIPANT_CRASH_POINTS: &[&str] = &[
    "participant::after_vote_recorded",
    "participant::after_commit_applied",
];

/// Attempts at binding a restarted process to its old address (another socket may hold
/// the port for a moment).
const RESTART_ATTEMPTS: u32 = 10;

/// A process of the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Coordinator,
    Participant(Service),
}

/// A participant process: where a transfer's legs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Bank(usize),
    Rewards,
}

impl Role {
    pub const REWARDS: Role = Role::Participant(Service::Rewards);

    pub fn bank(index: usize) -> Role {
        Role::Participant(Service::Bank(index))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Role::Coordinator => write!(f, "coordinator"),
            Role::Participant(service) => service.fmt(f),
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Service::Bank(i) => write!(f, "bank{i}"),
            Service::Rewards => write!(f, "rewards"),
        }
    }
}

#[derive(Debug)]
struct Node {
    data_dir: PathBuf,
    address: SocketAddr,
    process: Option<ServerProcess>,
    /// The crash point armed in the running process, if any.
    armed: Option<String>,
    /// The running process's FAILPOINTS (empty: clean).
    failpoints: String,
}

#[derive(Debug)]
pub struct Cluster {
    coordinator: Node,
    banks: Vec<Node>,
    rewards: Node,
    /// The accounts each bank opens on its first start.
    accounts: Vec<Vec<(String, i64)>>,
    /// The members (with their points) rewards opens on its first start.
    members: Vec<(String, i64)>,
    /// Processes that died by SIGKILL: from the driver, or at an armed crash point.
    pub kills: u32,
    pub crash_point_deaths: u32,
}

impl Cluster {
    /// Starts every process on a free port of 127.0.0.1: bank `i` with `accounts[i]`,
    /// rewards with `members`.
    pub async fn start(
        dir: &Path,
        accounts: Vec<Vec<(String, i64)>>,
        members: Vec<(String, i64)>,
    ) -> Self {
        let any_port: SocketAddr = "127.0.0.1:0".parse().expect("a literal address");
        let node = |name: String| Node {
            data_dir: dir.join(name),
            address: any_port,
            process: None,
            armed: None,
            failpoints: String::new(),
        };
        let mut cluster = Self {
            coordinator: node("coordinator".into()),
            banks: (0..accounts.len())
                .map(|i| node(format!("bank{i}")))
                .collect(),
            rewards: node("rewards".into()),
            accounts,
            members,
            kills: 0,
            crash_point_deaths: 0,
        };
        for role in cluster.roles() {
            cluster.launch(role, None).await;
        }
        cluster
    }

    pub fn roles(&self) -> Vec<Role> {
        std::iter::once(Role::Coordinator)
            .chain(self.services().into_iter().map(Role::Participant))
            .collect()
    }

    /// The participants: every bank, then rewards.
    pub fn services(&self) -> Vec<Service> {
        (0..self.banks.len())
            .map(Service::Bank)
            .chain([Service::Rewards])
            .collect()
    }

    pub fn endpoint(&self, role: Role) -> String {
        format!("http://{}", self.node(role).address)
    }

    pub fn data_dir(&self, role: Role) -> &Path {
        &self.node(role).data_dir
    }

    fn node(&self, role: Role) -> &Node {
        match role {
            Role::Coordinator => &self.coordinator,
            Role::Participant(Service::Bank(i)) => &self.banks[i],
            Role::Participant(Service::Rewards) => &self.rewards,
        }
    }

    fn node_mut(&mut self, role: Role) -> &mut Node {
        match role {
            Role::Coordinator => &mut self.coordinator,
            Role::Participant(Service::Bank(i)) => &mut self.banks[i],
            Role::Participant(Service::Rewards) => &mut self.rewards,
        }
    }

    /// kill -9 (if it runs), then starts it again at once with `crash_point` armed (it
    /// dies when it gets there, after `skip` passes) or clean.
    pub async fn kill_and_restart(&mut self, role: Role, crash_point: Option<(&str, u32)>) {
        self.kill(role).await;
        self.launch(role, crash_point).await;
    }

    /// kill -9 and wait until it is gone; nothing if it is not running.
    pub async fn kill(&mut self, role: Role) {
        let node = self.node_mut(role);
        if let Some(mut process) = node.process.take() {
            let status = process
                .kill9(PATIENCE)
                .await
                .unwrap_or_else(|e| panic!("{role} did not die: {e}"));
            if killed_by_sigkill(status) {
                self.kills += 1;
            }
        }
    }

    /// Restarts, clean, every process that died at its crash point; returns how many.
    pub async fn revive_the_dead(&mut self) -> u32 {
        let mut revived = 0;
        for role in self.roles() {
            let node = self.node_mut(role);
            let Some(process) = node.process.as_mut() else {
                continue;
            };
            let Some(status) = process.try_exit_status() else {
                continue;
            };
            assert!(
                killed_by_sigkill(status) && node.armed.is_some(),
                "{role} exited by itself ({status}) with crash point {:?}; its log:\n{}",
                node.armed,
                process.log_tail(60)
            );
            node.process = None;
            self.kills += 1;
            self.crash_point_deaths += 1;
            revived += 1;
            self.launch(role, None).await;
        }
        revived
    }

    /// Ends the chaos: every process running, clean. Dead ones are restarted; those
    /// with failpoints armed (crash points, lost answers) are killed and restarted.
    pub async fn calm_down(&mut self) {
        self.revive_the_dead().await;
        for role in self.roles() {
            if self.node(role).process.is_none() || !self.node(role).failpoints.is_empty() {
                self.kill(role).await;
                self.launch_with(role, None, false).await;
            }
        }
    }

    /// Stops every process with SIGTERM; fails if one does not stop cleanly.
    pub async fn stop_all(&mut self) {
        for role in self.roles() {
            self.stop(role).await;
        }
    }

    pub async fn stop(&mut self, role: Role) {
        if let Some(mut process) = self.node_mut(role).process.take() {
            let status = process
                .stop(PATIENCE)
                .await
                .unwrap_or_else(|e| panic!("{role} did not stop: {e}"));
            assert!(
                status.success(),
                "{role} stopped with {status}; its log:\n{}",
                process.log_tail(60)
            );
        }
    }

    /// Starts `role` (not running) as during the chaos: the coordinator loses a few
    /// answers.
    pub async fn restart_in_chaos(&mut self, role: Role) {
        self.launch(role, None).await;
    }

    /// Starts `role` (which must not be running). During the chaos the coordinator
    /// always loses a few answers.
    async fn launch(&mut self, role: Role, crash_point: Option<(&str, u32)>) {
        self.launch_with(role, crash_point, true).await;
    }

    /// Starts `role` (not running) without failpoints.
    pub async fn start_clean(&mut self, role: Role) {
        self.launch_with(role, None, false).await;
    }

    async fn launch_with(
        &mut self,
        role: Role,
        crash_point: Option<(&str, u32)>,
        losing_answers: bool,
    ) {
        let (program, args, ready) = self.command(role);
        assert!(
            self.node(role).process.is_none(),
            "{role} is already running"
        );
        let log_file = self.node(role).data_dir.with_extension("log");
        let mut crash_point = crash_point;
        let mut last_error = String::new();
        for _ in 0..RESTART_ATTEMPTS {
            let mut failpoints: Vec<String> = Vec::new();
            if let Some((point, skip)) = crash_point {
                failpoints.push(format!("{point}={skip}*off->return"));
            }
            if role == Role::Coordinator && losing_answers {
                failpoints.push(LOST_ANSWERS.to_string());
            }
            let failpoints = failpoints.join(";");
            let mut envs = vec![
                ("TREATY_LOG", "info"),
                ("BANK_LOG", "info"),
                ("REWARDS_LOG", "info"),
            ];
            if !failpoints.is_empty() {
                envs.push(("FAILPOINTS", &failpoints));
            }
            let node = self.node_mut(role);
            let mut args = args.clone();
            args.extend(["--listen".to_string(), node.address.to_string()]);
            match ServerProcess::start(&program, &args, &envs, ready, log_file.clone(), PATIENCE)
                .await
            {
                Ok(process) => {
                    node.address = process.address;
                    node.process = Some(process);
                    node.armed = crash_point.map(|(point, _)| point.to_string());
                    node.failpoints = failpoints.clone();
                    return;
                }
                Err(error) => {
                    last_error = error.to_string();
                    // Its recovery can reach the crash point before it announces (a
                    // resumed saga compensating, say): that is the kill the crash point
                    // was for. Started again with it, it would die the same way each time.
                    if let Some((point, _)) = crash_point.take() {
                        if last_error.contains(&format!("failpoint {point} reached")) {
                            self.kills += 1;
                            self.crash_point_deaths += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        panic!(
            "{role} did not start again on {}: {last_error}",
            self.node(role).address
        );
    }

    /// The program, its arguments (but `--listen`) and its ready line.
    fn command(&self, role: Role) -> (PathBuf, Vec<String>, &'static str) {
        let data_dir = self.node(role).data_dir.to_string_lossy().into_owned();
        let strings = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match role {
            Role::Coordinator => (
                workspace_binary("treaty-coordinator", "treaty"),
                strings(&[
                    "serve",
                    "--data-dir",
                    &data_dir,
                    "--default-transaction-timeout-ms",
                    "15000",
                    "--default-prepare-timeout-ms",
                    "3000",
                    "--participant-call-timeout-ms",
                    "2000",
                    "--retry-backoff-initial-ms",
                    "50",
                    "--retry-backoff-max-ms",
                    "500",
                    "--sweep-interval-ms",
                    "500",
                    "--stale-after-ms",
                    "3000",
                    "--shutdown-grace-ms",
                    "3000",
                    // Compact whenever the log has doubled since the last compaction or
                    // start, though it keeps every record for the audit, so that kills
                    // also land in the middle of compactions.
                    "--log-compaction-min-bytes",
                    "1",
                    "--log-compaction-growth-factor",
                    "2",
                    "--log-compaction-min-removed-records",
                    "0",
                ]),
                "treaty listening on",
            ),
            Role::Participant(Service::Bank(i)) => {
                let accounts = counters(&self.accounts[i]);
                (
                    workspace_binary("treaty-examples", "bank"),
                    strings(&[
                        "--name",
                        &format!("bank{i}"),
                        "--accounts",
                        &accounts,
                        "--journal",
                        "--data-dir",
                        &data_dir,
                    ]),
                    "bank listening on",
                )
            }
            Role::Participant(Service::Rewards) => (
                workspace_binary("treaty-examples", "rewards"),
                strings(&[
                    "--members",
                    &counters(&self.members),
                    "--journal",
                    "--data-dir",
                    &data_dir,
                ]),
                "rewards listening on",
            ),
        }
    }
}

/// `name=value,name=value`, as the example binaries read them.
fn counters(counters: &[(String, i64)]) -> String {
    counters
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}
