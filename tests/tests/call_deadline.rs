//! Every call the coordinator makes to a participant carries its deadline as
//! `grpc-timeout` (the prepare timeout plus its grace for Prepare, the participant call
//! timeout for phase 2), read here by a participant served with bare tonic, so that what
//! the wire carries is seen, not what an SDK makes of it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome};
use treaty_tests::harness::{Coordinator, PATIENCE, coordinator_config};

/// A call's operation and its `grpc-timeout` header, if it had one.
type NotedCall = (&'static str, Option<String>);

/// Answers YES and COMMITTED, noting each call.
#[derive(Debug, Default, Clone)]
struct NotesDeadlines {
    calls: Arc<Mutex<Vec<NotedCall>>>,
}

impl NotesDeadlines {
    fn note<T>(&self, operation: &'static str, request: &Request<T>) {
        let timeout = request
            .metadata()
            .get("grpc-timeout")
            .map(|value| value.to_str().unwrap().to_string());
        self.calls.lock().unwrap().push((operation, timeout));
    }
}

#[tonic::async_trait]
impl pb::participant_server::Participant for NotesDeadlines {
    async fn prepare(
        &self,
        request: Request<pb::PrepareBranchRequest>,
    ) -> Result<Response<pb::PrepareBranchResponse>, Status> {
        self.note("prepare", &request);
        Ok(Response::new(pb::PrepareBranchResponse {
            vote: pb::Vote::Yes as i32,
            ..Default::default()
        }))
    }
    async fn commit(
        &self,
        request: Request<pb::CommitBranchRequest>,
    ) -> Result<Response<pb::CommitBranchResponse>, Status> {
        self.note("commit", &request);
        Ok(Response::new(pb::CommitBranchResponse {
            result: pb::CommitResult::Committed as i32,
            ..Default::default()
        }))
    }
    async fn abort(
        &self,
        request: Request<pb::AbortBranchRequest>,
    ) -> Result<Response<pb::AbortBranchResponse>, Status> {
        self.note("abort", &request);
        Ok(Response::new(pb::AbortBranchResponse {
            result: pb::AbortResult::Aborted as i32,
        }))
    }
    async fn compensate(
        &self,
        request: Request<pb::CompensateBranchRequest>,
    ) -> Result<Response<pb::CompensateBranchResponse>, Status> {
        self.note("compensate", &request);
        Ok(Response::new(pb::CompensateBranchResponse::default()))
    }
}

/// A `grpc-timeout` value ("<digits><unit>", gRPC's HTTP/2 protocol) as a duration.
fn parse_grpc_timeout(value: &str) -> Duration {
    let (digits, unit) = value.split_at(value.len() - 1);
    let amount: u64 = digits.parse().unwrap();
    match unit {
        "H" => Duration::from_secs(amount * 3_600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        other => panic!("unknown grpc-timeout unit {other} in {value}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_calls_carry_their_deadline_as_grpc_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.participant_call_timeout_ms = 3_000;
    let coordinator = Coordinator::start_with(config).await;

    let participant = NotesDeadlines::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::participant_server::ParticipantServer::new(
                participant.clone(),
            ))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let client = coordinator.client().await;
    let prepare_timeout_ms = 7_000;
    let (id, outcome) = client
        .run_two_phase(
            vec![
                BranchSpec::new("a", &endpoint, "a"),
                BranchSpec::new("b", &endpoint, "b"),
            ],
            BeginOptions {
                prepare_timeout_ms: Some(prepare_timeout_ms),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    client.wait_until_finished(&id, PATIENCE).await.unwrap();

    let calls = participant.calls.lock().unwrap().clone();
    let operations: Vec<&str> = calls.iter().map(|(operation, _)| *operation).collect();
    assert_eq!(
        operations.iter().filter(|o| **o == "prepare").count(),
        2,
        "{calls:?}"
    );
    assert_eq!(
        operations.iter().filter(|o| **o == "commit").count(),
        2,
        "{calls:?}"
    );
    for (operation, timeout) in &calls {
        let timeout = parse_grpc_timeout(
            timeout
                .as_deref()
                .unwrap_or_else(|| panic!("a {operation} without grpc-timeout: {calls:?}")),
        );
        // Prepare: the prepare timeout plus a grace of up to a second (the call trails
        // the prepare timer); phase 2: the participant call timeout.
        let (at_least, at_most) = match *operation {
            "prepare" => (
                Duration::from_millis(prepare_timeout_ms),
                Duration::from_millis(prepare_timeout_ms + 1_000),
            ),
            _ => (Duration::from_millis(3_000), Duration::from_millis(3_000)),
        };
        assert!(
            timeout >= at_least && timeout <= at_most,
            "{operation}: grpc-timeout {timeout:?} outside {at_least:?}..={at_most:?}"
        );
    }
    coordinator.stop().await.unwrap();
    server.abort();
}
