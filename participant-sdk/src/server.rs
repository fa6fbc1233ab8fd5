//! Serves a [`Participant`] over gRPC, through the barrier.
//!
//! This is the edge of the SDK: protobuf requests are checked and converted here (bad
//! input is INVALID_ARGUMENT naming the field, and reaches neither the barrier nor user
//! code), protocol outcomes go back as response fields, and only failures to answer
//! (user code errors, a failed store) become error statuses. Every answer is counted
//! here, by operation and result ([`crate::metrics`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_server::ParticipantServer;

use crate::barrier::{AbortAnswer, Barrier, BarrierError, BranchMode, CommitAnswer};
use crate::barrier_gc::{BarrierCollector, BarrierGcOptions};
use crate::barrier_store::BarrierStore;
use crate::connections::{ConnectionLimits, incoming};
use crate::durable::DurableStore;
use crate::in_doubt::{InDoubtOptions, InDoubtResolver};
use crate::limits::{FieldError, check_endpoint, check_id, check_payload};
use crate::metrics::{
    Operation, OperationResult, ParticipantMetrics, check_metrics_listen, serve_metrics,
};
use crate::participant::{BranchContext, Participant, Vote};
use crate::run_to_end::RunToEnd;
use crate::tls::ReloadableServerTls;
use crate::trace::TraceContext;
pub use crate::trust::CoordinatorTrust;

mod serving;
pub use serving::{
    MetricsListen, ServeError, ServeOptions, hangups, reflection_services, serve,
    serve_with_routes, shutdown_signal,
};

/// The tonic service for one participant. Mount it with [`ParticipantServer::new`] in a
/// server of your own, or let [`serve`] do everything.
#[derive(Debug)]
pub struct ParticipantService<P, S: BarrierStore = DurableStore> {
    participant: Arc<P>,
    barrier: Arc<Barrier<S>>,
    trust: Arc<CoordinatorTrust>,
    /// With it, the `Calls` stream is served: the server's stopping signal (streams read
    /// no further call once it is true) and the calls answered at once per connection,
    /// all its streams together.
    call_streams: Option<(tokio::sync::watch::Receiver<bool>, usize)>,
}

impl<P, S: BarrierStore> Clone for ParticipantService<P, S> {
    fn clone(&self) -> Self {
        Self {
            participant: self.participant.clone(),
            barrier: self.barrier.clone(),
            trust: self.trust.clone(),
            call_streams: self.call_streams.clone(),
        }
    }
}

impl<P: Participant, S: BarrierStore> ParticipantService<P, S> {
    /// A service that serves every caller (see [`with_trust`](Self::with_trust)).
    pub fn new(participant: Arc<P>, barrier: Arc<Barrier<S>>) -> Self {
        Self {
            participant,
            barrier,
            trust: Arc::new(CoordinatorTrust::default()),
            call_streams: None,
        }
    }

    /// Serves the `Calls` stream (docs/PARTICIPANT-PROTOCOL.md, section 15), at most
    /// `max_calls_in_flight` calls at once per connection, all its streams together. `stopping` must turn true when
    /// the server stops: each stream then reads no further call, answers those it has
    /// read, and ends, so that a graceful shutdown is not held up by a caller's
    /// long-lived stream. Without this the stream is answered UNIMPLEMENTED and callers
    /// make unary calls. [`serve`] sets it.
    pub fn with_call_streams(
        mut self,
        stopping: tokio::sync::watch::Receiver<bool>,
        max_calls_in_flight: usize,
    ) -> Self {
        self.call_streams = Some((stopping, max_calls_in_flight));
        self
    }

    /// Serves only the coordinators `trust` names.
    pub fn with_trust(mut self, trust: CoordinatorTrust) -> Self {
        self.trust = Arc::new(trust);
        self
    }

    /// Runs a barrier operation for `branch` to completion (see [`run_to_completion`])
    /// and turns its failure into a status.
    async fn run<T, F, Fut>(&self, branch: &BranchContext, operation: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(Arc<P>, Arc<Barrier<S>>, BranchContext) -> Fut,
        Fut: std::future::Future<Output = Result<T, BarrierError>> + Send + 'static,
    {
        let started = self.barrier.unfinished.start();
        let operation = operation(
            self.participant.clone(),
            self.barrier.clone(),
            branch.clone(),
        );
        let operation = async move {
            let _started = started;
            operation.await
        };
        run_to_completion(branch, operation)
            .await
            .map_err(|e| barrier_error(branch, e))
    }
}

fn field_error(error: FieldError) -> Status {
    Status::invalid_argument(error.to_string())
}

/// The branch a request is for, with the trace context its metadata carries (an invalid
/// or missing `traceparent` is simply none: tracing never fails a call).
fn branch_context(
    trace: Option<TraceContext>,
    transaction_id: &str,
    branch_id: &str,
) -> Result<BranchContext, Status> {
    check_id("transaction_id", transaction_id).map_err(field_error)?;
    check_id("branch_id", branch_id).map_err(field_error)?;
    Ok(BranchContext::new(transaction_id.to_string(), branch_id.to_string()).with_trace(trace))
}

fn coordinator_endpoint(endpoint: &str) -> Result<(), Status> {
    if endpoint.is_empty() {
        return Ok(());
    }
    check_endpoint("coordinator_endpoint", endpoint).map_err(field_error)
}

fn barrier_error(branch: &BranchContext, error: BarrierError) -> Status {
    match &error {
        BarrierError::Participant(e) => {
            tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, error = %e, "participant code failed");
            Status::unavailable(error.to_string())
        }
        BarrierError::Busy(_) => {
            tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, error = %error, "call refused: too many wait for this branch");
            Status::unavailable(error.to_string())
        }
        BarrierError::PastRetention { .. } => {
            tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, error = %error, "call past the barrier retention refused");
            Status::failed_precondition(error.to_string())
        }
        BarrierError::Store(_) | BarrierError::Corrupt { .. } => {
            tracing::error!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, error = %error, "barrier failed");
            Status::internal(error.to_string())
        }
    }
}

/// Runs a barrier operation to its end even when the caller gives up and the request is
/// dropped ([`RunToEnd`]): user code is never cancelled half-way. A panic in user code is
/// answered as the participant's failure.
async fn run_to_completion<T: Send + 'static>(
    branch: &BranchContext,
    operation: impl std::future::Future<Output = Result<T, BarrierError>> + Send + 'static,
) -> Result<T, BarrierError> {
    let span = tracing::info_span!(
        "branch",
        txn_id = %branch.transaction_id,
        branch_id = %branch.branch_id,
        trace_id = tracing::field::Empty,
    );
    if let Some(parent) = branch.traceparent().filter(|_| !span.is_disabled()) {
        span.record("trace_id", tracing::field::display(parent.trace_id_hex()));
    }
    match RunToEnd::new(tracing::Instrument::instrument(operation, span)).await {
        Ok(result) => result,
        Err(panic) => Err(BarrierError::Participant(crate::ParticipantError::new(
            format!("participant code panicked: {panic}"),
        ))),
    }
}

/// The result label of a call that ended in `status`.
fn status_result(status: &Status) -> OperationResult {
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied => OperationResult::refused,
        _ => OperationResult::error,
    }
}

/// One call to `operation`, counted once when it ends: by the answer it gave, or as
/// `cancelled` when it is dropped before answering (the caller cancelled, its deadline
/// passed or its connection went). The barrier operation behind a dropped call runs on
/// to completion (`run_to_completion`); only its answer has nobody to go to.
struct CountedCall<'a> {
    metrics: &'a ParticipantMetrics,
    operation: Operation,
    started: Instant,
    answered: bool,
}

impl<'a> CountedCall<'a> {
    fn start(metrics: &'a ParticipantMetrics, operation: Operation) -> Self {
        Self {
            metrics,
            operation,
            started: Instant::now(),
            answered: false,
        }
    }

    /// The call ended with `answer`, whose protocol result `result_of` reads.
    fn answered<T>(
        mut self,
        answer: &Result<Response<T>, Status>,
        result_of: impl FnOnce(&T) -> OperationResult,
    ) {
        let result = match answer {
            Ok(response) => result_of(response.get_ref()),
            Err(status) => status_result(status),
        };
        self.metrics
            .operation(self.operation, result, self.started.elapsed());
        self.answered = true;
    }
}

impl Drop for CountedCall<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.metrics.operation(
                self.operation,
                OperationResult::cancelled,
                self.started.elapsed(),
            );
        }
    }
}

fn vote_result(response: &pb::PrepareBranchResponse) -> OperationResult {
    match pb::Vote::try_from(response.vote) {
        Ok(pb::Vote::Yes) => OperationResult::yes,
        Ok(pb::Vote::ReadOnly) => OperationResult::read_only,
        _ => OperationResult::no,
    }
}

fn commit_result(response: &pb::CommitBranchResponse) -> OperationResult {
    match pb::CommitResult::try_from(response.result) {
        Ok(pb::CommitResult::Committed) => OperationResult::committed,
        Ok(pb::CommitResult::Rejected) => OperationResult::rejected,
        Ok(pb::CommitResult::NotPrepared) => OperationResult::not_prepared,
        _ => OperationResult::already_aborted,
    }
}

fn abort_result(response: &pb::AbortBranchResponse) -> OperationResult {
    match pb::AbortResult::try_from(response.result) {
        Ok(pb::AbortResult::AlreadyCommitted) => OperationResult::already_committed,
        _ => OperationResult::aborted,
    }
}

/// The operation label of a commit in `mode` (an invalid mode counts as a commit).
fn commit_operation(mode: i32) -> Operation {
    match pb::CommitMode::try_from(mode) {
        Ok(pb::CommitMode::OnePhase) => Operation::one_phase_commit,
        Ok(pb::CommitMode::SagaStep) => Operation::saga_step,
        _ => Operation::commit,
    }
}

#[tonic::async_trait]
impl<P: Participant, S: BarrierStore> pb::participant_server::Participant
    for ParticipantService<P, S>
{
    async fn prepare(
        &self,
        request: Request<pb::PrepareBranchRequest>,
    ) -> Result<Response<pb::PrepareBranchResponse>, Status> {
        let call = CountedCall::start(self.metrics(), Operation::prepare);
        let answer = self.answer_prepare(request).await;
        call.answered(&answer, vote_result);
        answer
    }

    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        let call = CountedCall::start(self.metrics(), commit_operation(request.get_ref().mode));
        let answer = self.answer_commit(request).await;
        call.answered(&answer, commit_result);
        answer
    }

    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        let call = CountedCall::start(self.metrics(), Operation::abort);
        let answer = self.answer_abort(request).await;
        call.answered(&answer, abort_result);
        answer
    }

    async fn compensate(
        &self,
        request: Request<pb::CompensateBranchRequest>,
    ) -> Result<Response<pb::CompensateBranchResponse>, Status> {
        let call = CountedCall::start(self.metrics(), Operation::compensate);
        let answer = self.answer_compensate(request).await;
        call.answered(&answer, |_| OperationResult::compensated);
        answer
    }

    type CallsStream = crate::call_stream::CallAnswers;

    async fn calls(
        &self,
        request: Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        let Some((stopping, max_in_flight)) = self.call_streams.clone() else {
            return Err(Status::unimplemented(
                "this participant serves unary calls only",
            ));
        };
        self.trust.check(&request)?;
        Ok(crate::call_stream::serve(
            self.clone(),
            request,
            stopping,
            max_in_flight,
        ))
    }
}

/// The calls, answered through the barrier (counted by the trait methods above).
impl<P: Participant, S: BarrierStore> ParticipantService<P, S> {
    fn metrics(&self) -> &ParticipantMetrics {
        self.barrier.metrics()
    }

    async fn answer_prepare(
        &self,
        request: Request<pb::PrepareBranchRequest>,
    ) -> Result<Response<pb::PrepareBranchResponse>, Status> {
        self.trust.check(&request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        let branch = branch_context(trace, &request.transaction_id, &request.branch_id)?;
        check_payload("payload", &request.payload).map_err(field_error)?;
        coordinator_endpoint(&request.coordinator_endpoint)?;
        self.trust.check_endpoint(&request.coordinator_endpoint)?;
        let vote = self
            .run(&branch, move |participant, barrier, ctx| async move {
                barrier
                    .prepare(
                        participant.as_ref(),
                        &ctx,
                        &request.payload,
                        &request.coordinator_endpoint,
                    )
                    .await
            })
            .await?;
        tracing::debug!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?vote, "prepared");
        let (vote, reason) = match vote {
            Vote::Yes => (pb::Vote::Yes, String::new()),
            Vote::No { reason } => (pb::Vote::No, reason),
            Vote::ReadOnly => (pb::Vote::ReadOnly, String::new()),
        };
        Ok(Response::new(pb::PrepareBranchResponse {
            vote: vote as i32,
            reason,
        }))
    }

    async fn answer_commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        self.trust.check(&request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        let branch = branch_context(trace, &request.transaction_id, &request.branch_id)?;
        let mode = match pb::CommitMode::try_from(request.mode) {
            Ok(pb::CommitMode::TwoPhase) => BranchMode::TwoPhase,
            Ok(pb::CommitMode::OnePhase) => BranchMode::OnePhase,
            Ok(pb::CommitMode::SagaStep) => BranchMode::SagaStep,
            _ => {
                return Err(Status::invalid_argument(format!(
                    "mode: {} is not a commit mode",
                    request.mode
                )));
            }
        };
        check_payload("payload", &request.payload).map_err(field_error)?;
        coordinator_endpoint(&request.coordinator_endpoint)?;
        self.trust.check_endpoint(&request.coordinator_endpoint)?;
        let answer = self
            .run(&branch, move |participant, barrier, ctx| async move {
                barrier
                    .commit(
                        participant.as_ref(),
                        &ctx,
                        mode,
                        &request.payload,
                        &request.coordinator_endpoint,
                    )
                    .await
            })
            .await?;
        tracing::debug!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?mode, ?answer, "commit");
        let (result, reason) = match answer {
            CommitAnswer::Committed => (pb::CommitResult::Committed, String::new()),
            CommitAnswer::Rejected { reason } => (pb::CommitResult::Rejected, reason),
            CommitAnswer::NotPrepared => (pb::CommitResult::NotPrepared, String::new()),
            CommitAnswer::AlreadyAborted => (pb::CommitResult::AlreadyAborted, String::new()),
        };
        Ok(Response::new(pb::CommitBranchResponse {
            result: result as i32,
            reason,
        }))
    }

    async fn answer_abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        self.trust.check(&request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        let branch = branch_context(trace, &request.transaction_id, &request.branch_id)?;
        let answer = self
            .run(&branch, move |participant, barrier, ctx| async move {
                barrier.abort(participant.as_ref(), &ctx).await
            })
            .await?;
        tracing::debug!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?answer, "abort");
        let result = match answer {
            AbortAnswer::Aborted => pb::AbortResult::Aborted,
            AbortAnswer::AlreadyCommitted => pb::AbortResult::AlreadyCommitted,
        };
        Ok(Response::new(pb::AbortBranchResponse {
            result: result as i32,
        }))
    }

    async fn answer_compensate(
        &self,
        request: Request<pb::CompensateBranchRequest>,
    ) -> Result<Response<pb::CompensateBranchResponse>, Status> {
        self.trust.check(&request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        let branch = branch_context(trace, &request.transaction_id, &request.branch_id)?;
        check_payload("payload", &request.payload).map_err(field_error)?;
        self.run(&branch, move |participant, barrier, ctx| async move {
            barrier
                .compensate(participant.as_ref(), &ctx, &request.payload)
                .await
        })
        .await?;
        Ok(Response::new(pb::CompensateBranchResponse {
            result: pb::CompensateResult::Compensated as i32,
        }))
    }
}
