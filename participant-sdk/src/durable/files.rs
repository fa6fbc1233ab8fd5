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
//!
//! Listing the two directories costs about ten system calls, at every group. On Linux
//! an inotify watch on both says whether any entry appeared or vanished since the last
//! listing; while none did and no file waits for its second sync, the listing is
//! skipped, since it would find nothing to sync. Where the watch cannot be set up
//! (other systems, or the user's limit of inotify instances reached, which is logged)
//! or stops working, every call lists.

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
    /// Says when the directories' entries changed; `None`: list at every call.
    watch: Option<EntryWatch>,
    /// Entries may have changed since the last complete listing.
    listing_owed: bool,
    /// Listings made, for tests.
    listings: u64,
}

impl SyncedFiles {
    pub(super) fn new(dir: &Path, skipped: &[&str]) -> Self {
        let mut files = Self::with_watch(dir, skipped, None);
        files.watch = match EntryWatch::start(&files.dir, &files.blobs) {
            Ok(watch) => Some(watch),
            Err(error) => {
                tracing::info!(dir = %dir.display(), %error, "no inotify watch on the store's directory; listing it at every group");
                None
            }
        };
        files
    }

    fn with_watch(dir: &Path, skipped: &[&str], watch: Option<EntryWatch>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            blobs: dir.join("blobs"),
            skipped: skipped.iter().map(OsString::from).collect(),
            top: Tracked::default(),
            blob_files: Tracked::default(),
            watch,
            listing_owed: true,
            listings: 0,
        }
    }

    /// Syncs every file not synced yet (and the fresh ones again), and each directory
    /// whose entries changed, noting each in `synced`.
    pub(super) fn sync_new(&mut self, synced: &mut Vec<SyncedPath>) -> std::io::Result<()> {
        // The watch is read before the listing: a change during the listing is seen by
        // the next call as well.
        self.listing_owed |= match self.watch.as_mut().map(|w| w.entries_changed(&self.blobs)) {
            None => true,
            Some(Ok(changed)) => changed,
            Some(Err(error)) => {
                tracing::warn!(dir = %self.dir.display(), %error, "the inotify watch on the store's directory failed; listing it at every group from now on");
                self.watch = None;
                true
            }
        };
        let fresh = !self.top.fresh.is_empty() || !self.blob_files.fresh.is_empty();
        if !self.listing_owed && !fresh {
            return Ok(());
        }
        self.listings += 1;
        sync_new_in(&self.blobs, &[], &mut self.blob_files, synced)?;
        sync_new_in(&self.dir, &self.skipped, &mut self.top, synced)?;
        self.listing_owed = false;
        Ok(())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
use entry_watch::EntryWatch;

#[cfg(any(target_os = "linux", target_os = "android"))]
mod entry_watch {
    use std::path::Path;

    use nix::errno::Errno;
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

    /// An inotify watch on a store's directory and its `blobs/`, for entries created,
    /// removed or renamed. `blobs/` is watched from when it exists (sled creates it at
    /// open; the watch does not count on that), and its creation, or another directory
    /// put in its place, is an event in the store's directory.
    #[derive(Debug)]
    pub(super) struct EntryWatch {
        inotify: Inotify,
        dir: WatchDescriptor,
        blobs: Option<WatchDescriptor>,
    }

    /// What makes a name appear in or vanish from a directory, or the directory go.
    fn entry_changes() -> AddWatchFlags {
        AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR
    }

    /// The watched directory itself was removed or moved away, or its watch ended.
    fn watch_ended() -> AddWatchFlags {
        AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF
    }

    impl EntryWatch {
        pub(super) fn start(dir: &Path, blobs: &Path) -> std::io::Result<Self> {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            let dir = inotify.add_watch(dir, entry_changes())?;
            let mut watch = Self {
                inotify,
                dir,
                blobs: None,
            };
            watch.watch_blobs(blobs)?;
            Ok(watch)
        }

        /// Watches the directory at `blobs` if it exists and is not watched yet.
        fn watch_blobs(&mut self, blobs: &Path) -> Result<(), Errno> {
            if self.blobs.is_some() {
                return Ok(());
            }
            match self.inotify.add_watch(blobs, entry_changes()) {
                Ok(descriptor) => {
                    self.blobs = Some(descriptor);
                    Ok(())
                }
                Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(()),
                Err(error) => Err(error),
            }
        }

        /// Whether any entry may have appeared or vanished since the last call: an
        /// event arrived (events the kernel could not queue show as `IN_Q_OVERFLOW`,
        /// an event too). When `blobs/` went, was moved, or events were lost, the
        /// directory now at `blobs` is watched afresh; what was created in it before
        /// is found by the listing this answer asks for. An error when the watch can
        /// no longer tell: the store's directory itself went or moved.
        pub(super) fn entries_changed(&mut self, blobs: &Path) -> Result<bool, String> {
            let mut changed = false;
            loop {
                let events = match self.inotify.read_events() {
                    Ok(events) if !events.is_empty() => events,
                    Ok(_) | Err(Errno::EAGAIN) => break,
                    Err(error) => return Err(format!("reading inotify events: {error}")),
                };
                changed = true;
                for event in events {
                    if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        self.blobs = None;
                    }
                    if !event.mask.intersects(watch_ended()) {
                        continue;
                    }
                    if event.wd == self.dir {
                        return Err("the store's directory was removed or moved".into());
                    }
                    if Some(event.wd) == self.blobs {
                        // A moved directory keeps its watch; its events would only
                        // cause listings.
                        let _ = self.inotify.rm_watch(event.wd);
                        self.blobs = None;
                    }
                }
            }
            if changed {
                self.watch_blobs(blobs)
                    .map_err(|e| format!("watching blobs/: {e}"))?;
            }
            Ok(changed)
        }
    }
}

/// Without inotify the store lists its directories at every group.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
#[derive(Debug)]
enum EntryWatch {}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
impl EntryWatch {
    fn start(_dir: &Path, _blobs: &Path) -> std::io::Result<Self> {
        Err(std::io::Error::new(
            ErrorKind::Unsupported,
            "no inotify on this system",
        ))
    }

    fn entries_changed(&mut self, _blobs: &Path) -> Result<bool, String> {
        match *self {}
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
        // `blobs/` may not exist (sled creates it at open, but not every store is sled's).
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

/// Writes `bytes` to `temporary` and syncs it, then renames it to `path`: after a crash
/// `path` holds the old content or all of the new, never part. The caller syncs the
/// directory ([`sync_dir`]) to make the rename durable.
pub(super) fn write_synced_then_rename(
    temporary: &Path,
    path: &Path,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut file = File::create(temporary)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    std::fs::rename(temporary, path)
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

    /// A store directory holding its log, one blob and `blobs/`.
    fn store_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        std::fs::write(blobs.join("17"), b"blob").unwrap();
        dir
    }

    fn new_files_are_synced_twice_then_settled(dir: &Path, mut files: SyncedFiles) {
        let blobs = dir.join("blobs");
        let mut synced = Vec::new();
        files.sync_new(&mut synced).unwrap();
        // The blob, `blobs/` as a new entry and as a directory whose entries changed,
        // and the store's directory; never the skipped log.
        let tmp = dir.file_name().unwrap().to_string_lossy().into_owned();
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
    fn new_files_are_synced_twice_then_settled_and_directories_when_they_change() {
        let dir = store_dir();
        let files = SyncedFiles::new(dir.path(), &["db"]);
        new_files_are_synced_twice_then_settled(dir.path(), files);
    }

    #[test]
    fn without_a_watch_every_call_lists_and_syncs_the_same() {
        let dir = store_dir();
        let files = SyncedFiles::with_watch(dir.path(), &["db"], None);
        new_files_are_synced_twice_then_settled(dir.path(), files);

        let mut files = SyncedFiles::with_watch(dir.path(), &["db"], None);
        for _ in 0..3 {
            files.sync_new(&mut Vec::new()).unwrap();
        }
        assert_eq!(files.listings, 3);
    }

    /// A store with a watch; fails where inotify is missing or its instances are used up.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn watched(dir: &Path) -> SyncedFiles {
        let files = SyncedFiles::new(dir, &["db"]);
        assert!(
            files.watch.is_some(),
            "no inotify watch on {}",
            dir.display()
        );
        files
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_watched_store_lists_only_when_entries_changed_or_a_file_waits_for_its_second_sync() {
        // No `blobs/` yet (sled creates it at open; the watch does not count on it).
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db"), b"log").unwrap();
        let mut files = watched(dir.path());
        let mut synced = Vec::new();
        let mut sync = |files: &mut SyncedFiles| {
            synced.clear();
            files.sync_new(&mut synced).unwrap();
            (names(&synced), files.listings)
        };
        let tmp = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();

        assert_eq!(sync(&mut files), (vec![], 1), "the first call lists");
        assert_eq!(sync(&mut files), (vec![], 1), "nothing changed: no listing");

        // Written to, not created: not an entry change, as before the watch.
        std::fs::write(dir.path().join("db"), b"log, longer").unwrap();
        assert_eq!(sync(&mut files), (vec![], 1));

        // `blobs/` and a blob in it, created before the watch on `blobs/` can start:
        // the listing the creation asks for finds the blob.
        let blobs = dir.path().join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        std::fs::write(blobs.join("1"), b"blob").unwrap();
        let mut expected = vec!["1".to_string(), "blobs".into(), "blobs".into(), tmp.clone()];
        expected.sort();
        assert_eq!(sync(&mut files), (expected, 2));
        let again = vec!["1".to_string(), "blobs".into()];
        assert_eq!(sync(&mut files), (again, 3), "their second sync");
        assert_eq!(sync(&mut files), (vec![], 3), "settled: no listing");

        // A blob created in the now watched `blobs/`.
        std::fs::write(blobs.join("2"), b"blob").unwrap();
        let new_blob = vec!["2".to_string(), "blobs".into()];
        assert_eq!(
            sync(&mut files),
            (new_blob, 4),
            "the blob and its directory"
        );
        assert_eq!(
            sync(&mut files),
            (vec!["2".to_string()], 5),
            "its second sync"
        );
        assert_eq!(sync(&mut files), (vec![], 5));

        // A blob removed: its directory is synced.
        std::fs::remove_file(blobs.join("2")).unwrap();
        assert_eq!(sync(&mut files), (vec!["blobs".to_string()], 6));
        // A snapshot renamed into place in the store's directory.
        std::fs::write(dir.path().join("snap.generating"), b"snap").unwrap();
        std::fs::rename(
            dir.path().join("snap.generating"),
            dir.path().join("snap.1"),
        )
        .unwrap();
        let mut expected = vec!["snap.1".to_string(), tmp];
        expected.sort();
        assert_eq!(sync(&mut files), (expected, 7));
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_blobs_directory_moved_away_and_replaced_is_watched_afresh() {
        let dir = store_dir();
        let blobs = dir.path().join("blobs");
        let mut files = watched(dir.path());
        for _ in 0..3 {
            files.sync_new(&mut Vec::new()).unwrap();
        }
        std::fs::rename(&blobs, dir.path().join("old-blobs")).unwrap();
        std::fs::create_dir(&blobs).unwrap();
        files.sync_new(&mut Vec::new()).unwrap();
        files.sync_new(&mut Vec::new()).unwrap();
        let settled = files.listings;
        // A blob in the new `blobs/`: seen, although the old watch went with the old one.
        std::fs::write(blobs.join("19"), b"blob").unwrap();
        let mut synced = Vec::new();
        files.sync_new(&mut synced).unwrap();
        assert_eq!(files.listings, settled + 1);
        assert!(names(&synced).contains(&"19".to_string()), "{synced:?}");
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_store_directory_moved_away_ends_the_watch_and_every_call_lists() {
        let parent = tempfile::tempdir().unwrap();
        let store = parent.path().join("store");
        std::fs::create_dir(&store).unwrap();
        let mut files = watched(&store);
        files.sync_new(&mut Vec::new()).unwrap();
        std::fs::rename(&store, parent.path().join("moved")).unwrap();
        files.sync_new(&mut Vec::new()).unwrap();
        assert!(files.watch.is_none(), "the watch can no longer tell");
        std::fs::rename(parent.path().join("moved"), &store).unwrap();
        std::fs::write(store.join("snap.2"), b"snap").unwrap();
        let mut synced = Vec::new();
        files.sync_new(&mut synced).unwrap();
        assert!(names(&synced).contains(&"snap.2".to_string()), "{synced:?}");
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
