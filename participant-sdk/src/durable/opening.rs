//! Opening a store's sled database and checking what it holds before anything is
//! answered from it: sled opened with patience for a lock still being let go of, damage
//! (a corruption error or a panic inside sled) reported as `Damaged`, the forced-group
//! number checked against the high-water mark, and every page read back.

use super::*;

/// The number of the last forced group sled holds (0: none yet).
pub(super) fn forced_groups(meta: &sled::Tree) -> Result<u64, String> {
    let stored = meta
        .get(FORCED_GROUPS_KEY)
        .map_err(|e| format!("reading the forced-group number: {e}"))?;
    match stored {
        None => Ok(0),
        Some(bytes) => {
            let number: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| format!("the forced-group number has {} bytes, not 8", bytes.len()))?;
            Ok(u64::from_be_bytes(number))
        }
    }
}

/// Compares sled's forced groups with the high-water mark; returns the mark.
pub(super) fn check_mark(mark: &Mark, forced_groups: u64, db: &sled::Db) -> Result<u64, String> {
    match *mark {
        Mark::At(acknowledged) if forced_groups < acknowledged => Err(format!(
            "it holds {forced_groups} forced write groups but {acknowledged} were acknowledged \
             ({} says so): everything logged after group {forced_groups} is missing, as sled \
             stops reading its log at the first damaged or cut-short message",
            high_water::FILE_NAME
        )),
        Mark::At(acknowledged) => Ok(acknowledged),
        Mark::Unreadable(ref why) => Err(format!("its high-water mark is unreadable: {why}")),
        // The mark is written with the first forced group and at every open: sled
        // holding a numbered group without it means the file was lost.
        Mark::Absent if forced_groups > 0 => Err(format!(
            "its high-water mark {} is missing although {forced_groups} forced write groups \
             were logged",
            high_water::FILE_NAME
        )),
        Mark::Absent => {
            if !db.is_empty() {
                tracing::warn!(
                    "the store has records but no high-water mark (written by an older \
                     version): damage before this open cannot be detected; it is from now on"
                );
            }
            Ok(0)
        }
    }
}

/// Reads every key and value, so that sled checks each page's checksum; returns the
/// caller's records and their bytes. sled trips on some damage with a panic: that is
/// damage too.
pub(super) fn read_everything(db: &sled::Db, meta: &sled::Tree) -> Result<(u64, u64), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_all(db, meta)))
        .unwrap_or_else(|panic| Err(format!("sled failed reading it: {}", panic_text(&panic))))
}

fn read_all(db: &sled::Db, meta: &sled::Tree) -> Result<(u64, u64), String> {
    let mut records = 0;
    let mut bytes = 0;
    for entry in db.iter() {
        let (key, value) = entry.map_err(|e| format!("reading record {}: {e}", records + 1))?;
        records += 1;
        bytes += (key.len() + value.len()) as u64;
    }
    for entry in meta.iter() {
        entry.map_err(|e| format!("reading the store's bookkeeping: {e}"))?;
    }
    Ok((records, bytes))
}

/// How long `open` waits for the file lock of a database that another handle is still
/// letting go of: sled's background IO threads release it shortly after the last handle
/// is dropped, so a quick reopen in the same process can find it still held.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// Opens a new generation's empty database (for compaction).
pub(super) fn open_sled_at(dir: &Path, cache_capacity_bytes: u64) -> Result<sled::Db, String> {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_capacity_bytes)
        .open()
        .map_err(|e| format!("opening a database in {}: {e}", dir.display()))
}

/// Opens sled in `dir` (the current generation of the store at `root`) and the store's
/// bookkeeping tree. sled reports some damage as a corruption error and trips on other
/// damage with a panic: both are `Damaged`.
pub(super) fn open_sled(
    root: &Path,
    dir: &Path,
    options: &StoreOptions,
) -> Result<(sled::Db, sled::Tree), StoreError> {
    let started = std::time::Instant::now();
    let damaged = |message: String| StoreError::Damaged {
        path: root.to_path_buf(),
        message,
    };
    loop {
        let cache_capacity_bytes = options.cache_capacity_bytes;
        let attempt = std::panic::catch_unwind(|| {
            let db = sled::Config::new()
                .path(dir)
                .cache_capacity(cache_capacity_bytes)
                .open()?;
            let meta = db.open_tree(META_TREE)?;
            Ok::<_, sled::Error>((db, meta))
        });
        match attempt {
            Ok(Ok(opened)) => return Ok(opened),
            // sled 0.34.7 reports a held lock as an `Other` I/O error with this text.
            Ok(Err(sled::Error::Io(error)))
                if error.to_string().contains("could not acquire lock")
                    && started.elapsed() < LOCK_PATIENCE =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(Err(error @ sled::Error::Corruption { .. })) => {
                return Err(damaged(format!("sled found it corrupt: {error}")));
            }
            Ok(Err(error)) => {
                return Err(StoreError::Open {
                    path: root.to_path_buf(),
                    message: error.to_string(),
                });
            }
            Err(panic) => {
                return Err(damaged(format!(
                    "sled failed reading it: {}",
                    panic_text(&panic)
                )));
            }
        }
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

pub(super) fn remove_unfinished_snapshots(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing a snapshot left unfinished by a crash");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}
