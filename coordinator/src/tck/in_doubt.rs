//! In-doubt resolution (docs/PARTICIPANT-PROTOCOL.md, section 9): a participant that
//! voted YES and hears nothing more must ask the coordinator its Prepare named
//! (`GetOutcome`), stay prepared while the answer is PENDING or an error, and apply the
//! decision once it is given, through its barrier: one effect, and later calls answered
//! from the record. It never decides on its own.
//!
//! The kit serves a stand-in coordinator for this (`--coordinator-listen`): it answers
//! `GetOutcome` as each case scripts it, counting the questions, and every other
//! method UNIMPLEMENTED. A case holds its transaction undecided, answering PENDING and
//! UNAVAILABLE in turn (a participant must wait through both), then releases a
//! decision. A transaction no case holds (one left by an interrupted run) is answered
//! PENDING, not a real coordinator's presumed ABORT: PENDING never makes a participant
//! act. The stand-in serves cleartext and checks no credentials: the participant must
//! trust the endpoint the kit names (`http://ADDRESS`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};

use super::cases::YES;
use super::check::{
    Case, Ctx, Outcome, Stop, TWO_PHASE, abort_effect, cases, commit_effect, expect, prepare_effect,
};
use super::target::{Branch, effects_text};

pub fn all() -> Vec<Case> {
    cases! {
        "in-doubt.commit", "with --coordinator-listen: a Prepare YES naming the kit's coordinator is asked about (GetOutcome); while answered PENDING, then UNAVAILABLE, then PENDING, the branch stays prepared (PREPARE only); answered COMMIT it commits once (PREPARE, COMMIT), and Commit TWO_PHASE then answers COMMITTED from the record", commit;
        "in-doubt.abort", "with --coordinator-listen: the same, held undecided for two questions; answered ABORT it aborts once (PREPARE, ABORT), and Abort then answers ABORTED from the record", abort;
    }
}

#[derive(Debug)]
struct Held {
    released: Option<pb::Decision>,
    asked: u32,
}

/// The stand-in coordinator's state: the transactions the cases hold, by id.
#[derive(Debug, Default, Clone)]
pub struct StandIn {
    held: Arc<Mutex<HashMap<String, Held>>>,
}

/// The stand-in serving, and the endpoint the cases name.
#[derive(Debug)]
pub struct Serving {
    pub stand_in: StandIn,
    pub endpoint: String,
    /// How long a case waits for the participant to ask, and to apply a decision.
    pub within: Duration,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the stand-in on `listen` (a specific address: the participant is told
/// `http://` and it).
pub async fn serve(listen: std::net::SocketAddr, within: Duration) -> Result<Serving, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("--coordinator-listen: cannot listen on {listen}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("--coordinator-listen: {e}"))?;
    let stand_in = StandIn::default();
    let server = tonic::transport::Server::builder()
        .add_service(CoordinatorServer::new(stand_in.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let task = tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::warn!(%error, "the kit's stand-in coordinator stopped");
        }
    });
    Ok(Serving {
        stand_in,
        endpoint: format!("http://{bound}"),
        within,
        task,
    })
}

impl StandIn {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers `transaction_id` PENDING and UNAVAILABLE in turn (PENDING first) until
    /// [`StandIn::release`].
    pub fn hold(&self, transaction_id: &str) {
        self.lock().insert(
            transaction_id.to_string(),
            Held {
                released: None,
                asked: 0,
            },
        );
    }

    /// Answers `transaction_id` with `decision` from now on.
    pub fn release(&self, transaction_id: &str, decision: pb::Decision) {
        if let Some(held) = self.lock().get_mut(transaction_id) {
            held.released = Some(decision);
        }
    }

    /// How often the participant asked about `transaction_id`.
    pub fn asked(&self, transaction_id: &str) -> u32 {
        self.lock().get(transaction_id).map_or(0, |held| held.asked)
    }

    fn answer(&self, transaction_id: &str) -> Result<pb::Decision, Status> {
        let mut held = self.lock();
        let Some(held) = held.get_mut(transaction_id) else {
            return Ok(pb::Decision::Pending);
        };
        held.asked = held.asked.saturating_add(1);
        match held.released {
            Some(decision) => Ok(decision),
            None if held.asked % 2 == 1 => Ok(pb::Decision::Pending),
            None => Err(Status::unavailable(
                "the kit's stand-in coordinator fails on purpose: ask again",
            )),
        }
    }
}

/// The case's stand-in, or why the case is skipped.
pub fn serving(ctx: &Ctx) -> Result<&Serving, Stop> {
    ctx.coordinator.as_ref().ok_or_else(|| {
        Stop::Skipped(
            "no --coordinator-listen: the kit serves no GetOutcome for the participant to ask"
                .into(),
        )
    })
}

/// Prepares `branch` YES naming the stand-in, held undecided, and waits, bounded,
/// until the participant has asked about it `questions` times, checking all the while
/// that it stays prepared: a participant that acts on a branch in doubt before it is
/// told fails here. (It may still act on the last answer after the case releases the
/// decision: releasing COMMIT shows that too, as an ABORT effect.)
async fn prepared_and_held(
    ctx: &Ctx,
    serving: &Serving,
    branch: &Branch,
    questions: u32,
) -> Outcome {
    serving.stand_in.hold(&branch.transaction_id);
    let prepare = ctx.target().prepare(branch, YES, &serving.endpoint).await;
    if prepare.name() == "PERMISSION_DENIED" {
        return Err(Stop::Failed(format!(
            "Prepare naming the kit's coordinator: {prepare}; the participant must trust \
             {} (its list of trusted coordinators) for the in-doubt cases",
            serving.endpoint
        )));
    }
    expect("Prepare naming the kit's coordinator", prepare, "VOTE_YES")?;
    let prepared = [prepare_effect(YES)];
    let started = Instant::now();
    loop {
        let asked = serving.stand_in.asked(&branch.transaction_id);
        let effects = ctx.effects("while in doubt", branch).await?;
        if effects != prepared {
            return Err(Stop::Failed(format!(
                "the branch in doubt was acted on before the coordinator decided (GetOutcome \
                 asked {asked} time(s), answered PENDING and UNAVAILABLE in turn): expected \
                 effects {}, got {}",
                effects_text(&prepared),
                effects_text(&effects)
            )));
        }
        if asked >= questions {
            return Ok(());
        }
        if started.elapsed() >= serving.within {
            let hint = if asked == 0 {
                format!(
                    "does its in-doubt resolution run, and can it reach {} from where it runs?",
                    serving.endpoint
                )
            } else {
                "does it wait longer between questions than --in-doubt-within-ms allows?"
                    .to_string()
            };
            return Err(Stop::Failed(format!(
                "the participant asked GetOutcome about its branch in doubt {asked} time(s) \
                 within {:?}, not {questions}: {hint}",
                serving.within
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn commit(ctx: &Ctx) -> Outcome {
    let serving = serving(ctx)?;
    let b = Branch::fresh();
    // PENDING, UNAVAILABLE, PENDING: a participant that gives up on either shows it,
    // since the decision released then is COMMIT.
    prepared_and_held(ctx, serving, &b, 3).await?;
    serving
        .stand_in
        .release(&b.transaction_id, pb::Decision::Commit);
    let expected = [prepare_effect(YES), commit_effect(YES)];
    ctx.expect_effects_within("answered COMMIT", &b, &expected, serving.within)
        .await?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE after", commit, "COMMIT_RESULT_COMMITTED")?;
    ctx.expect_effects("at the end", &b, &expected).await
}

async fn abort(ctx: &Ctx) -> Outcome {
    let serving = serving(ctx)?;
    let b = Branch::fresh();
    prepared_and_held(ctx, serving, &b, 2).await?;
    serving
        .stand_in
        .release(&b.transaction_id, pb::Decision::Abort);
    let expected = [prepare_effect(YES), abort_effect(YES)];
    ctx.expect_effects_within("answered ABORT", &b, &expected, serving.within)
        .await?;
    expect("Abort after", ctx.abort(&b).await, "ABORT_RESULT_ABORTED")?;
    ctx.expect_effects("at the end", &b, &expected).await
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented(
        "the conformance kit's stand-in coordinator serves GetOutcome only",
    ))
}

#[tonic::async_trait]
impl Coordinator for StandIn {
    async fn get_outcome(
        &self,
        request: Request<pb::GetOutcomeRequest>,
    ) -> Result<Response<pb::GetOutcomeResponse>, Status> {
        let decision = self.answer(&request.into_inner().transaction_id)?;
        Ok(Response::new(pb::GetOutcomeResponse {
            decision: decision as i32,
        }))
    }

    async fn begin(
        &self,
        _: Request<pb::BeginRequest>,
    ) -> Result<Response<pb::BeginResponse>, Status> {
        unimplemented()
    }

    async fn enlist(
        &self,
        _: Request<pb::EnlistRequest>,
    ) -> Result<Response<pb::EnlistResponse>, Status> {
        unimplemented()
    }

    async fn commit(
        &self,
        _: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::CommitResponse>, Status> {
        unimplemented()
    }

    async fn abort(
        &self,
        _: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        unimplemented()
    }

    async fn get_transaction(
        &self,
        _: Request<pb::GetTransactionRequest>,
    ) -> Result<Response<pb::GetTransactionResponse>, Status> {
        unimplemented()
    }

    async fn list_transactions(
        &self,
        _: Request<pb::ListTransactionsRequest>,
    ) -> Result<Response<pb::ListTransactionsResponse>, Status> {
        unimplemented()
    }

    type WatchTransactionStream =
        futures::stream::Empty<Result<pb::WatchTransactionResponse, Status>>;

    async fn watch_transaction(
        &self,
        _: Request<pb::WatchTransactionRequest>,
    ) -> Result<Response<Self::WatchTransactionStream>, Status> {
        unimplemented()
    }

    async fn submit_saga(
        &self,
        _: Request<pb::SubmitSagaRequest>,
    ) -> Result<Response<pb::SubmitSagaResponse>, Status> {
        unimplemented()
    }

    async fn cancel_saga(
        &self,
        _: Request<pb::CancelSagaRequest>,
    ) -> Result<Response<pb::CancelSagaResponse>, Status> {
        unimplemented()
    }

    type CallsStream = futures::stream::Empty<Result<pb::TransactionAnswer, Status>>;

    async fn calls(
        &self,
        _: Request<tonic::Streaming<pb::TransactionCall>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        unimplemented()
    }
}
