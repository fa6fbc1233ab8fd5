//! The high-water mark: a witness of acknowledged forced writes kept outside sled.
//!
//! sled checksums each log message but treats a bad one as the end of its log, so one
//! damaged byte (or a file cut short) makes it open "successfully" without everything
//! written after that point. The store therefore numbers its forced group commits: the
//! number goes into sled with each group, and, once the group is on disk, into this
//! file: written in place without a sync of its own (a *note*: the group's own sync
//! already cost one device flush), the file synced within a second and at close. At
//! open, sled must hold at least the number this file holds; if it holds less,
//! acknowledged writes were lost and the store refuses to open.
//!
//! Invariants:
//! - A number is written only after its group is durable in sled, so after any crash
//!   the number in sled is at least the number here (never the reverse). After a kill
//!   -9 the file holds the last group's number; a power cut may lose the notes since the
//!   file's last sync (at most a second's), leaving an older number that still bounds
//!   what sled must hold.
//! - The file has two checksummed slots, in different sectors; group `n` overwrites slot
//!   `n % 2` in place (the file's size never changes after creation, so `fdatasync`
//!   writes no metadata). A torn write of one slot leaves the other, one group older,
//!   which still bounds what sled must hold.
//! - The file is made whole beside its place and renamed into it, so a crash while it
//!   is created leaves no file or a whole one. An empty file (left by a crash of a build
//!   that created it in place) vouches for nothing, as no file does: it reads as absent.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The file's name in the store's directory.
pub const FILE_NAME: &str = "treaty-high-water";
/// Where the file is made before it is renamed into place.
const TEMPORARY_FILE_NAME: &str = "treaty-high-water.new";

const MAGIC: &[u8; 8] = b"TRTYHW01";
const SLOT_BYTES: usize = 20;
/// Slot `i` starts at `i * SLOT_SPACING`: separate sectors, so one torn write spoils one.
const SLOT_SPACING: u64 = 512;
const FILE_BYTES: usize = SLOT_SPACING as usize + SLOT_BYTES;

/// The open high-water mark file.
#[derive(Debug)]
pub(super) struct HighWater {
    file: File,
    path: PathBuf,
}

/// What reading the file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Mark {
    /// No file: a new store, or one written before the mark existed.
    Absent,
    /// The highest forced group known to be acknowledged.
    At(u64),
    /// The file exists but neither slot is readable.
    Unreadable(String),
}

/// Reads the mark in `dir` without changing anything.
pub(super) fn read(dir: &Path) -> std::io::Result<Mark> {
    let path = dir.join(FILE_NAME);
    let mut bytes = Vec::with_capacity(FILE_BYTES);
    match File::open(&path) {
        Ok(file) => {
            file.take(FILE_BYTES as u64 + 1).read_to_end(&mut bytes)?;
        }
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(Mark::Absent),
        Err(error) => return Err(error),
    }
    if bytes.is_empty() {
        return Ok(Mark::Absent);
    }
    let slots = [0, 1].map(|i| {
        let start = i * SLOT_SPACING as usize;
        bytes.get(start..start + SLOT_BYTES).and_then(decode_slot)
    });
    match slots.into_iter().flatten().max() {
        Some(mark) => Ok(Mark::At(mark)),
        None => Ok(Mark::Unreadable(format!(
            "{} ({} bytes) has no slot whose checksum matches",
            path.display(),
            bytes.len()
        ))),
    }
}

impl HighWater {
    /// Opens the file in `dir` for writing, creating it holding `mark` if it is absent
    /// or not whole (made and synced beside its place, renamed into it and `dir` synced,
    /// so that it exists whole after a crash or a power cut, or not at all).
    pub(super) fn open(dir: &Path, mark: u64) -> std::io::Result<Self> {
        let path = dir.join(FILE_NAME);
        let whole = match std::fs::metadata(&path) {
            Ok(metadata) => metadata.len() == FILE_BYTES as u64,
            Err(error) if error.kind() == ErrorKind::NotFound => false,
            Err(error) => return Err(error),
        };
        if !whole {
            let mut bytes = vec![0u8; FILE_BYTES];
            for slot in [0, 1] {
                let start = slot * SLOT_SPACING as usize;
                bytes[start..start + SLOT_BYTES].copy_from_slice(&encode_slot(mark));
            }
            let temporary = dir.join(TEMPORARY_FILE_NAME);
            super::files::write_synced_then_rename(&temporary, &path, &bytes)?;
            super::files::sync_dir(dir)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut high_water = Self { file, path };
        if whole {
            high_water.record(mark)?;
        }
        Ok(high_water)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Durably records that forced group `mark` is acknowledged.
    pub(super) fn record(&mut self, mark: u64) -> std::io::Result<()> {
        self.note(mark)?;
        self.sync()
    }

    /// Records that forced group `mark` is acknowledged, without syncing: call only once
    /// the group is durable. A power cut may lose the note (leaving an older, still true
    /// number), never make it claim more.
    pub(super) fn note(&mut self, mark: u64) -> std::io::Result<()> {
        let offset = (mark % 2) * SLOT_SPACING;
        self.file.write_all_at(&encode_slot(mark), offset)
    }

    /// Makes the notes so far durable.
    pub(super) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

fn encode_slot(mark: u64) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[..8].copy_from_slice(MAGIC);
    slot[8..16].copy_from_slice(&mark.to_le_bytes());
    let crc = crc32fast::hash(&slot[..16]);
    slot[16..].copy_from_slice(&crc.to_le_bytes());
    slot
}

fn decode_slot(slot: &[u8]) -> Option<u64> {
    let (body, crc) = slot.split_at(16);
    if &body[..8] != MAGIC || crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    let mut mark = [0u8; 8];
    mark.copy_from_slice(&body[8..]);
    Some(u64::from_le_bytes(mark))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_then_created_then_advanced() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::Absent);
        let mut mark = HighWater::open(dir.path(), 7).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::At(7));
        mark.record(8).unwrap();
        mark.record(9).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::At(9));
        drop(mark);
        // Reopening keeps the mark it is given (the store passes the larger one).
        HighWater::open(dir.path(), 9).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::At(9));
    }

    /// A crash of an older build between creating the file and writing it left it
    /// empty, and the store refused to open for ever; such a file vouches for nothing.
    /// The file is now made beside its place and renamed, and replaced if not whole.
    #[test]
    fn an_empty_file_reads_as_absent_and_is_made_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"").unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::Absent);
        // A file made beside it by a crashed creation is replaced too.
        std::fs::write(dir.path().join(TEMPORARY_FILE_NAME), b"half").unwrap();
        HighWater::open(dir.path(), 3).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::At(3));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), FILE_BYTES as u64);
        assert!(!dir.path().join(TEMPORARY_FILE_NAME).exists());
    }

    #[test]
    fn a_spoiled_slot_falls_back_to_the_other_and_two_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut mark = HighWater::open(dir.path(), 1).unwrap();
        mark.record(2).unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        // Slot 0 holds 2: spoil it; slot 1 still says 1.
        bytes[9] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Mark::At(1));
        bytes[SLOT_SPACING as usize + 3] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(dir.path()).unwrap(), Mark::Unreadable(_)));
    }
}
