//! Syncing the files sled creates beside its log.
//!
//! sled 0.34.7 writes a log message bigger than a quarter of a segment (~128 KiB) to a
//! file of its own under `blobs/`, and that message is often a whole tree node, so
//! values of ~7.5 KiB already make blob files. sled never syncs them, nor the directory
//! that gained them; it renames snapshots into place without syncing the directory
//! either. A power cut could then leave a committed log message pointing at a missing or
//! short blob, and sled's recovery stops (or skips) there.
//!
//! [`SyncedFiles`] closes that hole. At every forced group commit, after sled's
//! `flush()` and before the waiters are woken, and after every lazy group, before the
//! next group is written (sled's flusher thread fsyncs its log every 500 ms on its own,
//! so waiting for the next forced group is not enough), it syncs each file in the
//! store's directory and in `blobs/` that it has not synced yet, and each directory
//! whose entries changed.
//!
//! Invariant: when [`SyncedFiles::sync_new`] returns, every file that existed when sled's
//! `flush()` (or the lazy group's `apply_batch`) returned is on disk with all its bytes,
//! and so are the directory entries naming them. sled writes a blob whole while the
//! message that points at it is being reserved (in `apply_batch`, before it returns),
//! and `flush()` waits for every reservation made before it; a blob seen for the first
//! time may still be growing (it belongs to a later message), so it is synced again at
//! the next group commit, after which it is settled and left alone.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// A file or directory that a group commit synced, and its length once synced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncedPath {
    pub path: PathBuf,
    pub len: u64,
    pub is_dir: bool,
}

/// Files of one directory, by what is known of them.
#[derive(Debug, Default)]
struct Tracked {
    /// Synced after a flush that waited for their writer: complete and durable.
    settled: HashSet<OsString>,
    /// Synced once; synced again at the next group commit.
    fresh: HashSet<OsString>,
}

/// The directories of one store, and what has been synced in them.
#[derive(Debug)]
pub(super) struct SyncedFiles {
    dir: PathBuf,
    blobs: PathBuf,
    /// Files in `dir` the store syncs by other means (the log file, the mark).
    skipped: Vec<OsString>,
    top: Tracked,
    blob_files: Tracked,
}

impl SyncedFiles {
    pub(super) fn new(dir: &Path, skipped: &[&str]) -> Self {
        Self {
            dir: dir.to_path_buf(),
            blobs: dir.join("blobs"),
            skipped: skipped.iter().map(OsString::from).collect(),
            top: Tracked::default(),
            blob_files: Tracked::default(),
        }
    }

    /// Syncs every file not synced yet (and the fresh ones again), and each directory
    /// whose entries changed, noting each in `synced`.
    pub(super) fn sync_new(&mut self, synced: &mut Vec<SyncedPath>) -> std::io::Result<()> {
        sync_new_in(&self.blobs, &[], &mut self.blob_files, synced)?;
        sync_new_in(&self.dir, &self.skipped, &mut self.top, synced)
    }
}

fn sync_new_in(
    dir: &Path,
    skipped: &[OsString],
    tracked: &mut Tracked,
    synced: &mut Vec<SyncedPath>,
) -> std::io::Result<()> {
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        // sled creates `blobs/` with its first blob.
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    let mut present = HashSet::new();
    let mut fresh = HashSet::new();
    let mut appeared = false;
    for entry in listing {
        let entry = entry?;
        // Subdirectories (`blobs/`) are entries too: synced like files, and their parent
        // when they appear.
        let name = entry.file_name();
        // A compaction's generations and pointer are synced by compaction.
        let layout = super::generations::is_layout_entry(&name.to_string_lossy());
        if layout || skipped.contains(&name) || tracked.settled.contains(&name) {
            present.insert(name);
            continue;
        }
        // Removed since it was listed (sled collects old blobs and snapshots).
        let Some(len) = sync_file(&entry.path())? else {
            continue;
        };
        synced.push(SyncedPath {
            path: entry.path(),
            len,
            is_dir: false,
        });
        if tracked.fresh.contains(&name) {
            tracked.settled.insert(name.clone());
        } else {
            appeared = true;
            fresh.insert(name.clone());
        }
        present.insert(name);
    }
    let vanished = tracked
        .settled
        .iter()
        .chain(&tracked.fresh)
        .any(|name| !present.contains(name));
    tracked.settled.retain(|name| present.contains(name));
    tracked.fresh = fresh;
    if appeared || vanished {
        sync_dir(dir)?;
        synced.push(SyncedPath {
            path: dir.to_path_buf(),
            len: 0,
            is_dir: true,
        });
    }
    Ok(())
}

/// Syncs a file's data; `None` if it no longer exists.
fn sync_file(path: &Path) -> std::io::Result<Option<u64>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    file.sync_data()?;
    Ok(Some(file.metadata()?.len()))
}

/// Makes `dir`'s entries (files created, renamed or removed in it) durable.
pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and any missing parents) so that it exists after a power cut: each
/// created directory's parent is synced.
pub(super) fn create_dir_synced(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut next = Some(dir);
    while let Some(path) = next {
        if path.as_os_str().is_empty() || path.exists() {
            break;
        }
        missing.push(path);
        next = path.parent();
    }
    std::fs::create_dir_all(dir)?;
    for created in missing.iter().rev() {
        sync_dir(created.parent().unwrap_or(Path::new(".")))?;
    }
    if !missing.is_empty() {
        sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(synced: &[SyncedPath]) -> Vec<String> {
        let mut names: Vec<String> = synced
            .iter()
            .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn new_files_are_synced_twice_then_settled_and_directories_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        std::fs::write(blobs.join("17"), b"blob").unwrap();
        let mut files = SyncedFiles::new(dir.path(), &["db"]);

        let mut synced = Vec::new();
        files.sync_new(&mut synced).unwrap();
        // The blob, `blobs/` as a new entry and as a directory whose entries changed,
        // and the store's directory; never the skipped log.
        let tmp = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut expected = vec!["17".to_string(), "blobs".into(), "blobs".into(), tmp];
        expected.sort();
        assert_eq!(names(&synced), expected);

        synced.clear();
        files.sync_new(&mut synced).unwrap();
        let again = vec!["17".to_string(), "blobs".into()];
        assert_eq!(names(&synced), again, "synced again once");

        synced.clear();
        files.sync_new(&mut synced).unwrap();
        assert!(synced.is_empty(), "settled: {synced:?}");

        std::fs::remove_file(blobs.join("17")).unwrap();
        std::fs::write(blobs.join("18"), b"blob").unwrap();
        synced.clear();
        files.sync_new(&mut synced).unwrap();
        assert_eq!(names(&synced), vec!["18".to_string(), "blobs".into()]);
    }

    #[test]
    fn creating_nested_directories_works_and_existing_ones_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a").join("b");
        create_dir_synced(&nested).unwrap();
        assert!(nested.is_dir());
        create_dir_synced(&nested).unwrap();
    }
}
