//! The coordinator's side of a participant's `Calls` stream: its prepare / commit /
//! abort / compensate calls travel on one long-lived stream per endpoint
//! (docs/PARTICIPANT-PROTOCOL.md, "Calls over one stream"). How a stream is opened,
//! shared, ended and given up for unary calls is the SDK's
//! ([`treaty_sdk::call_stream_client`]); this module says which messages travel on it.

use treaty_proto::v1 as pb;
use treaty_sdk::call_stream_client;
use treaty_sdk::streamed_call;

pub use call_stream_client::{CLOSE_IDLE_AFTER, Transport};

/// A participant's calls stream.
pub(super) type CallStream = call_stream_client::CallStream<ParticipantCalls>;

/// A participant call that can travel on its stream.
pub(super) trait StreamedCall: call_stream_client::StreamedCall<ParticipantCalls> {}
impl<T: call_stream_client::StreamedCall<ParticipantCalls>> StreamedCall for T {}

/// The messages of `Participant.Calls`.
#[derive(Debug)]
pub(super) struct ParticipantCalls;

treaty_sdk::calls_protocol!(
    ParticipantCalls,
    pb::CallRequest,
    pb::CallAnswer,
    pb::call_request::Call,
    pb::call_answer::Answer,
    "the participant",
    withdraw = pb::call_request::Call::Withdraw(pb::WithdrawCall {})
);

macro_rules! participant_call {
    ($request:ty, $response:ty, $variant:ident) => {
        streamed_call!(
            ParticipantCalls,
            pb::call_request::Call,
            pb::call_answer::Answer,
            $request,
            $response,
            $variant
        );
    };
}

participant_call!(pb::PrepareBranchRequest, pb::PrepareBranchResponse, Prepare);
participant_call!(pb::CommitBranchRequest, pb::CommitBranchResponse, Commit);
participant_call!(pb::AbortBranchRequest, pb::AbortBranchResponse, Abort);
participant_call!(
    pb::CompensateBranchRequest,
    pb::CompensateBranchResponse,
    Compensate
);
