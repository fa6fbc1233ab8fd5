//! In-process servers for tests: a coordinator (the daemon's own `run_on`) and scripted
//! participants (the SDK's own `serve`), each on 127.0.0.1 port 0 with a real sled
//! directory. Dropping a handle does not stop it; call `stop` (bounded in time).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use treaty_coordinator::config::ServeConfig;
use treaty_sdk::TreatyClient;
use treaty_sdk::in_doubt::InDoubtOptions;
use treaty_sdk::server::ServeOptions;

use crate::scripted::Scripted;

/// How long a test waits for anything that should happen "soon". Generous on purpose:
/// tests must pass on a loaded 2-core machine.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Polls `check` every 50 ms until it returns `Some`, for at most `PATIENCE`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "gave up after {PATIENCE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `http://127.0.0.1:PORT`, or with TLS `https://localhost:PORT` (the name test
/// certificates carry).
fn local_endpoint(listener: &TcpListener, tls: bool) -> String {
    let port = listener.local_addr().expect("bound address").port();
    if tls {
        format!("https://localhost:{port}")
    } else {
        format!("http://127.0.0.1:{port}")
    }
}

#[derive(Debug)]
pub struct Coordinator {
    pub endpoint: String,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), treaty_coordinator::daemon::DaemonError>>,
}

/// Runs a two-phase commit over branches `a` and `b` of the two participants (both
/// vote YES), checks that it committed, and returns its id.
pub async fn commit_over(
    client: &TreatyClient,
    a: &ParticipantServer,
    b: &ParticipantServer,
) -> String {
    use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome};
    let (id, outcome) = client
        .run_two_phase(
            vec![
                BranchSpec::new("a", &a.endpoint, "yes"),
                BranchSpec::new("b", &b.endpoint, "yes"),
            ],
            BeginOptions::default(),
        )
        .await
        .expect("the two-phase commit runs");
    assert_eq!(outcome, Outcome::Committed);
    id
}

/// Test-friendly defaults: short timeouts and retries, one shard per core.
pub fn coordinator_config(data_dir: &Path) -> ServeConfig {
    let mut config = ServeConfig::new("127.0.0.1:0".parse().expect("a literal address"), data_dir);
    config.retry_backoff_initial_ms = 20;
    config.retry_backoff_max_ms = 200;
    config.participant_call_timeout_ms = 2_000;
    config.shutdown_grace_ms = 2_000;
    config.default_step_timeout_ms = 2_000;
    config.compensation_stuck_after_attempts = 3;
    config
}

impl Coordinator {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(coordinator_config(data_dir)).await
    }

    pub async fn start_with(config: ServeConfig) -> Self {
        let listener = TcpListener::bind(config.listen).await.expect("bind port 0");
        let endpoint = local_endpoint(&listener, config.security.tls_cert.is_some());
        let (stop, stopped) = oneshot::channel::<()>();
        let data_dir = config.data_dir.clone();
        let task = tokio::spawn(treaty_coordinator::daemon::run_on(
            config,
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            endpoint,
            data_dir,
            stop: Some(stop),
            task,
        }
    }

    pub async fn client(&self) -> TreatyClient {
        TreatyClient::connect(self.endpoint.clone())
            .await
            .expect("connect to the test coordinator")
    }

    /// Stops it gracefully and returns how `run_on` ended.
    pub async fn stop(mut self) -> Result<(), treaty_coordinator::daemon::DaemonError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("coordinator stops in time")
            .expect("coordinator task did not panic")
    }
}

#[derive(Debug)]
pub struct ParticipantServer {
    pub endpoint: String,
    pub participant: Arc<Scripted>,
    pub data_dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), treaty_sdk::ServeError>>,
}

/// In-doubt resolution that asks quickly, for tests.
pub fn quick_in_doubt() -> InDoubtOptions {
    InDoubtOptions {
        poll_interval_ms: 200,
        ask_after_ms: 300,
        call_timeout_ms: 1_000,
        max_branches_per_round: 256,
        ..InDoubtOptions::default()
    }
}

impl ParticipantServer {
    pub async fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, ServeOptions::default()).await
    }

    /// With `options` (TLS, trust); in-doubt resolution and the grace period are the
    /// tests' quick ones.
    pub async fn start_with(data_dir: &Path, options: ServeOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        Self::start_on(listener, data_dir, options)
    }

    /// [`Self::start_with`] on `listener`, bound earlier (calls made to it before are
    /// served now).
    pub fn start_on(listener: TcpListener, data_dir: &Path, options: ServeOptions) -> Self {
        let endpoint = local_endpoint(&listener, options.tls.is_some());
        let participant = Arc::new(Scripted::new());
        let options = ServeOptions {
            in_doubt: InDoubtOptions {
                coordinator_client: options.in_doubt.coordinator_client.clone(),
                ..quick_in_doubt()
            },
            shutdown_grace_ms: 2_000,
            ..options
        };
        let store = Arc::new(
            treaty_sdk::durable::DurableStore::open(data_dir, Default::default())
                .expect("open the participant's store"),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(treaty_sdk::serve(
            participant.clone(),
            store,
            listener,
            options,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            endpoint,
            participant,
            data_dir: data_dir.to_path_buf(),
            stop: Some(stop),
            task,
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("participant stops in time")
            .expect("participant task did not panic")
            .expect("participant stopped cleanly");
    }
}

/// What the barrier in a (stopped) participant's directory recorded for a branch.
pub fn barrier_record(
    data_dir: &Path,
    transaction_id: &str,
    branch_id: &str,
) -> Option<treaty_sdk::barrier::BranchRecord> {
    let store = treaty_sdk::durable::DurableStore::open(data_dir, Default::default())
        .expect("open the participant's barrier");
    let barrier = treaty_sdk::barrier::Barrier::new(Arc::new(store));
    barrier
        .record(&treaty_sdk::BranchContext::new(
            transaction_id.to_string(),
            branch_id.to_string(),
        ))
        .expect("read the barrier")
}

/// What the (stopped) coordinator's log holds for a transaction.
pub fn log_record(
    data_dir: &Path,
    transaction_id: &str,
) -> Option<treaty_coordinator::model::TxnRecord> {
    use treaty_coordinator::log::DecisionLog;
    let log = treaty_coordinator::log::SledLog::open(data_dir).expect("open the coordinator's log");
    let id = transaction_id.parse().expect("a transaction id");
    let record = log.get(&id).expect("read the log");
    log.close().expect("close the log");
    record
}

/// A two-phase record with no branches, for tests of the log itself: its reason is
/// `padding` bytes long, so that its size can be chosen.
pub fn bare_record(
    id: treaty_coordinator::model::TxnId,
    state: treaty_coordinator::model::TxnState,
    padding: usize,
) -> treaty_coordinator::model::TxnRecord {
    treaty_coordinator::model::TxnRecord {
        id,
        kind: treaty_coordinator::model::TxnKind::TwoPhase,
        state,
        created_unix_ms: 1_700_000_000_000,
        deadline_unix_ms: 1_700_000_060_000,
        prepare_timeout_ms: 5_000,
        reason: Some("p".repeat(padding)),
        branches: Vec::new(),
        transitions: Vec::new(),
        ended_unix_ms: state.is_final().then_some(1_700_000_001_000),
        idempotency_key: None,
        stuck: false,
        saga: None,
        owner: None,
        paused: false,
    }
}

/// Asks a participant, through the real protocol, what its barrier recorded for a
/// branch: a duplicate Prepare is answered from the record without running user code
/// (NO once the branch is aborted, YES while prepared or committed).
pub async fn recorded_vote(endpoint: &str, transaction_id: &str, branch_id: &str) -> Option<i32> {
    let mut client =
        treaty_proto::v1::participant_client::ParticipantClient::connect(endpoint.to_string())
            .await
            .ok()?;
    let response = client
        .prepare(treaty_proto::v1::PrepareBranchRequest {
            transaction_id: transaction_id.to_string(),
            branch_id: branch_id.to_string(),
            payload: b"yes".to_vec(),
            coordinator_endpoint: String::new(),
        })
        .await
        .ok()?;
    Some(response.into_inner().vote)
}

/// The services a server lists through gRPC reflection v1.
pub async fn reflected_services_v1(channel: tonic::transport::Channel) -> Vec<String> {
    use tonic_reflection::pb::v1;
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected v1 reflection answer: {response:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}
