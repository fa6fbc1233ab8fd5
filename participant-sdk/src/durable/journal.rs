//! The journal: where a group commit becomes durable with one append and one
//! `fdatasync`, ahead of sled.
//!
//! Making a sled 0.34.7 write durable costs several device flushes (its `flush()` writes
//! and `sync_file_range`s its log, then the log file, any new file and the high-water
//! mark are synced): about 0.9 ms here where one `fdatasync` of an appended file costs
//! about 0.15 ms. So every group the logger applies is first appended to this file as a
//! checksummed *frame*; a forced group is acknowledged once the journal is synced, and
//! sled is made durable only at a *checkpoint* (when the journal has grown past a size,
//! at close, at open and when a compaction switches generations), after which a fresh
//! journal replaces this one.
//!
//! Invariants:
//! - Frames are numbered without gaps from the journal's *base* + 1; the base is the
//!   number of the last frame sled held durably when the journal was started, and sled's
//!   bookkeeping holds that number too (written before the checkpoint's flush). At open,
//!   sled holding fewer frames than the base means sled lost durable writes: damage.
//! - Every group is appended, lazy ones too (unsynced), in the order they are applied:
//!   replaying the frames after the base, in order, over whatever sled recovered gives
//!   every key the value of its last write. Replay is idempotent: a frame sled already
//!   holds is written again with the same value.
//! - A frame is read only whole and with a matching checksum and number; the first one
//!   that is not ends the journal there (a write a crash cut short was never
//!   acknowledged, as its sync had not returned). A cut that loses an acknowledged
//!   forced group is caught by the high-water mark, which is written (unsynced) after
//!   each forced group's sync and must not be ahead of the journal.
//! - A new journal is written to a temporary name, synced, renamed over the old one and
//!   the directory synced: after a crash either the old journal (whose frames sled
//!   holds, since the checkpoint finished before) or the new one is found, whole.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::files::{SyncedPath, sync_dir};

/// The journal's file in a generation's directory.
pub const FILE_NAME: &str = "treaty-journal";
/// Where a new journal is written before it replaces the old one.
const NEXT_FILE_NAME: &str = "treaty-journal.next";

const MAGIC: &[u8; 8] = b"TRTYJNL1";
/// Magic, base, checksum of both.
const HEADER_BYTES: usize = 8 + 8 + 4;
/// Length of the body, checksum, frame number, forced group number.
const FRAME_HEADER_BYTES: usize = 4 + 4 + 8 + 8;
const TAG_REMOVE: u8 = 0;
const TAG_INSERT: u8 = 1;

/// Whether `name` is one of the journal's files (the compaction's removal of a
/// generation and the sync of new files leave them to this module).
pub(super) fn is_journal_file(name: &str) -> bool {
    name == FILE_NAME || name == NEXT_FILE_NAME
}

/// One group commit as the journal keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame {
    pub number: u64,
    /// The forced group's number, or 0 for a group of lazy writes.
    pub forced_group: u64,
    pub ops: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

/// What [`read`] found in a generation's directory.
#[derive(Debug)]
pub(super) struct Found {
    pub base: u64,
    /// The frames after the base, in order, up to the first incomplete or damaged one.
    pub frames: Vec<Frame>,
    /// Bytes after the last whole frame (a write cut short, or damage).
    pub trailing_bytes: u64,
}

/// Reads the journal in `dir`: `Ok(None)` if there is none (a new store, or one written
/// before the journal existed); `Err` with why if its header is unreadable.
pub(super) fn read(dir: &Path) -> std::io::Result<Result<Option<Found>, String>> {
    let mut bytes = Vec::new();
    match File::open(dir.join(FILE_NAME)) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)?;
        }
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(Ok(None)),
        Err(error) => return Err(error),
    }
    let Some(base) = decode_header(&bytes) else {
        return Ok(Err(format!(
            "its journal {FILE_NAME} has no readable header ({} bytes)",
            bytes.len()
        )));
    };
    let mut frames = Vec::new();
    let mut at = HEADER_BYTES;
    while let Some((frame, next)) = decode_frame(&bytes, at, base + frames.len() as u64 + 1) {
        frames.push(frame);
        at = next;
    }
    Ok(Ok(Some(Found {
        base,
        frames,
        trailing_bytes: (bytes.len() - at) as u64,
    })))
}

/// The open journal the logger appends to.
#[derive(Debug)]
pub(super) struct Journal {
    file: File,
    path: PathBuf,
    /// The number of the last frame appended (the base when none was).
    last_frame: u64,
    len_bytes: u64,
    /// Reused for encoding, so that an append allocates nothing once warm.
    scratch: Vec<u8>,
}

impl Journal {
    /// Starts a journal in `dir` whose frames follow frame `base`, replacing the one
    /// there (see the module docs); what it synced is added to `synced`.
    pub(super) fn start(
        dir: &Path,
        base: u64,
        synced: &mut Vec<SyncedPath>,
    ) -> std::io::Result<Self> {
        let next = dir.join(NEXT_FILE_NAME);
        let path = dir.join(FILE_NAME);
        {
            let mut file = File::create(&next)?;
            file.write_all(&encode_header(base))?;
            file.sync_data()?;
        }
        std::fs::rename(&next, &path)?;
        sync_dir(dir)?;
        synced.push(SyncedPath {
            path: path.clone(),
            len: HEADER_BYTES as u64,
            is_dir: false,
        });
        synced.push(SyncedPath {
            path: dir.to_path_buf(),
            len: 0,
            is_dir: true,
        });
        let file = OpenOptions::new().write(true).open(&path)?;
        Ok(Self {
            file,
            path,
            last_frame: base,
            len_bytes: HEADER_BYTES as u64,
            scratch: Vec::new(),
        })
    }

    /// Appends the next frame (in the page cache: [`Journal::sync`] makes it durable)
    /// and returns its number.
    pub(super) fn append<'a>(
        &mut self,
        forced_group: u64,
        ops: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> std::io::Result<u64> {
        let number = self.last_frame + 1;
        encode_frame(&mut self.scratch, number, forced_group, ops)?;
        self.file.write_all_at(&self.scratch, self.len_bytes)?;
        self.len_bytes += self.scratch.len() as u64;
        self.last_frame = number;
        Ok(number)
    }

    /// `fdatasync`: every frame appended so far survives a power cut.
    pub(super) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    pub(super) fn last_frame(&self) -> u64 {
        self.last_frame
    }

    pub(super) fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// What [`Journal::sync`] made durable, for the sync observer.
    pub(super) fn synced_path(&self) -> SyncedPath {
        SyncedPath {
            path: self.path.clone(),
            len: self.len_bytes,
            is_dir: false,
        }
    }
}

fn encode_header(base: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0; HEADER_BYTES];
    header[..8].copy_from_slice(MAGIC);
    header[8..16].copy_from_slice(&base.to_le_bytes());
    let crc = crc32fast::hash(&header[..16]);
    header[16..].copy_from_slice(&crc.to_le_bytes());
    header
}

fn decode_header(bytes: &[u8]) -> Option<u64> {
    let header = bytes.get(..HEADER_BYTES)?;
    let (body, crc) = header.split_at(16);
    if &body[..8] != MAGIC || crc32fast::hash(body).to_le_bytes() != crc {
        return None;
    }
    Some(u64::from_le_bytes(body[8..16].try_into().ok()?))
}

/// Encodes a frame into `out` (cleared first). A key or value of 4 GiB or more cannot
/// be framed: the store refuses it rather than write a frame it could not read back.
fn encode_frame<'a>(
    out: &mut Vec<u8>,
    number: u64,
    forced_group: u64,
    ops: impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)>,
) -> std::io::Result<()> {
    let too_big = || std::io::Error::new(ErrorKind::InvalidInput, "a frame over 4 GiB");
    let length = |bytes: &[u8]| u32::try_from(bytes.len()).map_err(|_| too_big());
    out.clear();
    out.resize(FRAME_HEADER_BYTES, 0);
    for (key, value) in ops {
        out.extend_from_slice(&length(key)?.to_le_bytes());
        out.extend_from_slice(key);
        match value {
            Some(value) => {
                out.push(TAG_INSERT);
                out.extend_from_slice(&length(value)?.to_le_bytes());
                out.extend_from_slice(value);
            }
            None => out.push(TAG_REMOVE),
        }
    }
    let body_bytes = u32::try_from(out.len() - FRAME_HEADER_BYTES).map_err(|_| too_big())?;
    out[0..4].copy_from_slice(&body_bytes.to_le_bytes());
    out[8..16].copy_from_slice(&number.to_le_bytes());
    out[16..24].copy_from_slice(&forced_group.to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[0..4]);
    hasher.update(&out[8..]);
    out[4..8].copy_from_slice(&hasher.finalize().to_le_bytes());
    Ok(())
}

/// Decodes the frame at `at` if it is whole, its checksum matches and it is frame
/// `expected`; returns it and where the next one starts.
fn decode_frame(bytes: &[u8], at: usize, expected: u64) -> Option<(Frame, usize)> {
    let header = bytes.get(at..at.checked_add(FRAME_HEADER_BYTES)?)?;
    let body_bytes = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let number = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let forced_group = u64::from_le_bytes(header[16..24].try_into().ok()?);
    let end = at
        .checked_add(FRAME_HEADER_BYTES)?
        .checked_add(body_bytes)?;
    let frame_bytes = bytes.get(at..end)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&frame_bytes[0..4]);
    hasher.update(&frame_bytes[8..]);
    if hasher.finalize() != crc || number != expected {
        return None;
    }
    let mut body = &frame_bytes[FRAME_HEADER_BYTES..];
    let mut ops = Vec::new();
    while !body.is_empty() {
        let (key, rest) = take_sized(body)?;
        let (&tag, rest) = rest.split_first()?;
        let (value, rest) = match tag {
            TAG_INSERT => {
                let (value, rest) = take_sized(rest)?;
                (Some(value.to_vec()), rest)
            }
            TAG_REMOVE => (None, rest),
            _ => return None,
        };
        ops.push((key.to_vec(), value));
        body = rest;
    }
    let frame = Frame {
        number,
        forced_group,
        ops,
    };
    Some((frame, end))
}

/// Splits a length-prefixed byte string off the front of `bytes`.
fn take_sized(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (length, rest) = bytes.split_at_checked(4)?;
    let length = u32::from_le_bytes(length.try_into().ok()?) as usize;
    rest.split_at_checked(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(pairs: &[(&str, Option<&str>)]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
            .collect()
    }

    fn append(journal: &mut Journal, forced_group: u64, ops: &[(Vec<u8>, Option<Vec<u8>>)]) {
        let borrowed = ops.iter().map(|(k, v)| (k.as_slice(), v.as_deref()));
        journal.append(forced_group, borrowed).unwrap();
    }

    #[test]
    fn frames_read_back_in_order_after_the_base() {
        let dir = tempfile::tempdir().unwrap();
        let mut synced = Vec::new();
        let mut journal = Journal::start(dir.path(), 41, &mut synced).unwrap();
        let first = ops(&[("a", Some("1")), ("b", None)]);
        let second = ops(&[("c", Some(""))]);
        append(&mut journal, 7, &first);
        append(&mut journal, 0, &second);
        journal.sync().unwrap();
        assert_eq!(journal.last_frame(), 43);
        let found = read(dir.path()).unwrap().unwrap().unwrap();
        assert_eq!(found.base, 41);
        assert_eq!(found.trailing_bytes, 0);
        let expected = vec![
            Frame {
                number: 42,
                forced_group: 7,
                ops: first,
            },
            Frame {
                number: 43,
                forced_group: 0,
                ops: second,
            },
        ];
        assert_eq!(found.frames, expected);
        assert_eq!(synced[0].path, dir.path().join(FILE_NAME));
        assert!(synced[1].is_dir);
    }

    #[test]
    fn a_frame_cut_short_or_changed_ends_the_journal_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path(), 0, &mut Vec::new()).unwrap();
        for n in 0..3 {
            append(&mut journal, n, &ops(&[("key", Some("value"))]));
        }
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::read(&path).unwrap();
        let frame_bytes = (whole.len() - HEADER_BYTES) / 3;
        // Every cut inside the third frame keeps exactly the first two.
        for cut in 1..frame_bytes {
            std::fs::write(&path, &whole[..whole.len() - cut]).unwrap();
            let found = read(dir.path()).unwrap().unwrap().unwrap();
            assert_eq!(found.frames.len(), 2, "cut {cut}");
            assert_eq!(found.trailing_bytes as usize, frame_bytes - cut);
        }
        // Any changed byte of the second frame ends the journal after the first.
        for at in HEADER_BYTES + frame_bytes..HEADER_BYTES + 2 * frame_bytes {
            let mut changed = whole.clone();
            changed[at] ^= 0x40;
            std::fs::write(&path, &changed).unwrap();
            let found = read(dir.path()).unwrap().unwrap().unwrap();
            assert_eq!(found.frames.len(), 1, "byte {at}");
        }
    }

    #[test]
    fn a_frame_from_another_journal_is_not_read_as_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::start(dir.path(), 10, &mut Vec::new()).unwrap();
        append(&mut journal, 0, &ops(&[("k", Some("v"))]));
        let path = dir.path().join(FILE_NAME);
        let mut bytes = std::fs::read(&path).unwrap();
        // The same frame bytes again: number 11 where 12 is expected.
        let frame = bytes[HEADER_BYTES..].to_vec();
        bytes.extend_from_slice(&frame);
        std::fs::write(&path, &bytes).unwrap();
        let found = read(dir.path()).unwrap().unwrap().unwrap();
        assert_eq!(found.frames.len(), 1);
        assert_eq!(found.trailing_bytes as usize, frame.len());
    }

    #[test]
    fn a_new_journal_replaces_the_old_and_a_missing_or_bad_header_is_told() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().unwrap().is_none());
        let mut journal = Journal::start(dir.path(), 0, &mut Vec::new()).unwrap();
        append(&mut journal, 1, &ops(&[("k", Some("v"))]));
        let journal = Journal::start(dir.path(), 1, &mut Vec::new()).unwrap();
        assert_eq!(journal.len_bytes(), HEADER_BYTES as u64);
        let found = read(dir.path()).unwrap().unwrap().unwrap();
        assert_eq!((found.base, found.frames.len()), (1, 0));
        assert!(!dir.path().join(NEXT_FILE_NAME).exists());
        std::fs::write(dir.path().join(FILE_NAME), b"TRTYJNL1 short").unwrap();
        let refused = read(dir.path()).unwrap().unwrap_err();
        assert!(refused.contains("no readable header"), "{refused}");
    }
}
