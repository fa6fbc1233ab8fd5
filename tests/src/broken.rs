//! Deliberately broken participants, each bypassing the SDK's barrier in one way, to show
//! that `treaty tck` catches what the protocol forbids (tests/tests/tck.rs). Never a
//! model: every one of them loses or duplicates work.
//!
//! - [`NoBarrier`]: runs user code on every call, with no record and no deduplication
//!   (duplicates run twice, a late Prepare after an Abort runs, a Commit with no YES
//!   commits).
//! - [`VolatileYes`]: the SDK's barrier, but its store keeps YES votes (the writes that
//!   mark a branch in doubt) in memory only: a restart forgets them.
//! - [`NoAntiHanging`]: the SDK's barrier, except that a Prepare for a branch already
//!   aborted or compensated runs user code and votes YES.
//! - [`give_up_in_doubt`]: beside the SDK's own service, a task that aborts a branch in
//!   doubt that names a coordinator a second after its YES, whatever the coordinator
//!   says ([`GiveUp::AfterASecond`]: a participant that took a timeout for an abort), or
//!   as soon as `GetOutcome` fails ([`GiveUp::OnError`]: one that took a coordinator it
//!   cannot reach for one that aborted).
//! - [`OddParticipant`] with [`Oddity::StreamInOrder`]: the SDK's unary calls, and a
//!   `Calls` stream that runs its calls one at a time in the order they came and knows no
//!   withdrawals (it answers them INVALID_ARGUMENT, as a request without a call).
//! - [`OddParticipant`] with [`Oddity::UserFailureAs`] FAILED_PRECONDITION: user code
//!   that failed is answered as a refusal for good, which the coordinator never retries.
//!
//! And two that are not broken, though they look odd, which the kit must pass: the SDK's
//! participant whose `Calls` stream sends its response headers only with its first answer,
//! as grpc-go and grpc-java servers do ([`Oddity::LateStreamHeaders`]), and one that
//! answers user code that failed UNKNOWN, as a gRPC server does for an exception its
//! handler let through (`Oddity::UserFailureAs` UNKNOWN).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_sdk::barrier::{Barrier, BranchStatus};
use treaty_sdk::barrier_store::{BarrierStore, BarrierWrite, BranchKey};
use treaty_sdk::durable::{DurableStore, StoreError};
use treaty_sdk::limits::check_id;
use treaty_sdk::{BranchContext, Participant, ParticipantService, Vote};

use crate::conformance::ConformanceParticipant;

fn branch(transaction_id: &str, branch_id: &str) -> Result<BranchContext, Status> {
    for (field, value) in [("transaction_id", transaction_id), ("branch_id", branch_id)] {
        check_id(field, value).map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    Ok(BranchContext::new(transaction_id, branch_id))
}

fn unavailable(error: treaty_sdk::ParticipantError) -> Status {
    Status::unavailable(error.to_string())
}

/// Runs user code on every call: no barrier at all. Keeps prepare payloads in memory
/// only so that commit and abort get them.
#[derive(Debug)]
pub struct NoBarrier {
    user: Arc<ConformanceParticipant>,
    prepared_payloads: Mutex<HashMap<(String, String), Vec<u8>>>,
}

impl NoBarrier {
    pub fn new(user: Arc<ConformanceParticipant>) -> Self {
        Self {
            user,
            prepared_payloads: Mutex::default(),
        }
    }

    fn prepared_payload(&self, branch: &BranchContext) -> Vec<u8> {
        self.prepared_payloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(branch.transaction_id.clone(), branch.branch_id.clone()))
            .cloned()
            .unwrap_or_default()
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for NoBarrier {
    async fn prepare(
        &self,
        request: Request<pb::PrepareBranchRequest>,
    ) -> Result<Response<pb::PrepareBranchResponse>, Status> {
        let request = request.into_inner();
        let branch = branch(&request.transaction_id, &request.branch_id)?;
        self.prepared_payloads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                (branch.transaction_id.clone(), branch.branch_id.clone()),
                request.payload.clone(),
            );
        let vote = self
            .user
            .prepare(&branch, &request.payload)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(vote_response(vote)))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        let request = request.into_inner();
        let branch = branch(&request.transaction_id, &request.branch_id)?;
        let payload = if request.mode == pb::CommitMode::TwoPhase as i32 {
            self.prepared_payload(&branch)
        } else {
            match self
                .user
                .prepare(&branch, &request.payload)
                .await
                .map_err(unavailable)?
            {
                Vote::Yes => request.payload,
                Vote::ReadOnly => {
                    return Ok(Response::new(commit_response(pb::CommitResult::Committed)));
                }
                Vote::No { reason } => {
                    return Ok(Response::new(pb::CommitBranchResponse {
                        result: pb::CommitResult::Rejected as i32,
                        reason,
                    }));
                }
            }
        };
        self.user
            .commit(&branch, &payload)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(commit_response(pb::CommitResult::Committed)))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        let request = request.into_inner();
        let branch = branch(&request.transaction_id, &request.branch_id)?;
        let payload = self.prepared_payload(&branch);
        self.user
            .abort(&branch, &payload)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(pb::AbortBranchResponse {
            result: pb::AbortResult::Aborted as i32,
        }))
    }

    async fn compensate(
        &self,
        request: Request<pb::CompensateBranchRequest>,
    ) -> Result<Response<pb::CompensateBranchResponse>, Status> {
        let request = request.into_inner();
        let branch = branch(&request.transaction_id, &request.branch_id)?;
        self.user
            .compensate(&branch, &request.payload)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(pb::CompensateBranchResponse {
            result: pb::CompensateResult::Compensated as i32,
        }))
    }

    type CallsStream = treaty_sdk::call_stream::CallAnswers;

    /// Unary calls only, as a participant written from the proto alone may be.
    async fn calls(
        &self,
        _request: Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        Err(Status::unimplemented("NoBarrier serves unary calls only"))
    }
}

fn vote_response(vote: Vote) -> pb::PrepareBranchResponse {
    let (vote, reason) = match vote {
        Vote::Yes => (pb::Vote::Yes, String::new()),
        Vote::No { reason } => (pb::Vote::No, reason),
        Vote::ReadOnly => (pb::Vote::ReadOnly, String::new()),
    };
    pb::PrepareBranchResponse {
        vote: vote as i32,
        reason,
    }
}

fn commit_response(result: pb::CommitResult) -> pb::CommitBranchResponse {
    pb::CommitBranchResponse {
        result: result as i32,
        reason: String::new(),
    }
}

/// The SDK's store, except that a write marking a branch in doubt (a YES vote) stays in
/// memory: `load` sees it, the disk never does.
#[derive(Debug)]
pub struct VolatileYes {
    inner: Arc<DurableStore>,
    yes_votes: Mutex<HashMap<BranchKey, Vec<u8>>>,
}

impl VolatileYes {
    pub fn new(inner: Arc<DurableStore>) -> Self {
        Self {
            inner,
            yes_votes: Mutex::default(),
        }
    }

    fn votes(&self) -> std::sync::MutexGuard<'_, HashMap<BranchKey, Vec<u8>>> {
        self.yes_votes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BarrierStore for VolatileYes {
    fn load(&self, key: &BranchKey) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(record) = self.votes().get(key) {
            return Ok(Some(record.clone()));
        }
        BarrierStore::load(self.inner.as_ref(), key)
    }

    fn save(&self, write: BarrierWrite) -> impl Future<Output = Result<(), StoreError>> + Send {
        let durable = if write.in_doubt {
            self.votes().insert(write.key, write.record);
            None
        } else {
            self.votes().remove(&write.key);
            Some(BarrierStore::save(self.inner.as_ref(), write))
        };
        async move {
            match durable {
                Some(save) => save.await,
                None => Ok(()),
            }
        }
    }

    fn in_doubt(
        &self,
        after: Option<&BranchKey>,
        limit: usize,
    ) -> Result<Vec<BranchKey>, StoreError> {
        BarrierStore::in_doubt(self.inner.as_ref(), after, limit)
    }

    fn records_before(
        &self,
        after: Option<&BranchKey>,
        before_transaction_id: &str,
        limit: usize,
    ) -> Result<Vec<(BranchKey, Vec<u8>)>, StoreError> {
        BarrierStore::records_before(self.inner.as_ref(), after, before_transaction_id, limit)
    }

    fn remove(&self, keys: Vec<BranchKey>) -> impl Future<Output = Result<(), StoreError>> + Send {
        BarrierStore::remove(self.inner.as_ref(), keys)
    }

    fn failure(&self) -> Option<String> {
        BarrierStore::failure(self.inner.as_ref())
    }

    fn close(&self) -> Result<(), StoreError> {
        BarrierStore::close(self.inner.as_ref())
    }

    fn describe(&self) -> String {
        format!(
            "{} (YES votes in memory only: broken)",
            BarrierStore::describe(self.inner.as_ref())
        )
    }
}

/// The SDK's service, except for a Prepare of a branch whose record says aborted or
/// compensated: that one runs user code and answers its vote.
#[derive(Debug)]
pub struct NoAntiHanging {
    inner: ParticipantService<ConformanceParticipant>,
    barrier: Arc<Barrier>,
    user: Arc<ConformanceParticipant>,
}

impl NoAntiHanging {
    pub fn new(user: Arc<ConformanceParticipant>, barrier: Arc<Barrier>) -> Self {
        Self {
            inner: ParticipantService::new(user.clone(), barrier.clone()),
            barrier,
            user,
        }
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for NoAntiHanging {
    async fn prepare(
        &self,
        request: Request<pb::PrepareBranchRequest>,
    ) -> Result<Response<pb::PrepareBranchResponse>, Status> {
        let message = request.get_ref();
        let branch = branch(&message.transaction_id, &message.branch_id)?;
        let record = self
            .barrier
            .record(&branch)
            .map_err(|e| Status::internal(e.to_string()))?;
        let ended = record.is_some_and(|r| {
            matches!(
                r.status,
                BranchStatus::Aborted { .. } | BranchStatus::Compensated { .. }
            )
        });
        if !ended {
            return self.inner.prepare(request).await;
        }
        let vote = self
            .user
            .prepare(&branch, &message.payload)
            .await
            .map_err(unavailable)?;
        Ok(Response::new(vote_response(vote)))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        self.inner.commit(request).await
    }

    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        self.inner.abort(request).await
    }

    async fn compensate(
        &self,
        request: Request<pb::CompensateBranchRequest>,
    ) -> Result<Response<pb::CompensateBranchResponse>, Status> {
        self.inner.compensate(request).await
    }

    type CallsStream = treaty_sdk::call_stream::CallAnswers;

    /// Unary calls only: a stream would go through `inner`'s prepare, not this one's.
    async fn calls(
        &self,
        _request: Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        Err(Status::unimplemented(
            "NoAntiHanging serves unary calls only",
        ))
    }
}

/// When [`give_up_in_doubt`] aborts a branch in doubt on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// A second after its YES, whatever the coordinator says.
    AfterASecond,
    /// As soon as `GetOutcome` fails (it asks every quarter second): a coordinator that
    /// cannot answer taken for one that decided to abort. PENDING and decisions are left
    /// to the SDK's own in-doubt resolution.
    OnError,
}

/// Aborts, through its own barrier on `store`, the branches in doubt there that name a
/// coordinator, when `rule` says, looking every quarter second for as long as the
/// process lives: the rule "a participant that voted YES never aborts on its own"
/// broken. Branches that name no coordinator are left alone: the kit's other cases
/// leave theirs prepared as long as they like.
pub fn give_up_in_doubt(user: Arc<ConformanceParticipant>, store: Arc<DurableStore>, rule: GiveUp) {
    const GIVE_UP_AFTER_MS: u64 = 1_000;
    let barrier = Barrier::new(store);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            ticks.tick().await;
            let now_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64);
            let in_doubt = match barrier.in_doubt(256) {
                Ok(in_doubt) => in_doubt,
                Err(error) => {
                    tracing::warn!(%error, "listing the branches in doubt");
                    continue;
                }
            };
            for branch in in_doubt {
                if branch.coordinator_endpoint.is_empty() {
                    continue;
                }
                let give_up = match rule {
                    GiveUp::AfterASecond => {
                        now_unix_ms.saturating_sub(branch.prepared_unix_ms) >= GIVE_UP_AFTER_MS
                    }
                    GiveUp::OnError => outcome_fails(&branch).await,
                };
                if !give_up {
                    continue;
                }
                if let Err(error) = barrier.abort(user.as_ref(), &branch.branch).await {
                    tracing::warn!(%error, "giving up a branch in doubt");
                }
            }
        }
    });
}

/// Whether asking the branch's coordinator `GetOutcome` fails.
async fn outcome_fails(branch: &treaty_sdk::barrier::InDoubtBranch) -> bool {
    use pb::coordinator_client::CoordinatorClient;
    let Ok(mut coordinator) = CoordinatorClient::connect(branch.coordinator_endpoint.clone()).await
    else {
        return true;
    };
    let request = pb::GetOutcomeRequest {
        transaction_id: branch.branch.transaction_id.clone(),
        branch_id: branch.branch.branch_id.clone(),
    };
    coordinator.get_outcome(request).await.is_err()
}

/// What an [`OddParticipant`] does otherwise than the SDK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oddity {
    /// Broken: the `Calls` stream answers each call before it reads the next, and takes
    /// a withdrawal for a request without a known call (INVALID_ARGUMENT).
    StreamInOrder,
    /// Correct: the SDK's stream, whose start (the response headers) is answered only
    /// together with its first answer, as a gRPC server may.
    LateStreamHeaders,
    /// A unary call the SDK answers UNAVAILABLE (user code that failed) is answered with
    /// this code instead: UNKNOWN is what a gRPC server answers for an exception its
    /// handler let through (correct), FAILED_PRECONDITION a refusal for good (broken).
    UserFailureAs(tonic::Code),
}

/// The SDK's service, serving as `oddity` says.
#[derive(Debug)]
pub struct OddParticipant {
    inner: Arc<ParticipantService<ConformanceParticipant>>,
    oddity: Oddity,
}

impl OddParticipant {
    /// `stopping` turns true when the server stops (see
    /// `ParticipantService::with_call_streams`).
    pub fn new(
        user: Arc<ConformanceParticipant>,
        barrier: Arc<Barrier>,
        stopping: tokio::sync::watch::Receiver<bool>,
        oddity: Oddity,
    ) -> Self {
        Self {
            inner: Arc::new(
                ParticipantService::new(user, barrier)
                    .with_call_streams(stopping, ODD_STREAM_MAX_CALLS),
            ),
            oddity,
        }
    }

    /// A unary call's error status, as this participant answers it.
    fn odd(&self, status: Status) -> Status {
        match self.oddity {
            Oddity::UserFailureAs(code) if status.code() == tonic::Code::Unavailable => {
                Status::new(code, status.message())
            }
            _ => status,
        }
    }
}

/// Calls answered at once on one connection (the SDK's stream), and answered but not yet
/// sent (the in-order one).
const ODD_STREAM_MAX_CALLS: usize = 1024;

type AnswerStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::CallAnswer, Status>> + Send>>;

/// One call of an in-order stream, run as the unary call would be.
async fn answer_in_order(
    inner: &ParticipantService<ConformanceParticipant>,
    call: Option<pb::call_request::Call>,
) -> Result<pb::call_answer::Answer, Status> {
    use pb::call_answer::Answer;
    use pb::call_request::Call;
    use pb::participant_server::Participant as _;
    Ok(match call {
        Some(Call::Prepare(r)) => {
            Answer::Prepare(inner.prepare(Request::new(r)).await?.into_inner())
        }
        Some(Call::Commit(r)) => Answer::Commit(inner.commit(Request::new(r)).await?.into_inner()),
        Some(Call::Abort(r)) => Answer::Abort(inner.abort(Request::new(r)).await?.into_inner()),
        Some(Call::Compensate(r)) => {
            Answer::Compensate(inner.compensate(Request::new(r)).await?.into_inner())
        }
        Some(Call::Withdraw(_)) | None => {
            return Err(Status::invalid_argument(
                "call: a CallRequest without a known call",
            ));
        }
    })
}

/// Answers each call of `calls` before it reads the next.
fn in_order(
    inner: Arc<ParticipantService<ConformanceParticipant>>,
    mut calls: tonic::Streaming<pb::CallRequest>,
) -> AnswerStream {
    let (answers, stream) = tokio::sync::mpsc::channel(ODD_STREAM_MAX_CALLS);
    tokio::spawn(async move {
        while let Ok(Some(request)) = calls.message().await {
            let answer = match answer_in_order(&inner, request.call).await {
                Ok(answer) => answer,
                Err(status) => pb::call_answer::Answer::Error(pb::CallError {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                    details: Vec::new(),
                }),
            };
            let answer = pb::CallAnswer {
                call_id: request.call_id,
                answer: Some(answer),
            };
            if answers.send(Ok(answer)).await.is_err() {
                break;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(stream))
}

#[tonic::async_trait]
impl pb::participant_server::Participant for OddParticipant {
    async fn prepare(
        &self,
        request: Request<pb::PrepareBranchRequest>,
    ) -> Result<Response<pb::PrepareBranchResponse>, Status> {
        self.inner.prepare(request).await.map_err(|s| self.odd(s))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        self.inner.commit(request).await.map_err(|s| self.odd(s))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        self.inner.abort(request).await.map_err(|s| self.odd(s))
    }

    async fn compensate(
        &self,
        request: Request<pb::CompensateBranchRequest>,
    ) -> Result<Response<pb::CompensateBranchResponse>, Status> {
        self.inner
            .compensate(request)
            .await
            .map_err(|s| self.odd(s))
    }

    type CallsStream = AnswerStream;

    async fn calls(
        &self,
        request: Request<tonic::Streaming<pb::CallRequest>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        use futures::StreamExt;
        match self.oddity {
            Oddity::StreamInOrder => Ok(Response::new(in_order(
                self.inner.clone(),
                request.into_inner(),
            ))),
            Oddity::LateStreamHeaders => {
                let mut answers = self.inner.calls(request).await?.into_inner();
                // The response (its headers) is returned only once the first answer is
                // ready.
                let first = answers.next().await;
                let answers: AnswerStream = Box::pin(futures::stream::iter(first).chain(answers));
                Ok(Response::new(answers))
            }
            Oddity::UserFailureAs(_) => {
                let answers = self.inner.calls(request).await?.into_inner();
                Ok(Response::new(Box::pin(answers)))
            }
        }
    }
}
