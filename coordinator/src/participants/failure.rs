//! What a failed call carries ([`CallFailure`]), and how an error status becomes the
//! description clients read (branch errors, histories, abort reasons). Clients name the
//! endpoints, so a status says only whether the participant answered with an error (its
//! gRPC status) or was unreachable; transport details go to the log. A participant's
//! FAILED_PRECONDITION is a refusal for good.

use super::Call;
use treaty_sdk::limits::truncate_reason;

/// What clients are told when no gRPC answer came, whatever the transport said.
pub const UNREACHABLE: &str = "participant unreachable";
/// What they are told when the call was not made: the endpoint's circuit is open.
pub const CIRCUIT_OPEN: &str = "participant unreachable (circuit open: not called)";

/// How tonic begins the message of a status it made up from an HTTP status code because
/// the response had no `grpc-status`: the server there does not speak gRPC.
const NOT_GRPC_PREFIX: &str = "grpc-status header missing";

/// Why a call brought no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailure {
    /// What happened, for the branch's history and the logs.
    pub message: String,
    /// Sending the same call again cannot succeed: the participant refused it for good
    /// (see [`refused_for_good`]).
    pub permanent: bool,
}

impl CallFailure {
    pub(super) fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }
}

/// What the client is told of a call that ended in `status`; the details go to the log.
pub(super) fn describe_failure(call: &Call, status: &tonic::Status) -> String {
    if answered_by_participant(status) {
        tracing::debug!(
            endpoint = %call.endpoint,
            branch_id = %call.branch_id,
            code = ?status.code(),
            status_message = %status.message(),
            "participant answered with an error"
        );
        // A participant's message is bounded before it is kept or logged.
        return truncate_reason(format!(
            "participant answered {:?}: {}",
            status.code(),
            status.message()
        ));
    }
    tracing::warn!(
        endpoint = %call.endpoint,
        branch_id = %call.branch_id,
        code = ?status.code(),
        status_message = %status.message(),
        source = ?std::error::Error::source(status),
        "participant unreachable"
    );
    UNREACHABLE.to_string()
}

/// Whether `status` is a gRPC server's answer rather than one the client made up: tonic
/// gives a status made from a transport error (connect, TLS, HTTP/2) its source, and one
/// made from a non-gRPC HTTP response a recognisable message.
pub(super) fn answered_by_participant(status: &tonic::Status) -> bool {
    std::error::Error::source(status).is_none() && !status.message().starts_with(NOT_GRPC_PREFIX)
}

/// A participant's FAILED_PRECONDITION: a call about a transaction past its barrier
/// retention that found no record. It answers the same however often it is sent, so
/// an operator must end the transaction (docs/PARTICIPANT-PROTOCOL.md, "Barrier
/// retention and late calls").
pub(super) fn refused_for_good(status: &tonic::Status) -> bool {
    answered_by_participant(status) && status.code() == tonic::Code::FailedPrecondition
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_a_grpc_servers_own_status_counts_as_an_answer() {
        let call = Call {
            endpoint: "http://127.0.0.1:1".into(),
            transaction_id: "t".into(),
            branch_id: "b".into(),
            timeout: Duration::from_secs(1),
            trace: None,
        };
        let answered = tonic::Status::unavailable("participant: store down");
        assert_eq!(
            describe_failure(&call, &answered),
            "participant answered Unavailable: participant: store down"
        );
        let transport =
            tonic::Status::from_error(Box::new(std::io::Error::other("connection refused")));
        assert_eq!(describe_failure(&call, &transport), UNREACHABLE);
        let not_grpc = tonic::Status::unimplemented(
            "grpc-status header missing, mapped from HTTP status code 404",
        );
        assert_eq!(describe_failure(&call, &not_grpc), UNREACHABLE);
    }

    #[test]
    fn only_a_participants_failed_precondition_is_a_refusal_for_good() {
        let past_retention =
            tonic::Status::failed_precondition("the transaction is past the barrier retention");
        assert!(refused_for_good(&past_retention));
        assert!(!refused_for_good(&tonic::Status::unavailable(
            "participant: store down"
        )));
        assert!(!refused_for_good(&tonic::Status::internal(
            "record unreadable"
        )));
    }
}
