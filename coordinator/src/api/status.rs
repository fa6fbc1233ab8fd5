//! The one mapping from the runtime's errors to gRPC statuses, and the statuses the
//! service answers of its own: a transaction of another principal, a bad field, and a
//! `Calls` stream whose waits are all taken.

use super::*;

pub(super) fn not_yours(id: &TxnId) -> Status {
    Status::permission_denied(format!("transaction_id: {id} belongs to another principal"))
}

pub(super) fn invalid(error: FieldError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// The one mapping from runtime errors to gRPC statuses. An unknown transaction also
/// carries a machine-readable `ErrorInfo` (see [`unknown_transaction`]).
pub fn status_of(error: RuntimeError) -> Status {
    let field = match &error {
        RuntimeError::UnknownTransaction(id) => return unknown_transaction(*id, &error),
        RuntimeError::Refused(Refusal::DuplicateBranch(_)) => "branch.branch_id",
        RuntimeError::Refused(Refusal::TooManyBranches(_)) => "branch",
        RuntimeError::Refused(Refusal::NoBranches) => "branches",
        RuntimeError::Refused(Refusal::UnknownBranch(_) | Refusal::NothingToResolve { .. }) => {
            "branch_id"
        }
        // Operator verbs answer their refusals as `applied: false` (see admin.rs); the
        // rest cannot come from the calls of this service.
        RuntimeError::Refused(
            Refusal::NotActive(_)
            | Refusal::AlreadyCommitting
            | Refusal::CommitInFlight
            | Refusal::DecisionInFlight
            | Refusal::VotesDecide
            | Refusal::Final(_)
            | Refusal::Unfinished(_)
            | Refusal::MayStillAsk
            | Refusal::AlreadyEnding(_)
            | Refusal::NothingToRetry
            | Refusal::AlreadyPaused
            | Refusal::NotPaused
            | Refusal::Undecided(_)
            | Refusal::ContradictsDecision { .. }
            | Refusal::CallInFlight(_),
        )
        | RuntimeError::NotTwoPhase(_)
        | RuntimeError::NotSaga(_) => "transaction_id",
        RuntimeError::IdempotencyConflict(_) => "idempotency_key",
        RuntimeError::Invalid(error) => return Status::invalid_argument(error.to_string()),
        RuntimeError::Overloaded(_)
        | RuntimeError::PrincipalOverloaded { .. }
        | RuntimeError::PayloadBudget { .. } => {
            return Status::resource_exhausted(error.to_string());
        }
        RuntimeError::ShuttingDown => return Status::unavailable(error.to_string()),
        RuntimeError::Log(_) => return Status::internal(error.to_string()),
    };
    Status::invalid_argument(format!("{field}: {error}"))
}

/// INVALID_ARGUMENT naming `transaction_id`, as every other bad field, with an
/// `ErrorInfo` detail (reason UNKNOWN_TRANSACTION, the id in its metadata) so that
/// clients can tell it from a malformed request without reading the text.
fn unknown_transaction(id: TxnId, error: &RuntimeError) -> Status {
    use treaty_proto::error_info::{DOMAIN, TRANSACTION_ID, UNKNOWN_TRANSACTION};
    Status::with_error_details(
        tonic::Code::InvalidArgument,
        format!("transaction_id: {error}"),
        ErrorDetails::with_error_info(
            UNKNOWN_TRANSACTION,
            DOMAIN,
            [(TRANSACTION_ID.to_string(), id.to_string())],
        ),
    )
}

/// A waiting SubmitSaga on a `Calls` stream that found every wait of its connection
/// taken: RESOURCE_EXHAUSTED with an `ErrorInfo` (reason STREAM_WAITS_TAKEN) by which
/// the SDK's client knows to send it unary. Nothing was submitted.
pub(super) fn stream_waits_taken() -> Status {
    use treaty_proto::error_info::{DOMAIN, STREAM_WAITS_TAKEN};
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        format!(
            "every one of this connection's {MAX_CONCURRENT_STREAMS} waits on Calls streams is taken: \
             submit unary to wait for the outcome"
        ),
        ErrorDetails::with_error_info(STREAM_WAITS_TAKEN, DOMAIN, []),
    )
}
