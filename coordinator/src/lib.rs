//! The Treaty coordinator: runs two-phase commits, logs decisions durably before acting
//! on them, and keeps delivering them until every participant has them.

pub mod engine;
pub mod log;
pub mod model;
