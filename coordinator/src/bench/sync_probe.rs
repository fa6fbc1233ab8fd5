//! `treaty bench`'s sync probe: what a forced write costs on the disk that holds the
//! bench's stores, measured in the same run as the workloads, so that the target at one
//! in flight (issue 11: p50 ≤ 2 × (two echo round trips + one fsync)) is computed from
//! one run rather than from a separate `pg_test_fsync`.
//!
//! A round writes 8 KiB at the next block of a file written in full beforehand (the
//! file's size and blocks never change, as in the stores' segments) and `fdatasync`s
//! it, timed from the write to the sync's return. The probe runs rounds twice:
//! - **alone**: one writer;
//! - **at once**: one writer per process that syncs on a two-phase commit's path (the
//!   coordinator's intent and each participant's YES are forced at the same moment), each
//!   with its own file, started together; a round lasts until the last of them is
//!   durable, which is what the commit waits for. The bench puts every store on one
//!   disk, so there their syncs queue at the one device.
//!
//! Bounded: each part runs for the time given and at most `MAX_ROUNDS` rounds; the files
//! are `PREWRITTEN_BLOCKS` × 8 KiB each and removed at the end.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::workload::percentile_ms;

/// The size of one write, as `pg_test_fsync`'s.
const BLOCK_BYTES: usize = 8 * 1024;
/// Blocks each probe file holds, written before the rounds: 2 MiB.
const PREWRITTEN_BLOCKS: u64 = 256;
/// Most rounds per part, whatever the time given.
const MAX_ROUNDS: usize = 1_000_000;
/// Most writers at once (one per process on a commit's path).
pub const MAX_WRITERS: usize = 64;

/// One part's rounds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncTimes {
    pub writers: usize,
    pub rounds: u64,
    pub p50_ms: f64,
    pub mean_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SyncProbeReport {
    /// Where the probe's files were (the bench's stores' directory).
    pub dir: PathBuf,
    pub alone: SyncTimes,
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

/// Rounds with one writer per file, started together, until `duration` has passed: the
/// time of each, from the first write to the last sync's return.
fn rounds(files: &[File], duration: Duration) -> std::io::Result<SyncTimes> {
    let writers = files.len();
    // Two waits a round: after the first, the leader decides whether another round
    // runs; after the second, every writer reads that same decision and starts it.
    let barrier = Barrier::new(writers);
    let go_on = AtomicBool::new(true);
    let deadline = Instant::now() + duration;
    let per_writer: Vec<std::io::Result<Vec<(Instant, Instant)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .iter()
            .map(|file| {
                let barrier = &barrier;
                let go_on = &go_on;
                scope.spawn(move || {
                    let block = vec![0x5au8; BLOCK_BYTES];
                    let mut spans = Vec::new();
                    let mut failed = None;
                    for round in 0..MAX_ROUNDS {
                        if barrier.wait().is_leader() {
                            go_on.store(Instant::now() < deadline, Ordering::Relaxed);
                        }
                        barrier.wait();
                        if !go_on.load(Ordering::Relaxed) {
                            break;
                        }
                        // A writer that failed keeps meeting the others at the barrier,
                        // so that none waits for it forever; it writes no more.
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
                            Err(error) => failed = Some(error),
                        }
                    }
                    match failed {
                        Some(error) => Err(error),
                        None => Ok(spans),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    let per_writer = per_writer
        .into_iter()
        .collect::<std::io::Result<Vec<_>>>()?;
    let count = per_writer.iter().map(Vec::len).min().unwrap_or(0);
    let mut times: Vec<Duration> = (0..count)
        .map(|round| {
            let started = per_writer.iter().map(|spans| spans[round].0).min();
            let ended = per_writer.iter().map(|spans| spans[round].1).max();
            match (started, ended) {
                (Some(started), Some(ended)) => ended.saturating_duration_since(started),
                _ => Duration::ZERO,
            }
        })
        .collect();
    times.sort_unstable();
    let total: Duration = times.iter().sum();
    Ok(SyncTimes {
        writers,
        rounds: times.len() as u64,
        p50_ms: percentile_ms(&times, 0.50),
        mean_ms: if times.is_empty() {
            0.0
        } else {
            total.as_secs_f64() * 1_000.0 / times.len() as f64
        },
    })
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
        assert_eq!(std::fs::read_dir(&probe_dir).unwrap().count(), 0);
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
