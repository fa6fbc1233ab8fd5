//! The Treaty participant SDK: what services embed to take part in distributed
//! transactions, and what initiators use to run them.
//!
//! - [`Participant`]: implement prepare / commit / abort / compensate for your data.
//! - [`serve`]: serves it over gRPC behind a durable [`barrier`] (idempotency, null
//!   compensation, anti-hanging) and resolves in-doubt branches with the coordinator;
//!   [`serve_with_routes`] serves more gRPC services beside it (e.g. `Conformance`).
//! - [`client::TreatyClient`]: begin, enlist, commit, abort, get, list, watch.
//! - [`durable`]: group-committed durable writes on sled 0.34.7, which the barrier and
//!   the coordinator's decision log share.
//! - [`barrier_store::BarrierStore`]: implement it to keep the barrier's records in your
//!   own database, beside your data.
//! - [`barrier_gc`] and [`transaction_age`]: records of final branches are deleted once
//!   their transaction (a UUIDv7, which tells its age) is older than the retention.
//! - [`tls`], [`auth`] and [`connections`]: TLS (rustls), bearer tokens and principals,
//!   and the accept loop the servers share (the coordinator's too).
//! - [`trace`]: W3C trace context, carried from initiator to participants; with the
//!   `logging` feature, `logging`: text or JSON log lines for binaries.
//! - [`metrics`]: the participant server's Prometheus metrics (operations by result,
//!   barrier records, branches in doubt) and the `/metrics` endpoint (the coordinator's
//!   too).
//! - [`limits`] and [`endpoint`]: what crosses the wire, checked; endpoints in canonical
//!   form.

pub mod auth;
pub mod barrier;
pub mod barrier_gc;
pub mod barrier_store;
pub mod call_stream;
pub mod call_stream_client;
pub mod client;
pub mod connections;
pub mod durable;
pub mod endpoint;
pub mod failpoint;
pub mod hex;
pub mod in_doubt;
mod keyed_locks;
pub mod limits;
#[cfg(feature = "logging")]
pub mod logging;
pub mod metrics;
pub mod participant;
mod run_to_end;
pub mod server;
pub mod tls;
pub mod trace;
pub mod transaction_age;
pub mod trust;

pub use client::{
    BeginOptions, BranchSpec, ClientError, Outcome, SagaStep, SubmitOptions, SubmittedSaga,
    TreatyClient,
};
pub use participant::{BranchContext, Participant, ParticipantError, Vote};
pub use server::{
    MetricsListen, ParticipantService, ServeError, ServeOptions, serve, serve_with_routes,
};
