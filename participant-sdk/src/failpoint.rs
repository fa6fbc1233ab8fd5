//! Failpoints at the dangerous instants, for crash tests of the real binaries.
//!
//! Points are configured from the `FAILPOINTS` environment variable with the `fail`
//! crate's syntax (`name=actions;name=actions`), e.g.
//! `FAILPOINTS=coordinator::after_decision_logged=return`. At a [`crash_point`] the
//! `return` action kills the process with SIGKILL on the spot (no destructors, no
//! flushes): exactly what `kill -9` from outside does, but at a chosen instant. At a
//! [`hold_point`], `return(PATH)` holds the process until the file PATH exists, so that
//! a test can act on it there. The other `fail` actions (`sleep(ms)`, `pause`, `panic`,
//! counts like `2*off->return`) work too.
//!
//! With no `FAILPOINTS` set, a crash point costs one read-locked map lookup.

/// Applies the `FAILPOINTS` environment variable. Call once at process start.
pub fn configure_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else {
        return Ok(());
    };
    for entry in spec.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, actions) = entry
            .split_once('=')
            .ok_or_else(|| format!("FAILPOINTS entry {entry:?} is not name=actions"))?;
        fail::cfg(name.trim(), actions.trim())
            .map_err(|e| format!("FAILPOINTS entry {entry:?}: {e}"))?;
        tracing::warn!(
            failpoint = name.trim(),
            actions = actions.trim(),
            "failpoint armed"
        );
    }
    Ok(())
}

/// A named instant where a crash test may kill the process.
pub fn crash_point(name: &'static str) {
    fail::fail_point!(name, |_| die(name));
}

fn die(name: &'static str) {
    tracing::warn!(failpoint = name, "failpoint reached: killing this process");
    eprintln!("failpoint {name} reached: killing this process with SIGKILL");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    // raise(SIGKILL) does not return; abort is the fallback if it somehow did.
    std::process::abort();
}

/// Most a [`hold_point`] waits for its release file; then the process goes on.
const HOLD_MAX: std::time::Duration = std::time::Duration::from_secs(120);

/// A named instant where a test may hold the process, to act on it there (send it a
/// signal). Armed with `return(PATH)`, it says on stderr that it holds, then waits until
/// the file PATH exists (polled every 10 ms, at most [`HOLD_MAX`]). It blocks its thread:
/// call it where blocking is allowed.
pub fn hold_point(name: &'static str) {
    fail::fail_point!(name, |release: Option<String>| hold(name, release));
}

fn hold(name: &'static str, release: Option<String>) {
    let Some(release) = release else {
        eprintln!("failpoint {name} needs return(PATH) to hold; going on");
        return;
    };
    let release = std::path::Path::new(&release);
    eprintln!(
        "failpoint {name} reached: holding until {} exists",
        release.display()
    );
    let started = std::time::Instant::now();
    while !release.exists() && started.elapsed() < HOLD_MAX {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    eprintln!("failpoint {name} released");
}

/// Whether the failpoint `name` is armed with `return` right now (for faults other than a
/// crash, such as losing a message). Each evaluation consumes one count of `N*return`.
pub fn triggered(name: &'static str) -> bool {
    fail::fail_point!(name, |_| true);
    false
}
