//! gRPC server reflection on both servers (the coordinator daemon and the SDK's participant
//! server), in both protocol versions: v1, and v1alpha, the only one Python's
//! grpcio-reflection, Postman and older grpcurl speak.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use tonic::transport::Channel;
use tonic_reflection::pb::v1alpha;
use treaty_tests::harness::{Coordinator, ParticipantServer, reflected_services_v1};

async fn channel(endpoint: &str) -> Channel {
    Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// The services listed by reflection v1alpha, and whether the file declaring `symbol` is
/// served too (what a client needs to build requests).
async fn services_v1alpha(channel: Channel, symbol: &str) -> (Vec<String>, bool) {
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let requests = [
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.to_string())),
        },
    ];
    let mut responses = client
        .server_reflection_info(futures::stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected v1alpha reflection answer: {response:?}");
    };
    let names = list.service.into_iter().map(|s| s.name).collect();
    let response = responses.message().await.unwrap().unwrap();
    let described = matches!(
        response.message_response,
        Some(MessageResponse::FileDescriptorResponse(ref files))
            if !files.file_descriptor_proto.is_empty()
    );
    (names, described)
}

fn assert_lists(names: &[String], expected: &[&str], what: &str) {
    for service in expected {
        assert!(
            names.iter().any(|n| n == service),
            "{what}: {service} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_serves_reflection_v1_and_v1alpha() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(dir.path()).await;
    let channel = channel(&coordinator.endpoint).await;
    let expected = [
        "treaty.v1.Coordinator",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    assert_lists(
        &reflected_services_v1(channel.clone()).await,
        &expected,
        "v1",
    );
    let (names, described) = services_v1alpha(channel, "treaty.v1.Coordinator").await;
    assert_lists(&names, &expected, "v1alpha");
    assert!(described, "v1alpha serves the Coordinator's descriptor");
    coordinator.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_participant_server_serves_reflection_v1_and_v1alpha() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(dir.path()).await;
    let channel = channel(&participant.endpoint).await;
    let expected = [
        "treaty.v1.Participant",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    assert_lists(
        &reflected_services_v1(channel.clone()).await,
        &expected,
        "v1",
    );
    let (names, described) = services_v1alpha(channel, "treaty.v1.Participant").await;
    assert_lists(&names, &expected, "v1alpha");
    assert!(described, "v1alpha serves the Participant's descriptor");
    participant.stop().await;
}
