//! Treaty's wire contract: the `treaty.v1` protobuf package, generated at build time from
//! `proto/treaty/v1/*.proto` (see `build.rs`). Everything else converts these types into
//! its own at the edge; nothing past the API layers sees them.

#![allow(missing_debug_implementations)] // generated code: clients and servers are not Debug

pub mod codec;

/// The `treaty.v1` package: messages, enums, the Coordinator, Admin and Participant
/// services.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used
)]
pub mod v1 {
    tonic::include_proto!("treaty.v1");
}

/// The encoded `FileDescriptorSet` of `treaty.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("treaty_descriptor");

/// The machine-readable details (`google.rpc.ErrorInfo`) Treaty attaches to error
/// statuses, beside the text, so clients need not parse messages.
pub mod error_info {
    /// The `domain` of every `ErrorInfo` Treaty sends.
    pub const DOMAIN: &str = "treaty.v1";
    /// `reason`: the coordinator has no record of the transaction a request names (an
    /// Enlist, Commit or Abort of it); the status is INVALID_ARGUMENT. Not sent for a
    /// malformed id: that is a malformed request.
    pub const UNKNOWN_TRANSACTION: &str = "UNKNOWN_TRANSACTION";
    /// `metadata` key of [`UNKNOWN_TRANSACTION`]: the transaction's id.
    pub const TRANSACTION_ID: &str = "transaction_id";
    /// `reason`: a SubmitSaga that waits for its outcome found every wait of its
    /// connection's `Calls` streams taken; the status is RESOURCE_EXHAUSTED and nothing
    /// was submitted. Sent unary, the same call waits as any unary call does.
    pub const STREAM_WAITS_TAKEN: &str = "STREAM_WAITS_TAKEN";
}
