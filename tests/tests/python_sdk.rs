//! The Python participant SDK's own tests (`participant-sdk/python/run_tests.sh`), run
//! from the workspace's test command so that `cargo test --workspace` covers both SDKs.
//! The script makes its virtual environment (grpcio, protobuf, grpcio-tools from PyPI)
//! the first time and reuses it after; it needs `python3`, which a fresh machine has.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::Path;
use std::time::Duration;

/// Installing the virtual environment on a slow connection included.
const PATIENCE: Duration = Duration::from_secs(900);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_passes_its_tests() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("participant-sdk/python/run_tests.sh");
    let run = tokio::process::Command::new("bash")
        .arg(&script)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the Python SDK's tests finish within 15 minutes")
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let summary = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with("python-sdk: ") && line.contains("passed"))
        .unwrap_or("(no summary line)");
    println!("{summary}");
    assert!(
        output.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        output.status
    );
    assert!(summary.contains(" 0 failed"), "{summary}");
}
