//! The Treaty coordinator: runs two-phase commits, logs each commit decision durably
//! before anyone hears of it, and keeps delivering it until every participant has it.
//!
//! - [`engine`]: the protocol as pure state machines (no I/O, no clock).
//! - [`runtime`]: shards that own live transactions and carry out the engine's actions.
//! - [`participants`]: calls to participants, deadlines, retry backoff.
//! - [`log`]: the decision log (`DecisionLog`) on sled, and in memory.
//! - [`api`]: the gRPC service; protobuf stops there.
//! - [`endpoint_policy`]: which participant endpoints the coordinator may call.
//! - [`daemon`], [`config`], [`config_file`], [`cli`]: `treaty serve` (its settings from
//!   flags, environment and a TOML file) and the `treaty` command line.
//! - [`defaults`]: default values and the memory budget's split, read by the config,
//!   the API, the runtime and the metrics alike.
//! - [`security`]: TLS, authentication and participant credentials of the daemon.
//! - [`bench`]: `treaty bench`, commits per second over loopback gRPC.
//! - [`tck`]: `treaty tck`, the conformance kit that checks a participant against the
//!   participant protocol.
//! - `otlp` (cargo feature `otlp`): export of participant-call spans over OTLP/gRPC.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod daemon;
pub mod defaults;
pub mod endpoint_policy;
pub mod engine;
pub mod log;
pub mod metrics;
pub mod model;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod participants;
pub mod runtime;
pub mod security;
pub mod tck;
