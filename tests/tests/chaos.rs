//! The chaos suite (see `treaty_tests::chaos`): transfers between banks as two-phase
//! commits and sagas, some with points at a rewards service kept in SQLite and some with
//! payloads big enough for sled's blob files, while a seeded schedule kills the
//! coordinator, the banks and rewards; then an audit of agreement, validity,
//! exactly-once effects, every balance and the sum of all money.
//!
//! Its own harness, so that the seed and the tally are printed even when it passes:
//! `TREATY_CHAOS_SECONDS=600 cargo test -p treaty-tests --test chaos` runs it longer,
//! `TREATY_CHAOS_SEED=N` replays a schedule.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::process::ExitCode;

use treaty_tests::chaos::{self, ChaosConfig};

fn main() -> ExitCode {
    // `cargo test -- --list` and filters: this file holds one test.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("chaos: test");
        return ExitCode::SUCCESS;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if !filters.is_empty() && !filters.iter().any(|f| "chaos".contains(f.as_str())) {
        return ExitCode::SUCCESS;
    }
    let config = ChaosConfig::from_env();
    println!(
        "chaos: seed {} for {:?} (replay: TREATY_CHAOS_SEED={} TREATY_CHAOS_SECONDS={})",
        config.seed,
        config.duration,
        config.seed,
        config.duration.as_secs()
    );
    let dir = tempfile::Builder::new()
        .prefix("treaty-chaos-")
        .tempdir()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match runtime.block_on(chaos::run(&config, dir.path())) {
        Ok(report) => {
            let t = &report.tally;
            println!(
                "chaos: survived {} kills ({} at crash points) from {} faults {:?} in {:.0?} \
                 (after the faults: workers finished in {:.0?}, the audit took {:.0?})",
                report.kills,
                report.crash_point_deaths,
                report.faults,
                report.victims,
                report.elapsed,
                report.workers_finishing,
                report.auditing
            );
            println!(
                "chaos: checked {} transactions of {} transfers: 2PC {} committed / {} \
                 aborted, sagas {} completed / {} compensated; {} never begun, {} outcomes \
                 the client never heard",
                t.transactions_checked,
                report.transfers,
                t.committed,
                t.aborted,
                t.completed,
                t.compensated,
                t.never_begun,
                t.told_nothing,
            );
            println!(
                "chaos: {} with points at rewards ({} committed), {} with big payloads ({} \
                 committed, {} memos intact at the banks); journal entries: {} at banks, {} \
                 at rewards; sled blob files at the end: {:?}; coordinator log compactions: {}",
                t.with_points,
                t.with_points_committed,
                t.big,
                t.big_committed,
                t.memos_intact,
                t.bank_journal_entries,
                t.rewards_journal_entries,
                report.blob_files,
                report.log_compactions
            );
            println!("test chaos ... ok");
            ExitCode::SUCCESS
        }
        Err(violations) => {
            let kept = dir.keep();
            eprintln!(
                "chaos FAILED with seed {} (replay: TREATY_CHAOS_SEED={} TREATY_CHAOS_SECONDS={}); \
                 data and logs kept in {}:\n{violations}",
                config.seed,
                config.seed,
                config.duration.as_secs(),
                kept.display()
            );
            ExitCode::FAILURE
        }
    }
}
