//! The participant server's `/metrics`, against real gRPC and a real sled directory: a
//! known workload, then exact counts of operations by result, of the barrier's records
//! (those found at start included, those collected subtracted), of branches in doubt.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::barrier::Barrier;
use treaty_sdk::barrier_gc::BarrierGcOptions;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::in_doubt::InDoubtOptions;
use treaty_sdk::server::{MetricsListen, ServeError, ServeOptions};
use treaty_sdk::transaction_age::first_transaction_id_at;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

/// Nothing listens there: every question about a branch in doubt fails.
const UNREACHABLE_COORDINATOR: &str = "http://127.0.0.1:9";
const RETENTION_MS: u64 = 300;
const AHEAD_MS: u64 = 2_000;
const PATIENCE: Duration = Duration::from_secs(30);

/// Votes by payload: "no" → NO, "ro" → READ_ONLY, "fail" → an error, "panic" → a
/// panic; else YES.
#[derive(Debug, Default)]
struct ByPayload;

impl Participant for ByPayload {
    async fn prepare(&self, _: &BranchContext, payload: &[u8]) -> Result<Vote, ParticipantError> {
        match payload {
            b"no" => Ok(Vote::no("refused")),
            b"ro" => Ok(Vote::ReadOnly),
            b"fail" => Err(ParticipantError::new("the database is down")),
            b"panic" => panic!("user code broke"),
            _ => Ok(Vote::Yes),
        }
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The body of `GET /metrics` at `address`.
async fn scrape(address: SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: participant\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("the scrape is answered in time")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|value| value.trim().parse().unwrap())
}

fn operations(text: &str, operation: &str, result: &str) -> Option<f64> {
    sample(
        text,
        &format!(
            "treaty_participant_operations_total{{operation=\"{operation}\",result=\"{result}\"}}"
        ),
    )
}

fn prepare(txn: &str, branch: &str, payload: &[u8], coordinator: &str) -> pb::PrepareBranchRequest {
    pb::PrepareBranchRequest {
        transaction_id: txn.into(),
        branch_id: branch.into(),
        payload: payload.to_vec(),
        coordinator_endpoint: coordinator.into(),
    }
}

fn commit(
    txn: &str,
    branch: &str,
    mode: pb::CommitMode,
    payload: &[u8],
) -> pb::CommitBranchRequest {
    pb::CommitBranchRequest {
        transaction_id: txn.into(),
        branch_id: branch.into(),
        mode: mode as i32,
        payload: payload.to_vec(),
        coordinator_endpoint: String::new(),
    }
}

/// A participant served on loopback with `/metrics` on a port of its own.
struct Served {
    endpoint: String,
    metrics_address: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Served {
    /// Serves `participant` over `store` with `options` and metrics on.
    async fn start<P: Participant>(
        participant: Arc<P>,
        store: Arc<DurableStore>,
        options: ServeOptions,
    ) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let metrics_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let metrics_address = metrics_listener.local_addr().unwrap();
        let options = ServeOptions {
            metrics_listen: Some(metrics_listener.into()),
            ..options
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(treaty_sdk::serve(
            participant,
            store,
            listener,
            options,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            endpoint,
            metrics_address,
            stop,
            server,
        }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.server.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_known_workload_is_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    // A record from before the server started: counted at start.
    Barrier::new(store.clone())
        .abort(&ByPayload, &BranchContext::new("before-start", "b"))
        .await
        .unwrap();

    let options = ServeOptions {
        in_doubt: InDoubtOptions {
            poll_interval_ms: 50,
            ask_after_ms: 0,
            call_timeout_ms: 500,
            ..InDoubtOptions::default()
        },
        barrier_gc: BarrierGcOptions {
            retention_ms: RETENTION_MS,
            interval_ms: 50,
            max_records_per_round: 100,
            round_pause_ms: 0,
        },
        ..ServeOptions::default()
    };
    let served = Served::start(Arc::new(ByPayload), store.clone(), options).await;
    let metrics_address = served.metrics_address;
    let mut client = ParticipantClient::connect(served.endpoint.clone())
        .await
        .unwrap();

    // Ids without an age: their records are never collected.
    let txn = "m-1";
    let votes = [
        ("a", &b"yes"[..], pb::Vote::Yes), // stays in doubt: its coordinator never answers
        ("a", b"yes", pb::Vote::Yes),      // a duplicate: answered from the record
        ("b", b"no", pb::Vote::No),
        ("c", b"ro", pb::Vote::ReadOnly),
    ];
    for (branch, payload, vote) in votes {
        let answer = client
            .prepare(prepare(txn, branch, payload, UNREACHABLE_COORDINATOR))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.vote, vote as i32, "{branch}");
    }
    let failed = client
        .prepare(prepare(txn, "h", b"fail", ""))
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    let invalid = client
        .prepare(prepare(txn, "no/slashes", b"yes", ""))
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    let commits = [
        (
            "x",
            pb::CommitMode::TwoPhase,
            &b""[..],
            pb::CommitResult::NotPrepared,
        ),
        (
            "f",
            pb::CommitMode::OnePhase,
            b"do",
            pb::CommitResult::Committed,
        ),
        (
            "g",
            pb::CommitMode::SagaStep,
            b"no",
            pb::CommitResult::Rejected,
        ),
    ];
    for (branch, mode, payload, result) in commits {
        let answer = client
            .commit(commit(txn, branch, mode, payload))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.result, result as i32, "{branch}");
    }
    let aborted = client
        .abort(pb::AbortBranchRequest {
            transaction_id: txn.into(),
            branch_id: "d".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aborted.result, pb::AbortResult::Aborted as i32);
    client
        .compensate(pb::CompensateBranchRequest {
            transaction_id: txn.into(),
            branch_id: "e".into(),
            payload: b"undo".to_vec(),
        })
        .await
        .unwrap();
    // Saga steps of a transaction "created" a little ahead (young however loaded the
    // machine while they run): collected once past the retention.
    let young = first_transaction_id_at(now_unix_ms() + AHEAD_MS);
    for branch in ["s1", "s2", "s3"] {
        let answer = client
            .commit(commit(&young, branch, pb::CommitMode::SagaStep, b"do"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.result, pb::CommitResult::Committed as i32);
    }

    // The collector deletes the three young records once they are old enough, and the
    // resolver finishes passes over the branch in doubt, asking its coordinator in vain.
    let started = Instant::now();
    let text = loop {
        let text = scrape(metrics_address).await;
        let collected = sample(&text, "treaty_participant_barrier_gc_removed_total");
        let age = sample(&text, "treaty_participant_in_doubt_oldest_age_seconds");
        let asked = sample(
            &text,
            "treaty_participant_outcome_inquiries_total{result=\"error\"}",
        );
        if collected == Some(3.0)
            && age.is_some_and(|age| age > 0.0)
            && asked.is_some_and(|asked| asked >= 1.0)
        {
            break text;
        }
        assert!(started.elapsed() < PATIENCE, "not there yet:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let expected = [
        ("prepare", "yes", 2.0),
        ("prepare", "no", 1.0),
        ("prepare", "read_only", 1.0),
        ("prepare", "error", 1.0),
        ("prepare", "refused", 1.0),
        ("commit", "not_prepared", 1.0),
        ("commit", "committed", 0.0),
        ("one_phase_commit", "committed", 1.0),
        ("saga_step", "rejected", 1.0),
        ("saga_step", "committed", 3.0),
        ("abort", "aborted", 1.0),
        ("abort", "already_committed", 0.0),
        ("compensate", "compensated", 1.0),
    ];
    for (operation, result, count) in expected {
        assert_eq!(
            operations(&text, operation, result),
            Some(count),
            "{operation} {result} in\n{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            "treaty_participant_operation_duration_seconds_count{operation=\"prepare\"}"
        ),
        Some(6.0)
    );
    // 1 from before the start, a b c d e f g, and the three saga steps, collected.
    assert_eq!(
        sample(&text, "treaty_participant_barrier_records"),
        Some(8.0),
        "{text}"
    );
    assert_eq!(store.db().scan_prefix(b"b/").count(), 8);
    assert_eq!(
        sample(&text, "treaty_participant_branches_in_doubt"),
        Some(1.0),
        "{text}"
    );
    for result in ["commit", "abort", "pending"] {
        assert_eq!(
            sample(
                &text,
                &format!("treaty_participant_outcome_inquiries_total{{result=\"{result}\"}}")
            ),
            Some(0.0)
        );
    }
    // The store's own counts: every durable answer above forced at least one group.
    let fsyncs = sample(&text, "treaty_participant_store_fsyncs_total").unwrap();
    let forced = sample(&text, "treaty_participant_store_forced_records_total").unwrap();
    assert!(fsyncs >= 1.0 && forced >= fsyncs, "{text}");
    let sync_time = sample(&text, "treaty_participant_store_fsync_seconds_total").unwrap();
    assert!(sync_time > 0.0, "{text}");

    served.stop().await;
}

#[tokio::test]
async fn metrics_beyond_loopback_need_unauthenticated_callers_allowed() {
    let options = ServeOptions {
        metrics_listen: Some(MetricsListen::Address("0.0.0.0:0".parse().unwrap())),
        ..ServeOptions::default()
    };
    let refused = refused_at_start(options).await;
    assert!(
        matches!(&refused, ServeError::Options(message) if message.contains("--allow-unauthenticated")),
        "{refused}"
    );
}

/// A token for asking coordinators without a list of them would go to whatever address
/// a Prepare named: refused at start.
#[tokio::test]
async fn a_coordinator_token_needs_listed_coordinators() {
    let mut options = ServeOptions::default();
    options.in_doubt.coordinator_client.token = Some("secret".into());
    let refused = refused_at_start(options).await;
    assert!(
        matches!(&refused, ServeError::Options(message) if message.contains("listed coordinators")),
        "{refused}"
    );
}

/// In-doubt branches are asked about with the configured token: one that cannot be sent
/// stops the start rather than leaving them unresolved without a word.
#[tokio::test]
async fn an_unusable_coordinator_token_stops_the_start() {
    let mut options = ServeOptions::default();
    options.in_doubt.coordinator_client.token = Some("line\nbreak".into());
    options.trust = treaty_sdk::trust::CoordinatorTrust::default().endpoint("http://127.0.0.1:9");
    let refused = refused_at_start(options).await;
    assert!(
        matches!(&refused, ServeError::Options(message) if message.contains("coordinator_client.token")),
        "{refused}"
    );
}

/// In-doubt options with which no branch in doubt would ever be resolved stop the
/// start, naming the field.
#[tokio::test]
async fn in_doubt_options_that_resolve_nothing_stop_the_start() {
    let mut options = ServeOptions::default();
    options.in_doubt.max_branches_per_round = 0;
    let refused = refused_at_start(options).await;
    assert!(
        matches!(&refused, ServeError::Options(message) if message.starts_with("in_doubt.max_branches_per_round: ")),
        "{refused}"
    );
    // Nor a client that could never reach a coordinator.
    let mut options = ServeOptions::default();
    options.in_doubt.coordinator_client.keepalive_timeout_ms = 0;
    let refused = refused_at_start(options).await;
    assert!(
        matches!(&refused, ServeError::Options(message) if message.starts_with("in_doubt.coordinator_client.keepalive_timeout_ms ")),
        "{refused}"
    );
}

/// A branch's prepare that does not end holds its lock: the calls for it that follow,
/// each given up by its caller and run on by itself, wait behind it up to
/// `MAX_WAITING_PER_KEY`; one more is answered UNAVAILABLE at once, so they cannot pile
/// up for as long as it lasts. Once it ends, the ones waiting answer from its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_piling_up_behind_one_that_does_not_end_are_refused() {
    use treaty_sdk::barrier::MAX_WAITING_PER_KEY;

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let participant = Arc::new(HeldPrepare::new());
    let served = Served::start(participant.clone(), store, ServeOptions::default()).await;
    let mut client = ParticipantClient::connect(served.endpoint.clone())
        .await
        .unwrap();
    let metrics_address = served.metrics_address;
    for given_up in 1..=1 + MAX_WAITING_PER_KEY {
        prepare_given_up(&mut client).await;
        // Counted once the server dropped it, its work moved to a task of its own.
        let started = Instant::now();
        while operations(&scrape(metrics_address).await, "prepare", "cancelled")
            != Some(given_up as f64)
        {
            assert!(started.elapsed() < PATIENCE, "call {given_up} not dropped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let refused = tokio::time::timeout(PATIENCE, client.prepare(prepare("c-1", "a", b"yes", "")))
        .await
        .expect("answered at once")
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("already wait"), "{refused:?}");
    participant.release.add_permits(1);
    let started = Instant::now();
    while participant
        .finished
        .load(std::sync::atomic::Ordering::SeqCst)
        < 1
    {
        assert!(started.elapsed() < PATIENCE, "the held prepare never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Refused while its record is being written, with the eight still waiting.
    let started = Instant::now();
    let repeat = loop {
        match client.prepare(prepare("c-1", "a", b"yes", "")).await {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                assert!(started.elapsed() < PATIENCE, "still refused: {status:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answered => break answered.unwrap().into_inner(),
        }
    };
    assert_eq!(repeat.vote, pb::Vote::Yes as i32);
    assert_eq!(
        participant
            .finished
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the prepares that waited answered from the record"
    );
}

/// A prepare whose caller went away runs on by itself; a shutdown that begins meanwhile
/// waits for it (within its grace period) before it closes the store, so its YES is
/// recorded: with the store closed under it, user code voted and nothing was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_waits_for_operations_whose_callers_went_away() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let participant = Arc::new(HeldPrepare::new());
    let options = ServeOptions {
        shutdown_grace_ms: 20_000,
        ..ServeOptions::default()
    };
    let served = Served::start(participant.clone(), store, options).await;
    let mut client = ParticipantClient::connect(served.endpoint.clone())
        .await
        .unwrap();
    prepare_given_up(&mut client).await;
    drop(client);

    let stopping = tokio::spawn(served.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "stopped with the prepare still held"
    );
    participant.release.add_permits(1);
    tokio::time::timeout(PATIENCE, stopping)
        .await
        .expect("stops once the prepare ended")
        .unwrap();

    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let barrier = treaty_sdk::barrier::Barrier::new(store);
    let in_doubt = barrier.in_doubt(10).unwrap();
    assert_eq!(in_doubt.len(), 1, "the YES was recorded: {in_doubt:?}");
    assert_eq!(in_doubt[0].branch.transaction_id, "c-1");
}

/// What `serve` says when it refuses to start with `options`, over a store of its own.
async fn refused_at_start(options: ServeOptions) -> ServeError {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    treaty_sdk::serve(
        Arc::new(ByPayload),
        store,
        listener,
        options,
        std::future::ready(()),
    )
    .await
    .unwrap_err()
}

/// Sends a prepare of branch `a` of `c-1` whose deadline passes while the participant
/// holds it: the server drops the call, and its work runs on by itself.
async fn prepare_given_up(client: &mut ParticipantClient<tonic::transport::Channel>) {
    let mut held = tonic::Request::new(prepare("c-1", "a", b"yes", ""));
    held.set_timeout(Duration::from_millis(100));
    let expired = client.prepare(held).await.unwrap_err();
    assert_eq!(expired.code(), tonic::Code::Cancelled, "{expired:?}");
}

/// Holds every prepare until a permit is released for it; counts the prepares that ran
/// to their end.
#[derive(Debug)]
struct HeldPrepare {
    release: tokio::sync::Semaphore,
    finished: std::sync::atomic::AtomicUsize,
}

impl HeldPrepare {
    fn new() -> Self {
        Self {
            release: tokio::sync::Semaphore::new(0),
            finished: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Participant for HeldPrepare {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        self.release.acquire().await.unwrap().forget();
        self.finished
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn compensate(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_call_dropped_before_its_answer_is_counted_as_cancelled_and_its_work_still_ends() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let participant = Arc::new(HeldPrepare::new());
    let served = Served::start(participant.clone(), store, ServeOptions::default()).await;
    let metrics_address = served.metrics_address;
    let mut client = ParticipantClient::connect(served.endpoint.clone())
        .await
        .unwrap();

    // The caller gives up while the prepare is held: its call is dropped (RST_STREAM).
    let given_up = tokio::time::timeout(
        Duration::from_millis(200),
        client.prepare(prepare("c-1", "a", b"yes", "")),
    )
    .await;
    assert!(given_up.is_err(), "the held prepare answered: {given_up:?}");
    let started = Instant::now();
    let text = loop {
        let text = scrape(metrics_address).await;
        if operations(&text, "prepare", "cancelled") == Some(1.0) {
            break text;
        }
        assert!(started.elapsed() < PATIENCE, "not counted yet:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(operations(&text, "prepare", "yes"), Some(0.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "treaty_participant_operation_duration_seconds_count{operation=\"prepare\"}"
        ),
        Some(1.0),
        "{text}"
    );
    // Every operation has the series from the start.
    assert_eq!(operations(&text, "abort", "cancelled"), Some(0.0), "{text}");

    // A caller that stays but whose deadline (`grpc-timeout`) passes: the server drops
    // the call itself and says so; counted the same way.
    let mut late = tonic::Request::new(prepare("c-2", "a", b"yes", ""));
    late.set_timeout(Duration::from_millis(200));
    let expired = tokio::time::timeout(PATIENCE, client.prepare(late))
        .await
        .expect("the server ends the call at its deadline")
        .unwrap_err();
    assert_eq!(expired.code(), tonic::Code::Cancelled, "{expired:?}");
    let text = scrape(metrics_address).await;
    assert_eq!(
        operations(&text, "prepare", "cancelled"),
        Some(2.0),
        "{text}"
    );

    // The prepares behind the dropped calls run to their end once released, and a
    // repeat is answered from its record (a YES, counted as one) without running again.
    participant.release.add_permits(2);
    let started = Instant::now();
    while participant
        .finished
        .load(std::sync::atomic::Ordering::SeqCst)
        < 2
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the held prepares never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let repeat = client
        .prepare(prepare("c-1", "a", b"yes", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(repeat.vote, pb::Vote::Yes as i32);
    assert_eq!(
        participant
            .finished
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    let text = scrape(metrics_address).await;
    assert_eq!(operations(&text, "prepare", "yes"), Some(1.0), "{text}");
    assert_eq!(
        operations(&text, "prepare", "cancelled"),
        Some(2.0),
        "{text}"
    );

    served.stop().await;
}

#[tokio::test]
async fn a_panic_in_user_code_is_answered_as_the_participant_failing_and_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
    let served = Served::start(Arc::new(ByPayload), store, ServeOptions::default()).await;
    let mut client = ParticipantClient::connect(served.endpoint.clone())
        .await
        .unwrap();

    let panicked = client
        .prepare(prepare("p-1", "a", b"panic", ""))
        .await
        .unwrap_err();
    assert_eq!(panicked.code(), tonic::Code::Unavailable, "{panicked:?}");
    assert!(
        panicked
            .message()
            .contains("participant code panicked: user code broke"),
        "{panicked:?}"
    );
    // No record was written: asked again, the code runs again (and panics again).
    let again = client
        .prepare(prepare("p-1", "a", b"panic", ""))
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unavailable, "{again:?}");
    let yes = client
        .prepare(prepare("p-2", "a", b"yes", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(yes.vote, pb::Vote::Yes as i32);
    let text = scrape(served.metrics_address).await;
    assert_eq!(operations(&text, "prepare", "error"), Some(2.0), "{text}");
    assert_eq!(operations(&text, "prepare", "yes"), Some(1.0), "{text}");

    served.stop().await;
}
