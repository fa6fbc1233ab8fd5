//! What a broken or hostile client can put on the wire, at the coordinator's server and
//! at a participant's: bytes that are not the message, and inputs so large that an
//! error must quote only a little of them.

use super::*;

/// Sends raw bytes as a request body: what a broken or hostile client can put on the wire.
#[derive(Debug, Clone, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let bytes = bytes::Buf::copy_to_bytes(buf, bytes::Buf::remaining(buf));
        Ok(Some(bytes.to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_the_message_are_invalid_argument_at_both_servers() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    // A field tag with wire type 7 (there is none): no protobuf decoder accepts it.
    let garbage = vec![0x0f, 0xff, 0xff, 0xff];
    for (endpoint, path) in [
        (&coordinator.endpoint, "/treaty.v1.Coordinator/Begin"),
        (&participant.endpoint, "/treaty.v1.Participant/Prepare"),
    ] {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(
                tonic::Request::new(garbage.clone()),
                http::uri::PathAndQuery::from_static(path),
                RawBytes,
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
    }
    let client = coordinator.client().await;
    assert!(client.list(&[], 10, "").await.unwrap().0.is_empty());
    assert!(participant.participant.calls().is_empty());
    coordinator.stop().await.unwrap();
    participant.stop().await;
}

/// Asserts `result` is INVALID_ARGUMENT naming `field` with a message that quotes only a
/// little of the (huge) input.
#[track_caller]
fn assert_invalid_and_short<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    const MAX_MESSAGE_BYTES: usize = 600;
    let message_len = match &result {
        Err(status) => status.message().len(),
        Ok(_) => 0,
    };
    if let Err(status) = &result {
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
    }
    assert_invalid(result, field);
    assert!(
        message_len <= MAX_MESSAGE_BYTES,
        "{field}: a {message_len}-byte error message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_at_most_a_little_of_a_huge_input_at_both_servers() {
    use treaty_proto::v1::participant_client::ParticipantClient;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let good = participant.endpoint.clone();
    // 3 MiB, under the 4 MiB message limit; control characters are escaped when quoted.
    let huge = format!("\u{1b}[31m{}", "x".repeat(3 << 20));
    let mut api = CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap()
        .max_encoding_message_size(8 << 20);
    let begin = |branch: pb::BranchSpec| pb::BeginRequest {
        deadline_unix_ms: 0,
        prepare_timeout_ms: 0,
        branches: vec![branch],
        ..Default::default()
    };
    assert_invalid_and_short(
        api.begin(begin(spec(&huge, &good))).await,
        "branches[0].branch_id",
    );
    assert_invalid_and_short(
        api.begin(begin(spec("a", &huge))).await,
        "branches[0].endpoint",
    );
    assert_invalid_and_short(
        api.enlist(pb::EnlistRequest {
            transaction_id: huge.clone(),
            branch: Some(spec("a", &good)),
        })
        .await,
        "transaction_id",
    );
    assert_invalid_and_short(
        api.commit(pb::CommitRequest {
            transaction_id: huge.clone(),
        })
        .await,
        "transaction_id",
    );
    assert_invalid_and_short(
        api.abort(pb::AbortRequest {
            transaction_id: huge.clone(),
            reason: String::new(),
        })
        .await,
        "transaction_id",
    );
    assert_invalid_and_short(
        api.get_transaction(pb::GetTransactionRequest {
            transaction_id: huge.clone(),
        })
        .await,
        "transaction_id",
    );
    assert_invalid_and_short(
        api.watch_transaction(pb::WatchTransactionRequest {
            transaction_id: huge.clone(),
        })
        .await,
        "transaction_id",
    );
    assert_invalid_and_short(
        api.get_outcome(pb::GetOutcomeRequest {
            transaction_id: huge.clone(),
            branch_id: String::new(),
        })
        .await,
        "transaction_id",
    );
    assert_invalid_and_short(
        api.list_transactions(pb::ListTransactionsRequest {
            states: vec![],
            page_size: 10,
            page_token: huge.clone(),
            ..Default::default()
        })
        .await,
        "page_token",
    );
    assert_invalid_and_short(
        api.list_transactions(pb::ListTransactionsRequest {
            page_size: 10,
            endpoint: huge.clone(),
            ..Default::default()
        })
        .await,
        "endpoint",
    );
    let step = |step_id: &str, endpoint: &str, after: Vec<String>| pb::SagaStep {
        step_id: step_id.into(),
        endpoint: endpoint.into(),
        payload: b"ok".to_vec(),
        after,
        ..Default::default()
    };
    let saga = |idempotency_key: &str, steps: Vec<pb::SagaStep>| pb::SubmitSagaRequest {
        idempotency_key: idempotency_key.into(),
        steps,
        ..Default::default()
    };
    assert_invalid_and_short(
        api.submit_saga(saga(&huge, vec![step("s", &good, vec![])]))
            .await,
        "idempotency_key",
    );
    assert_invalid_and_short(
        api.submit_saga(saga("", vec![step(&huge, &good, vec![])]))
            .await,
        "steps[0].step_id",
    );
    assert_invalid_and_short(
        api.submit_saga(saga("", vec![step("s", &huge, vec![])]))
            .await,
        "steps[0].endpoint",
    );
    assert_invalid_and_short(
        api.submit_saga(saga("", vec![step("s", &good, vec![huge.clone()])]))
            .await,
        "steps[0].after[0]",
    );

    // Past the 4 MiB message limit the message is refused before it is decoded.
    let status = api
        .commit(pb::CommitRequest {
            transaction_id: "x".repeat(5 << 20),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().len() <= 600, "{status:?}");

    // The participant's server, called directly.
    let mut branch = ParticipantClient::connect(participant.endpoint.clone())
        .await
        .unwrap()
        .max_encoding_message_size(8 << 20);
    let id = treaty_coordinator::model::TxnId::generate(now_ms()).to_string();
    let prepare = |transaction_id: &str, branch_id: &str, coordinator_endpoint: &str| {
        pb::PrepareBranchRequest {
            transaction_id: transaction_id.into(),
            branch_id: branch_id.into(),
            payload: b"yes".to_vec(),
            coordinator_endpoint: coordinator_endpoint.into(),
        }
    };
    assert_invalid_and_short(
        branch.prepare(prepare(&huge, "a", "")).await,
        "transaction_id",
    );
    assert_invalid_and_short(branch.prepare(prepare(&id, &huge, "")).await, "branch_id");
    assert_invalid_and_short(
        branch.prepare(prepare(&id, "a", &huge)).await,
        "coordinator_endpoint",
    );
    assert_invalid_and_short(
        branch
            .abort(pb::AbortBranchRequest {
                transaction_id: huge.clone(),
                branch_id: "a".into(),
            })
            .await,
        "transaction_id",
    );
    assert_invalid_and_short(
        branch
            .compensate(pb::CompensateBranchRequest {
                transaction_id: id.clone(),
                branch_id: huge.clone(),
                payload: vec![],
            })
            .await,
        "branch_id",
    );

    // Nothing was created anywhere.
    let client = coordinator.client().await;
    assert!(client.list(&[], 10, "").await.unwrap().0.is_empty());
    assert!(participant.participant.calls().is_empty());
    participant.stop().await;
    coordinator.stop().await.unwrap();
}
