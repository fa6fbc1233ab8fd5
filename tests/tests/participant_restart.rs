//! A participant that is down during phase 2 gets the commit once it is back: the
//! participant is a real process, killed with SIGKILL after it voted YES and restarted
//! on the same address and data directory. And a participant's branches in doubt are
//! resolved by asking, after a restart and whatever its own code does meanwhile (a
//! panic, an abort that does not end).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::barrier::BranchStatus;
use treaty_sdk::client::{BeginOptions, BranchSpec, BranchState, Outcome, TransactionState};
use treaty_sdk::in_doubt::InDoubtOptions;
use treaty_sdk::server::ServeOptions;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};
use treaty_tests::harness::{
    Coordinator, PATIENCE, ParticipantServer, barrier_record, eventually, quick_in_doubt,
};
use treaty_tests::process::{exit_status, kill9, killed_by_sigkill, start_scripted_participant};

fn branch_state(txn: &treaty_sdk::client::Transaction, branch: &str) -> i32 {
    txn.branches
        .iter()
        .find(|b| b.branch_id == branch)
        .map(|b| b.state)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_down_during_phase_two_receives_the_commit_once_back() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let fast = ParticipantServer::start(&dir.path().join("fast")).await;
    let remote_dir = dir.path().join("remote");
    let mut remote = start_scripted_participant(&remote_dir, "127.0.0.1:0").await;
    let address = remote.address;

    // The fast branch takes a while to vote, so the remote branch's YES comes first and
    // the decision waits for it; the remote participant dies in that window.
    let id = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("slow", &fast.endpoint, "slow:3000"),
                BranchSpec::new("remote", remote.endpoint(), "yes"),
            ],
        )
        .await
        .unwrap();
    let committing = {
        let client = client.clone();
        let id = id.clone();
        tokio::spawn(async move { client.commit(&id).await })
    };
    eventually("the remote participant voted YES", || async {
        let txn = client.get(&id).await.unwrap()?;
        (branch_state(&txn, "remote") == BranchState::Prepared as i32).then_some(())
    })
    .await;
    let status = kill9(&mut remote).await;
    assert!(killed_by_sigkill(status));

    // The decision is commit (the dead participant's YES is durable there); phase 2 to
    // it fails and is retried.
    assert_eq!(committing.await.unwrap().unwrap(), Outcome::Committed);
    eventually(
        "phase 2 to the dead participant is being retried",
        || async {
            let txn = client.get(&id).await.unwrap()?;
            let remote = txn.branches.iter().find(|b| b.branch_id == "remote")?;
            (txn.state == TransactionState::Committing as i32 && remote.attempts >= 2).then_some(())
        },
    )
    .await;

    let mut remote = start_scripted_participant(&remote_dir, &address.to_string()).await;
    eventually(
        "the restarted participant acknowledges the commit",
        || async {
            let txn = client.get(&id).await.unwrap()?;
            (txn.state == TransactionState::Committed as i32).then_some(())
        },
    )
    .await;

    remote.terminate();
    assert!(
        exit_status(&mut remote).await.success(),
        "{}",
        remote.log_tail(60)
    );
    assert_eq!(
        barrier_record(&remote_dir, &id, "remote").unwrap().status,
        BranchStatus::Committed
    );
    fast.stop().await;
    coordinator.stop().await.unwrap();
}

/// After a restart with more branches in doubt than one round asks about, the rounds of
/// the pass follow one another: the branches are all resolved long before a single
/// poll interval (ten minutes here) has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_many_branches_in_doubt_resolves_them_without_waiting_between_rounds() {
    use treaty_tests::scripted::{Op, Scripted};

    const BRANCHES: u64 = 12;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let data_dir = dir.path().join("participant");
    let in_doubt = |ask_after_ms| InDoubtOptions {
        poll_interval_ms: 600_000,
        ask_after_ms,
        call_timeout_ms: 5_000,
        max_branches_per_round: 3,
        ..InDoubtOptions::default()
    };

    // `ask_after_ms`: the first run must not ask, whenever its first round comes (its
    // listing runs on a blocking thread, which a loaded machine may start late).
    let served = serve(Arc::new(Scripted::new()), &data_dir, in_doubt(600_000)).await;
    let txns = unknown_transactions(BRANCHES);
    vote_yes(&served, &coordinator, &txns).await;
    // Stopped before its next round (ten minutes away), and it asked about none: all
    // twelve stay in doubt.
    served.stop().await.unwrap();

    let participant = Arc::new(Scripted::new());
    let served = serve(participant.clone(), &data_dir, in_doubt(0)).await;
    eventually("every branch in doubt is aborted after the restart", || {
        let all = txns
            .iter()
            .all(|txn| participant.ops(txn, "b").contains(&Op::Abort));
        std::future::ready(all.then_some(()))
    })
    .await;
    served.stop().await.unwrap();
}

/// The participant's own abort panics the first time it is asked to abort one of the
/// branches in doubt: that branch stays in doubt and is aborted in a later round, and
/// the other branches are resolved too (a panic once ended in-doubt resolution for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_participants_abort_leaves_the_branch_for_a_later_round() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = Arc::new(Troubled::default());
    let served = serve(participant.clone(), &dir.path().join("p"), quick_in_doubt()).await;
    // Marked before the votes: a branch may be asked about as soon as it voted.
    let txns = unknown_transactions(3);
    participant
        .panics_once
        .lock()
        .unwrap()
        .insert(txns[0].clone());
    participant
        .panics_once
        .lock()
        .unwrap()
        .insert(txns[2].clone());
    vote_yes(&served, &coordinator, &txns).await;
    eventually(
        "every branch in doubt is aborted, despite the panics",
        || {
            let aborted = participant.aborted.lock().unwrap();
            std::future::ready(txns.iter().all(|txn| aborted.contains(txn)).then_some(()))
        },
    )
    .await;
    assert_eq!(
        participant.abort_calls(&txns[0]),
        2,
        "panicked once, then aborted"
    );
    assert_eq!(participant.abort_calls(&txns[1]), 1);
    served.stop().await.unwrap();
}

/// The participant's own abort of one branch in doubt does not end: the others are
/// resolved meanwhile, the stuck one is not asked about again while its abort runs, the
/// participant stops in bounded time, and the abort still ends when it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_that_does_not_end_holds_neither_other_branches_nor_a_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = Arc::new(Troubled::default());
    let options = InDoubtOptions {
        apply_wait_ms: 200,
        ..quick_in_doubt()
    };
    let served = serve(participant.clone(), &dir.path().join("p"), options).await;
    // Marked before the votes: a branch may be asked about as soon as it voted.
    let txns = unknown_transactions(3);
    participant.hangs.lock().unwrap().insert(txns[0].clone());
    vote_yes(&served, &coordinator, &txns).await;
    eventually("the other branches are aborted", || {
        let aborted = participant.aborted.lock().unwrap();
        std::future::ready(
            txns[1..]
                .iter()
                .all(|txn| aborted.contains(txn))
                .then_some(()),
        )
    })
    .await;
    // Several more rounds (200 ms apart) pass; the stuck abort is not started again.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(participant.abort_calls(&txns[0]), 1);
    assert!(!participant.aborted.lock().unwrap().contains(&txns[0]));
    tokio::time::timeout(PATIENCE, served.stop())
        .await
        .expect("the participant stops while an abort is stuck")
        .unwrap();
    participant.release.add_permits(1);
    eventually("the stuck abort ends once released", || {
        let aborted = participant.aborted.lock().unwrap();
        std::future::ready(aborted.contains(&txns[0]).then_some(()))
    })
    .await;
}

/// A participant served with its own store and in-doubt options.
struct Served {
    endpoint: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), treaty_sdk::ServeError>>,
}

impl Served {
    async fn stop(self) -> Result<(), treaty_sdk::ServeError> {
        let _ = self.stop.send(());
        self.task.await.unwrap()
    }
}

async fn serve<P: Participant>(
    participant: Arc<P>,
    data_dir: &std::path::Path,
    in_doubt: InDoubtOptions,
) -> Served {
    let store =
        Arc::new(treaty_sdk::durable::DurableStore::open(data_dir, Default::default()).unwrap());
    let options = ServeOptions {
        in_doubt,
        shutdown_grace_ms: 2_000,
        ..ServeOptions::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(treaty_sdk::serve(
        participant,
        store,
        listener,
        options,
        async {
            let _ = stopped.await;
        },
    ));
    Served {
        endpoint,
        stop,
        task,
    }
}

/// Ids of `count` transactions the coordinator never began, a minute old, oldest first:
/// asked about one, it answers ABORT (presumed abort).
fn unknown_transactions(count: u64) -> Vec<String> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    (0..count)
        .map(|i| treaty_sdk::transaction_age::first_transaction_id_at(now_ms - 60_000 + i))
        .collect()
}

/// YES votes on branch `b` of each of `txns`, naming `coordinator`.
async fn vote_yes(served: &Served, coordinator: &Coordinator, txns: &[String]) {
    let mut client = ParticipantClient::connect(served.endpoint.clone())
        .await
        .unwrap();
    for txn in txns {
        let answer = client
            .prepare(pb::PrepareBranchRequest {
                transaction_id: txn.clone(),
                branch_id: "b".into(),
                payload: b"yes".to_vec(),
                coordinator_endpoint: coordinator.endpoint.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.vote, pb::Vote::Yes as i32);
    }
}

/// Votes YES; its abort panics once for the transactions in `panics_once`, and waits
/// for a permit of `release` for those in `hangs`.
#[derive(Debug)]
struct Troubled {
    panics_once: Mutex<HashSet<String>>,
    hangs: Mutex<HashSet<String>>,
    release: Semaphore,
    abort_calls: Mutex<Vec<String>>,
    aborted: Mutex<HashSet<String>>,
}

impl Default for Troubled {
    fn default() -> Self {
        Self {
            panics_once: Mutex::default(),
            hangs: Mutex::default(),
            release: Semaphore::new(0),
            abort_calls: Mutex::default(),
            aborted: Mutex::default(),
        }
    }
}

impl Troubled {
    fn abort_calls(&self, txn: &str) -> usize {
        let calls = self.abort_calls.lock().unwrap();
        calls.iter().filter(|t| *t == txn).count()
    }
}

impl Participant for Troubled {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Err(ParticipantError::new("only aborts are expected"))
    }
    async fn abort(&self, branch: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        let txn = branch.transaction_id.clone();
        self.abort_calls.lock().unwrap().push(txn.clone());
        if self.panics_once.lock().unwrap().remove(&txn) {
            panic!("the participant's abort of {txn} panics");
        }
        if self.hangs.lock().unwrap().contains(&txn) {
            self.release.acquire().await.unwrap().forget();
        }
        self.aborted.lock().unwrap().insert(txn);
        Ok(())
    }
}

/// A participant killed while its prepare is on the coordinator's stream to it: that call
/// fails at once as one without an answer (not at its timeout), the transaction aborts,
/// and the restarted participant gets the next call on a new stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_killed_with_a_prepare_on_its_stream_fails_that_call_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    let fast = ParticipantServer::start(&dir.path().join("fast")).await;
    let remote_dir = dir.path().join("remote");
    let mut remote = start_scripted_participant(&remote_dir, "127.0.0.1:0").await;
    let address = remote.address;
    // Longer than the test waits: only the broken stream can end the prepare in time.
    let patient = BeginOptions {
        prepare_timeout_ms: Some(600_000),
        ..BeginOptions::default()
    };
    let branches = |remote_script: &str, remote: &str| {
        vec![
            BranchSpec::new("fast", &fast.endpoint, "yes"),
            BranchSpec::new("remote", remote, remote_script),
        ]
    };
    // A first transaction opens the coordinator's stream to the remote participant.
    let (_, outcome) = client
        .run_two_phase(branches("yes", &remote.endpoint()), patient.clone())
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let running = {
        let client = client.clone();
        let branches = branches("slow:600000", &remote.endpoint());
        let patient = patient.clone();
        tokio::spawn(async move { client.run_two_phase(branches, patient).await })
    };
    // Its prepares go out together: once the fast branch has voted, the remote's is on
    // the stream.
    eventually("the fast branch voted YES", || async {
        let (page, _) = client
            .list(&[TransactionState::Preparing], 10, "")
            .await
            .ok()?;
        let txn = page.first()?;
        (branch_state(txn, "fast") == BranchState::Prepared as i32).then_some(())
    })
    .await;
    let status = kill9(&mut remote).await;
    assert!(killed_by_sigkill(status));

    let (_, outcome) = tokio::time::timeout(treaty_tests::harness::PATIENCE, running)
        .await
        .expect("the prepare on the broken stream fails before its timeout")
        .unwrap()
        .unwrap();
    assert!(
        matches!(&outcome, Outcome::Aborted { .. }),
        "a prepare without an answer aborts: {outcome:?}"
    );

    let mut remote = start_scripted_participant(&remote_dir, &address.to_string()).await;
    let (_, outcome) = client
        .run_two_phase(branches("yes", &remote.endpoint()), patient)
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);

    remote.terminate();
    assert!(
        exit_status(&mut remote).await.success(),
        "{}",
        remote.log_tail(60)
    );
    fast.stop().await;
    coordinator.stop().await.unwrap();
}
