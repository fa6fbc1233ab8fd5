//! The protocol core: pure state machines, `step(state, input) -> actions`, with no I/O,
//! no clock and no randomness. The runtime (`crate::runtime`) executes their actions and
//! feeds the results back. Time enters as the `now` argument of every step.

pub mod footprint;
pub mod messages;
pub mod saga;
pub mod saga_graph;
pub mod twopc;

#[cfg(test)]
#[path = "operator_tests.rs"]
mod operator_tests;
#[cfg(test)]
#[path = "parallel_commit_tests.rs"]
mod parallel_commit_tests;
#[cfg(test)]
#[path = "saga_call_tests.rs"]
mod saga_call_tests;
#[cfg(test)]
#[path = "saga_operator_call_tests.rs"]
mod saga_operator_call_tests;
#[cfg(test)]
#[path = "saga_operator_tests.rs"]
mod saga_operator_tests;
#[cfg(test)]
#[path = "saga_recovery_tests.rs"]
mod saga_recovery_tests;
#[cfg(test)]
#[path = "saga_tests.rs"]
mod saga_tests;
#[cfg(test)]
#[path = "twopc_delivery_tests.rs"]
mod twopc_delivery_tests;
#[cfg(test)]
#[path = "twopc_tests.rs"]
mod twopc_tests;
