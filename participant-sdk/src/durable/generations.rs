//! Where a store's sled database lives, and how a rebuilt copy takes its place.
//!
//! sled 0.34.7 does not give back the space of what was removed: a store whose live
//! records stay the same size still grows on disk. Compaction (see `compaction`) copies
//! the live records into a fresh database, a new *generation*, and switches to it.
//!
//! Layout of a store's directory:
//! - never compacted (generation 0, the layout from before compaction existed): sled's
//!   files (`db`, `conf`, `blobs/`, `snap.*`) and the high-water mark lie in the
//!   directory itself;
//! - compacted: they lie in `gen-<n>/`, and the file `CURRENT` names that directory.
//!
//! Invariants:
//! - `CURRENT` only ever names a generation that is complete and durable: every file of
//!   it, its high-water mark and its directory were synced before `CURRENT` was written.
//!   `CURRENT` is replaced by writing a temporary file, syncing it, renaming it over the
//!   old one and syncing the directory; that rename is the switch.
//! - Without `CURRENT`, the directory's own files are the database and any `gen-*`
//!   directory is a rebuild that never finished: it is removed at open. With `CURRENT`,
//!   everything else (older generations, the directory's own sled files) is a
//!   generation already replaced: also removed at open.
//! - A store that has a generation directory but neither `CURRENT` nor sled files of its
//!   own lost its pointer: it is damaged and refused, never opened as a new empty store.
//! - When generation 0 is replaced, its high-water mark is not deleted but set to
//!   `u64::MAX`: a binary from before compaction (which knows nothing of `CURRENT`) then
//!   refuses the directory as damaged instead of opening an empty database in it and
//!   presuming every logged commit aborted.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use super::files::{sync_dir, write_synced_then_rename};
use super::{LOG_FILE_NAME, high_water};

/// The file naming the current generation's directory.
pub const POINTER_FILE: &str = "CURRENT";
const POINTER_TEMPORARY: &str = "CURRENT.tmp";
const GENERATION_PREFIX: &str = "gen-";
/// The names sled 0.34.7 gives the files it keeps beside its log file.
const SLED_CONFIG_FILE: &str = "conf";
const SLED_BLOB_DIR: &str = "blobs";
const SLED_SNAPSHOT_PREFIX: &str = "snap.";

/// The generation a store's directory holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Located {
    pub number: u64,
    /// The directory holding that generation's sled files.
    pub dir: PathBuf,
}

/// The directory of generation `number` in the store at `root`.
pub(super) fn dir_of(root: &Path, number: u64) -> PathBuf {
    if number == 0 {
        root.to_path_buf()
    } else {
        root.join(format!("{GENERATION_PREFIX}{number}"))
    }
}

/// Whether `root` holds a store (of any generation).
pub fn is_store(root: &Path) -> bool {
    root.join(LOG_FILE_NAME).is_file() || root.join(POINTER_FILE).is_file()
}

/// Entries of the store's directory that belong to the layout, not to a generation's
/// sled files: a group commit of generation 0 leaves them to compaction to sync.
pub(super) fn is_layout_entry(name: &str) -> bool {
    name == POINTER_FILE || name == POINTER_TEMPORARY || generation_number(name).is_some()
}

fn generation_number(name: &str) -> Option<u64> {
    name.strip_prefix(GENERATION_PREFIX)?
        .parse()
        .ok()
        .filter(|number| *number > 0)
}

/// Finds the current generation of the store at `root`. `Err(message)` means damage.
pub(super) fn locate(root: &Path) -> std::io::Result<Result<Located, String>> {
    let pointer = match std::fs::read_to_string(root.join(POINTER_FILE)) {
        Ok(text) => Some(text),
        Err(error) if error.kind() == ErrorKind::NotFound => None,
        Err(error) => return Err(error),
    };
    let Some(text) = pointer else {
        let generations = generation_dirs(root)?;
        if !generations.is_empty() && !root.join(LOG_FILE_NAME).exists() {
            return Ok(Err(format!(
                "it holds compacted generations ({}) but no {POINTER_FILE} file naming the \
                 current one",
                generations.len()
            )));
        }
        return Ok(Ok(Located {
            number: 0,
            dir: root.to_path_buf(),
        }));
    };
    let Some(number) = generation_number(text.trim()) else {
        return Ok(Err(format!(
            "{POINTER_FILE} holds {text:?}, not the name of a generation"
        )));
    };
    let dir = dir_of(root, number);
    if !dir.join(LOG_FILE_NAME).is_file() {
        return Ok(Err(format!(
            "{POINTER_FILE} names {}, which holds no database",
            dir.display()
        )));
    }
    Ok(Ok(Located { number, dir }))
}

/// The numbers of the `gen-*` directories in `root`.
fn generation_dirs(root: &Path) -> std::io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        if let Some(number) = generation_number(&entry.file_name().to_string_lossy()) {
            if entry.file_type()?.is_dir() {
                numbers.push(number);
            }
        }
    }
    Ok(numbers)
}

/// Removes what is not the current generation: unfinished rebuilds, replaced
/// generations, a temporary pointer. Returns whether anything was removed.
pub(super) fn remove_all_but(root: &Path, current: u64) -> std::io::Result<bool> {
    let mut removed = false;
    for number in generation_dirs(root)? {
        if number != current {
            tracing::info!(
                generation = number,
                "removing a replaced or unfinished generation of the store"
            );
            remove_generation(root, number)?;
            removed = true;
        }
    }
    if current != 0 {
        // Idempotent: also finishes a removal a crash cut short.
        remove_generation(root, 0)?;
        removed = true;
    }
    match std::fs::remove_file(root.join(POINTER_TEMPORARY)) {
        Ok(()) => removed = true,
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    if removed {
        sync_dir(root)?;
    }
    Ok(removed)
}

/// Deletes generation `number`'s files. For generation 0, only sled's files in the
/// store's directory, never the layout's; its high-water mark stays, set to `u64::MAX`
/// so that an older binary refuses the directory (see the module docs).
pub(super) fn remove_generation(root: &Path, number: u64) -> std::io::Result<()> {
    if number != 0 {
        return ignore_missing(std::fs::remove_dir_all(dir_of(root, number)));
    }
    // First, so that a crash part-way never leaves a mark an old binary would accept.
    high_water::HighWater::open(root, u64::MAX)?;
    for entry in std::fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_sled_file = name == LOG_FILE_NAME
            || name == SLED_CONFIG_FILE
            || name.starts_with(SLED_SNAPSHOT_PREFIX);
        if name == SLED_BLOB_DIR {
            ignore_missing(std::fs::remove_dir_all(entry.path()))?;
        } else if is_sled_file {
            ignore_missing(std::fs::remove_file(entry.path()))?;
        }
    }
    Ok(())
}

fn ignore_missing(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Where a switch failed: before the rename nothing changed; after it, the new
/// generation is current but that may not yet be durable.
#[derive(Debug)]
pub(super) enum SwitchError {
    NothingChanged(std::io::Error),
    NotDurable(std::io::Error),
}

/// Makes generation `number` (complete and durable) the current one.
pub(super) fn switch_to(root: &Path, number: u64) -> Result<Vec<PathBuf>, SwitchError> {
    let temporary = root.join(POINTER_TEMPORARY);
    let pointer = root.join(POINTER_FILE);
    let content = format!("{GENERATION_PREFIX}{number}\n");
    write_synced_then_rename(&temporary, &pointer, content.as_bytes())
        .map_err(SwitchError::NothingChanged)?;
    sync_dir(root).map_err(SwitchError::NotDurable)?;
    Ok(vec![pointer, root.to_path_buf()])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"x").unwrap();
    }

    #[test]
    fn a_store_never_compacted_is_its_own_directory_and_unfinished_rebuilds_go() {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join(LOG_FILE_NAME));
        touch(&root.path().join("gen-1").join(LOG_FILE_NAME));
        let located = locate(root.path()).unwrap().unwrap();
        assert_eq!(located.number, 0);
        assert_eq!(located.dir, root.path());
        assert!(remove_all_but(root.path(), 0).unwrap());
        assert!(!root.path().join("gen-1").exists());
        assert!(root.path().join(LOG_FILE_NAME).exists());
    }

    #[test]
    fn the_pointer_wins_and_replaced_generations_go() {
        let root = tempfile::tempdir().unwrap();
        for file in [
            LOG_FILE_NAME,
            "conf",
            "snap.0000000000001234",
            high_water::FILE_NAME,
        ] {
            touch(&root.path().join(file));
        }
        touch(&root.path().join("blobs").join("17"));
        touch(&root.path().join("gen-1").join(LOG_FILE_NAME));
        touch(&root.path().join("gen-2").join(LOG_FILE_NAME));
        touch(&root.path().join("unrelated.txt"));
        switch_to(root.path(), 2).unwrap();
        let located = locate(root.path()).unwrap().unwrap();
        assert_eq!(located.number, 2);
        remove_all_but(root.path(), 2).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["CURRENT", "gen-2", high_water::FILE_NAME, "unrelated.txt"]
        );
        // What a binary from before compaction reads there: a mark no database can meet.
        assert_eq!(
            high_water::read(root.path()).unwrap(),
            high_water::Mark::At(u64::MAX)
        );
    }

    #[test]
    fn a_lost_or_wrong_pointer_is_damage_not_an_empty_store() {
        let root = tempfile::tempdir().unwrap();
        touch(&root.path().join("gen-3").join(LOG_FILE_NAME));
        assert!(
            locate(root.path()).unwrap().is_err(),
            "no pointer, no own files"
        );
        std::fs::write(root.path().join(POINTER_FILE), b"gen-4\n").unwrap();
        assert!(
            locate(root.path()).unwrap().is_err(),
            "names a missing generation"
        );
        std::fs::write(root.path().join(POINTER_FILE), b"garbage").unwrap();
        assert!(locate(root.path()).unwrap().is_err(), "names nothing");
        std::fs::write(root.path().join(POINTER_FILE), b"gen-3\n").unwrap();
        assert_eq!(locate(root.path()).unwrap().unwrap().number, 3);
        assert!(is_store(root.path()));
    }
}
