//! `treaty bench`'s sync probe: what a forced write costs on the disk that holds the
//! bench's stores, measured in the same run as the workloads, so that the target at one
//! in flight (issue 11: p50 ≤ 2 × (two echo round trips + one fsync)) is computed from
//! one run rather than from a separate `pg_test_fsync`.
//!
//! A round writes 8 KiB at the next block of a file written in full beforehand (the
//! file's size and blocks never change, as in the stores' segments) and `fdatasync`s
//! it, timed from the write to the sync's return. The probe runs rounds twice:
//! - **alone**: one writer;
//! - **at once**: one writer per process that forces a write on a two-phase commit's
//!   path (the coordinator's intent, as the prepares go out, and each participant's YES),
//!   each with its own file, started together; a round lasts until the last of them is
//!   durable. The bench puts every store on one disk, so there their syncs queue at the
//!   one device. On a commit's path they overlap only in part (a YES is forced when its
//!   prepare arrives), so this is the most they can cost together.
//!
//! Invariants: every writer runs the same rounds (a round starts for all or for none,
//! decided by one of them between two barrier waits), so round `i` of each writer is the
//! same round; a writer that fails ends the part at the next round and the part is an
//! error. Bounded: each part runs for the time given and at most `MAX_ROUNDS` rounds;
//! the files are `PREWRITTEN_BLOCKS` × 8 KiB each and removed at the end, with the
//! probe's directory if it is then empty.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

use super::stats::{mean_ms, percentile_ms};

/// The size of one write, as `pg_test_fsync`'s.
const BLOCK_BYTES: usize = 8 * 1024;
/// Blocks each probe file holds, written before the rounds: 2 MiB.
const PREWRITTEN_BLOCKS: u64 = 256;
/// Most rounds per part, whatever the time given.
const MAX_ROUNDS: usize = 1_000_000;
/// Most writers at once: one per process on a commit's path.
pub const MAX_WRITERS: usize = 64;
const _: () = assert!(
    treaty_sdk::limits::MAX_BRANCHES < MAX_WRITERS,
    "every participant of a commit and its coordinator get a writer"
);

/// One part's rounds. A round: each writer writes 8 KiB and `fdatasync`s it, all
/// started together; it lasts from the first write to the last sync's return.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncTimes {
    /// Writers in each round, each on a file of its own.
    pub writers: usize,
    pub rounds: u64,
    /// The median round.
    pub p50_ms: f64,
    pub mean_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncProbeReport {
    /// Where the probe's files were (beside the bench's stores, or in a directory of
    /// their own under `--sync-probe-dir`).
    pub dir: PathBuf,
    /// One writer.
    pub alone: SyncTimes,
    /// One writer per process that forces a write on a two-phase commit's path.
    pub at_once: SyncTimes,
}

impl SyncProbeReport {
    /// The line printed under the table.
    pub fn line(&self) -> String {
        let part = |t: &SyncTimes| {
            format!(
                "p50 {:.3} ms (mean {:.3}, {} rounds)",
                t.p50_ms, t.mean_ms, t.rounds
            )
        };
        format!(
            "fsync in {} (8 KiB written, then fdatasync): alone {}; {} at once, until the \
             last is durable, {}",
            self.dir.display(),
            part(&self.alone),
            self.at_once.writers,
            part(&self.at_once)
        )
    }
}

/// Runs both parts in `dir` (created if missing), each for `duration`, the second with
/// `writers_at_once` writers. Blocking: call it off the async runtime.
pub fn run(
    dir: &Path,
    writers_at_once: usize,
    duration: Duration,
) -> std::io::Result<SyncProbeReport> {
    assert!(
        (1..=MAX_WRITERS).contains(&writers_at_once),
        "the sync probe's writers are 1..={MAX_WRITERS} (the processes on a commit's path)"
    );
    std::fs::create_dir_all(dir)?;
    let paths: Vec<PathBuf> = (0..writers_at_once)
        .map(|index| dir.join(format!("sync-probe-{index}")))
        .collect();
    let measured = alone_then_at_once(&paths, duration);
    for path in &paths {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir(dir);
    let (alone, at_once) = measured?;
    Ok(SyncProbeReport {
        dir: dir.to_path_buf(),
        alone,
        at_once,
    })
}

/// The rounds of the first file's writer alone, then of every file's at once.
fn alone_then_at_once(
    paths: &[PathBuf],
    duration: Duration,
) -> std::io::Result<(SyncTimes, SyncTimes)> {
    let files = paths
        .iter()
        .map(|path| prewritten(path))
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((rounds(&files[..1], duration)?, rounds(&files, duration)?))
}

/// A file of `PREWRITTEN_BLOCKS` blocks of zeros, durable with its size.
fn prewritten(path: &Path) -> std::io::Result<File> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let zeros = vec![0u8; BLOCK_BYTES];
    for _ in 0..PREWRITTEN_BLOCKS {
        file.write_all(&zeros)?;
    }
    file.sync_all()?;
    Ok(file)
}

/// What the writers of one part share.
struct Rounds {
    /// Two waits a round: after the first, one writer decides whether another round
    /// runs; after the second, every writer reads that decision.
    barrier: Barrier,
    go_on: AtomicBool,
    /// A writer failed: no round starts after it.
    failed: AtomicBool,
    deadline: Instant,
}

/// Rounds with one writer per file until `duration` has passed: each round's time.
fn rounds(files: &[File], duration: Duration) -> std::io::Result<SyncTimes> {
    let writers = files.len();
    let shared = Rounds {
        barrier: Barrier::new(writers),
        go_on: AtomicBool::new(true),
        failed: AtomicBool::new(false),
        deadline: Instant::now() + duration,
    };
    let per_writer = std::thread::scope(|scope| {
        // Every writer waits at its gate until all are spawned, so that a writer the
        // system refuses to start cannot leave the others waiting at the barrier: the
        // gates are dropped instead of opened, and the started ones end.
        let mut gates = Vec::with_capacity(writers);
        let mut handles = Vec::with_capacity(writers);
        for (index, file) in files.iter().enumerate() {
            let (gate, waits) = mpsc::channel::<()>();
            let shared = &shared;
            let spawned = std::thread::Builder::new()
                .name(format!("sync-probe-{index}"))
                .spawn_scoped(scope, move || match waits.recv() {
                    Ok(()) => write_rounds(file, shared),
                    Err(_) => Ok(Vec::new()),
                });
            match spawned {
                Ok(handle) => {
                    gates.push(gate);
                    handles.push(handle);
                }
                Err(error) => return Err(error),
            }
        }
        for gate in &gates {
            // A writer that is waiting at its gate has not dropped its end of it.
            let _ = gate.send(());
        }
        handles
            .into_iter()
            .map(|handle| match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect::<std::io::Result<Vec<_>>>()
    })?;
    let count = per_writer.first().map_or(0, Vec::len);
    assert!(
        per_writer.iter().all(|spans| spans.len() == count),
        "every writer of the sync probe runs the same rounds"
    );
    let mut times: Vec<Duration> = (0..count)
        .map(|round| {
            let started = per_writer.iter().map(|spans| spans[round].0);
            let ended = per_writer.iter().map(|spans| spans[round].1);
            match (started.min(), ended.max()) {
                (Some(started), Some(ended)) => ended.saturating_duration_since(started),
                _ => unreachable!("a sync probe's part has at least one writer"),
            }
        })
        .collect();
    times.sort_unstable();
    let total: Duration = times.iter().sum();
    Ok(SyncTimes {
        writers,
        rounds: times.len() as u64,
        p50_ms: percentile_ms(&times, 0.50),
        mean_ms: mean_ms(total.as_secs_f64(), times.len() as f64).unwrap_or(0.0),
    })
}

/// One writer's rounds on `file`: when each write began and its sync returned.
fn write_rounds(file: &File, shared: &Rounds) -> std::io::Result<Vec<(Instant, Instant)>> {
    let block = vec![0x5au8; BLOCK_BYTES];
    let mut spans = Vec::new();
    let mut failed = None;
    for round in 0..MAX_ROUNDS {
        if shared.barrier.wait().is_leader() {
            let go_on = Instant::now() < shared.deadline && !shared.failed.load(Ordering::Relaxed);
            shared.go_on.store(go_on, Ordering::Relaxed);
        }
        shared.barrier.wait();
        if !shared.go_on.load(Ordering::Relaxed) {
            break;
        }
        // A writer that failed stays until the others stop, meeting them at the
        // barrier, so that none waits for it forever.
        if failed.is_some() {
            continue;
        }
        let offset = (round as u64 % PREWRITTEN_BLOCKS) * BLOCK_BYTES as u64;
        let started = Instant::now();
        match file
            .write_all_at(&block, offset)
            .and_then(|()| file.sync_data())
        {
            Ok(()) => spans.push((started, Instant::now())),
            Err(error) => {
                shared.failed.store(true, Ordering::Relaxed);
                failed = Some(error);
            }
        }
    }
    match failed {
        Some(error) => Err(error),
        None => Ok(spans),
    }
}

/// The bench's probe, on the runtime's blocking pool.
pub async fn run_blocking(
    dir: PathBuf,
    writers_at_once: usize,
    duration: Duration,
) -> anyhow::Result<SyncProbeReport> {
    let report = tokio::task::spawn_blocking(move || run(&dir, writers_at_once, duration))
        .await?
        .map_err(|e| anyhow::anyhow!("the sync probe: {e}"))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both parts ran rounds and timed them, the second with every writer, and the
    /// probe's files are gone.
    #[test]
    fn the_probe_times_rounds_alone_and_at_once_and_removes_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let probe_dir = dir.path().join("probe");
        let report = run(&probe_dir, 3, Duration::from_millis(100)).unwrap();
        assert_eq!(report.alone.writers, 1);
        assert_eq!(report.at_once.writers, 3);
        for part in [&report.alone, &report.at_once] {
            assert!(part.rounds > 0, "{report:?}");
            assert!(part.p50_ms > 0.0 && part.mean_ms > 0.0, "{report:?}");
        }
        assert!(!probe_dir.exists(), "the probe's directory is left behind");
        let line = report.line();
        assert!(line.contains("alone p50 "), "{line}");
        assert!(
            line.contains("; 3 at once, until the last is durable, p50 "),
            "{line}"
        );
    }

    /// A directory that cannot be made is an error, not a panic or a report.
    #[test]
    fn a_directory_that_cannot_be_made_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").unwrap();
        assert!(run(&file.join("probe"), 2, Duration::from_millis(10)).is_err());
    }
}
