//! The Admin gRPC service: operator verbs (retry now, pause, resume, cancel, resolve,
//! forget) on one transaction each, and the participant endpoints' health.
//!
//! Invariants: only admin principals get past the first line of every call (others are
//! PERMISSION_DENIED, unauthenticated callers UNAUTHENTICATED) and nothing changes for
//! them; every request is checked completely before the runtime sees it; a verb that
//! does not apply is `applied: false` with the reason, and changed nothing; every verb
//! carried out is in the transaction's history with who asked and why.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use treaty_proto::v1 as proto;
use treaty_sdk::auth::Principal;
use treaty_sdk::limits::{check_id, check_reason};

use super::auth::Authenticator;
use super::{invalid, pb, status_of};
use crate::engine::twopc::{OperatorCommand, OperatorRequest, Refusal};
use crate::model::TxnId;
use crate::participants::Transport;
use crate::participants::circuit::CircuitState;
use crate::runtime::{Runtime, RuntimeError};

#[derive(Debug, Clone)]
pub struct AdminService {
    runtime: Runtime,
    auth: Arc<Authenticator>,
}

impl AdminService {
    /// Shares the Coordinator service's authenticator (same tokens, same reloads).
    pub fn new(runtime: Runtime, auth: Arc<Authenticator>) -> Self {
        Self { runtime, auth }
    }

    /// The caller, if an admin.
    fn admin<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let principal = self.auth.authenticate(request)?;
        if !principal.admin {
            return Err(Status::permission_denied(
                "operator verbs are for admin principals",
            ));
        }
        Ok(principal)
    }

    /// Runs `command` on the transaction the request names.
    async fn operate(
        &self,
        request: Request<proto::OperatorRequest>,
        command: OperatorCommand,
    ) -> Result<Response<proto::OperatorResponse>, Status> {
        let principal = self.admin(&request)?;
        let request = request.into_inner();
        let id = pb::parse_txn_id("transaction_id", &request.transaction_id).map_err(invalid)?;
        check_reason("reason", &request.reason).map_err(invalid)?;
        let request = OperatorRequest {
            command,
            by: principal.name,
            reason: request.reason,
        };
        answer(self.runtime.operate(id, request).await)
    }
}

/// The response to a verb: applied with the transaction as it is now, or not applied
/// (a refusal of the protocol) with why; other errors are statuses.
fn answer(
    result: Result<crate::model::TxnRecord, RuntimeError>,
) -> Result<Response<proto::OperatorResponse>, Status> {
    let response = match result {
        Ok(record) => proto::OperatorResponse {
            applied: true,
            detail: String::new(),
            transaction: Some(pb::transaction_to_pb(&record)),
        },
        // A branch the transaction does not have is a bad argument, not a refusal.
        Err(error @ RuntimeError::Refused(Refusal::UnknownBranch(_))) => {
            return Err(status_of(error));
        }
        Err(RuntimeError::Refused(refusal)) => proto::OperatorResponse {
            applied: false,
            detail: refusal.to_string(),
            transaction: None,
        },
        Err(error) => return Err(status_of(error)),
    };
    Ok(Response::new(response))
}

fn parse_id(text: &str) -> Result<TxnId, Status> {
    pb::parse_txn_id("transaction_id", text).map_err(invalid)
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    async fn retry_now(
        &self,
        request: Request<proto::OperatorRequest>,
    ) -> Result<Response<proto::OperatorResponse>, Status> {
        self.operate(request, OperatorCommand::RetryNow).await
    }

    async fn pause(
        &self,
        request: Request<proto::OperatorRequest>,
    ) -> Result<Response<proto::OperatorResponse>, Status> {
        self.operate(request, OperatorCommand::Pause).await
    }

    async fn resume(
        &self,
        request: Request<proto::OperatorRequest>,
    ) -> Result<Response<proto::OperatorResponse>, Status> {
        self.operate(request, OperatorCommand::Resume).await
    }

    async fn cancel(
        &self,
        request: Request<proto::OperatorRequest>,
    ) -> Result<Response<proto::OperatorResponse>, Status> {
        self.operate(request, OperatorCommand::Cancel).await
    }

    async fn resolve(
        &self,
        request: Request<proto::ResolveRequest>,
    ) -> Result<Response<proto::OperatorResponse>, Status> {
        let principal = self.admin(&request)?;
        let request = request.into_inner();
        let id = parse_id(&request.transaction_id)?;
        check_id("branch_id", &request.branch_id).map_err(invalid)?;
        let outcome = pb::resolution_from_pb("outcome", request.outcome).map_err(invalid)?;
        check_reason("reason", &request.reason).map_err(invalid)?;
        let request = OperatorRequest {
            command: OperatorCommand::Resolve {
                branch_id: request.branch_id,
                outcome,
            },
            by: principal.name,
            reason: request.reason,
        };
        answer(self.runtime.operate(id, request).await)
    }

    async fn forget(
        &self,
        request: Request<proto::OperatorRequest>,
    ) -> Result<Response<proto::OperatorResponse>, Status> {
        let principal = self.admin(&request)?;
        let request = request.into_inner();
        let id = parse_id(&request.transaction_id)?;
        check_reason("reason", &request.reason).map_err(invalid)?;
        let result = self.runtime.forget(id).await;
        if result.is_ok() {
            tracing::info!(txn_id = %id, by = %principal.name, reason = %request.reason, "transaction forgotten");
        }
        answer(result)
    }

    async fn list_endpoints(
        &self,
        request: Request<proto::ListEndpointsRequest>,
    ) -> Result<Response<proto::ListEndpointsResponse>, Status> {
        self.admin(&request)?;
        let endpoints = self
            .runtime
            .endpoints()
            .into_iter()
            .map(|status| {
                let circuit = match status.circuit {
                    CircuitState::Closed => proto::CircuitState::Closed,
                    CircuitState::HalfOpen => proto::CircuitState::HalfOpen,
                    CircuitState::Open => proto::CircuitState::Open,
                };
                let (last_failure_unix_ms, last_failure) =
                    status.recent.last_failure.unwrap_or_default();
                let transport = match status.transport {
                    Transport::Stream => proto::CallTransport::Stream,
                    Transport::Unary => proto::CallTransport::Unary,
                    Transport::NoStreamOpen => proto::CallTransport::NoStreamOpen,
                };
                proto::EndpointHealth {
                    endpoint: status.endpoint,
                    circuit: circuit as i32,
                    calls_in_flight: u32::try_from(status.calls_in_flight).unwrap_or(u32::MAX),
                    failures_in_a_row: status.failures_in_a_row,
                    recent_calls: status.recent.calls,
                    recent_failures: status.recent.failures,
                    last_failure,
                    last_failure_unix_ms,
                    transport: transport as i32,
                }
            })
            .collect();
        Ok(Response::new(proto::ListEndpointsResponse { endpoints }))
    }
}
