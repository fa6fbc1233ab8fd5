//! Real processes: the workspace's binaries, built once per test process with the same
//! cargo that runs the tests, started as children with their output kept in a log file.
//! Children are killed if the test fails before stopping them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::PATIENCE;

/// The path of `bin` from workspace package `package`, building it if needed. Cargo
/// gives integration tests only their own package's binaries, so the others are built
/// here with `cargo build` (the outer `cargo test` no longer holds the build lock).
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    let key = format!("{package}/{bin}");
    if let Some(path) = built.get(&key) {
        return path.clone();
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace");
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--message-format=json",
            "-p",
            package,
            "--bin",
            bin,
        ])
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(
        output.status.success(),
        "cargo build -p {package} --bin {bin} failed"
    );
    let path = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter(|message| message["target"]["name"] == bin)
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo reported no executable for {bin}"));
    built.insert(key, path.clone());
    path
}

/// A child process that printed `<prefix> <address>` on stdout once it was serving.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pub address: SocketAddr,
    pub log_file: PathBuf,
}

impl ServerProcess {
    /// Starts `program args…` with `envs`, its stderr appended to `log_file`, and waits
    /// (at most `PATIENCE`) for the line announcing its address.
    pub async fn start(
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        ready_prefix: &str,
        log_file: PathBuf,
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .expect("open the child's log file");
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        for (key, value) in envs {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn the child process");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let address = tokio::time::timeout(PATIENCE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.strip_prefix(ready_prefix) {
                    return address.trim().parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "{} did not announce its address; its log:\n{}",
                program.display(),
                tail(&log_file)
            )
        });
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            address,
            log_file,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("child still running") as i32)
    }

    /// kill -9, then wait for it to be gone.
    pub async fn kill9(mut self) -> ExitStatus {
        let _ = self.child.start_kill();
        self.wait_exit().await
    }

    /// SIGTERM: a graceful stop.
    pub fn terminate(&self) {
        let _ = kill(self.pid(), Signal::SIGTERM);
    }

    /// Waits (at most `PATIENCE`) for the process to end on its own.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        match tokio::time::timeout(PATIENCE, self.child.wait()).await {
            Ok(Ok(status)) => status,
            _ => panic!(
                "process did not exit in time; its log:\n{}",
                tail(&self.log_file)
            ),
        }
    }

    pub fn log(&self) -> String {
        tail(&self.log_file)
    }
}

/// Whether `status` is death by SIGKILL.
pub fn killed_by_sigkill(status: ExitStatus) -> bool {
    status.signal() == Some(Signal::SIGKILL as i32)
}

/// The last 60 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// `treaty serve` as a child process on `listen` with data in `data_dir`.
pub async fn start_treaty(
    data_dir: &Path,
    listen: &str,
    failpoints: Option<&str>,
) -> ServerProcess {
    let binary = workspace_binary("treaty-coordinator", "treaty");
    let args: Vec<String> = [
        "serve",
        "--listen",
        listen,
        "--data-dir",
        &data_dir.to_string_lossy(),
        "--retry-backoff-initial-ms",
        "20",
        "--retry-backoff-max-ms",
        "200",
        "--shutdown-grace-ms",
        "2000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut envs = vec![("TREATY_LOG", "info")];
    if let Some(failpoints) = failpoints {
        envs.push(("FAILPOINTS", failpoints));
    }
    let log_file = data_dir.with_extension("log");
    ServerProcess::start(&binary, &args, &envs, "treaty listening on", log_file).await
}

/// Sleeps briefly; for the rare places a test must let time pass.
pub async fn pause(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
