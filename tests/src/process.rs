//! Real processes: the workspace's binaries, built once per test process with the same
//! cargo that runs the tests, started as children (see `treaty_examples::process`) with
//! their stderr kept in a log file. Children are killed if the test fails first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;

use crate::harness::PATIENCE;

/// The path of `bin` from workspace package `package`. Cargo gives integration tests
/// only their own package's binaries, so the first call builds the others with `cargo
/// build` (the outer `cargo test` no longer holds the build lock): all of the
/// workspace's binaries at once, so that their dependencies are built with one set of
/// features rather than one set per package (each set is a rebuild and gigabytes of
/// disk).
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<HashMap<String, PathBuf>> = OnceLock::new();
    BUILT
        .get_or_init(build_workspace_binaries)
        .get(bin)
        .cloned()
        .unwrap_or_else(|| panic!("cargo built no executable {bin} (package {package})"))
}

/// Every binary of the workspace by name (names are unique in it), built.
fn build_workspace_binaries() -> HashMap<String, PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace");
    let output = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "--message-format=json",
            "--workspace",
            "--bins",
        ])
        .current_dir(workspace)
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo build");
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    if !output.status.success() {
        // With --message-format=json the compiler's errors go to stdout, not to the
        // inherited stderr: print them, or the failure says only "1 previous error".
        let diagnostics: String = messages
            .iter()
            .filter(|message| message["reason"] == "compiler-message")
            .filter_map(|message| message["message"]["rendered"].as_str())
            .collect();
        panic!(
            "cargo build --workspace --bins failed ({}):\n{diagnostics}",
            output.status
        );
    }
    messages
        .iter()
        .filter(|message| message["reason"] == "compiler-artifact")
        .filter_map(|message| {
            let name = message["target"]["name"].as_str()?;
            let executable = message["executable"].as_str()?;
            Some((name.to_owned(), PathBuf::from(executable)))
        })
        .collect()
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
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // A short grace unless the test chooses its own.
    if !extra_args.contains(&"--shutdown-grace-ms") {
        args.extend(["--shutdown-grace-ms".to_string(), "2000".to_string()]);
    }
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
