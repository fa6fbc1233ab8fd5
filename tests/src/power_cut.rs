//! What a power cut leaves of a store's directory, and what one changed byte does.
//!
//! [`DiskModel`] follows a [`DurableStore`](treaty_sdk::durable::DurableStore) through
//! its sync observer: for each file the length it had when it was last synced, and for
//! each directory the names it held when it was last synced. [`DiskModel::cut`] copies
//! the live directory and makes of the copy what a power cut could leave: a file whose
//! name its directory never synced is removed, emptied or cut short; a file never
//! synced is emptied or cut short; a file longer than when it was last synced is cut
//! back to that length.
//!
//! [`flip_one_byte`] copies a closed store's directory and changes one byte at a random
//! position of its files (every byte of the chosen files is equally likely).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rand::Rng;
use rand::rngs::StdRng;
use treaty_sdk::durable::{SyncObserver, SyncedPath};

#[derive(Debug, Default)]
struct Synced {
    /// File → its length when last synced.
    files: HashMap<PathBuf, u64>,
    /// Directory → the names it held when last synced.
    listings: HashMap<PathBuf, HashSet<String>>,
}

/// What has reached the disk, as the store's syncs say.
#[derive(Debug, Default, Clone)]
pub struct DiskModel {
    synced: Arc<Mutex<Synced>>,
}

/// What the cut did to the copy, for the failure message.
#[derive(Debug, Default)]
pub struct CutReport {
    pub removed: Vec<String>,
    pub emptied: Vec<String>,
    pub shortened: Vec<String>,
}

impl DiskModel {
    pub fn new() -> Self {
        Self::default()
    }

    /// The observer to give the store.
    pub fn observer(&self) -> SyncObserver {
        let synced = self.synced.clone();
        Arc::new(move |paths: &[SyncedPath]| {
            let mut synced = synced.lock().unwrap();
            for path in paths {
                if path.is_dir {
                    let names = std::fs::read_dir(&path.path)
                        .map(|listing| {
                            listing
                                .flatten()
                                .map(|e| e.file_name().to_string_lossy().into_owned())
                                .collect()
                        })
                        .unwrap_or_default();
                    synced.listings.insert(path.path.clone(), names);
                } else {
                    synced.files.insert(path.path.clone(), path.len);
                }
            }
        })
    }

    /// Copies `live` (the store's directory, which must not be written meanwhile) to
    /// `into` as a power cut now could leave it.
    pub fn cut(&self, live: &Path, into: &Path, rng: &mut StdRng) -> CutReport {
        let synced = self.synced.lock().unwrap();
        let mut report = CutReport::default();
        copy_dir(live, into);
        for copy in files_in(into) {
            let original = live.join(copy.strip_prefix(into).unwrap());
            let name = original.display().to_string();
            let parent = original.parent().unwrap().to_path_buf();
            let file_name = original.file_name().unwrap().to_string_lossy().into_owned();
            let entry_synced = synced
                .listings
                .get(&parent)
                .is_some_and(|names| names.contains(&file_name));
            let len = std::fs::metadata(&copy).unwrap().len();
            match (entry_synced, synced.files.get(&original)) {
                (false, _) => match rng.random_range(0..3) {
                    0 => {
                        std::fs::remove_file(&copy).unwrap();
                        report.removed.push(name);
                    }
                    1 => {
                        truncate(&copy, 0);
                        report.emptied.push(name);
                    }
                    _ => {
                        truncate(&copy, rng.random_range(0..=len));
                        report.shortened.push(name);
                    }
                },
                (true, None) => {
                    truncate(&copy, rng.random_range(0..=len / 2));
                    report.shortened.push(name);
                }
                (true, Some(&synced_len)) if len > synced_len => {
                    truncate(&copy, synced_len);
                    report.shortened.push(name);
                }
                (true, Some(_)) => {}
            }
        }
        report
    }
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Every file under `dir` (not directories), in a stable order.
pub fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(next) = dirs.pop() {
        for entry in std::fs::read_dir(&next).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    files
}

/// Copies the directory tree `from` to `to` (created). The store may be running: a file
/// or directory it removes while the copy is made (an old blob, a snapshot being
/// replaced) is left out, as a copy taken a moment later would have it.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
        Err(error) => panic!("listing {}: {error}", from.display()),
    };
    for entry in entries.flatten() {
        let target = to.join(entry.file_name());
        let Ok(file_type) = entry.file_type() else {
            continue;
        };
        if file_type.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if let Err(error) = std::fs::copy(entry.path(), &target) {
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::NotFound,
                "copying {}: {error}",
                entry.path().display()
            );
            // Gone since it was listed; drop a partial copy, if any.
            let _ = std::fs::remove_file(&target);
        }
    }
}

/// Copies `store` to `into` and changes one byte of the copy at a random position of
/// the files `chosen` accepts; says which file and offset.
pub fn flip_one_byte(
    store: &Path,
    into: &Path,
    rng: &mut StdRng,
    chosen: impl Fn(&Path) -> bool,
) -> String {
    copy_dir(store, into);
    let files: Vec<PathBuf> = files_in(into).into_iter().filter(|f| chosen(f)).collect();
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    let total: u64 = sizes.iter().sum();
    assert!(total > 0, "nothing to damage in {}", store.display());
    let mut position = rng.random_range(0..total);
    for (file, size) in files.iter().zip(sizes) {
        if position < size {
            let mut bytes = std::fs::read(file).unwrap();
            bytes[position as usize] ^= rng.random_range(1..=255u8);
            std::fs::write(file, bytes).unwrap();
            let relative = file.strip_prefix(into).unwrap().display();
            return format!("{relative} at byte {position} of {size}");
        }
        position -= size;
    }
    unreachable!("the position is within the files' total size")
}

/// Every key and value of a store's main tree.
pub fn contents(store: &treaty_sdk::durable::DurableStore) -> BTreeMap<Vec<u8>, Vec<u8>> {
    store
        .db()
        .iter()
        .map(|entry| {
            let (key, value) = entry.unwrap();
            (key.to_vec(), value.to_vec())
        })
        .collect()
}
