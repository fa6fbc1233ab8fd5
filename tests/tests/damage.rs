//! Damage is detected, never served: a real coordinator and a real participant run two-
//! phase commits and sagas (some with 16 KiB payloads, so sled writes blob files), stop
//! cleanly, and then, hundreds of times, one byte at a random position of a copy of the
//! coordinator's log or of the participant's store is changed. Each damaged copy must
//! either refuse to open with an error that says it is damaged, or hold exactly what the
//! undamaged store held (every acknowledged decision and barrier record, as written):
//! zero silent losses.
//!
//! `TREATY_DAMAGE_SEED` replays the positions; `TREATY_DAMAGE_TRIALS` sets how many per
//! store (default 200).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use treaty_coordinator::log::{DecisionLog, SledLog};
use treaty_sdk::durable::{Durability, DurableStore, StoreError, StoreOptions, WriteBatch};
use treaty_sdk::{BeginOptions, BranchSpec, SagaStep, SubmitOptions};
use treaty_tests::harness::{Coordinator, ParticipantServer};
use treaty_tests::power_cut::{contents, copy_dir, flip_one_byte};
use treaty_tests::process::workspace_binary;

const TRANSACTIONS: usize = 60;

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// A 2PC and a saga per round, every third with payloads at the limit.
async fn run_workload(coordinator: &Coordinator, participant: &ParticipantServer) {
    let client = coordinator.client().await;
    for i in 0..TRANSACTIONS {
        let size = if i % 3 == 0 { 16 * 1024 } else { 64 };
        // "yes", padded with spaces the scripted participant ignores.
        let mut payload = b"yes".to_vec();
        payload.resize(size, b' ');
        let branches = ["a", "b"]
            .map(|b| BranchSpec::new(b, participant.endpoint.clone(), payload.clone()))
            .to_vec();
        client
            .run_two_phase(branches, BeginOptions::default())
            .await
            .unwrap();
        let steps = ["one", "two"]
            .map(|s| {
                SagaStep::new(s, participant.endpoint.clone(), payload.clone())
                    .compensation(b"undo".to_vec())
            })
            .to_vec();
        let options = SubmitOptions {
            idempotency_key: Some(format!("damage-{i}")),
            wait_for_outcome: true,
            ..SubmitOptions::default()
        };
        tokio::time::timeout(
            treaty_tests::harness::PATIENCE,
            client.submit_saga(steps, options),
        )
        .await
        .expect("the saga ends in time")
        .unwrap();
    }
}

/// Damages copies of `store` `trials` times; each must be refused as damaged or hold
/// what the undamaged copy holds.
fn damage_trials(
    name: &str,
    store: &Path,
    scratch: &Path,
    seed: u64,
    trials: u64,
    also_open_as_log: bool,
    damaged_file: fn(&Path) -> bool,
) {
    let intact = {
        let opened = DurableStore::open(store, StoreOptions::default()).unwrap();
        let held = contents(&opened);
        opened.close().unwrap();
        held
    };
    assert!(!intact.is_empty());
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut refused, mut unharmed) = (0, 0);
    for trial in 0..trials {
        let copy = scratch.join(format!("{name}-{trial}"));
        let flipped = flip_one_byte(store, &copy, &mut rng, damaged_file);
        match DurableStore::open(&copy, StoreOptions::default()) {
            Err(StoreError::Damaged { message, .. }) => {
                assert!(!message.is_empty());
                refused += 1;
            }
            Err(other) => panic!(
                "seed {seed}, {name} trial {trial} ({flipped}): refused, but not as damage: {other}"
            ),
            Ok(opened) => {
                let held = contents(&opened);
                opened.close().unwrap();
                drop(opened);
                let lost = intact
                    .iter()
                    .filter(|(k, v)| held.get(*k) != Some(*v))
                    .count();
                assert_eq!(
                    lost,
                    0,
                    "seed {seed}, {name} trial {trial} ({flipped}): opened without complaint \
                     but {lost} of {} records are missing or changed",
                    intact.len()
                );
                if also_open_as_log {
                    // The coordinator's own start-up reads: every unfinished record decodes.
                    let log = SledLog::open(&copy).unwrap();
                    log.unfinished().unwrap();
                    log.close().unwrap();
                }
                unharmed += 1;
            }
        }
        std::fs::remove_dir_all(&copy).unwrap();
    }
    println!(
        "{name}: {trials} one-byte changes: {refused} refused as damaged, {unharmed} harmless"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_changed_byte_is_refused_or_harmless_never_a_silent_loss() {
    let seed = env_number("TREATY_DAMAGE_SEED").unwrap_or_else(rand::random);
    let trials = env_number("TREATY_DAMAGE_TRIALS").unwrap_or(200);
    println!("TREATY_DAMAGE_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("participant")).await;
    run_workload(&coordinator, &participant).await;
    // Copied while they run, once idle: what a kill -9 now would leave. (After a clean
    // stop sled has written a snapshot, and damage in the log before it goes unread.)
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let base = dir.path().join("base");
    copy_dir(&dir.path().join("coordinator"), &base.join("coordinator"));
    copy_dir(&dir.path().join("participant"), &base.join("participant"));
    participant.stop().await;
    coordinator.stop().await.unwrap();

    log_verify_tells_intact_from_damaged(&base, &dir.path().join("cut"));
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    damage_trials(
        "coordinator log",
        &base.join("coordinator"),
        &scratch,
        seed,
        trials,
        true,
        |_| true,
    );
    damage_trials(
        "participant store",
        &base.join("participant"),
        &scratch,
        seed.wrapping_add(1),
        trials,
        false,
        |_| true,
    );
}

/// sled's blob files (whole tree nodes of ~128 KiB and more, written beside the log)
/// get their own trials: a clean stop of the daemons above may leave none alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_byte_in_a_blob_file_is_refused_or_harmless() {
    let seed = env_number("TREATY_DAMAGE_SEED").unwrap_or_else(rand::random);
    println!("TREATY_DAMAGE_SEED={seed}");
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = DurableStore::open(&store_dir, StoreOptions::default()).unwrap();
    for i in 0..40u32 {
        let mut batch = WriteBatch::new();
        batch.insert(format!("rec/{:02}", i % 12), vec![i as u8; 40 * 1024]);
        store.write(batch, Durability::Forced).await.unwrap();
    }
    store.close().unwrap();
    drop(store);
    let blobs = std::fs::read_dir(store_dir.join("blobs")).map_or(0, |d| d.count());
    assert!(blobs > 0, "the store kept no blob file to damage");
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let trials = env_number("TREATY_DAMAGE_TRIALS").unwrap_or(200) / 4;
    damage_trials(
        "blob files",
        &store_dir,
        &scratch,
        seed,
        trials,
        false,
        |file| file.parent().is_some_and(|p| p.ends_with("blobs")),
    );
}

/// `treaty log verify`, the real binary: counts on intact stores, exit 1 on a cut one.
fn log_verify_tells_intact_from_damaged(base: &Path, scratch: &Path) {
    let verify = |dir: &Path| {
        std::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
            .args(["log", "verify", "--data-dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    let intact = verify(&base.join("coordinator"));
    let report = String::from_utf8_lossy(&intact.stdout);
    assert!(intact.status.success(), "{report}");
    assert!(
        report.contains("coordinator TwoPhase Committed: "),
        "{report}"
    );
    assert!(report.contains("coordinator Saga Completed: "), "{report}");
    assert!(report.trim_end().ends_with("OK"), "{report}");
    let participant = verify(&base.join("participant"));
    let report = String::from_utf8_lossy(&participant.stdout);
    assert!(participant.status.success(), "{report}");
    assert!(report.contains("participant barrier records: "), "{report}");

    // A log cut short. sled reuses the segments it has freed, so which writes a cut
    // takes depends on where they landed: cut to half, the log may have lost only
    // segments no longer in use (then verify must say exactly what it said of the whole
    // log), or acknowledged decisions (then it must say DAMAGED). Cut to nothing, it
    // has certainly lost them. (Reports name the directory checked: that line differs.)
    let findings = |stdout: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(stdout)
            .lines()
            .filter(|line| !line.starts_with("store: "))
            .map(str::to_owned)
            .collect()
    };
    let intact_findings = findings(&intact.stdout);
    let length = std::fs::metadata(base.join("coordinator").join("db"))
        .unwrap()
        .len();
    for cut_to in [length / 2, 0] {
        let _ = std::fs::remove_dir_all(scratch);
        copy_dir(&base.join("coordinator"), scratch);
        let log = scratch.join("db");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&log)
            .unwrap()
            .set_len(cut_to)
            .unwrap();
        let cut = verify(scratch);
        let report = String::from_utf8_lossy(&cut.stdout);
        let damaged = cut.status.code() == Some(1) && report.contains("DAMAGED");
        let unharmed = cut.status.success() && findings(&cut.stdout) == intact_findings;
        assert!(
            damaged || (unharmed && cut_to > 0),
            "log cut from {length} to {cut_to} bytes: {:?}\n{report}",
            cut.status
        );
        // The directory is checked on a copy: it is left exactly as it was.
        assert_eq!(std::fs::metadata(&log).unwrap().len(), cut_to);
    }
}

/// A damaged record in the middle of the log, behind which later forced groups were
/// written (with no snapshot between, as after a kill -9), must not be passed over. A
/// read-only audit feared it would be: sled's last recovery pass reads a bad message
/// outside the last segment as the end of that segment and goes on with the next, and
/// later groups satisfy the high-water mark. Each place the value was written (sled
/// rewrites a leaf now and then) is damaged in a copy of its own: every copy is refused
/// as damaged or holds the value whole.
#[tokio::test]
async fn a_damaged_record_before_later_segments_is_refused_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let store = DurableStore::open(&store_dir, StoreOptions::default()).unwrap();
    let filler = |from: u32, to: u32, bytes: usize| {
        let mut batch = WriteBatch::new();
        for i in from..to {
            batch.insert(format!("z/{i:08}").into_bytes(), vec![b'f'; bytes]);
        }
        batch
    };
    for round in 0..50u32 {
        let batch = filler(round * 100, round * 100 + 100, 16);
        store.write(batch, Durability::Forced).await.unwrap();
    }
    let victim: Vec<u8> = b"VICTIM-".iter().copied().cycle().take(700).collect();
    let mut batch = WriteBatch::new();
    batch.insert(b"a/victim".to_vec(), victim.clone());
    store.write(batch, Durability::Forced).await.unwrap();
    // About 3 MiB more, in forced groups: several segments after the victim's.
    for round in 0..60u32 {
        let batch = filler(100_000 + round * 50, 100_000 + round * 50 + 50, 1024);
        store.write(batch, Durability::Forced).await.unwrap();
    }
    let pristine = dir.path().join("pristine");
    copy_dir(&store_dir, &pristine);
    store.close().unwrap();
    // The log file, in the store's directory or its generation's.
    let log_in = |root: &Path| {
        let entries = |d: &Path| -> Vec<std::path::PathBuf> {
            std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        };
        let top = entries(root);
        let nested: Vec<_> = top
            .iter()
            .filter(|p| p.is_dir())
            .flat_map(|d| entries(d))
            .collect();
        top.into_iter()
            .chain(nested)
            .find(|p| p.file_name().is_some_and(|n| n == "db"))
            .expect("sled's log file")
    };
    let bytes = std::fs::read(log_in(&pristine)).unwrap();
    // Every place the value was written (sled may have rewritten its leaf): each is
    // damaged in a copy of its own.
    let places: Vec<usize> = bytes
        .windows(victim.len())
        .enumerate()
        .filter(|(_, w)| *w == victim.as_slice())
        .map(|(at, _)| at)
        .collect();
    assert!(!places.is_empty(), "the victim's value is in the log");
    for (trial, at) in places.into_iter().enumerate() {
        let copy = dir.path().join(format!("copy-{trial}"));
        copy_dir(&pristine, &copy);
        let mut damaged = bytes.clone();
        damaged[at + 300] ^= 0x5a;
        std::fs::write(log_in(&copy), &damaged).unwrap();
        match DurableStore::open(&copy, StoreOptions::default()) {
            Err(StoreError::Damaged { .. }) => {}
            Err(other) => panic!("byte {at}: refused, but not as damage: {other}"),
            Ok(opened) => {
                let held = opened.db().get(b"a/victim").unwrap();
                assert_eq!(
                    held.as_deref(),
                    Some(victim.as_slice()),
                    "byte {at}: opened without complaint, and the victim is missing or changed"
                );
                opened.close().unwrap();
            }
        }
    }
}
