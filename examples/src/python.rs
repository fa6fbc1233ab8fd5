//! The Python participant SDK's virtual environment, for the demo's Python shipping
//! service and the tests that run Python participants: made by
//! `participant-sdk/python/run_tests.sh --venv-only` the first time (it installs grpcio
//! and protobuf from PyPI), reused after.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Making the environment on a slow connection included.
const SETUP_PATIENCE: Duration = Duration::from_secs(900);

/// The workspace's root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The interpreter of the Python SDK's virtual environment, made first if there is none.
pub async fn sdk_interpreter() -> anyhow::Result<PathBuf> {
    let setup = workspace_root().join("participant-sdk/python/run_tests.sh");
    let run = tokio::process::Command::new("bash")
        .arg(&setup)
        .arg("--venv-only")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SETUP_PATIENCE, run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{} --venv-only took over {} s",
                setup.display(),
                SETUP_PATIENCE.as_secs()
            )
        })??;
    anyhow::ensure!(
        output.status.success(),
        "{} --venv-only failed ({}):\n{}",
        setup.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let python = stdout.lines().last().unwrap_or_default().trim();
    anyhow::ensure!(
        !python.is_empty(),
        "{} printed no interpreter",
        setup.display()
    );
    Ok(PathBuf::from(python))
}
