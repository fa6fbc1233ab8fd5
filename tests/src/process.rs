//! Real processes: the workspace's binaries, built once per test process with the same
//! cargo that runs the tests, started as children (see `treaty_examples::process`) with
//! their stderr kept in a log file. Children are killed if the test fails first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};

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

pub use treaty_examples::process::{ServerProcess, killed_by_sigkill, tail};

/// Starts a server process, failing the test (with its log) if it does not come up.
pub async fn start_server(
    program: &Path,
    args: &[String],
    envs: &[(&str, &str)],
    ready_prefix: &str,
    log_file: PathBuf,
) -> ServerProcess {
    ServerProcess::start(program, args, envs, ready_prefix, log_file, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Waits for the process to end, failing the test (with its log) if it does not.
pub async fn exit_status(process: &mut ServerProcess) -> ExitStatus {
    process
        .wait_exit(PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// kill -9, and wait until it is gone.
pub async fn kill9(process: &mut ServerProcess) -> ExitStatus {
    process
        .kill9(PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `treaty serve` as a child process on `listen` with data in `data_dir`.
pub async fn start_treaty(
    data_dir: &Path,
    listen: &str,
    failpoints: Option<&str>,
) -> ServerProcess {
    let failpoints = failpoints.map(|f| ("FAILPOINTS", f));
    start_treaty_with_env(data_dir, listen, failpoints.as_slice()).await
}

/// [`start_treaty`] with more environment variables (they override the defaults, e.g.
/// `TREATY_LOG`).
pub async fn start_treaty_with_env(
    data_dir: &Path,
    listen: &str,
    extra_envs: &[(&str, &str)],
) -> ServerProcess {
    start_treaty_with(data_dir, listen, &[], extra_envs).await
}

/// [`start_treaty_with_env`] with more arguments to `treaty serve`.
pub async fn start_treaty_with(
    data_dir: &Path,
    listen: &str,
    extra_args: &[&str],
    extra_envs: &[(&str, &str)],
) -> ServerProcess {
    let binary = workspace_binary("treaty-coordinator", "treaty");
    let mut args: Vec<String> = [
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
    args.extend(extra_args.iter().map(|s| s.to_string()));
    let mut envs = vec![("TREATY_LOG", "info")];
    envs.retain(|(key, _)| !extra_envs.iter().any(|(extra, _)| extra == key));
    envs.extend_from_slice(extra_envs);
    let log_file = data_dir.with_extension("log");
    start_server(&binary, &args, &envs, "treaty listening on", log_file).await
}

/// The scripted participant (`src/bin/scripted-participant.rs`) as a child process.
pub async fn start_scripted_participant(data_dir: &Path, listen: &str) -> ServerProcess {
    let args = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--data-dir".to_string(),
        data_dir.to_string_lossy().into_owned(),
    ];
    start_server(
        &workspace_binary("treaty-tests", "scripted-participant"),
        &args,
        &[],
        "participant listening on",
        data_dir.with_extension("log"),
    )
    .await
}

/// Runs the `treaty` command line with `args`, then `--coordinator COORDINATOR`; returns
/// whether it exited successfully, and its stdout with its stderr after.
pub async fn treaty_cli(coordinator: &str, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
        .args(args)
        .args(["--coordinator", coordinator])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, output)
        .await
        .expect("the treaty command finishes in time")
        .expect("run the treaty command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}
