//! The types and sizes behind [`super`]'s "When": the policy and its defaults, what a
//! finished compaction reports, the base the growth factor applies to as the store
//! keeps it, and the sizes on disk the policy and a compaction look at. The decisions
//! (when to compact, when to take a base) stay in [`super`].

use crate::durable::{BASE_AWAITED_KEY, COMPACTED_BYTES_KEY, Generation, generations};

/// The default [`CompactionPolicy::retry_after_failure_ms`].
pub const DEFAULT_COMPACTION_RETRY_AFTER_FAILURE_MS: u64 = 600_000;

/// The default [`CompactionPolicy::min_bytes`].
pub const DEFAULT_COMPACTION_MIN_BYTES: u64 = 32 * 1024 * 1024;
/// The default [`CompactionPolicy::growth_factor`]. Measured on the coordinator's log:
/// at a steady count of live records sled's own reuse of freed space holds it at
/// 1.7–2.0 times its compacted size, so at 2 compactions that bought nothing lasting
/// came about every 40 s at 7,000 2PCs/s, each halving the rate for some seconds
/// (docs/PERFORMANCE.md, "Compactions only for what sled does not reuse").
pub const DEFAULT_COMPACTION_GROWTH_FACTOR: u64 = 3;
/// The least [`CompactionPolicy::growth_factor`] taken: below, each compaction would
/// call the next.
pub const MIN_COMPACTION_GROWTH_FACTOR: u64 = 2;
/// The default [`CompactionPolicy::min_removed_records`]: a store that has removed
/// nothing since its last compaction holds nothing a copy would leave behind. The
/// coordinator's log, filling towards its limit of final transactions, compacted at
/// 32 MiB from 34.6 to 35.7 MB (docs/PERFORMANCE.md, "No compaction while the log only
/// grows").
pub const DEFAULT_COMPACTION_MIN_REMOVED_RECORDS: u64 = 1;

/// When a store compacts itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Never compact a store smaller than this on disk.
    pub min_bytes: u64,
    /// Compact once the store is this many times its base: its size after the last
    /// compaction, or when a store created empty first removed records (see
    /// `min_removed_records`), kept in the store. A store with no base yet starts from
    /// 0, so `min_bytes` alone decides. Taken as at least
    /// [`MIN_COMPACTION_GROWTH_FACTOR`]; the default is
    /// [`DEFAULT_COMPACTION_GROWTH_FACTOR`].
    pub growth_factor: u64,
    /// Never compact a store that has removed fewer records than this since its last
    /// compaction, or since it was opened if it has not compacted since (0: size alone
    /// decides, and nothing below applies). A store created empty and with no base,
    /// when it first gets that far, takes its size then as the base the growth factor
    /// applies to, instead of compacting: until then it held nothing removed, and a
    /// copy then freed little (a coordinator's log). That happens once, at the first
    /// look after its first removals, however few or small: a store that first removes
    /// a record when it is small gets a small base, and `min_bytes` then decides as
    /// before. The store remembers across reopens that it waits for that base (until
    /// later on 2026-12-06, a store reopened before its first removals compacted at
    /// them); one that removes records while its policy takes no base (none, or 0 here)
    /// stops waiting, as it then holds removed records. Records written again leave
    /// dead space too: a store that only ever rewrites its records wants 0. The default is
    /// [`DEFAULT_COMPACTION_MIN_REMOVED_RECORDS`].
    pub min_removed_records: u64,
    /// How often the size on disk is looked at.
    pub check_interval_ms: u64,
    /// How long after an abandoned compaction (an error while copying, too little free
    /// space) the policy may start another. The default is
    /// [`DEFAULT_COMPACTION_RETRY_AFTER_FAILURE_MS`].
    pub retry_after_failure_ms: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        Self {
            min_bytes: DEFAULT_COMPACTION_MIN_BYTES,
            growth_factor: DEFAULT_COMPACTION_GROWTH_FACTOR,
            min_removed_records: DEFAULT_COMPACTION_MIN_REMOVED_RECORDS,
            check_interval_ms: 10_000,
            retry_after_failure_ms: DEFAULT_COMPACTION_RETRY_AFTER_FAILURE_MS,
        }
    }
}

/// What a finished compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionReport {
    /// The generation now current.
    pub generation: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Records (keys of the caller's tree) copied.
    pub records: u64,
}

/// What the policy's growth factor applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(in crate::durable) enum Base {
    /// None yet: `min_bytes` alone decides.
    #[default]
    None,
    /// None yet, and the store was created empty and holds nothing removed: its size at
    /// the first look after its first removals becomes the base, when the policy counts
    /// removals (see `CompactionPolicy::min_removed_records`).
    Awaited,
    /// The store's size after its last compaction, or when it was taken as above.
    Bytes(u64),
}

impl Base {
    pub(super) fn bytes(self) -> u64 {
        match self {
            Base::Bytes(bytes) => bytes,
            Base::None | Base::Awaited => 0,
        }
    }
}

/// The policy's base, as the store keeps it (0: none yet).
pub(in crate::durable) fn baseline_bytes(meta: &sled::Tree) -> u64 {
    meta.get(COMPACTED_BYTES_KEY)
        .ok()
        .flatten()
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

/// The policy's base as the store keeps it: its bytes, or whether it awaits one (a
/// store that cannot read its mark is taken as not awaiting, so at worst it compacts
/// at its first removals).
pub(in crate::durable) fn stored_base(meta: &sled::Tree) -> Base {
    match baseline_bytes(meta) {
        0 if meta.contains_key(BASE_AWAITED_KEY).unwrap_or(false) => Base::Awaited,
        0 => Base::None,
        bytes => Base::Bytes(bytes),
    }
}

/// Bytes available to this process on the filesystem holding `dir`.
pub(super) fn free_bytes(dir: &std::path::Path) -> Result<u64, String> {
    let stats = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| format!("reading the free space of {}: {e}", dir.display()))?;
    Ok((stats.blocks_available() as u64).saturating_mul(stats.fragment_size() as u64))
}

/// The bytes of a generation's files on disk.
pub(in crate::durable) fn generation_bytes(generation: &Generation) -> std::io::Result<u64> {
    bytes_in(&generation.dir, true)
}

/// Every file under the store's root: the current generation, a copy being built and a
/// replaced one not yet deleted.
pub(in crate::durable) fn store_bytes(root: &std::path::Path) -> std::io::Result<u64> {
    bytes_in(root, false)
}

/// The bytes of the files under `dir`, leaving out the other generations' directories
/// and the pointer to the current one if `skip_layout`.
fn bytes_in(dir: &std::path::Path, skip_layout: bool) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if skip_layout && generations::is_layout_entry(&entry.file_name().to_string_lossy()) {
            continue;
        }
        let metadata = match entry.metadata() {
            Ok(metadata) => metadata,
            // sled removes old blobs and snapshots as it goes; compaction removes
            // whole generations.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        total += if metadata.is_dir() {
            match bytes_in(&entry.path(), false) {
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
                other => other?,
            }
        } else {
            metadata.len()
        };
    }
    Ok(total)
}
