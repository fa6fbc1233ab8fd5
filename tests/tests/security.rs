//! Trust boundaries (issue 8): TLS on every hop, authenticated callers, participants
//! that serve only their coordinator, secure defaults and bounded connections. Real gRPC
//! on 127.0.0.1, certificates generated at test time, real sled directories; the reload
//! test signals a real `treaty serve` process.

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
async fn connections_beyond_the_cap_are_closed_and_room_comes_back() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.max_connections = 2;
    let coordinator = Coordinator::start_with(config).await;
    let address = coordinator
        .endpoint
        .trim_start_matches("http://")
        .to_string();
    let first = tokio::net::TcpStream::connect(&address).await.unwrap();
    let second = tokio::net::TcpStream::connect(&address).await.unwrap();
    // Give the accept loop time to take both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), third.read(&mut byte))
        .await
        .expect("the connection past the cap is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop((first, second));
    eventually("a client is served once connections close", || async {
        let client = TreatyClient::connect(coordinator.endpoint.clone())
            .await
            .ok()?;
        client.list(&[], 1, "").await.ok()
    })
    .await;
    coordinator.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_never_under_a_call_in_flight() {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const IDLE: Duration = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("participant")).await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.idle_connection_timeout_ms = IDLE.as_millis() as u64;
    let coordinator = Coordinator::start_with(config).await;

    // A client that opens HTTP/2 and never calls is closed once the timeout passes.
    let address = coordinator.endpoint.trim_start_matches("http://");
    let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut received = 0usize;
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buffer = [0u8; 1024];
        // Bounded by the timeout around it: the server's settings, then end of stream.
        loop {
            match silent.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection stays open");
    assert!(received > 0, "the server spoke HTTP/2 before closing");

    // A watch in flight keeps its connection past many timeouts and sees the decision.
    let client = TreatyClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let id = begin_two_branches(&client, &participant.endpoint).await;
    let watcher = TreatyClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let mut updates = Box::pin(watcher.watch(&id).await.unwrap().unwrap());
    tokio::time::sleep(IDLE * 6).await;
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);
    let finished = tokio::time::timeout(Duration::from_secs(30), async {
        // Bounded: the stream ends after the final state (and by the timeout).
        while let Some(update) = updates.next().await {
            let update = update.expect("the watch survives idle timeouts");
            if update.transaction.state == pb::TransactionState::Committed as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(finished, Ok(true));

    // A client whose connection was closed for idleness reconnects on its next call.
    tokio::time::sleep(IDLE * 4).await;
    assert!(client.get(&id).await.unwrap().is_some());
    coordinator.stop().await.unwrap();
}

/// CPU time (user + system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) end with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports in USER_HZ, 100 per second on every architecture it supports.
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_daemon_pauses_accepting_instead_of_spinning() {
    use treaty_tests::process::{start_server, workspace_binary};
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("coordinator");
    let treaty = workspace_binary("treaty-coordinator", "treaty");
    let args: Vec<String> = [
        "-c",
        "ulimit -n 64 && exec \"$0\" \"$@\"",
        &treaty.to_string_lossy(),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir.to_string_lossy(),
        "--max-connections",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log_file = dir.path().join("coordinator.log");
    let mut daemon = start_server(
        std::path::Path::new("/bin/sh"),
        &args,
        &[("TREATY_LOG", "warn")],
        "treaty listening on",
        log_file.clone(),
    )
    .await;
    let pid = daemon.id().unwrap();

    // More connections than the daemon has descriptors left: accept fails with EMFILE.
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(
            tokio::net::TcpStream::connect(daemon.address)
                .await
                .unwrap(),
        );
    }
    eventually("the daemon reports that accept failed", || async {
        let log = std::fs::read_to_string(&log_file).ok()?;
        log.contains("accept failed; pausing").then_some(())
    })
    .await;
    let before = cpu_time(pid);
    let watched = Duration::from_secs(3);
    tokio::time::sleep(watched).await;
    let used = cpu_time(pid) - before;
    assert!(
        used < watched / 4,
        "the daemon used {used:?} of CPU in {watched:?} at the descriptor limit"
    );
    assert!(daemon.try_exit_status().is_none(), "the daemon died");

    // Descriptors come back: the daemon serves again.
    drop(open);
    let endpoint = daemon.endpoint();
    eventually("a client is served once descriptors are free", || async {
        let client = TreatyClient::connect(endpoint.clone()).await.ok()?;
        client.list(&[], 1, "").await.ok()
    })
    .await;
    daemon.stop(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_and_tokens_and_never_kills_the_daemon() {
    use treaty_tests::process::start_treaty_with;
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new(dir.path(), "old-ca");
    let new_ca = TestCa::new(dir.path(), "new-ca");
    let live = old_ca.server("live");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice {ALICE_TOKEN}\n")).unwrap();
    let (cert, key, tokens_path) = (
        live.cert.to_string_lossy().into_owned(),
        live.key.to_string_lossy().into_owned(),
        tokens.to_string_lossy().into_owned(),
    );
    let mut daemon = start_treaty_with(
        &dir.path().join("coordinator"),
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--auth-tokens",
            &tokens_path,
        ],
        &[],
    )
    .await;
    let endpoint = format!("https://localhost:{}", daemon.address.port());
    let lists = |ca: &TestCa, token: &str| {
        let options = trusting(ca, Some(token));
        let endpoint = endpoint.clone();
        async move {
            let client = TreatyClient::connect_with(endpoint, &options).await.ok()?;
            client.list(&[], 1, "").await.ok()
        }
    };
    assert!(lists(&old_ca, ALICE_TOKEN).await.is_some());
    assert!(lists(&new_ca, ALICE_TOKEN).await.is_none());

    // A broken file: SIGHUP keeps the old certificate and the daemon keeps serving.
    std::fs::write(&live.cert, "not a certificate").unwrap();
    daemon.hang_up();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        daemon.try_exit_status().is_none(),
        "SIGHUP killed the daemon"
    );
    assert!(lists(&old_ca, ALICE_TOKEN).await.is_some());

    // New certificate and a new token file: both take effect on SIGHUP.
    let renewed = new_ca.server("renewed");
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    std::fs::copy(&renewed.key, &live.key).unwrap();
    std::fs::write(&tokens, format!("bob {BOB_TOKEN}\n")).unwrap();
    daemon.hang_up();
    eventually("the renewed certificate is served", || {
        lists(&new_ca, BOB_TOKEN)
    })
    .await;
    assert!(
        lists(&new_ca, ALICE_TOKEN).await.is_none(),
        "a removed token still works"
    );
    assert!(lists(&old_ca, BOB_TOKEN).await.is_none());
    assert!(
        daemon.try_exit_status().is_none(),
        "SIGHUP killed the daemon"
    );
    daemon.terminate();
    let status = daemon
        .wait_exit(treaty_tests::harness::PATIENCE)
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_belong_to_their_principal_and_admins_see_all() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.auth_tokens = Some(token_file(dir.path()));
    let coordinator = Coordinator::start_with(config.clone()).await;
    let alice = connect_as(&coordinator.endpoint, Some(ALICE_TOKEN)).await;
    let bob = connect_as(&coordinator.endpoint, Some(BOB_TOKEN)).await;
    let root = connect_as(&coordinator.endpoint, Some(ROOT_TOKEN)).await;

    let open = alice
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("a", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    let denied = |error: treaty_sdk::ClientError| {
        assert_eq!(error.code(), Some(Code::PermissionDenied), "{error}");
    };
    denied(
        bob.enlist(&open, BranchSpec::new("b", &participant.endpoint, "yes"))
            .await
            .unwrap_err(),
    );
    denied(bob.commit(&open).await.unwrap_err());
    denied(bob.abort(&open, "mine now").await.unwrap_err());
    denied(bob.get(&open).await.unwrap_err());
    denied(bob.watch(&open).await.err().expect("watch refused"));
    let untouched = alice.get(&open).await.unwrap().unwrap();
    assert_eq!(untouched.branches.len(), 1, "bob's enlist changed it");
    assert_eq!(
        untouched.state,
        treaty_sdk::client::TransactionState::Active as i32,
        "bob's commit or abort changed it"
    );
    assert!(participant.participant.calls().is_empty());

    // Lists: one's own; admins see all.
    let bobs = bob
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("a", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    assert_eq!(ids_of(&alice).await, vec![open.clone()]);
    assert_eq!(ids_of(&bob).await, vec![bobs.clone()]);
    let mut all = ids_of(&root).await;
    all.sort();
    let mut expected = vec![open.clone(), bobs.clone()];
    expected.sort();
    assert_eq!(all, expected);

    // Operator verbs are for admins only: others are refused before anything changes.
    let pause = |id: &str| pb::OperatorRequest {
        transaction_id: id.to_string(),
        reason: "look".into(),
    };
    for token in [Some(ALICE_TOKEN), Some(BOB_TOKEN), None] {
        let mut admin = admin_as(&coordinator.endpoint, token).await;
        let code = if token.is_some() {
            Code::PermissionDenied
        } else {
            Code::Unauthenticated
        };
        assert_eq!(admin.pause(pause(&open)).await.unwrap_err().code(), code);
        assert_eq!(admin.resume(pause(&open)).await.unwrap_err().code(), code);
        assert_eq!(
            admin.retry_now(pause(&open)).await.unwrap_err().code(),
            code
        );
        assert_eq!(admin.cancel(pause(&open)).await.unwrap_err().code(), code);
        assert_eq!(admin.forget(pause(&open)).await.unwrap_err().code(), code);
        let resolve = pb::ResolveRequest {
            transaction_id: open.clone(),
            branch_id: "a".into(),
            outcome: pb::Resolution::Abort as i32,
            reason: String::new(),
        };
        assert_eq!(admin.resolve(resolve).await.unwrap_err().code(), code);
        assert_eq!(
            admin
                .list_endpoints(pb::ListEndpointsRequest {})
                .await
                .unwrap_err()
                .code(),
            code
        );
    }
    assert!(!alice.get(&open).await.unwrap().unwrap().paused);
    let mut admin = admin_as(&coordinator.endpoint, Some(ROOT_TOKEN)).await;
    let paused = admin.pause(pause(&open)).await.unwrap().into_inner();
    assert!(paused.applied, "{paused:?}");
    let history = alice.get(&open).await.unwrap().unwrap().transitions;
    assert!(
        history
            .iter()
            .any(|t| t.reason == "retries paused by operator root: look"),
        "{history:?}"
    );
    assert!(
        admin
            .resume(pause(&open))
            .await
            .unwrap()
            .into_inner()
            .applied
    );

    // Idempotency keys are per principal: the same key names two sagas.
    let submit = |client: TreatyClient| {
        let endpoint = participant.endpoint.clone();
        async move {
            client
                .submit_saga(
                    vec![SagaStep::new("s", &endpoint, "yes")],
                    SubmitOptions {
                        idempotency_key: Some("order-1".into()),
                        wait_for_outcome: true,
                        ..SubmitOptions::default()
                    },
                )
                .await
                .unwrap()
        }
    };
    let alices_saga = submit(alice.clone()).await;
    let bobs_saga = submit(bob.clone()).await;
    assert!(alices_saga.created && bobs_saga.created);
    assert_ne!(alices_saga.transaction_id, bobs_saga.transaction_id);
    assert_eq!(alices_saga.transaction.idempotency_key, "order-1");
    let again = submit(alice.clone()).await;
    assert!(!again.created);
    assert_eq!(again.transaction_id, alices_saga.transaction_id);

    // The owner is in the log: after a restart, only alice (and admins) see her commit.
    assert_eq!(alice.commit(&open).await.unwrap(), Outcome::Committed);
    eventually("the commit is finished", || async {
        let txn = alice.get(&open).await.ok()??;
        (txn.state == treaty_sdk::client::TransactionState::Committed as i32).then_some(())
    })
    .await;
    coordinator.stop().await.unwrap();
    let coordinator = Coordinator::start_with(config).await;
    let alice = connect_as(&coordinator.endpoint, Some(ALICE_TOKEN)).await;
    let bob = connect_as(&coordinator.endpoint, Some(BOB_TOKEN)).await;
    let root = connect_as(&coordinator.endpoint, Some(ROOT_TOKEN)).await;
    denied(bob.get(&open).await.unwrap_err());
    assert!(alice.get(&open).await.unwrap().is_some());
    assert!(root.get(&open).await.unwrap().is_some());
    assert!(!ids_of(&bob).await.contains(&open));

    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_principal_cannot_take_every_transaction_slot() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.auth_tokens = Some(token_file(dir.path()));
    config.max_active_per_principal = 2;
    let coordinator = Coordinator::start_with(config).await;
    let (alice, bob) = (
        connect_as(&coordinator.endpoint, Some(ALICE_TOKEN)).await,
        connect_as(&coordinator.endpoint, Some(BOB_TOKEN)).await,
    );
    let branches = || vec![BranchSpec::new("a", &participant.endpoint, "yes")];
    let first = alice
        .begin(BeginOptions::default(), branches())
        .await
        .unwrap();
    alice
        .begin(BeginOptions::default(), branches())
        .await
        .unwrap();
    let refused = alice
        .begin(BeginOptions::default(), branches())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    let refused = alice
        .submit_saga(
            vec![SagaStep::new("s", &participant.endpoint, "yes")],
            SubmitOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    assert_eq!(
        ids_of(&alice).await.len(),
        2,
        "a refused call created something"
    );
    // Others are not held up, and a finished transaction frees its slot.
    bob.begin(BeginOptions::default(), branches())
        .await
        .unwrap();
    alice.abort(&first, "done").await.unwrap();
    eventually("the abort frees a slot", || async {
        alice.begin(BeginOptions::default(), branches()).await.ok()
    })
    .await;
    coordinator.stop().await.unwrap();
    participant.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_held_in_memory_have_a_budget() {
    use treaty_sdk::limits::MAX_PAYLOAD_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.max_payload_memory_bytes = 4 * MAX_PAYLOAD_BYTES;
    let coordinator = Coordinator::start_with(config).await;
    let client = coordinator.client().await;
    // "yes" then padding: the scripted participant reads the first word.
    let big = |id: &str| {
        let mut payload = b"yes ".to_vec();
        payload.resize(MAX_PAYLOAD_BYTES, b'.');
        BranchSpec::new(id, &participant.endpoint, payload)
    };
    let first = client
        .begin(BeginOptions::default(), vec![big("a"), big("b"), big("c")])
        .await
        .unwrap();
    let refused = client
        .begin(BeginOptions::default(), vec![big("a"), big("b")])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    client.enlist(&first, big("d")).await.unwrap();
    let refused = client.enlist(&first, big("e")).await.unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    let refused = client
        .submit_saga(
            vec![SagaStep::new("s", &participant.endpoint, vec![b'.'; 1024])],
            SubmitOptions::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    assert_eq!(client.get(&first).await.unwrap().unwrap().branches.len(), 4);
    assert_eq!(ids_of(&client).await, vec![first.clone()]);
    // A finished transaction gives its bytes back.
    client.abort(&first, "done").await.unwrap();
    eventually("the abort frees the budget", || async {
        client
            .begin(BeginOptions::default(), vec![big("a"), big("b")])
            .await
            .ok()
    })
    .await;
    coordinator.stop().await.unwrap();
    participant.stop().await;
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
