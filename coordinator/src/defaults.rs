//! Default values, and how the memory budget is split: a leaf module (it imports
//! nothing of the crate) that the flags, [`crate::config::ServeConfig::new`], the API's
//! and the runtime's defaults and the metrics all read, so none of them imports another
//! for a number, and each value is written once.

pub const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 60_000;
pub const MAX_TRANSACTION_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_PREPARE_TIMEOUT_MS: u64 = 10_000;
pub const MAX_PREPARE_TIMEOUT_MS: u64 = 600_000;
pub const PARTICIPANT_CALL_TIMEOUT_MS: u64 = 5_000;
/// The most a participant connection's set-up may take, whatever the call timeout.
pub const MAX_CONNECT_TIMEOUT_MS: u64 = 2_000;
pub const RETRY_BACKOFF_INITIAL_MS: u64 = 100;
pub const RETRY_BACKOFF_MAX_MS: u64 = 10_000;
pub const MAX_ACTIVE_TRANSACTIONS: usize = 100_000;
pub const MAX_UNDELIVERED_ABORTS: usize = 100_000;
pub const MAX_ACTIVE_PER_PRINCIPAL: usize = 10_000;
pub const MAX_PAYLOAD_MEMORY_BYTES: usize = 512 * 1024 * 1024;
pub const MAX_IN_FLIGHT_CALLS: usize = 4_096;
pub const MEMORY_RETENTION_MS: u64 = 300_000;
pub const MAX_RETAINED_TRANSACTIONS: usize = 100_000;
pub const MEMORY_BUDGET_BYTES: u64 = 512 * 1024 * 1024;
/// Below this the shares are too small to be useful: the process alone (runtime,
/// gRPC, TLS, allocator) takes some 20–30 MiB before it holds any transaction.
pub const MIN_MEMORY_BUDGET_BYTES: u64 = 64 * 1024 * 1024;
pub const LOG_RETENTION_MS: u64 = 7 * 24 * 3_600_000;
pub const DELIVERY_HORIZON_MS: u64 = 7 * 24 * 3_600_000;
/// The durable store's defaults (why: their docs).
pub const LOG_COMPACTION_MIN_BYTES: u64 = treaty_sdk::durable::DEFAULT_COMPACTION_MIN_BYTES;
pub const LOG_COMPACTION_MIN_REMOVED_RECORDS: u64 =
    treaty_sdk::durable::DEFAULT_COMPACTION_MIN_REMOVED_RECORDS;
/// The durable store's default and least factors (why 3: their docs).
pub const LOG_COMPACTION_GROWTH_FACTOR: u64 = treaty_sdk::durable::DEFAULT_COMPACTION_GROWTH_FACTOR;
pub const MIN_LOG_COMPACTION_GROWTH_FACTOR: u64 = treaty_sdk::durable::MIN_COMPACTION_GROWTH_FACTOR;
/// Beyond, the log's files could grow past any disk before a compaction.
pub const MAX_LOG_COMPACTION_GROWTH_FACTOR: u64 = 100;
/// A quarter of a millisecond, and only under load (the previous forced group held
/// [`LOG_GROUP_COMMIT_HOLD_AFTER_WRITES`] or more forced writes). On a disk
/// whose lone sync takes 0.07 ms, decisions arriving during one sync alone gave 18 per
/// sync at 256 in flight, below issue 11's 20; with this hold 27–33, at the same rate,
/// and at 64 in flight 2PCs and sagas 1.4 % slower (docs/PERFORMANCE.md, "The decision
/// log's hold back at 250 µs"). The hold of before, 500 µs after 8 forced writes, cost
/// sagas 5–13 % ("The decision log's hold off by default").
pub const LOG_GROUP_COMMIT_HOLD_US: u64 = 250;
/// A longer hold only adds latency: a forced write of the log takes under a
/// millisecond on this project's machines.
pub const MAX_LOG_GROUP_COMMIT_HOLD_US: u64 = 100_000;
/// The decision log's forced groups wait for company only after a forced group of at
/// least this many forced writes (`StoreOptions::group_commit_hold_after_writes`, 8 for
/// participants): so never with fewer transactions than this writing at once. At 64 in
/// flight a group holds about 12 of a 2PC's intents, or 8 of a saga's records; at 256 in
/// flight about 18 (docs/PERFORMANCE.md, "The decision log's hold back at 250 µs").
pub const LOG_GROUP_COMMIT_HOLD_AFTER_WRITES: usize = 16;
/// The decision log's forced groups wait one `--log-group-commit-hold-us` for every
/// [`LOG_GROUP_COMMIT_HOLD_AFTER_WRITES`] forced writes in the previous group, up to this
/// many (`StoreOptions::group_commit_max_holds`; participants keep one).
pub const LOG_GROUP_COMMIT_MAX_HOLDS: u32 = 4;
pub const SHUTDOWN_GRACE_MS: u64 = 5_000;
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_STEP_ATTEMPTS: u32 = 3;
pub const COMPENSATION_STUCK_AFTER_ATTEMPTS: u32 = 10;
pub const SWEEP_INTERVAL_MS: u64 = 5_000;
pub const SWEEP_BATCH: usize = 1_000;
pub const STALE_AFTER_MS: u64 = 60_000;

/// How `memory_budget_bytes` is split. The shares are fixed fractions so that one number
/// is all an operator sets; each part is bounded by its own mechanism:
/// - `log_bytes` (1/4): the decision log. Only `log_cache_bytes`, an eighth of it, is
///   given to sled as the page cache of each of its databases: sled counts its cache in
///   bytes on disk, keeps structures outside it that grow with the log (its page table,
///   replaced nodes not yet reclaimed), and while the log compacts itself a second
///   database with its own cache holds the rebuilt copy (docs/PERFORMANCE.md, "The
///   log's cache"). Records and their index entries are keyed by time-ordered ids or
///   end times, so writes and removals touch the ends of each key range and a small
///   cache serves them (saga idempotency keys, chosen by clients, are the exception).
///   What sled keeps beside its caches grows with the records the log holds, so the log
///   keeps at most `log_finished_max` finished transactions (the rest of its share at
///   [`LOG_BYTES_PER_FINISHED`] each): beyond that the oldest are purged before
///   `log_retention_ms` is up;
/// - `retained_bytes` (1/4): finished transactions kept in memory, by their estimated
///   bytes (the oldest leave memory first; `max_retained_transactions` and
///   `memory_retention_ms` still apply, whichever comes first);
/// - `headroom_bytes` (the rest): work in progress and the process itself. Work in
///   progress is bounded by `max_active_transactions` and `max_payload_memory_bytes`,
///   not by the budget: set those so that it fits (docs/CONFIG.md, "Memory").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    pub budget_bytes: u64,
    pub log_bytes: u64,
    /// sled's `cache_capacity` for each of the log's databases.
    pub log_cache_bytes: u64,
    /// Finished transactions the log keeps at most (the oldest beyond are purged).
    pub log_finished_max: u64,
    pub retained_bytes: usize,
    pub headroom_bytes: u64,
}

/// The log's share over sled's cache capacity per database (see [`MemoryBudget`]).
const LOG_SHARE_PER_CACHE: u64 = 8;

/// Memory the log is given per finished transaction it keeps, beside sled's caches.
/// Measured (docs/decisions.md, "Memory: the log keeps what its share of the budget
/// holds"): sled keeps 36 bytes per finished 2PC in a log written once, 80 or more in the
/// daemon's log, which is compacted while it runs, and a compaction holds a second copy
/// until it switches (its resident set rose by about 400 bytes per finished transaction
/// for a few seconds).
pub const LOG_BYTES_PER_FINISHED: u64 = 256;

impl MemoryBudget {
    pub fn of(budget_bytes: u64) -> Self {
        let log_bytes = budget_bytes / 4;
        let retained_bytes = budget_bytes / 4;
        Self {
            budget_bytes,
            log_bytes,
            log_cache_bytes: log_bytes / LOG_SHARE_PER_CACHE,
            // Two caches while the log compacts itself.
            log_finished_max: (log_bytes - 2 * (log_bytes / LOG_SHARE_PER_CACHE))
                / LOG_BYTES_PER_FINISHED,
            retained_bytes: usize::try_from(retained_bytes).unwrap_or(usize::MAX),
            headroom_bytes: budget_bytes - log_bytes - retained_bytes,
        }
    }
}
