//! A participant that is down during phase 2 gets the commit once it is back: the
//! participant is a real process, killed with SIGKILL after it voted YES and restarted
//! on the same address and data directory.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::barrier::BranchStatus;
use treaty_sdk::client::{BeginOptions, BranchSpec, BranchState, Outcome, TransactionState};
use treaty_tests::harness::{Coordinator, ParticipantServer, barrier_record, eventually};
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
    use std::sync::Arc;
    use treaty_proto::v1 as pb;
    use treaty_proto::v1::participant_client::ParticipantClient;
    use treaty_sdk::in_doubt::InDoubtOptions;
    use treaty_sdk::server::ServeOptions;
    use treaty_tests::scripted::{Op, Scripted};

    const BRANCHES: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let data_dir = dir.path().join("participant");
    // `ask_after_ms`: the first run must not ask, whenever its first round comes (its
    // listing runs on a blocking thread, which a loaded machine may start late).
    let serve = |participant: Arc<Scripted>, ask_after_ms: u64| {
        let store = Arc::new(
            treaty_sdk::durable::DurableStore::open(&data_dir, Default::default()).unwrap(),
        );
        let options = ServeOptions {
            in_doubt: InDoubtOptions {
                poll_interval_ms: 600_000,
                ask_after_ms,
                call_timeout_ms: 5_000,
                max_branches_per_round: 3,
                ..InDoubtOptions::default()
            },
            shutdown_grace_ms: 2_000,
            ..ServeOptions::default()
        };
        async move {
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
            (endpoint, stop, task)
        }
    };

    // YES votes for transactions the coordinator never began: once asked, it answers
    // ABORT (presumed abort).
    let (endpoint, stop, task) = serve(Arc::new(Scripted::new()), 600_000).await;
    let mut client = ParticipantClient::connect(endpoint).await.unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let txns: Vec<String> = (0..BRANCHES as u64)
        .map(|i| treaty_sdk::transaction_age::first_transaction_id_at(now_ms - 60_000 + i))
        .collect();
    for txn in &txns {
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
    // Stopped before its next round (ten minutes away), and it asked about none: all
    // twelve stay in doubt.
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    let participant = Arc::new(Scripted::new());
    let (_endpoint, stop, task) = serve(participant.clone(), 0).await;
    eventually("every branch in doubt is aborted after the restart", || {
        let all = txns
            .iter()
            .all(|txn| participant.ops(txn, "b").contains(&Op::Abort));
        std::future::ready(all.then_some(()))
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
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
