//! Helpers for Treaty's black-box tests (`tests/tests/*.rs`): in-process servers over
//! real gRPC and sled, child processes of the real binaries, a scripted participant, the
//! conformance participant of `treaty tck` (and its broken variants), and the chaos suite's
//! parts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: failing loudly is the point

pub mod broken;
pub mod certs;
pub mod chaos;
pub mod conformance;
pub mod harness;
pub mod power_cut;
pub mod process;
pub mod scrape;
pub mod scripted;
pub mod silent_link;
