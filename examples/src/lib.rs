//! Treaty's examples: participants a service developer can read as models, and the
//! support the demo needs to run them as separate processes.
//!
//! - [`shop`]: the showcase — payment, inventory and shipping services, orders placed
//!   as sagas across them, and the audit of the shop's invariants.
//! - [`bank`]: accounts and transfers, as a two-phase-commit participant.
//! - [`certs`]: a CA and certificates made on the spot, for demos and tests.
//! - [`ledger`]: what the services keep in their durable stores.
//! - [`journal`]: the journal of effects the bank and rewards can keep for audits.
//! - [`rewards`]: loyalty points in SQLite, with the barrier's records beside them (a
//!   participant whose data lives outside the SDK's store).
//! - [`process`]: starting and stopping child server processes.
//! - [`retention`]: journal entries and per-order records of old transactions, pruned.
//! - [`service`]: what the service binaries share.
//! - [`tls_and_tokens`]: TLS and tokens for every hop of `demo --secure`, made for one run.

pub mod bank;
pub mod certs;
pub mod journal;
pub mod ledger;
pub mod process;
pub mod python;
pub mod retention;
pub mod rewards;
pub mod service;
pub mod shop;
pub mod tls_and_tokens;
