//! Treaty's examples: participants a service developer can read as models, and the
//! support the demo needs to run them as separate processes.
//!
//! - [`bank`]: accounts and transfers, as a two-phase-commit participant.
//! - [`process`]: starting and stopping child server processes.

pub mod bank;
pub mod process;
