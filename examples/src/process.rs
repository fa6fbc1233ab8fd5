//! Child server processes, for the demo and the black-box tests: start one, wait for the
//! line that announces its address, stop it with SIGTERM or SIGKILL. Its stderr goes to a
//! log file; its stdout lines are forwarded to a channel (after the announcement) so the
//! caller can show or inspect them. Children are killed if their handle is dropped.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Most stdout lines kept waiting for the caller; later ones are dropped, never blocking
/// the child.
const STDOUT_BUFFER_LINES: usize = 10_000;

#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pub address: SocketAddr,
    pub log_file: PathBuf,
    /// The child's stdout, line by line, after the announcement.
    pub stdout: mpsc::Receiver<String>,
}

fn error(message: String) -> std::io::Error {
    std::io::Error::other(message)
}

impl ServerProcess {
    /// Starts `program args…` with `envs` and waits (at most `ready_within`) for a stdout
    /// line `<ready_prefix> <address>`.
    pub async fn start(
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        ready_prefix: &str,
        log_file: PathBuf,
        ready_within: Duration,
    ) -> std::io::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)?;
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
        let mut child = command
            .spawn()
            .map_err(|e| error(format!("cannot start {}: {e}", program.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| error("the child has no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let announced = tokio::time::timeout(ready_within, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.strip_prefix(ready_prefix) {
                    return address.trim().parse::<SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(address) = announced else {
            return Err(error(format!(
                "{} did not announce its address within {ready_within:?}; its log:\n{}",
                program.display(),
                tail(&log_file, 40)
            )));
        };
        let (sender, receiver) = mpsc::channel(STDOUT_BUFFER_LINES);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = sender.try_send(line);
            }
        });
        Ok(Self {
            child,
            address,
            log_file,
            stdout: receiver,
        })
    }

    /// Its cleartext endpoint, `http://ADDRESS`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.address)
    }

    /// Its endpoint when it serves TLS, `https://ADDRESS` (the address as the name its
    /// certificate must carry).
    pub fn https_endpoint(&self) -> String {
        format!("https://{}", self.address)
    }

    /// The child's process id while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    fn pid(&self) -> Option<Pid> {
        self.child.id().map(|id| Pid::from_raw(id as i32))
    }

    /// SIGTERM: ask for a graceful stop.
    pub fn terminate(&self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }

    /// SIGHUP: ask a daemon to reload its certificates and tokens.
    pub fn hang_up(&self) {
        if let Some(pid) = self.pid() {
            let _ = kill(pid, Signal::SIGHUP);
        }
    }

    /// SIGKILL, then wait for the process to be gone.
    pub async fn kill9(&mut self, within: Duration) -> std::io::Result<ExitStatus> {
        let _ = self.child.start_kill();
        self.wait_exit(within).await
    }

    /// Waits (at most `within`) for the process to end.
    pub async fn wait_exit(&mut self, within: Duration) -> std::io::Result<ExitStatus> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status,
            Err(_) => Err(error(format!(
                "process did not exit within {within:?}; its log:\n{}",
                tail(&self.log_file, 40)
            ))),
        }
    }

    /// How it ended, if it has (without waiting).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then wait; SIGKILL if it does not stop within `within`.
    pub async fn stop(&mut self, within: Duration) -> std::io::Result<ExitStatus> {
        self.terminate();
        match self.wait_exit(within).await {
            Ok(status) => Ok(status),
            Err(_) => self.kill9(within).await,
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_file, lines)
    }
}

/// Whether `status` is death by SIGKILL.
pub fn killed_by_sigkill(status: ExitStatus) -> bool {
    status.signal() == Some(Signal::SIGKILL as i32)
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The directory of the workspace's binaries beside the running one. When run through
/// cargo (`CARGO` is set), first builds `binaries` — `(package, binary)` pairs — with the
/// same profile, so that a fresh checkout needs nothing but the one `cargo run`.
pub fn workspace_binaries(binaries: &[(&str, &str)]) -> std::io::Result<PathBuf> {
    let bin_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| error("the running binary has no directory".into()))?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .ok_or_else(|| error("examples/ is not inside the workspace".into()))?;
        let mut command = std::process::Command::new(cargo);
        command.current_dir(workspace).args(["build", "--quiet"]);
        for (package, binary) in binaries {
            command.args(["-p", package, "--bin", binary]);
        }
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let status = command.status()?;
        if !status.success() {
            return Err(error(format!("cargo build failed: {status}")));
        }
    }
    for (_, binary) in binaries {
        if !bin_dir.join(binary).exists() {
            return Err(error(format!(
                "{} is missing: run this with `cargo run -p treaty-examples --bin ...`",
                bin_dir.join(binary).display()
            )));
        }
    }
    Ok(bin_dir)
}
