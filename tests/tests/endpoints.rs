//! Where the coordinator may call, over real gRPC on 127.0.0.1: endpoints are parsed
//! strictly and kept in canonical form, refused ones are INVALID_ARGUMENT naming the field
//! and create nothing, `--allow-endpoint` restricts them, and a branch's error does not
//! tell a closed port from an open one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tonic::Code;
use treaty_coordinator::participants::UNREACHABLE;
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome};
use treaty_tests::harness::{Coordinator, ParticipantServer, coordinator_config};

type Api = CoordinatorClient<tonic::transport::Channel>;

fn spec(id: &str, endpoint: &str) -> pb::BranchSpec {
    pb::BranchSpec {
        branch_id: id.into(),
        endpoint: endpoint.into(),
        payload: b"yes".to_vec(),
    }
}

fn step(id: &str, endpoint: &str) -> pb::SagaStep {
    pb::SagaStep {
        step_id: id.into(),
        endpoint: endpoint.into(),
        payload: b"yes".to_vec(),
        ..Default::default()
    }
}

fn begin(branches: Vec<pb::BranchSpec>) -> pb::BeginRequest {
    pb::BeginRequest {
        deadline_unix_ms: 0,
        prepare_timeout_ms: 0,
        branches,
        ..Default::default()
    }
}

fn saga(steps: Vec<pb::SagaStep>) -> pb::SubmitSagaRequest {
    pb::SubmitSagaRequest {
        steps,
        ..Default::default()
    }
}

/// Asserts `result` is INVALID_ARGUMENT starting with `field: ` and containing `says`;
/// returns the message.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    field: &str,
    says: &str,
) -> String {
    let status = result.expect_err("the endpoint should be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message().to_string();
    assert!(
        message.starts_with(&format!("{field}: ")) && message.contains(says),
        "expected {field:?} and {says:?} in {message:?}"
    );
    message
}

async fn transaction(api: &mut Api, id: &str) -> pb::Transaction {
    api.get_transaction(pb::GetTransactionRequest {
        transaction_id: id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .transaction
    .expect("the transaction exists")
}

async fn ids(api: &mut Api) -> Vec<String> {
    all_transactions(api)
        .await
        .into_iter()
        .map(|t| t.transaction_id)
        .collect()
}

async fn all_transactions(api: &mut Api) -> Vec<pb::Transaction> {
    api.list_transactions(pb::ListTransactionsRequest {
        states: vec![],
        page_size: 1000,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .transactions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_endpoints_name_the_field_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let good = participant.endpoint.clone();
    let port = good.rsplit(':').next().unwrap().to_string();
    let mut api = CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    // The transaction Enlist is aimed at.
    let id = api
        .begin(begin(vec![spec("a", &good)]))
        .await
        .unwrap()
        .into_inner()
        .transaction_id;
    let before = all_transactions(&mut api).await;

    for (endpoint, says) in [
        ("http://169.254.169.254:80", "is a cloud metadata service"),
        (
            "http://metadata.google.internal:80",
            "is a cloud metadata service",
        ),
        ("http://[fd00:ec2::254]:80", "is a cloud metadata service"),
        ("http://169.254.10.1:80", "is a link-local address"),
        ("http://[fe80::1]:80", "is a link-local address"),
        ("http://0.0.0.0:80", "is an unspecified address"),
        ("http://[::]:80", "is an unspecified address"),
        ("http://255.255.255.255:80", "is a broadcast address"),
        ("http://224.0.0.1:80", "is a multicast address"),
        (&format!("http://127.1:{port}"), "four decimal octets"),
        (&format!("http://2130706433:{port}"), "four decimal octets"),
        (&format!("http://0x7f.0.0.1:{port}"), "four decimal octets"),
        (&format!("http://0177.0.0.1:{port}"), "four decimal octets"),
        (&format!("http://127.0.0.1:0{port}"), "leading zeros"),
        (&format!("http://user@127.0.0.1:{port}"), "user information"),
        (&format!("http://127.0.0.1:{port}/path"), "no path"),
        (
            &format!("http://%31%32%37.0.0.1:{port}"),
            "percent-encoding",
        ),
    ] {
        assert_refused(
            api.begin(begin(vec![spec("a", &good), spec("b", endpoint)]))
                .await,
            "branches[1].endpoint",
            says,
        );
        assert_refused(
            api.enlist(pb::EnlistRequest {
                transaction_id: id.clone(),
                branch: Some(spec("b", endpoint)),
            })
            .await,
            "branch.endpoint",
            says,
        );
        assert_refused(
            api.submit_saga(saga(vec![step("a", &good), step("b", endpoint)]))
                .await,
            "steps[1].endpoint",
            says,
        );
    }

    // Control characters come back escaped, and the input quoted at most ~200 bytes.
    let hostile = format!("http://a\u{1b}[2J\u{7}{}:1", "x".repeat(230));
    let message = assert_refused(
        api.begin(begin(vec![spec("a", &hostile)])).await,
        "branches[0].endpoint",
        r"\u{1b}[2J\u{7}",
    );
    assert!(!message.contains(['\u{1b}', '\u{7}']), "{message:?}");
    let cut = format!("… ({} bytes)", hostile.len());
    assert!(message.contains(&cut), "{message:?}");
    assert!(message.len() < 600, "{} bytes", message.len());

    // Nothing was created, and the target of the enlists still has its one branch.
    assert_eq!(all_transactions(&mut api).await, before);
    assert_eq!(transaction(&mut api, &id).await.branches.len(), 1);

    // Another spelling of the participant is accepted, and kept in canonical form.
    let spelled = format!("HTTP://[::ffff:127.0.0.1]:{port}/");
    api.enlist(pb::EnlistRequest {
        transaction_id: id.clone(),
        branch: Some(spec("b", &spelled)),
    })
    .await
    .unwrap();
    let outcome = api
        .commit(pb::CommitRequest {
            transaction_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.outcome, pb::Outcome::Committed as i32);
    let txn = transaction(&mut api, &id).await;
    let endpoints: Vec<&str> = txn.branches.iter().map(|b| b.endpoint.as_str()).collect();
    assert_eq!(endpoints, [good.as_str(), good.as_str()]);

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowlist_admits_only_matching_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let port = participant.endpoint.rsplit(':').next().unwrap().to_string();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.allow_endpoint = vec![format!("127.0.0.1:{port}"), "169.254.0.0/16:*".into()];
    let coordinator = Coordinator::start_with(config).await;
    let client = coordinator.client().await;
    let mut api = CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();

    // The allowed participant takes part in both kinds of transaction.
    let (_, outcome) = client
        .run_two_phase(
            vec![
                BranchSpec::new("a", &participant.endpoint, "yes"),
                BranchSpec::new("b", format!("http://[::ffff:7f00:1]:{port}"), "yes"),
            ],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let submitted = api
        .submit_saga(pb::SubmitSagaRequest {
            wait_for_outcome: true,
            ..saga(vec![step("a", &participant.endpoint)])
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        submitted.transaction.unwrap().state,
        pb::TransactionState::Completed as i32
    );
    // Phase 2 may still be under way: compare ids only.
    let before = ids(&mut api).await;
    assert_eq!(before.len(), 2);

    // Everything else is refused, also other spellings of the same host by name.
    let other_port = if port == "1" { "2" } else { "1" };
    for endpoint in [
        format!("http://127.0.0.1:{other_port}"),
        format!("http://localhost:{port}"),
        format!("http://10.0.0.1:{port}"),
    ] {
        assert_refused(
            api.begin(begin(vec![spec("a", &endpoint)])).await,
            "branches[0].endpoint",
            "matches no --allow-endpoint pattern",
        );
        assert_refused(
            api.submit_saga(saga(vec![step("a", &endpoint)])).await,
            "steps[0].endpoint",
            "matches no --allow-endpoint pattern",
        );
    }
    // A network inside the link-local class names it; the metadata address stays refused.
    assert_refused(
        api.begin(begin(vec![spec("a", "http://169.254.169.254:80")]))
            .await,
        "branches[0].endpoint",
        "is a cloud metadata service",
    );
    assert_eq!(ids(&mut api).await, before);
    let allowed = api
        .begin(begin(vec![spec("a", "http://169.254.10.1:80")]))
        .await
        .unwrap()
        .into_inner()
        .transaction_id;
    api.abort(pb::AbortRequest {
        transaction_id: allowed,
        reason: String::new(),
    })
    .await
    .unwrap();

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_allowlist_stops_the_daemon_at_start_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.allow_endpoint = vec!["10.0.0.0/8:*".into(), "*:*".into()];
    let error = Coordinator::start_with(config)
        .await
        .stop()
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("invalid configuration: allow_endpoint: pattern 1 (\"*:*\")"),
        "{error}"
    );
}

/// Serves TCP on 127.0.0.1 port 0, answering each connection with `reply` and closing it.
async fn not_a_participant(reply: &'static [u8]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.write_all(reply).await;
            let _ = socket.shutdown().await;
        }
    });
    endpoint
}

/// Before, the closed port read `Unavailable: tcp connect error` and the others
/// `Cancelled: operation was canceled`: enough to scan ports through the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_and_a_port_that_speaks_something_else_look_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;

    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let targets = [
        ("closed port", closed),
        ("closes at once", not_a_participant(b"").await),
        (
            "SSH banner",
            not_a_participant(b"SSH-2.0-OpenSSH_9.6\r\n").await,
        ),
        (
            "HTTP/1.1 server",
            not_a_participant(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n").await,
        ),
    ];
    let mut seen = Vec::new();
    for (what, endpoint) in targets {
        let (id, outcome) = client
            .run_two_phase(
                vec![
                    BranchSpec::new("a", &participant.endpoint, "yes"),
                    BranchSpec::new("b", &endpoint, "yes"),
                ],
                BeginOptions::default(),
            )
            .await
            .unwrap();
        let Outcome::Aborted { reason } = outcome else {
            panic!("{what}: committed without b");
        };
        let txn = client.get(&id).await.unwrap().unwrap();
        assert_eq!(txn.reason, reason, "{what}");
        let b = txn.branches.iter().find(|b| b.branch_id == "b").unwrap();
        assert_eq!(b.last_error, UNREACHABLE, "{what}");
        let prepare = b
            .history
            .first()
            .map(|a| a.result.clone())
            .unwrap_or_default();
        seen.push((what, reason, prepare));
    }
    let expected_reason = format!("branch b did not answer prepare: {UNREACHABLE}");
    let expected_prepare = format!("error: {UNREACHABLE}");
    for (what, reason, prepare) in &seen {
        assert_eq!(reason, &expected_reason, "{what}");
        assert_eq!(prepare, &expected_prepare, "{what}");
    }

    participant.stop().await;
    coordinator.stop().await.unwrap();
}
