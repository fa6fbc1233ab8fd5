//! Failpoints at the dangerous instants, for crash tests of the real binaries.
//!
//! Points are configured from the `FAILPOINTS` environment variable with the `fail`
//! crate's syntax (`name=actions;name=actions`), e.g.
//! `FAILPOINTS=coordinator::after_decision_logged=return`. At a [`crash_point`] the
//! `return` action kills the process with SIGKILL on the spot (no destructors, no
//! flushes): exactly what `kill -9` from outside does, but at a chosen instant. The other
//! `fail` actions (`sleep(ms)`, `pause`, `panic`, counts like `2*off->return`) work too.
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

/// Whether the failpoint `name` is armed with `return` right now (for faults other than a
/// crash, such as losing a message). Each evaluation consumes one count of `N*return`.
pub fn triggered(name: &'static str) -> bool {
    fail::fail_point!(name, |_| true);
    false
}
