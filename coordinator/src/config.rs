//! The daemon's configuration: one struct, from flags, `TREATY_*` environment variables
//! or a TOML file (see [`crate::config_file`]), validated once at start. Units are in the
//! names; a field's name is its flag's with `_` for `-`, and its key in the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::api::ApiConfig;
use crate::endpoint_policy::EndpointPolicy;
use crate::runtime::RuntimeConfig;
pub use crate::security::SecurityConfig;

mod validate;

use crate::defaults::{self, MemoryBudget};

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct ServeConfig {
    /// Address to serve gRPC on (IP:PORT; port 0 picks a free port).
    #[arg(long, env = "TREATY_LISTEN", default_value = "127.0.0.1:7420")]
    pub listen: SocketAddr,

    /// Directory of the decision log (created if missing).
    #[arg(long, env = "TREATY_DATA_DIR", default_value = "treaty-data")]
    pub data_dir: PathBuf,

    /// Serve Prometheus metrics at http(s)://ADDR/metrics (IP:PORT; TLS with the
    /// server's certificate when --tls-cert is set). Off unless given.
    #[arg(long, env = "TREATY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// The endpoint participants use to reach this coordinator (GetOutcome). Defaults to
    /// http://LISTEN, with 127.0.0.1 for an unspecified IP.
    #[arg(long, env = "TREATY_ADVERTISE_ENDPOINT")]
    pub advertise_endpoint: Option<String>,

    /// Deadline of a transaction that asks for none.
    #[arg(long, env = "TREATY_DEFAULT_TRANSACTION_TIMEOUT_MS", default_value_t = defaults::DEFAULT_TRANSACTION_TIMEOUT_MS)]
    pub default_transaction_timeout_ms: u64,

    /// Latest deadline a transaction may ask for, from now.
    #[arg(long, env = "TREATY_MAX_TRANSACTION_TIMEOUT_MS", default_value_t = defaults::MAX_TRANSACTION_TIMEOUT_MS)]
    pub max_transaction_timeout_ms: u64,

    /// Phase-1 time limit of a transaction that asks for none.
    #[arg(long, env = "TREATY_DEFAULT_PREPARE_TIMEOUT_MS", default_value_t = defaults::DEFAULT_PREPARE_TIMEOUT_MS)]
    pub default_prepare_timeout_ms: u64,

    /// Longest phase-1 time limit a transaction may ask for.
    #[arg(long, env = "TREATY_MAX_PREPARE_TIMEOUT_MS", default_value_t = defaults::MAX_PREPARE_TIMEOUT_MS)]
    pub max_prepare_timeout_ms: u64,

    /// Deadline of each phase-2 call to a participant.
    #[arg(long, env = "TREATY_PARTICIPANT_CALL_TIMEOUT_MS", default_value_t = defaults::PARTICIPANT_CALL_TIMEOUT_MS)]
    pub participant_call_timeout_ms: u64,

    /// First retry delay of a failed phase-2 delivery (doubles per attempt, with jitter).
    #[arg(long, env = "TREATY_RETRY_BACKOFF_INITIAL_MS", default_value_t = defaults::RETRY_BACKOFF_INITIAL_MS)]
    pub retry_backoff_initial_ms: u64,

    /// Longest retry delay.
    #[arg(long, env = "TREATY_RETRY_BACKOFF_MAX_MS", default_value_t = defaults::RETRY_BACKOFF_MAX_MS)]
    pub retry_backoff_max_ms: u64,

    /// Transactions in progress at once; Begin beyond it is RESOURCE_EXHAUSTED.
    #[arg(long, env = "TREATY_MAX_ACTIVE_TRANSACTIONS", default_value_t = defaults::MAX_ACTIVE_TRANSACTIONS)]
    pub max_active_transactions: usize,

    /// Aborts still undelivered past their transaction's deadline that are kept (and
    /// retried) in memory; the oldest beyond are forgotten (a participant in doubt asks
    /// and hears ABORT). They no longer count as transactions in progress.
    #[arg(long, env = "TREATY_MAX_UNDELIVERED_ABORTS", default_value_t = defaults::MAX_UNDELIVERED_ABORTS)]
    pub max_undelivered_aborts: usize,

    /// Transactions one authenticated principal may have in progress at once (Begin or
    /// SubmitSaga beyond it is RESOURCE_EXHAUSTED); not applied without authentication.
    #[arg(long, env = "TREATY_MAX_ACTIVE_PER_PRINCIPAL", default_value_t = defaults::MAX_ACTIVE_PER_PRINCIPAL)]
    pub max_active_per_principal: usize,

    /// Payload bytes that transactions in progress may hold in memory, all together
    /// (Begin, Enlist or SubmitSaga beyond it is RESOURCE_EXHAUSTED).
    #[arg(long, env = "TREATY_MAX_PAYLOAD_MEMORY_BYTES", default_value_t = defaults::MAX_PAYLOAD_MEMORY_BYTES)]
    pub max_payload_memory_bytes: usize,

    /// Participant calls in flight at once.
    #[arg(long, env = "TREATY_MAX_IN_FLIGHT_CALLS", default_value_t = defaults::MAX_IN_FLIGHT_CALLS)]
    pub max_in_flight_calls: usize,

    /// How long a finished transaction stays in memory.
    #[arg(long, env = "TREATY_MEMORY_RETENTION_MS", default_value_t = defaults::MEMORY_RETENTION_MS)]
    pub memory_retention_ms: u64,

    /// Most finished transactions kept in memory.
    #[arg(long, env = "TREATY_MAX_RETAINED_TRANSACTIONS", default_value_t = defaults::MAX_RETAINED_TRANSACTIONS)]
    pub max_retained_transactions: usize,

    /// Memory the coordinator plans to use, split as docs/CONFIG.md says: a quarter for
    /// the decision log (an eighth of it is sled's cache), a quarter for finished
    /// transactions kept in memory (estimated bytes; the oldest leave memory first, their
    /// records stay in the log), the rest headroom for work in progress and the process
    /// itself. At least 64 MiB.
    #[arg(long, env = "TREATY_MEMORY_BUDGET_BYTES", default_value_t = defaults::MEMORY_BUDGET_BYTES)]
    pub memory_budget_bytes: u64,

    /// How long finished transactions stay in the log.
    #[arg(long, env = "TREATY_LOG_RETENTION_MS", default_value_t = defaults::LOG_RETENTION_MS)]
    pub log_retention_ms: u64,

    /// No participant is called about a transaction older than this (its id holds its
    /// creation time): deliveries still missing then wait for an operator (`treaty txn
    /// resolve`). Participants keep final barrier records at least this long (plus a
    /// margin for clock skew) and refuse calls about older transactions.
    #[arg(long, env = "TREATY_DELIVERY_HORIZON_MS", default_value_t = defaults::DELIVERY_HORIZON_MS)]
    pub delivery_horizon_ms: u64,

    /// The log is compacted (rebuilt holding only its live records, while writes go on)
    /// once its files exceed both this and `--log-compaction-growth-factor` times their
    /// size after the last compaction; sled alone never gives back the space of purged
    /// records. 0: never.
    #[arg(long, env = "TREATY_LOG_COMPACTION_MIN_BYTES", default_value_t = defaults::LOG_COMPACTION_MIN_BYTES)]
    pub log_compaction_min_bytes: u64,

    /// How many times its size after the last compaction the log's files may grow to
    /// before the next one (2–100). Lower keeps less dead space on disk and compacts more
    /// often: each compaction copies the live records, and the rate falls while it does.
    #[arg(long, env = "TREATY_LOG_COMPACTION_GROWTH_FACTOR", default_value_t = defaults::LOG_COMPACTION_GROWTH_FACTOR)]
    pub log_compaction_growth_factor: u64,

    /// The log is not compacted, whatever its size, before it has removed this many
    /// records (keys: a purged transaction takes two or three) since its last compaction
    /// or the daemon's start: a log filling towards its limit of finished transactions
    /// (`treaty_log_finished_transactions_limit`, set by the memory budget) removes nothing,
    /// and a copy of it frees nothing. A log created empty takes its size at its first
    /// removals (a purge, or an operator's `forget`) as the base the growth factor
    /// applies to, instead of compacting then, also across restarts (docs/CONFIG.md
    /// names the exceptions). 0: its size alone decides.
    #[arg(long, env = "TREATY_LOG_COMPACTION_MIN_REMOVED_RECORDS", default_value_t = defaults::LOG_COMPACTION_MIN_REMOVED_RECORDS)]
    pub log_compaction_min_removed_records: u64,

    /// Under load (the previous forced group of log writes held 16 or more forced ones,
    /// and came less than this long ago), a decision waits for others to share its sync
    /// before it is written (like PostgreSQL's `commit_delay`): this long for every 16
    /// forced writes that group held, at most 4 times this long. Fewer syncs per
    /// transaction, a little latency; fewer than 16 transactions at a time never wait. 0:
    /// never; decisions arriving during one sync still share the next.
    #[arg(long, env = "TREATY_LOG_GROUP_COMMIT_HOLD_US", default_value_t = defaults::LOG_GROUP_COMMIT_HOLD_US)]
    pub log_group_commit_hold_us: u64,

    /// Keep the history of transactions the protocol does not log (aborts, one-phase and
    /// read-only commits) in the log too, written lazily (never forced). `false` gives
    /// presumed abort's bare costs: no log write at all for those.
    #[arg(long, env = "TREATY_HISTORY_RECORDS", default_value_t = true, action = clap::ArgAction::Set)]
    pub history_records: bool,

    /// Write a two-phase commit (with its payloads, up to 48 KiB in all) to the log while
    /// its prepares are out, so that the votes decide it: the caller hears COMMITTED one
    /// forced write sooner, and aborts are forced instead. Needs participants that
    /// answer a repeated Prepare from their record (the SDK and `treaty tck` do).
    /// `false`: the commit decision is forced after the votes (classic presumed abort).
    #[arg(long, env = "TREATY_PARALLEL_COMMIT", default_value_t = true, action = clap::ArgAction::Set)]
    pub parallel_commit: bool,

    /// Call each participant over one long-lived `Calls` stream when it serves one (a
    /// call there costs a fraction of a unary call's CPU; participants that do not are
    /// called unary). `false`: every call is unary.
    #[arg(long, env = "TREATY_PARTICIPANT_CALL_STREAMS", default_value_t = true, action = clap::ArgAction::Set)]
    pub participant_call_streams: bool,

    /// How long shutdown waits for work in flight (transactions being delivered, and
    /// requests the server is still answering) before leaving it to recovery: one period
    /// for both, so the log is closed within this long of the signal (and 250 ms for
    /// the server's last answers).
    #[arg(long, env = "TREATY_SHUTDOWN_GRACE_MS", default_value_t = defaults::SHUTDOWN_GRACE_MS)]
    pub shutdown_grace_ms: u64,

    /// Deadline of each call of a saga step that asks for none.
    #[arg(long, env = "TREATY_DEFAULT_STEP_TIMEOUT_MS", default_value_t = defaults::DEFAULT_STEP_TIMEOUT_MS)]
    pub default_step_timeout_ms: u64,

    /// Forward attempts of a saga step that asks for no retry policy.
    #[arg(long, env = "TREATY_DEFAULT_STEP_ATTEMPTS", default_value_t = defaults::DEFAULT_STEP_ATTEMPTS)]
    pub default_step_attempts: u32,

    /// Failed attempts at one compensation after which a saga is flagged stuck.
    #[arg(long, env = "TREATY_COMPENSATION_STUCK_AFTER_ATTEMPTS", default_value_t = defaults::COMPENSATION_STUCK_AFTER_ATTEMPTS)]
    pub compensation_stuck_after_attempts: u32,

    /// How often the sweeper looks for transactions without progress.
    #[arg(long, env = "TREATY_SWEEP_INTERVAL_MS", default_value_t = defaults::SWEEP_INTERVAL_MS)]
    pub sweep_interval_ms: u64,

    /// How long a participant call may go without an answer before the sweeper sends it
    /// again, or in a paused transaction marks it lost (a safety net for lost answers:
    /// retries and deadlines have their own timers).
    #[arg(long, env = "TREATY_STALE_AFTER_MS", default_value_t = defaults::STALE_AFTER_MS)]
    pub stale_after_ms: u64,

    /// Engine shards (tasks owning transactions); 0 means one per CPU.
    #[arg(long, env = "TREATY_SHARDS", default_value_t = 0)]
    pub shards: usize,

    /// TLS, authentication, and how participants are called (see docs/SECURITY.md).
    /// Flat in the config file too, like the flags.
    #[command(flatten)]
    #[serde(flatten)]
    pub security: SecurityConfig,

    /// Participant endpoints the coordinator may call (repeatable; comma-separated in the
    /// environment). Without any, every endpoint may be called except unspecified,
    /// broadcast, multicast, link-local and cloud metadata addresses; with some, only
    /// matching ones, and those classes only if a pattern names them. Forms:
    /// `http://host:port` (exactly that endpoint), `host:port` or `host:*`,
    /// `*.domain:port` or `*.domain:*` (names below domain), `10.0.0.0/8:port` or
    /// `[fd00::/8]:*` (addresses in a network).
    #[arg(
        long = "allow-endpoint",
        env = "TREATY_ALLOW_ENDPOINT",
        value_name = "PATTERN",
        value_delimiter = ','
    )]
    pub allow_endpoint: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {field}: {message}")]
pub struct ConfigError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        field,
        message: message.into(),
    }
}

impl ServeConfig {
    /// A configuration with every default, serving on `listen` from `data_dir`.
    pub fn new(listen: SocketAddr, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen,
            data_dir: data_dir.into(),
            metrics_listen: None,
            advertise_endpoint: None,
            default_transaction_timeout_ms: defaults::DEFAULT_TRANSACTION_TIMEOUT_MS,
            max_transaction_timeout_ms: defaults::MAX_TRANSACTION_TIMEOUT_MS,
            default_prepare_timeout_ms: defaults::DEFAULT_PREPARE_TIMEOUT_MS,
            max_prepare_timeout_ms: defaults::MAX_PREPARE_TIMEOUT_MS,
            participant_call_timeout_ms: defaults::PARTICIPANT_CALL_TIMEOUT_MS,
            retry_backoff_initial_ms: defaults::RETRY_BACKOFF_INITIAL_MS,
            retry_backoff_max_ms: defaults::RETRY_BACKOFF_MAX_MS,
            max_active_transactions: defaults::MAX_ACTIVE_TRANSACTIONS,
            max_undelivered_aborts: defaults::MAX_UNDELIVERED_ABORTS,
            max_active_per_principal: defaults::MAX_ACTIVE_PER_PRINCIPAL,
            max_payload_memory_bytes: defaults::MAX_PAYLOAD_MEMORY_BYTES,
            max_in_flight_calls: defaults::MAX_IN_FLIGHT_CALLS,
            memory_retention_ms: defaults::MEMORY_RETENTION_MS,
            max_retained_transactions: defaults::MAX_RETAINED_TRANSACTIONS,
            memory_budget_bytes: defaults::MEMORY_BUDGET_BYTES,
            log_retention_ms: defaults::LOG_RETENTION_MS,
            delivery_horizon_ms: defaults::DELIVERY_HORIZON_MS,
            log_compaction_min_bytes: defaults::LOG_COMPACTION_MIN_BYTES,
            log_compaction_growth_factor: defaults::LOG_COMPACTION_GROWTH_FACTOR,
            log_compaction_min_removed_records: defaults::LOG_COMPACTION_MIN_REMOVED_RECORDS,
            log_group_commit_hold_us: defaults::LOG_GROUP_COMMIT_HOLD_US,
            history_records: true,
            parallel_commit: true,
            participant_call_streams: true,
            shutdown_grace_ms: defaults::SHUTDOWN_GRACE_MS,
            default_step_timeout_ms: defaults::DEFAULT_STEP_TIMEOUT_MS,
            default_step_attempts: defaults::DEFAULT_STEP_ATTEMPTS,
            compensation_stuck_after_attempts: defaults::COMPENSATION_STUCK_AFTER_ATTEMPTS,
            sweep_interval_ms: defaults::SWEEP_INTERVAL_MS,
            stale_after_ms: defaults::STALE_AFTER_MS,
            shards: 0,
            security: SecurityConfig::new(),
            allow_endpoint: Vec::new(),
        }
    }

    /// How the memory budget is split.
    pub fn memory_budget(&self) -> MemoryBudget {
        MemoryBudget::of(self.memory_budget_bytes)
    }

    /// The address policy and the `--allow-endpoint` allowlist.
    pub fn endpoint_policy(&self) -> Result<EndpointPolicy, ConfigError> {
        EndpointPolicy::new(&self.allow_endpoint).map_err(|e| bad("allow_endpoint", e.to_string()))
    }

    pub fn api(&self) -> Result<ApiConfig, ConfigError> {
        Ok(ApiConfig {
            https_participants: self.security.participant_ca.is_some(),
            default_transaction_timeout_ms: self.default_transaction_timeout_ms,
            max_transaction_timeout_ms: self.max_transaction_timeout_ms,
            default_prepare_timeout_ms: self.default_prepare_timeout_ms,
            max_prepare_timeout_ms: self.max_prepare_timeout_ms,
            saga: crate::api::saga::SagaDefaults {
                step_timeout_ms: self.default_step_timeout_ms,
                step_attempts: self.default_step_attempts,
                retry_backoff_initial_ms: self.retry_backoff_initial_ms,
                retry_backoff_max_ms: self.retry_backoff_max_ms,
                stuck_after_attempts: self.compensation_stuck_after_attempts,
            },
            endpoint_policy: Arc::new(self.endpoint_policy()?),
        })
    }

    /// The runtime's part; `bound` is the address actually listened on.
    pub fn runtime(&self, bound: SocketAddr) -> RuntimeConfig {
        let shards = match self.shards {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        RuntimeConfig {
            shards,
            advertise_endpoint: match &self.advertise_endpoint {
                // In canonical form, so participants can compare it with the ones they
                // trust; `validate` refused any that does not parse.
                Some(endpoint) => {
                    treaty_sdk::limits::canonical_endpoint("advertise_endpoint", endpoint)
                        .unwrap_or_else(|_| endpoint.clone())
                }
                None => advertised(bound, self.security.tls_cert.is_some()),
            },
            participant_call_timeout_ms: self.participant_call_timeout_ms,
            connect_timeout_ms: self
                .participant_call_timeout_ms
                .min(defaults::MAX_CONNECT_TIMEOUT_MS),
            retry_backoff_initial_ms: self.retry_backoff_initial_ms,
            retry_backoff_max_ms: self.retry_backoff_max_ms,
            max_active_transactions: self.max_active_transactions,
            max_undelivered_aborts: self.max_undelivered_aborts,
            max_active_per_principal: self.max_active_per_principal,
            max_payload_memory_bytes: self.max_payload_memory_bytes,
            max_in_flight_calls: self.max_in_flight_calls,
            max_branches: treaty_sdk::limits::MAX_BRANCHES,
            memory_retention_ms: self.memory_retention_ms,
            max_retained_transactions: self.max_retained_transactions,
            max_retained_bytes: self.memory_budget().retained_bytes,
            // The daemon's memory governor moves it (runtime/memory.rs).
            retained_allowance: Default::default(),
            log_retention_ms: self.log_retention_ms,
            log_finished_max: self.memory_budget().log_finished_max,
            delivery_horizon_ms: self.delivery_horizon_ms,
            history_records: self.history_records,
            parallel_commit: self.parallel_commit,
            participant_call_streams: self.participant_call_streams,
            sweep_interval_ms: self.sweep_interval_ms,
            sweep_batch: defaults::SWEEP_BATCH,
            stale_after_ms: self.stale_after_ms,
            // Read from files by the daemon at start (and on SIGHUP).
            participant_tls: None,
            participant_credentials: self.security.participant_credentials(),
            metrics: Default::default(),
        }
    }
}

fn advertised(bound: SocketAddr, tls: bool) -> String {
    let mut address = bound;
    if address.ip().is_unspecified() {
        address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if tls { "https" } else { "http" };
    format!("{scheme}://{address}")
}

#[cfg(test)]
mod tests;
