//! SubmitSaga's checks, submit and answer, shared by its unary call and the `Calls`
//! stream, and how the stream answers each of its calls through the unary handler of
//! its kind.

use super::*;

impl CoordinatorService {
    /// A SubmitSaga's checks and the runtime's submit (its definition durable, or the
    /// saga its idempotency key names found).
    pub(super) async fn submit(
        &self,
        request: Request<proto::SubmitSagaRequest>,
    ) -> Result<Submitted, Status> {
        let params = self.checked_saga(request)?;
        self.runtime.submit_saga(params).await.map_err(status_of)
    }

    /// A SubmitSaga checked (credentials, every field) and made into the runtime's
    /// parameters; nothing is changed.
    fn checked_saga(
        &self,
        request: Request<proto::SubmitSagaRequest>,
    ) -> Result<SagaParams, Status> {
        let principal = self.auth.authenticate(&request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        self.check_scheme(request.steps.iter().enumerate().map(|(i, s)| {
            (
                pb::ItemField::new("steps", i, "endpoint"),
                s.endpoint.as_str(),
            )
        }))?;
        let has_key = !request.idempotency_key.is_empty();
        // A retry with the same key after the deadline passed must still find the saga
        // it submitted: the runtime answers that one, and refuses only a new saga.
        let (deadline_unix_ms, refused_if_new) = match request.deadline_unix_ms {
            0 => (None, None),
            requested => match self.deadline(requested) {
                Ok(deadline) => (Some(deadline), None),
                Err(error) if has_key && requested <= now_unix_ms() => (None, Some(error)),
                Err(error) => return Err(invalid(error)),
            },
        };
        let mut params =
            saga::saga_params(request, &self.config.saga, &self.config.endpoint_policy)
                .map_err(invalid)?;
        params.owner = owner_of(&principal);
        params.trace = trace;
        params.deadline_unix_ms = deadline_unix_ms;
        params.refused_if_new = refused_if_new;
        params.idempotency_key = params
            .idempotency_key
            .map(|key| scoped_key(params.owner.as_deref(), key));
        Ok(params)
    }

    /// The answer to a submit: at once, or once the saga is final.
    pub(super) async fn answer_submit(
        &self,
        mut submitted: Submitted,
        wait_for_outcome: bool,
    ) -> Result<Response<proto::SubmitSagaResponse>, Status> {
        if wait_for_outcome {
            let mut stopping = self.stopping.clone();
            tokio::select! {
                finished = submitted.updates.wait_for(|record| record.state.is_final()) => {
                    finished.map_err(|_| status_of(RuntimeError::ShuttingDown))?;
                }
                _ = stopping.wait_for(|stopping| *stopping) => {
                    return Err(status_of(RuntimeError::ShuttingDown));
                }
            }
        }
        let record = submitted.updates.borrow().clone();
        Ok(Response::new(proto::SubmitSagaResponse {
            transaction_id: submitted.id.to_string(),
            created: submitted.created,
            transaction: Some(pb::transaction_to_pb(&record)),
        }))
    }

    /// What one call of a `Calls` stream gives: its unary method's response, or its
    /// status.
    pub(super) async fn answer_call(
        &self,
        stream: &StreamContext,
        call: proto::TransactionCall,
        place: &CallPlace,
    ) -> Result<proto::transaction_answer::Answer, Status> {
        use proto::coordinator_server::Coordinator;
        use proto::transaction_answer::Answer;
        use proto::transaction_call::Call;
        let (traceparent, tracestate) = (call.traceparent.as_str(), call.tracestate.as_str());
        match call.call {
            Some(Call::Begin(message)) => self
                .begin(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Begin(r.into_inner())),
            Some(Call::Enlist(message)) => self
                .enlist(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Enlist(r.into_inner())),
            Some(Call::Commit(message)) => self
                .commit(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Commit(r.into_inner())),
            Some(Call::Abort(message)) => self
                .abort(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::Abort(r.into_inner())),
            // A wait for the saga's outcome may be as long as its retries: it waits
            // without a place once the saga is durable, so that the places stay with
            // calls whose work ends on its own and the stream reads on (a withdrawal of
            // this wait among what it reads).
            Some(Call::SubmitSaga(message)) if message.wait_for_outcome => {
                let params = self.checked_saga(stream.request(traceparent, tracestate, message))?;
                if !place.take_wait() {
                    return Err(stream_waits_taken());
                }
                let submitted = self.runtime.submit_saga(params).await.map_err(status_of)?;
                place.wait_without_place();
                self.answer_submit(submitted, true)
                    .await
                    .map(|r| Answer::SubmitSaga(r.into_inner()))
            }
            Some(Call::SubmitSaga(message)) => self
                .submit_saga(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::SubmitSaga(r.into_inner())),
            Some(Call::CancelSaga(message)) => self
                .cancel_saga(stream.request(traceparent, tracestate, message))
                .await
                .map(|r| Answer::CancelSaga(r.into_inner())),
            // The stream's reader takes withdrawals itself: none is answered.
            Some(Call::Withdraw(_)) => Err(Status::internal(
                "a withdrawal was answered as a call (the stream's reader takes them)",
            )),
            None => Err(Status::invalid_argument(
                "call: one of begin, enlist, commit, abort, submit_saga or cancel_saga is required",
            )),
        }
    }
}
