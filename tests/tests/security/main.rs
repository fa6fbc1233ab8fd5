//! Trust boundaries (issue 8): TLS on every hop, authenticated callers, participants
//! that serve only their coordinator, secure defaults and bounded connections. Real gRPC
//! on 127.0.0.1, certificates generated at test time, real sled directories; the reload
//! test signals a real `treaty serve` process. Connections (`connections.rs`) and
//! principals (`principals.rs`) have their own files in this one test binary.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::auth::{BearerToken, Credentials};
use treaty_sdk::client::{BeginOptions, BranchSpec, ClientOptions, ClientTlsFiles, Outcome};
use treaty_sdk::server::{CoordinatorTrust, ServeOptions};
use treaty_sdk::tls::{ReloadableServerTls, ServerTlsFiles};
use treaty_sdk::{SagaStep, SubmitOptions, TreatyClient};
use treaty_tests::certs::{CertFiles, TestCa};
use treaty_tests::harness::{Coordinator, ParticipantServer, coordinator_config, eventually};
use treaty_tests::scripted::Op;

mod connections;
mod principals;

const ALICE_TOKEN: &str = "alice-token-0123456789";
const BOB_TOKEN: &str = "bob-token-0123456789ab";
const ROOT_TOKEN: &str = "root-token-0123456789ab";
const COORDINATOR_TOKEN: &str = "coordinator-secret-0123456789";

fn trusting(ca: &TestCa, token: Option<&str>) -> ClientOptions {
    ClientOptions {
        tls: Some(ClientTlsFiles {
            ca: Some(ca.cert.clone()),
            cert: None,
            key: None,
        }),
        token: token.map(str::to_string),
        ..Default::default()
    }
}

fn server_tls(files: &CertFiles, client_ca: Option<&TestCa>) -> Arc<ReloadableServerTls> {
    Arc::new(
        ReloadableServerTls::load(ServerTlsFiles {
            cert: files.cert.clone(),
            key: files.key.clone(),
            client_ca: client_ca.map(|ca| ca.cert.clone()),
        })
        .unwrap(),
    )
}

fn token_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        format!(
            "# principals of the tests\nalice {ALICE_TOKEN}\nbob {BOB_TOKEN}\nroot {ROOT_TOKEN} admin\n"
        ),
    )
    .unwrap();
    path
}

/// Begins a two-phase commit with branches `a` and `b` at `endpoint`, both voting YES.
async fn begin_two_branches(client: &TreatyClient, endpoint: &str) -> String {
    client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("a", endpoint, "yes"),
                BranchSpec::new("b", endpoint, "yes"),
            ],
        )
        .await
        .unwrap()
}

/// A cleartext client of `endpoint` that presents `token`, if any.
async fn connect_as(endpoint: &str, token: Option<&str>) -> TreatyClient {
    let options = ClientOptions {
        tls: None,
        token: token.map(str::to_string),
        ..Default::default()
    };
    TreatyClient::connect_with(endpoint, &options)
        .await
        .unwrap()
}

/// The Admin service as the holder of `token`.
async fn admin_as(
    endpoint: &str,
    token: Option<&str>,
) -> pb::admin_client::AdminClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Credentials>,
> {
    let options = ClientOptions {
        tls: None,
        token: token.map(str::to_string),
        ..Default::default()
    };
    let channel = treaty_sdk::client::endpoint_with(endpoint, &options)
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::admin_client::AdminClient::with_interceptor(
        channel,
        treaty_sdk::client::credentials(&options).unwrap(),
    )
}

async fn ids_of(client: &TreatyClient) -> Vec<String> {
    let (page, _) = client.list(&[], 1000, "").await.unwrap();
    page.into_iter().map(|t| t.transaction_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_commit_runs_over_verified_tls_on_every_hop() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let participant = ParticipantServer::start_with(
        &dir.path().join("p"),
        ServeOptions {
            tls: Some(server_tls(&ca.server("participant"), None)),
            ..ServeOptions::default()
        },
    )
    .await;
    assert!(participant.endpoint.starts_with("https://"));
    let coordinator_cert = ca.server("coordinator");
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.tls_cert = Some(coordinator_cert.cert.clone());
    config.security.tls_key = Some(coordinator_cert.key.clone());
    config.security.participant_ca = Some(ca.cert.to_string_lossy().into_owned());
    let coordinator = Coordinator::start_with(config).await;
    assert!(coordinator.endpoint.starts_with("https://"));

    let client = TreatyClient::connect_with(&coordinator.endpoint, &trusting(&ca, None))
        .await
        .unwrap();
    let id = begin_two_branches(&client, &participant.endpoint).await;
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);
    // Phase 2 reaches the participant over TLS too (Commit answers once it is decided).
    eventually("the commit reaches the participant", || async {
        (participant.participant.ops(&id, "a") == vec![Op::Prepare, Op::Commit]).then_some(())
    })
    .await;

    // No cleartext on a TLS port: a plain-HTTP/2 client gets no answer.
    let cleartext = coordinator
        .endpoint
        .replace("https://localhost", "http://127.0.0.1");
    let refused = match TreatyClient::connect(cleartext).await {
        Ok(plain) => plain.get(&id).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a cleartext client was served on a TLS port");
    // A client that does not trust the server's CA refuses it.
    let stranger_ca = TestCa::new(dir.path(), "other-ca");
    let untrusting =
        TreatyClient::connect_with(&coordinator.endpoint, &trusting(&stranger_ca, None)).await;
    assert!(
        untrusting.is_err(),
        "a certificate from an unknown CA was accepted"
    );

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_participants_without_a_tls_configuration_are_refused_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let https = "https://localhost:9";

    let error = client
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("a", https, "yes")],
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::InvalidArgument));
    assert!(
        error.to_string().contains("branches[0].endpoint: "),
        "{error}"
    );

    let error = client
        .submit_saga(
            vec![
                SagaStep::new("s", "http://127.0.0.1:9", "x"),
                SagaStep::new("t", "HTTPS://localhost:9", "x"),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::InvalidArgument));
    assert!(error.to_string().contains("steps[1].endpoint: "), "{error}");

    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let id = client
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("a", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    let error = client
        .enlist(&id, BranchSpec::new("b", https, "yes"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::InvalidArgument));
    assert!(error.to_string().contains("branch.endpoint: "), "{error}");
    let txn = client.get(&id).await.unwrap().unwrap();
    assert_eq!(
        txn.branches.len(),
        1,
        "the refused enlist changed the transaction"
    );
    assert_eq!(ids_of(&client).await, vec![id]);

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_without_valid_tokens_are_unauthenticated_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.auth_tokens = Some(token_file(dir.path()));
    let coordinator = Coordinator::start_with(config).await;
    let branches = || vec![BranchSpec::new("a", &participant.endpoint, "yes")];

    for (who, client) in [
        ("no token", connect_as(&coordinator.endpoint, None).await),
        (
            "a wrong token",
            connect_as(&coordinator.endpoint, Some("alice-token-0123456780")).await,
        ),
    ] {
        let error = client
            .begin(BeginOptions::default(), branches())
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(Code::Unauthenticated), "{who}: {error}");
        let error = client
            .submit_saga(
                vec![SagaStep::new("s", &participant.endpoint, "yes")],
                SubmitOptions::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(Code::Unauthenticated), "{who}: {error}");
        let error = client.list(&[], 10, "").await.unwrap_err();
        assert_eq!(error.code(), Some(Code::Unauthenticated), "{who}: {error}");
    }
    let root = connect_as(&coordinator.endpoint, Some(ROOT_TOKEN)).await;
    assert!(
        ids_of(&root).await.is_empty(),
        "a refused call created something"
    );
    assert!(participant.participant.calls().is_empty());

    let alice = connect_as(&coordinator.endpoint, Some(ALICE_TOKEN)).await;
    let id = alice
        .begin(BeginOptions::default(), branches())
        .await
        .unwrap();
    assert_eq!(alice.commit(&id).await.unwrap(), Outcome::Committed);
    // GetOutcome stays open to participants, who present nothing.
    let anonymous = connect_as(&coordinator.endpoint, None).await;
    assert_eq!(
        anonymous.outcome(&id).await.unwrap(),
        treaty_sdk::client::Decision::Commit
    );

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_callers_under_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let server = ca.server("coordinator");
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.tls_cert = Some(server.cert.clone());
    config.security.tls_key = Some(server.key.clone());
    config.security.tls_client_ca = Some(ca.cert.clone());
    let coordinator = Coordinator::start_with(config).await;

    // Without a client certificate a caller is anonymous: refused (UNAUTHENTICATED), but
    // GetOutcome, open to participants, still answers.
    let anonymous = TreatyClient::connect_with(&coordinator.endpoint, &trusting(&ca, None))
        .await
        .unwrap();
    let refused = anonymous.list(&[], 10, "").await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::Unauthenticated), "{refused}");
    let unknown = "019a0b6e-8d2f-7c3a-9b1e-2f4d5c6b7a80";
    assert_eq!(
        anonymous.outcome(unknown).await.unwrap(),
        treaty_sdk::client::Decision::Abort
    );
    // A certificate from another CA is refused as well.
    let other_ca = TestCa::new(dir.path(), "other-ca");
    let forged = other_ca.issue("forged", &["alice.test"]);
    let mut options = trusting(&ca, None);
    options.tls.as_mut().unwrap().cert = Some(forged.cert);
    options.tls.as_mut().unwrap().key = Some(forged.key);
    let refused = match TreatyClient::connect_with(&coordinator.endpoint, &options).await {
        Ok(client) => client.list(&[], 10, "").await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a certificate of an unknown CA was accepted");

    let alice = ca.issue("alice", &["alice.test"]);
    let mut options = trusting(&ca, None);
    options.tls.as_mut().unwrap().cert = Some(alice.cert);
    options.tls.as_mut().unwrap().key = Some(alice.key);
    let client = TreatyClient::connect_with(&coordinator.endpoint, &options)
        .await
        .unwrap();
    let id = client
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("a", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_serve_only_their_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start_with(
        &dir.path().join("p"),
        ServeOptions {
            trust: CoordinatorTrust::default().token(COORDINATOR_TOKEN),
            ..ServeOptions::default()
        },
    )
    .await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.participant_token = Some(COORDINATOR_TOKEN.to_string());
    let coordinator = Coordinator::start_with(config).await;
    let client = coordinator.client().await;
    let id = client
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("a", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);
    let calls_before = participant.participant.calls().len();

    // A stranger, with no token or a wrong one, calls the participant directly.
    for credentials in [
        Credentials::none(),
        Credentials::bearer(BearerToken::new("coordinator-secret-0123456780").unwrap()),
    ] {
        let channel = tonic::transport::Endpoint::from_shared(participant.endpoint.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut stranger = ParticipantClient::with_interceptor(channel, credentials);
        let minted = stranger
            .commit(pb::CommitBranchRequest {
                transaction_id: "mint-1".into(),
                branch_id: "a".into(),
                mode: pb::CommitMode::SagaStep as i32,
                payload: b"yes".to_vec(),
                coordinator_endpoint: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(minted.code(), Code::Unauthenticated, "{minted:?}");
        let aborted = stranger
            .abort(pb::AbortBranchRequest {
                transaction_id: id.clone(),
                branch_id: "a".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(aborted.code(), Code::Unauthenticated, "{aborted:?}");
        let prepared = stranger
            .prepare(pb::PrepareBranchRequest {
                transaction_id: "hang-1".into(),
                branch_id: "a".into(),
                payload: b"yes".to_vec(),
                coordinator_endpoint: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(prepared.code(), Code::Unauthenticated, "{prepared:?}");
    }
    assert_eq!(
        participant.participant.calls().len(),
        calls_before,
        "user code ran for a stranger"
    );

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_refuses_requests_naming_a_coordinator_it_does_not_trust() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start_with(
        &dir.path().join("p"),
        ServeOptions {
            trust: CoordinatorTrust::default().endpoint("http://127.0.0.1:1"),
            ..ServeOptions::default()
        },
    )
    .await;
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let id = begin_two_branches(&client, &participant.endpoint).await;
    // This coordinator names itself, which the participant does not trust: prepare is
    // refused (an error, not a vote), so the transaction aborts at once.
    assert!(matches!(
        client.commit(&id).await.unwrap(),
        Outcome::Aborted { .. }
    ));
    assert!(
        !participant.participant.ops(&id, "a").contains(&Op::Prepare),
        "user code prepared for an untrusted coordinator"
    );
    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_needs_authentication_or_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.listen = "0.0.0.0:0".parse().unwrap();
    let error = config.validate().unwrap_err();
    assert_eq!(error.field, "listen");
    assert!(error.message.contains("--allow-unauthenticated"), "{error}");
    config.security.allow_unauthenticated = true;
    assert_eq!(config.validate(), Ok(()));
    config.security.allow_unauthenticated = false;
    config.security.auth_tokens = Some(token_file(dir.path()));
    assert_eq!(config.validate(), Ok(()));

    // The participant SDK's server likewise.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let store = Arc::new(
        treaty_sdk::durable::DurableStore::open(&dir.path().join("p"), Default::default()).unwrap(),
    );
    let served = treaty_sdk::serve(
        Arc::new(treaty_tests::scripted::Scripted::new()),
        store,
        listener,
        ServeOptions::default(),
        async {},
    )
    .await;
    assert!(
        matches!(served, Err(treaty_sdk::ServeError::Unauthenticated(_))),
        "{served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_knows_its_coordinator_by_its_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let participant = ParticipantServer::start_with(
        &dir.path().join("p"),
        ServeOptions {
            tls: Some(server_tls(&ca.server("participant"), Some(&ca))),
            trust: CoordinatorTrust::default().identity("coordinator.test"),
            ..ServeOptions::default()
        },
    )
    .await;
    let identity = ca.issue("coordinator-client", &["coordinator.test"]);
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.participant_ca = Some(ca.cert.to_string_lossy().into_owned());
    config.security.participant_cert = Some(identity.cert.clone());
    config.security.participant_key = Some(identity.key.clone());
    let coordinator = Coordinator::start_with(config).await;
    let client = coordinator.client().await;
    let id = begin_two_branches(&client, &participant.endpoint).await;
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);
    // Phase 2 reaches the participant (Commit answers once it is decided).
    eventually("both commits reach the participant", || async {
        let ops = |branch| participant.participant.ops(&id, branch);
        (ops("a") == vec![Op::Prepare, Op::Commit] && ops("b") == vec![Op::Prepare, Op::Commit])
            .then_some(())
    })
    .await;
    let calls_before = participant.participant.calls().len();

    // Another certificate of the same CA is not the coordinator.
    let stranger = ca.issue("stranger", &["stranger.test"]);
    let tls = ClientTlsFiles {
        ca: Some(ca.cert.clone()),
        cert: Some(stranger.cert),
        key: Some(stranger.key),
    }
    .load()
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(participant.endpoint.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut direct = ParticipantClient::new(channel);
    let minted = direct
        .commit(pb::CommitBranchRequest {
            transaction_id: "mint-1".into(),
            branch_id: "a".into(),
            mode: pb::CommitMode::SagaStep as i32,
            payload: b"yes".to_vec(),
            coordinator_endpoint: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(minted.code(), Code::PermissionDenied, "{minted:?}");
    assert_eq!(participant.participant.calls().len(), calls_before);

    coordinator.stop().await.unwrap();
    participant.stop().await;
}
