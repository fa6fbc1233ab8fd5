//! Dead participants do not hold the coordinator (issue 9): a participant that never
//! answers takes only its own share of the call permits, and one that refuses
//! connections gets its circuit opened (calls fail at once), then closed again by a probe
//! once it is back. A real `treaty serve` process, observed through its metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use treaty_sdk::TreatyClient;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome};
use treaty_tests::harness::{ParticipantServer, eventually};
use treaty_tests::process::start_scripted_participant;
use treaty_tests::scrape::{call_count, sample, scrape, start_treaty_with_metrics};

/// A listener that accepts connections and never says a word: calls to it time out.
async fn silent_participant() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        // Bounded by the test's life: the runtime stops with it.
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    endpoint
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_never_answers_does_not_take_the_others_permits() {
    let dir = tempfile::tempdir().unwrap();
    let live = ParticipantServer::start(&dir.path().join("live")).await;
    let silent = silent_participant().await;
    // 8 permits in all, so at most 2 per endpoint; calls to the silent one hang 30 s.
    let (mut daemon, metrics) = start_treaty_with_metrics(
        dir.path(),
        &[
            "--max-in-flight-calls",
            "8",
            "--participant-call-timeout-ms",
            "30000",
        ],
    )
    .await;
    let client = TreatyClient::connect(daemon.endpoint()).await.unwrap();
    // 12 commits waiting on the silent participant: without a per-endpoint bound they
    // would hold every permit for 30 s.
    let mut hanging = Vec::new();
    for _ in 0..12 {
        let client = client.clone();
        let silent = silent.clone();
        hanging.push(tokio::spawn(async move {
            let branch = vec![BranchSpec::new("a", &silent, "yes")];
            client.run_two_phase(branch, BeginOptions::default()).await
        }));
    }
    eventually(
        "prepares to the silent participant are in flight",
        || async {
            let text = scrape(metrics).await;
            (sample(
                &text,
                "treaty_transactions_in_progress{protocol=\"two_phase\"}",
            ) >= 12.0)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let branches = vec![
            BranchSpec::new("a", &live.endpoint, "yes"),
            BranchSpec::new("b", &live.endpoint, "yes"),
        ];
        let (_, outcome) = client
            .run_two_phase(branches, BeginOptions::default())
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Committed);
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "commits to a live participant waited {waited:?} behind the silent one's calls"
    );
    for task in hanging {
        task.abort();
    }
    daemon.stop(Duration::from_secs(60)).await.unwrap();
    live.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_participant_opens_its_circuit_and_a_probe_closes_it() {
    let dir = tempfile::tempdir().unwrap();
    // A port nobody listens on (yet).
    let address = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let endpoint = format!("http://{address}");
    let (mut daemon, metrics) = start_treaty_with_metrics(dir.path(), &[]).await;
    let client = TreatyClient::connect(daemon.endpoint()).await.unwrap();
    let circuit = format!("treaty_circuit_state{{endpoint=\"{endpoint}\"}}");
    // Two branches: a prepare that gets no answer aborts the transaction at once (a
    // one-phase commit would wait for the participant, who holds its outcome).
    let attempt = || async {
        let branches = vec![
            BranchSpec::new("a", &endpoint, "yes"),
            BranchSpec::new("b", &endpoint, "yes"),
        ];
        client
            .run_two_phase(branches, BeginOptions::default())
            .await
            .unwrap()
            .1
    };
    // Each prepare is refused (connection refused): the transaction aborts, and its
    // aborts are retried. After five failures in a row the circuit opens and calls are
    // not even sent (a few sent together before it opened may still fail).
    for _ in 0..8 {
        assert!(matches!(attempt().await, Outcome::Aborted { .. }));
    }
    let text = scrape(metrics).await;
    assert_eq!(sample(&text, &circuit), 2.0, "{text}");
    let failed = call_count(&text, &endpoint, "prepare", "unreachable")
        + call_count(&text, &endpoint, "abort", "unreachable");
    // Abort retries go on in the background (a probe after each cool-down), so only a
    // lower bound holds.
    assert!(failed >= 5.0, "{failed} calls sent and failed\n{text}");
    assert!(
        call_count(&text, &endpoint, "prepare", "circuit_open") >= 6.0,
        "{text}"
    );

    // The participant comes up on that port: after the cool-down a probe goes through
    // and closes the circuit.
    let mut participant =
        start_scripted_participant(&dir.path().join("participant"), &address.to_string()).await;
    let outcome = eventually("a probe reaches the participant and commits", || async {
        match attempt().await {
            Outcome::Committed => Some(()),
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                None
            }
        }
    })
    .await;
    let () = outcome;
    // A scrape may be answered from a rendering up to a second old (METRICS_REUSE).
    let text = eventually("the circuit shows closed", || async {
        let text = scrape(metrics).await;
        (sample(&text, &circuit) == 0.0).then_some(text)
    })
    .await;
    assert!(
        call_count(&text, &endpoint, "prepare", "ok") >= 1.0,
        "{text}"
    );

    daemon.stop(Duration::from_secs(30)).await.unwrap();
    participant.stop(Duration::from_secs(30)).await.unwrap();
}

/// Presumed abort needs no acknowledgement: an abort nobody acknowledges is retried, but
/// gives back its slot of the work in progress at the transaction's deadline, and at most
/// `max_undelivered_aborts` of them are kept. With the classic protocol the one given up
/// leaves no trace; with parallel commit its intent is in the log, which gets its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_nobody_acknowledges_gives_back_its_slot_at_the_deadline() {
    an_abort_nobody_acknowledges_gives_back_its_slot(false).await;
    an_abort_nobody_acknowledges_gives_back_its_slot(true).await;
}

async fn an_abort_nobody_acknowledges_gives_back_its_slot(parallel_commit: bool) {
    use treaty_sdk::client::TransactionState;
    use treaty_tests::harness::{Coordinator, coordinator_config};

    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.max_active_transactions = 2;
    config.max_undelivered_aborts = 1;
    config.shards = 1;
    config.parallel_commit = parallel_commit;
    let coordinator = Coordinator::start_with(config).await;
    let client = coordinator.client().await;
    // Nothing listens on port 9: the prepare fails, so does every abort sent there.
    let branches = || {
        vec![
            BranchSpec::new("gone", "http://127.0.0.1:9", "yes"),
            BranchSpec::new("here", &participant.endpoint, "yes"),
        ]
    };
    let soon = || BeginOptions {
        deadline_unix_ms: Some(treaty_coordinator::runtime::now_unix_ms() + 3_000),
        ..BeginOptions::default()
    };
    let mut aborted = Vec::new();
    for _ in 0..2 {
        let id = client.begin(soon(), branches()).await.unwrap();
        assert!(matches!(
            client.commit(&id).await.unwrap(),
            Outcome::Aborted { .. }
        ));
        aborted.push(id);
    }
    let state = |id: String| {
        let client = client.clone();
        async move { client.get(&id).await.unwrap().map(|t| t.state) }
    };
    assert_eq!(
        state(aborted[0].clone()).await,
        Some(TransactionState::Aborting as i32)
    );
    // Both still hold their slots before the deadline.
    let refused = client.begin(soon(), branches()).await.unwrap_err();
    assert_eq!(
        refused.code(),
        Some(tonic::Code::ResourceExhausted),
        "{refused}"
    );
    // At the deadline they give them back; the newer stays, still retried, the older is
    // forgotten (one undelivered abort is kept).
    let id = eventually("a slot is free again", || async {
        client.begin(BeginOptions::default(), branches()).await.ok()
    })
    .await;
    client.abort(&id, "done with it").await.unwrap();
    // Unknown once forgotten; or, with its intent logged, ended there.
    let given_up = match parallel_commit {
        false => None,
        true => Some(TransactionState::Aborted as i32),
    };
    let kept = eventually("the older undelivered abort is forgotten", || async {
        let older = state(aborted[0].clone()).await;
        let newer = client.get(&aborted[1]).await.unwrap();
        (older == given_up).then_some(newer).flatten()
    })
    .await;
    assert_eq!(kept.state, TransactionState::Aborting as i32);
    assert!(
        kept.transitions
            .iter()
            .any(|t| t.reason.starts_with("abort undelivered at the deadline")),
        "{:?}",
        kept.transitions
    );
    // Presumed abort: a participant in doubt about the forgotten one hears ABORT.
    assert_eq!(
        client.outcome(&aborted[0]).await.unwrap(),
        treaty_sdk::client::Decision::Abort
    );
    participant.stop().await;
    coordinator.stop().await.unwrap();
}
