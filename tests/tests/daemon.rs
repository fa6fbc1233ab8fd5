//! `treaty serve` as a process: graceful stop on SIGTERM, restart on the same data, a
//! SIGHUP while starting, standard health and reflection services for generic gRPC
//! clients.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use treaty_sdk::TreatyClient;
use treaty_sdk::client::{BeginOptions, BranchSpec, BranchState, Outcome, TransactionState};
use treaty_tests::harness::{
    PATIENCE, ParticipantServer, commit_over, eventually, reflected_services_v1,
};
use treaty_tests::process::{exit_status, start_treaty, workspace_binary};
use treaty_tests::scripted::Op;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_a_restart_remembers_committed_work() {
    let dir = tempfile::tempdir().unwrap();
    let a = ParticipantServer::start(&dir.path().join("a")).await;
    let b = ParticipantServer::start(&dir.path().join("b")).await;
    let data_dir = dir.path().join("coordinator");
    let mut coordinator = start_treaty(&data_dir, "127.0.0.1:0", None).await;
    let client = TreatyClient::connect(coordinator.endpoint()).await.unwrap();
    let committed = commit_over(&client, &a, &b).await;
    eventually("the commit is acknowledged everywhere", || async {
        let txn = client.get(&committed).await.unwrap()?;
        (txn.state == TransactionState::Committed as i32).then_some(())
    })
    .await;

    // A transaction still preparing when the stop comes is aborted, and its caller told.
    let undecided = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("a", &a.endpoint, "yes"),
                BranchSpec::new("b", &b.endpoint, "slow:3000"),
            ],
        )
        .await
        .unwrap();
    let waiting = {
        let client = client.clone();
        let id = undecided.clone();
        tokio::spawn(async move { client.commit(&id).await })
    };
    eventually(
        "a voted YES while b's slow prepare is under way",
        || async {
            let txn = client.get(&undecided).await.unwrap()?;
            let a = txn.branches.iter().find(|b| b.branch_id == "a")?;
            (a.state == BranchState::Prepared as i32).then_some(())
        },
    )
    .await;
    coordinator.terminate();
    assert_eq!(
        waiting.await.unwrap().unwrap(),
        Outcome::Aborted {
            reason: "the coordinator is shutting down".into()
        }
    );
    let status = exit_status(&mut coordinator).await;
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        coordinator.log_tail(60)
    );
    eventually("both participants are told to abort", || async {
        let a_ops = a.participant.ops(&undecided, "a");
        let b_ops = b.participant.ops(&undecided, "b");
        (a_ops == [Op::Prepare, Op::Abort] && b_ops == [Op::Prepare, Op::Abort]).then_some(())
    })
    .await;

    let mut restarted = start_treaty(&data_dir, "127.0.0.1:0", None).await;
    let client = TreatyClient::connect(restarted.endpoint()).await.unwrap();
    let txn = client
        .get(&committed)
        .await
        .unwrap()
        .expect("the commit is in the log");
    assert_eq!(txn.state, TransactionState::Committed as i32);
    restarted.terminate();
    assert!(exit_status(&mut restarted).await.success());
    a.stop().await;
    b.stop().await;
}

/// `treaty serve` as a process held before it opens its log (the
/// `coordinator::before_log_open` hold point), its stderr in `dir/serve.log`.
struct HeldDaemon {
    process: tokio::process::Child,
    release: std::path::PathBuf,
    log_file: std::path::PathBuf,
}

impl HeldDaemon {
    async fn start(dir: &std::path::Path) -> Self {
        let release = dir.join("release");
        let log_file = dir.join("serve.log");
        let hold = format!(
            "coordinator::before_log_open=return({})",
            release.to_string_lossy()
        );
        let process =
            tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.join("coordinator"))
                .env("FAILPOINTS", &hold)
                .env("TREATY_LOG", "info")
                .stdout(std::process::Stdio::piped())
                .stderr(std::fs::File::create(&log_file).unwrap())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
        let held = Self {
            process,
            release,
            log_file,
        };
        eventually("the daemon holds before opening its log", || async {
            held.log()
                .contains("failpoint coordinator::before_log_open reached")
                .then_some(())
        })
        .await;
        held
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_file).unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.process.id().unwrap() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// Lets it open its log and go on; then whether it printed that it listens, read
    /// until it does or its stdout ends (bounded).
    async fn release_and_see_whether_it_serves(&mut self) -> bool {
        use tokio::io::{AsyncBufReadExt, BufReader};
        std::fs::write(&self.release, b"").unwrap();
        let mut lines = BufReader::new(self.process.stdout.take().unwrap()).lines();
        tokio::time::timeout(PATIENCE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("treaty listening on") {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }
}

/// SIGHUP never stops the daemon (docs/SECURITY.md), not even while it starts: its
/// handler was installed only after recovery, and a SIGHUP before (a log takes a while
/// to recover) killed it. One sent while the daemon is held before opening its log is
/// taken as a reload once it serves (the files may have changed after it read them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_while_starting_does_not_stop_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = HeldDaemon::start(dir.path()).await;
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let listening = daemon.release_and_see_whether_it_serves().await;
    assert!(
        listening,
        "the daemon did not serve ({:?}); its log:\n{}",
        daemon.process.try_wait(),
        daemon.log()
    );
    eventually("the SIGHUP is taken as a reload", || async {
        daemon
            .log()
            .contains("SIGHUP: reloading certificates and tokens")
            .then_some(())
    })
    .await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(PATIENCE, daemon.process.wait())
        .await
        .expect("the daemon stops")
        .unwrap();
    assert!(status.success(), "{status:?}; its log:\n{}", daemon.log());
}

/// A SIGTERM while the daemon opens and recovers its log (which can take a while) stops
/// it before it serves: it served first, and took requests it was told to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_stops_the_daemon_before_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = HeldDaemon::start(dir.path()).await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let listening = daemon.release_and_see_whether_it_serves().await;
    let status = tokio::time::timeout(PATIENCE, daemon.process.wait())
        .await
        .expect("the daemon stops")
        .unwrap();
    let log = daemon.log();
    assert!(!listening, "it served; its log:\n{log}");
    assert!(status.success(), "{status:?}; its log:\n{log}");
    assert!(log.contains("stopping before serving"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_grpc_client_can_discover_and_health_check_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = treaty_tests::harness::Coordinator::start(dir.path()).await;
    let channel = Channel::from_shared(coordinator.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    // The coordinator's service and the server as a whole ("", which generic probes
    // such as grpc_health_probe and Kubernetes ask by default).
    let services = ["treaty.v1.Coordinator", ""];
    let mut health = HealthClient::new(channel.clone());
    let mut watches = Vec::new();
    for service in services {
        let request = || tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let status = health.check(request()).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
        let mut watch = health.watch(request()).await.unwrap().into_inner();
        let first = watch.message().await.unwrap().unwrap().status;
        assert_eq!(first, ServingStatus::Serving as i32, "{service:?}");
        watches.push((service, watch));
    }

    let names = reflected_services_v1(channel.clone()).await;
    for expected in ["treaty.v1.Coordinator", "grpc.health.v1.Health"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing from {names:?}"
        );
    }

    // The descriptor of the service is served too, so a client can build requests.
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "treaty.v1.Coordinator".into(),
        )),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    assert!(matches!(
        response.message_response,
        Some(MessageResponse::FileDescriptorResponse(ref files)) if !files.file_descriptor_proto.is_empty()
    ));

    // Stopping, both say NOT_SERVING, so that a load balancer drains the coordinator (the
    // server as a whole said SERVING to the end).
    let stopped = tokio::spawn(coordinator.stop());
    for (service, mut watch) in watches {
        let next = tokio::time::timeout(PATIENCE, watch.message())
            .await
            .unwrap_or_else(|_| panic!("{service:?}: no status within {PATIENCE:?}"));
        let status = next
            .as_ref()
            .ok()
            .and_then(|message| message.as_ref())
            .map(|m| m.status);
        assert_eq!(
            status,
            Some(ServingStatus::NotServing as i32),
            "{service:?}: {next:?}"
        );
    }
    stopped.await.unwrap().unwrap();
}

/// `shutdown_grace_ms` bounds the whole stop: work in flight in the runtime and requests
/// in flight at the server share one grace period. They waited one after the other, so
/// a commit still being delivered and a client holding a stream open (a reflection
/// stream here, as `grpcurl` holds one) kept the daemon up for twice the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_and_the_server_share_one_shutdown_grace() {
    const GRACE_MS: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let a = ParticipantServer::start(&dir.path().join("a")).await;
    let b = ParticipantServer::start(&dir.path().join("b")).await;
    // a never acknowledges phase 2: the runtime waits the whole grace for it.
    a.participant.fail_next_commits(u32::MAX);
    let mut config = treaty_tests::harness::coordinator_config(&dir.path().join("coordinator"));
    config.shutdown_grace_ms = GRACE_MS;
    let coordinator = treaty_tests::harness::Coordinator::start_with(config).await;
    let client = TreatyClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    commit_over(&client, &a, &b).await;

    // A stream whose client never ends its requests: the server waits for it.
    let channel = Channel::from_shared(coordinator.endpoint.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (requests, held) = tokio::sync::mpsc::channel(1);
    requests
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .unwrap();
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(held))
        .await
        .unwrap()
        .into_inner();
    responses.message().await.unwrap().unwrap();

    let started = std::time::Instant::now();
    coordinator.stop().await.unwrap();
    let took = started.elapsed();
    // The runtime's wait happened (the commit was still undelivered), and nothing waited
    // a second grace after it. The margin is for a loaded machine.
    let grace = std::time::Duration::from_millis(GRACE_MS);
    assert!(took >= grace.mul_f64(0.9), "stopped after {took:?}");
    assert!(
        took < grace.mul_f64(1.6),
        "stopped after {took:?}, grace {grace:?}"
    );
    drop(requests);
    a.stop().await;
    b.stop().await;
}
