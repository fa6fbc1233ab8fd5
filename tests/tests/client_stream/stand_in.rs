//! A stand-in coordinator for the client's tests: its `Calls` stream served or not,
//! and its waiting submits served, refused, held, failed or broken as told.

use super::*;
/// A stand-in coordinator that runs a Begin with `commit` (as committed, under an id that
/// says how the call came) and answers everything else UNIMPLEMENTED: with `stream`, it
/// serves Begin on the `Calls` stream only; without, unary only (a coordinator from
/// before `Calls`). A SubmitSaga that waits is answered unary, and on the stream as
/// `waits` says, under an id that says how it came; withdrawals on its stream go
/// unanswered. With `hanging`, its stream is served
/// by the SDK's machinery instead (4 places) and every call on it hangs, counted in
/// `hanging`.
#[derive(Clone)]
pub(super) struct StandIn {
    stream: bool,
    waits: WaitsOnStream,
    hanging: Option<Arc<Hanging>>,
    /// Waiting SubmitSagas that came on the stream.
    pub(super) waits_on_stream: Arc<AtomicUsize>,
    /// Never turns true: the stand-in's streams end with their caller.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
}

/// How a stand-in answers a SubmitSaga that waits, on its stream.
#[derive(Clone, Copy, Debug)]
pub(super) enum WaitsOnStream {
    Served,
    /// Refused as a coordinator whose waits are all taken refuses it.
    AllTaken,
    /// Refused as a coordinator from before such waits refused it.
    RefusedAsBefore,
    /// Never answered: each holds one of the connection's waits.
    Held,
    /// Answered with an error that is not a refusal of the wait.
    Failed,
    /// Not answered: the stream breaks instead.
    Broken,
}

impl StandIn {
    pub(super) fn new(stream: bool, waits: WaitsOnStream, hanging: Option<Arc<Hanging>>) -> Self {
        Self {
            stream,
            waits,
            hanging,
            waits_on_stream: Arc::default(),
            stopping: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// A stand-in whose stream calls all hang, served: what hangs, its endpoint, its stop.
    pub(super) async fn hanging() -> (Arc<Hanging>, String, impl AsyncFnOnce()) {
        let hanging = Arc::new(Hanging::default());
        let (endpoint, stop) = Self::new(true, WaitsOnStream::Served, Some(hanging.clone()))
            .serve()
            .await;
        (hanging, endpoint, stop)
    }

    /// Serves it on a port of its own until the returned stop is called.
    pub(super) async fn serve(self) -> (String, impl AsyncFnOnce()) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::coordinator_server::CoordinatorServer::new(self))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        let stop = async move || {
            stop.send(()).unwrap();
            tokio::time::timeout(Duration::from_secs(60), server)
                .await
                .expect("the server stops")
                .unwrap()
                .unwrap();
        };
        (endpoint, stop)
    }
}

/// The calls a stand-in's stream left hanging: begun in all, and hanging now.
#[derive(Default)]
pub(super) struct Hanging {
    started: AtomicUsize,
    live: AtomicUsize,
}

impl Hanging {
    /// Waits until `started` calls have begun and `live` of them hang.
    pub(super) async fn until(self: &Arc<Self>, what: &str, started: usize, live: usize) {
        eventually(what, || {
            let hanging = self.clone();
            async move {
                let now = (
                    hanging.started.load(Ordering::SeqCst),
                    hanging.live.load(Ordering::SeqCst),
                );
                (now == (started, live)).then_some(())
            }
        })
        .await;
    }
}

/// Counts a hanging call until it is dropped.
struct Hangs(Arc<Hanging>);

impl Drop for Hangs {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

fn submitted(transaction_id: &str) -> pb::SubmitSagaResponse {
    pb::SubmitSagaResponse {
        transaction_id: transaction_id.into(),
        created: true,
        transaction: Some(pb::Transaction::default()),
    }
}

fn unimplemented<T>() -> Result<tonic::Response<T>, tonic::Status> {
    Err(tonic::Status::unimplemented("not in this coordinator"))
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for StandIn {
    async fn begin(
        &self,
        request: tonic::Request<pb::BeginRequest>,
    ) -> Result<tonic::Response<pb::BeginResponse>, tonic::Status> {
        if self.stream {
            return unimplemented();
        }
        assert!(request.into_inner().commit);
        Ok(tonic::Response::new(committed("unary")))
    }
    async fn enlist(
        &self,
        _: tonic::Request<pb::EnlistRequest>,
    ) -> Result<tonic::Response<pb::EnlistResponse>, tonic::Status> {
        unimplemented()
    }
    async fn commit(
        &self,
        _: tonic::Request<pb::CommitRequest>,
    ) -> Result<tonic::Response<pb::CommitResponse>, tonic::Status> {
        unimplemented()
    }
    async fn abort(
        &self,
        _: tonic::Request<pb::AbortRequest>,
    ) -> Result<tonic::Response<pb::AbortResponse>, tonic::Status> {
        unimplemented()
    }
    async fn get_transaction(
        &self,
        _: tonic::Request<pb::GetTransactionRequest>,
    ) -> Result<tonic::Response<pb::GetTransactionResponse>, tonic::Status> {
        unimplemented()
    }
    async fn list_transactions(
        &self,
        _: tonic::Request<pb::ListTransactionsRequest>,
    ) -> Result<tonic::Response<pb::ListTransactionsResponse>, tonic::Status> {
        unimplemented()
    }
    type WatchTransactionStream =
        futures::stream::Empty<Result<pb::WatchTransactionResponse, tonic::Status>>;
    async fn watch_transaction(
        &self,
        _: tonic::Request<pb::WatchTransactionRequest>,
    ) -> Result<tonic::Response<Self::WatchTransactionStream>, tonic::Status> {
        unimplemented()
    }
    async fn get_outcome(
        &self,
        _: tonic::Request<pb::GetOutcomeRequest>,
    ) -> Result<tonic::Response<pb::GetOutcomeResponse>, tonic::Status> {
        unimplemented()
    }
    async fn submit_saga(
        &self,
        request: tonic::Request<pb::SubmitSagaRequest>,
    ) -> Result<tonic::Response<pb::SubmitSagaResponse>, tonic::Status> {
        assert!(request.into_inner().wait_for_outcome);
        Ok(tonic::Response::new(submitted("unary")))
    }
    async fn cancel_saga(
        &self,
        _: tonic::Request<pb::CancelSagaRequest>,
    ) -> Result<tonic::Response<pb::CancelSagaResponse>, tonic::Status> {
        unimplemented()
    }
    type CallsStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::TransactionAnswer, tonic::Status>> + Send>,
    >;
    async fn calls(
        &self,
        request: tonic::Request<tonic::Streaming<pb::TransactionCall>>,
    ) -> Result<tonic::Response<Self::CallsStream>, tonic::Status> {
        use futures::StreamExt;
        if !self.stream {
            return unimplemented();
        }
        if let Some(hanging) = self.hanging.clone() {
            let stopping = self.stopping.subscribe();
            return Ok(treaty_sdk::call_stream::serve_calls::<
                treaty_sdk::call_stream::TransactionCalls,
                _,
                _,
            >(request, stopping, 4, move |_, _, _| {
                hanging.started.fetch_add(1, Ordering::SeqCst);
                hanging.live.fetch_add(1, Ordering::SeqCst);
                let hangs = Hangs(hanging.clone());
                async move {
                    let _hangs = hangs;
                    std::future::pending::<()>().await;
                    unreachable!("a pending future ended")
                }
            }));
        }
        let waits = self.waits;
        let waits_on_stream = self.waits_on_stream.clone();
        let answers = request.into_inner().filter_map(move |call| {
            futures::future::ready(answer_on_stream(call, waits, &waits_on_stream))
        });
        Ok(tonic::Response::new(Box::pin(answers)))
    }
}

/// The stand-in's answer to one call on its stream, if it answers it.
fn answer_on_stream(
    call: Result<pb::TransactionCall, tonic::Status>,
    waits: WaitsOnStream,
    waits_on_stream: &AtomicUsize,
) -> Option<Result<pb::TransactionAnswer, tonic::Status>> {
    use pb::transaction_answer::Answer;
    use pb::transaction_call::Call;
    let call = match call {
        Ok(call) => call,
        Err(status) => return Some(Err(status)),
    };
    let answer = match call.call {
        Some(Call::Begin(begin)) => {
            assert!(begin.commit);
            Answer::Begin(committed("stream"))
        }
        Some(Call::SubmitSaga(submit)) => {
            assert!(submit.wait_for_outcome);
            waits_on_stream.fetch_add(1, Ordering::SeqCst);
            match waits {
                WaitsOnStream::Served => Answer::SubmitSaga(submitted("stream")),
                WaitsOnStream::Held => return None,
                WaitsOnStream::Failed => Answer::Error(treaty_sdk::call_stream::call_error(
                    &tonic::Status::failed_precondition("the stand-in fails it"),
                )),
                WaitsOnStream::Broken => {
                    return Some(Err(tonic::Status::internal("the stand-in breaks it")));
                }
                WaitsOnStream::AllTaken => {
                    use treaty_proto::error_info::{DOMAIN, STREAM_WAITS_TAKEN};
                    Answer::Error(treaty_sdk::call_stream::call_error(
                        &tonic::Status::with_error_details(
                            Code::ResourceExhausted,
                            "every wait is taken",
                            tonic_types::ErrorDetails::with_error_info(
                                STREAM_WAITS_TAKEN,
                                DOMAIN,
                                [],
                            ),
                        ),
                    ))
                }
                // What the coordinator answered from 3f62934 to b4d6f73.
                WaitsOnStream::RefusedAsBefore => Answer::Error(
                    treaty_sdk::call_stream::call_error(&tonic::Status::invalid_argument(
                        "wait_for_outcome: not on the Calls stream: submit unary to wait \
                             for the outcome",
                    )),
                ),
            }
        }
        // Withdrawals of held waits are not answered.
        Some(Call::Withdraw(_)) => return None,
        _ => {
            return Some(Err(tonic::Status::unimplemented(
                "only Begin and SubmitSaga",
            )));
        }
    };
    Some(Ok(pb::TransactionAnswer {
        call_id: call.call_id,
        answer: Some(answer),
    }))
}

fn committed(transaction_id: &str) -> pb::BeginResponse {
    pb::BeginResponse {
        transaction_id: transaction_id.into(),
        outcome: pb::Outcome::Committed as i32,
        ..Default::default()
    }
}
