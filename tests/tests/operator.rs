//! Operator verbs through the `treaty` command line (a real process) against a real
//! coordinator and participant over gRPC: stuck work is listed by filter, paused,
//! resumed, retried, resolved only as the decision allows (and a saga step not while its
//! call is in flight), reported and forgotten; sagas are cancelled by their initiator, or
//! compensated at their deadline.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::time::Duration;

use serde_json::Value;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome, SagaStep, SubmitOptions};
use treaty_tests::harness::{Coordinator, ParticipantServer, eventually};
use treaty_tests::process::treaty_cli;

async fn treaty(endpoint: &str, args: &[&str]) -> (bool, String) {
    treaty_cli(endpoint, args).await
}

/// `treaty txn resolve ID --branch BRANCH FLAG --reason REASON`, FLAG `--commit` or
/// `--abort`.
async fn resolve(
    endpoint: &str,
    id: &str,
    branch: &str,
    flag: &str,
    reason: &str,
) -> (bool, String) {
    treaty(
        endpoint,
        &[
            "txn", "resolve", id, "--branch", branch, flag, "--reason", reason,
        ],
    )
    .await
}

/// A careful operator's `resolve`: the transaction paused first, so that nothing more is
/// sent for the branch, then resolved once `txn show` has no call for it in flight (the
/// coordinator refuses while one is: it could do the work stated done by hand a second
/// time).
async fn resolve_paused(endpoint: &str, id: &str, branch: &str, flag: &str, reason: &str) {
    let (ok, out) = treaty(endpoint, &["txn", "pause", id]).await;
    assert!(ok || out.contains("already paused"), "{out}");
    no_call_in_flight(endpoint, id, branch).await;
    let (ok, out) = resolve(endpoint, id, branch, flag, reason).await;
    assert!(ok, "{out}");
}

/// Waits until `txn show` has no call for `branch` in flight (the transaction paused,
/// none goes out again).
async fn no_call_in_flight(endpoint: &str, id: &str, branch: &str) {
    eventually("no call for the branch in flight", || async {
        let (ok, out) = treaty(endpoint, &["txn", "show", id, "--json"]).await;
        assert!(ok, "{out}");
        let shown = json_of(&out);
        let branches = shown["branches"].as_array().unwrap();
        let b = branches.iter().find(|b| b["branch_id"] == branch).unwrap();
        let history = b["history"].as_array().unwrap();
        assert_eq!(
            b["in_flight"],
            history.iter().any(|a| a["finished_unix_ms"].is_null()),
            "{out}"
        );
        (b["in_flight"] == false).then_some(())
    })
    .await;
}

/// The JSON a `--json` command printed (its first line).
fn json_of(out: &str) -> Value {
    serde_json::from_str(out.lines().next().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The ids a `txn list --json` printed.
fn listed_ids(out: &str) -> Vec<String> {
    json_of(out)
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["transaction_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_commits_are_found_paused_retried_resolved_reported_and_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let p = participant.endpoint.clone();
    let client = coordinator.client().await;
    let endpoint = coordinator.endpoint.as_str();

    // Committed, but the participant fails every commit: phase 2 keeps retrying.
    participant.participant.fail_next_commits(1_000_000);
    let stuck = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("b0", &p, "yes"),
                BranchSpec::new("b1", &p, "yes"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(client.commit(&stuck).await.unwrap(), Outcome::Committed);
    // Active for the whole test (a slow machine must not see it abort at its deadline).
    let half_an_hour = BeginOptions {
        deadline_unix_ms: Some(treaty_coordinator::runtime::now_unix_ms() + 1_800_000),
        ..BeginOptions::default()
    };
    let open = client
        .begin(half_an_hour, vec![BranchSpec::new("x", &p, "yes")])
        .await
        .unwrap();

    // Filters: by state, by endpoint, by age; a verb without id or filter is refused.
    let (ok, out) = treaty(
        endpoint,
        &["txn", "list", "--state", "committing", "--json"],
    )
    .await;
    assert!(ok, "{out}");
    assert_eq!(listed_ids(&out), vec![stuck.clone()]);
    let (ok, out) = treaty(endpoint, &["txn", "list", "--endpoint", &p, "--json"]).await;
    assert!(
        ok && listed_ids(&out) == vec![stuck.clone(), open.clone()],
        "{out}"
    );
    let (ok, out) = treaty(endpoint, &["txn", "list", "--older-than", "1h", "--json"]).await;
    assert!(ok && listed_ids(&out).is_empty(), "{out}");
    let (ok, out) = treaty(endpoint, &["txn", "pause"]).await;
    assert!(!ok && out.contains("name a transaction id"), "{out}");

    // Flagged stuck once a delivery failed 10 times.
    eventually("the commit is flagged stuck", || async {
        let (ok, out) = treaty(endpoint, &["txn", "list", "--stuck", "--json"]).await;
        (ok && listed_ids(&out) == vec![stuck.clone()]).then_some(())
    })
    .await;

    // Paused: no more calls reach the participant until resumed.
    let (ok, out) = treaty(
        endpoint,
        &["txn", "pause", &stuck, "--reason", "maintenance", "--json"],
    )
    .await;
    assert!(ok && json_of(&out)[0]["applied"] == true, "{out}");
    let attempts = || async {
        let txn = client.get(&stuck).await.unwrap().unwrap();
        txn.branches.iter().map(|b| b.attempts).sum::<u32>()
    };
    tokio::time::sleep(Duration::from_millis(500)).await; // calls in flight finish
    let attempts_when_paused = attempts().await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        attempts().await,
        attempts_when_paused,
        "deliveries went out while paused"
    );
    let (ok, out) = treaty(endpoint, &["txn", "show", &stuck, "--json"]).await;
    let shown = json_of(&out);
    assert!(ok && shown["paused"] == true, "{out}");
    assert!(
        shown["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["reason"] == "retries paused by an operator: maintenance"),
        "{out}"
    );
    // Pausing twice does not apply (and says why); the exit status says so too.
    let (ok, out) = treaty(endpoint, &["txn", "pause", &stuck, "--json"]).await;
    assert!(
        !ok && json_of(&out)[0]["detail"] == "its retries are already paused",
        "{out}"
    );

    // A branch the transaction does not have is a bad argument, named.
    let (ok, out) = treaty(
        endpoint,
        &["txn", "resolve", &stuck, "--branch", "nope", "--commit"],
    )
    .await;
    assert!(!ok && out.contains("branch_id"), "{out}");
    // Resolving against the durable commit decision is refused and changes nothing.
    let (ok, out) = treaty(
        endpoint,
        &[
            "txn", "resolve", &stuck, "--branch", "b1", "--abort", "--json",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(
        json_of(&out)[0]["detail"]
            .as_str()
            .unwrap()
            .contains("contradicts the decision to commit"),
        "{out}"
    );
    // The operator applied b1 by hand; the participant recovers and b0 is retried now.
    no_call_in_flight(endpoint, &stuck, "b1").await;
    let (ok, out) = treaty(
        endpoint,
        &[
            "txn",
            "resolve",
            &stuck,
            "--branch",
            "b1",
            "--commit",
            "--reason",
            "applied by hand",
        ],
    )
    .await;
    assert!(ok && out.contains("applied"), "{out}");
    participant.participant.fail_next_commits(0);
    let (ok, out) = treaty(endpoint, &["txn", "resume", "--endpoint", &p, "--json"]).await;
    // The open transaction is not paused: resume applies to one of the two.
    let results = json_of(&out);
    assert!(!ok, "{out}");
    assert_eq!(results.as_array().unwrap().len(), 2, "{out}");
    eventually("the stuck commit finishes", || async {
        let txn = client.get(&stuck).await.unwrap().unwrap();
        (txn.state == treaty_sdk::client::TransactionState::Committed as i32).then_some(())
    })
    .await;
    assert!(participant.participant.ops(&stuck, "b0").len() >= 2);

    // The report says which branch applied what, and who resolved what.
    let (ok, out) = treaty(endpoint, &["txn", "report", &stuck, "--json"]).await;
    assert!(ok, "{out}");
    let report = json_of(&out);
    let branches = report["branches"].as_array().unwrap();
    assert_eq!(branches[0]["applied"], "committed", "{out}");
    assert_eq!(branches[1]["applied"], "committed", "{out}");
    assert_eq!(branches[1]["resolution"]["outcome"], "commit", "{out}");
    assert_eq!(
        branches[1]["resolution"]["reason"], "applied by hand",
        "{out}"
    );

    // The endpoints' health shows the failures of the last minute.
    let (ok, out) = treaty(endpoint, &["endpoints", "--json"]).await;
    assert!(ok, "{out}");
    let endpoints = json_of(&out);
    let seen = endpoints
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["endpoint"] == p.as_str())
        .unwrap_or_else(|| panic!("{p} not listed: {out}"));
    assert!(seen["recent_failures"].as_u64().unwrap() >= 10, "{out}");
    assert!(seen["recent_calls"].as_u64().unwrap() > seen["recent_failures"].as_u64().unwrap());
    assert_eq!(seen["circuit"], "CLOSED", "{out}");
    // The SDK's participant serves the Calls stream: the calls go on it.
    assert_eq!(seen["calls"], "stream", "{out}");

    // Forget: only final transactions, and not a commit whose resolved branch may still
    // ask for its outcome; then it is gone from memory and the log.
    let (ok, out) = treaty(endpoint, &["txn", "forget", &open, "--json"]).await;
    assert!(!ok && json_of(&out)[0]["applied"] == false, "{out}");
    let (ok, out) = treaty(endpoint, &["txn", "forget", &stuck]).await;
    assert!(!ok && out.contains("must hear COMMIT"), "{out}");
    client.abort(&open, "not needed").await.unwrap();
    let (ok, out) = treaty(endpoint, &["txn", "forget", &open]).await;
    assert!(ok, "{out}");
    assert_eq!(client.get(&open).await.unwrap(), None);
    let (ok, out) = treaty(endpoint, &["txn", "show", &open]).await;
    assert!(!ok && out.contains("unknown transaction"), "{out}");

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// A step whose forward action keeps failing is resolved as committed: its work was
/// done by hand. When a later step is rejected the saga compensates; the step's
/// participant, which holds no record of it, records a null compensation and undoes
/// nothing, so the saga waits, flagged stuck, until an operator states the step undone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_step_resolved_as_committed_is_undone_only_by_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    let endpoint = coordinator.endpoint.as_str();

    let submitted = client
        .submit_saga(
            vec![
                failing_ship_step(&participant.endpoint),
                SagaStep::new("charge", &participant.endpoint, "no").after(["ship"]),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    resolve_paused(endpoint, &id, "ship", "--commit", "shipped by hand").await;
    // "charge" is rejected; the saga compensates "ship" at its participant, and then waits.
    eventually("the saga waits for an operator", || async {
        let (ok, out) = treaty(endpoint, &["txn", "list", "--stuck", "--json"]).await;
        (ok && listed_ids(&out) == vec![id.clone()]).then_some(())
    })
    .await;
    let (ok, out) = treaty(endpoint, &["txn", "show", &id, "--json"]).await;
    let shown = json_of(&out);
    assert!(ok && shown["state"] == "COMPENSATING", "{out}");
    assert!(
        shown["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["reason"].as_str().unwrap().contains("work done by hand")),
        "{out}"
    );
    assert_eq!(shown["branches"][0]["state"], "AWAITING_OPERATOR", "{out}");
    let (ok, out) = treaty(endpoint, &["txn", "report", &id, "--json"]).await;
    let report = json_of(&out);
    assert!(ok, "{out}");
    let ship = &report["branches"][0];
    assert!(
        ship["applied"]
            .as_str()
            .unwrap()
            .contains("work done by hand")
            && ship["note"].as_str().unwrap().contains("resolve --abort"),
        "{out}"
    );
    assert!(
        participant.participant.compensated().is_empty(),
        "the participant had nothing to undo"
    );
    let (ok, out) = resolve(endpoint, &id, "ship", "--abort", "unshipped by hand").await;
    assert!(ok, "{out}");
    let txn = eventually("the saga is compensated", || async {
        let txn = client.get(&id).await.unwrap().unwrap();
        (txn.state == treaty_sdk::client::TransactionState::Compensated as i32).then_some(txn)
    })
    .await;
    assert!(!txn.stuck, "{txn:?}");

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// A saga whose step an operator stated done is forgotten like any other finished one:
/// a saga's participants never ask about an outcome, so none may still ask (the refusal
/// is for a two-phase commit's branch resolved without its participant's answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_saga_with_a_step_resolved_by_hand_can_be_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    let endpoint = coordinator.endpoint.as_str();

    let submitted = client
        .submit_saga(
            vec![failing_ship_step(&participant.endpoint)],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    resolve_paused(endpoint, &id, "ship", "--commit", "shipped by hand").await;
    eventually("the saga completes", || async {
        let txn = client.get(&id).await.unwrap().unwrap();
        (txn.state == treaty_sdk::client::TransactionState::Completed as i32).then_some(())
    })
    .await;
    let (ok, out) = treaty(endpoint, &["txn", "forget", &id, "--json"]).await;
    assert!(ok, "{out}");
    assert!(
        client.get(&id).await.unwrap().is_none(),
        "the saga is forgotten"
    );

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// A step's work stated done by hand while its call is still on its way could be done
/// twice: the coordinator refuses, says why, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_step_is_not_resolved_while_its_call_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    let endpoint = coordinator.endpoint.as_str();
    // The command line built and started once, so that the call is still on its way.
    let (ok, out) = treaty(endpoint, &["txn", "list"]).await;
    assert!(ok, "{out}");

    let submitted = client
        .submit_saga(
            vec![SagaStep::new("ship", &participant.endpoint, "slow:10000").timeout_ms(60_000)],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    let (ok, out) = treaty(endpoint, &["txn", "show", &id, "--json"]).await;
    assert!(
        ok && json_of(&out)["branches"][0]["in_flight"] == true,
        "{out}"
    );
    let (ok, out) = treaty(
        endpoint,
        &[
            "txn", "resolve", &id, "--branch", "ship", "--commit", "--json",
        ],
    )
    .await;
    assert!(!ok, "{out}");
    let detail = json_of(&out)[0]["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains("in flight") && detail.contains("pause"),
        "{out}"
    );
    // Nothing changed: the call's answer settles the step.
    let txn = eventually("the saga completes", || async {
        let txn = client.get(&id).await.unwrap().unwrap();
        (txn.state == treaty_sdk::client::TransactionState::Completed as i32).then_some(txn)
    })
    .await;
    assert!(txn.branches[0].resolution.is_none(), "{txn:?}");

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// Step "ship" at `endpoint`, whose calls fail and are retried for minutes: it is still
/// running when the operator acts.
fn failing_ship_step(endpoint: &str) -> SagaStep {
    SagaStep::new("ship", endpoint, "error")
        .compensation("unship")
        .retry(100, 1_000, 5_000)
}

/// A step at an address where nothing listens: its calls fail until resolved.
fn dead_step(id: &str) -> SagaStep {
    SagaStep::new(id, "http://127.0.0.1:9", "forward")
        .compensation("undo")
        .retry(100, 100, 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_are_cancelled_by_their_initiator_or_compensated_at_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    let endpoint = coordinator.endpoint.as_str();

    // Cancelled while its second step keeps failing: the first is compensated once the
    // second is resolved as undone (it never ran: nothing listens there).
    let submitted = client
        .submit_saga(
            vec![
                SagaStep::new("reserve", &participant.endpoint, "yes").compensation("release"),
                dead_step("ship").after(["reserve"]),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    eventually("the first step committed", || async {
        let txn = client.get(&id).await.unwrap().unwrap();
        (txn.branches[0].state == treaty_sdk::client::BranchState::Committed as i32).then_some(())
    })
    .await;
    let (cancelled, txn) = client
        .cancel_saga(&id, "customer changed their mind")
        .await
        .unwrap();
    assert!(cancelled);
    assert_eq!(
        txn.state,
        treaty_sdk::client::TransactionState::Compensating as i32
    );
    assert_eq!(
        txn.reason,
        "cancelled by its initiator: customer changed their mind"
    );
    // Cancelling again answers the same.
    assert!(client.cancel_saga(&id, "again").await.unwrap().0);
    let (ok, out) = treaty(
        endpoint,
        &[
            "txn", "resolve", &id, "--branch", "ship", "--commit", "--json",
        ],
    )
    .await;
    assert!(
        !ok && out.contains("contradicts the decision to compensate"),
        "{out}"
    );
    resolve_paused(endpoint, &id, "ship", "--abort", "never shipped").await;
    eventually("the saga is compensated", || async {
        let txn = client.get(&id).await.unwrap().unwrap();
        (txn.state == treaty_sdk::client::TransactionState::Compensated as i32).then_some(())
    })
    .await;
    assert_eq!(
        participant.participant.compensated(),
        vec![(id.clone(), "reserve".to_string())]
    );

    // A deadline: not completed by then, it is compensated.
    let deadline_unix_ms = treaty_coordinator::runtime::now_unix_ms() + 1_500;
    let submitted = client
        .submit_saga(
            vec![dead_step("late")],
            SubmitOptions {
                deadline_unix_ms: Some(deadline_unix_ms),
                ..SubmitOptions::default()
            },
        )
        .await
        .unwrap();
    let late = submitted.transaction_id;
    assert_eq!(submitted.transaction.deadline_unix_ms, deadline_unix_ms);
    let txn = eventually("the deadline compensates the saga", || async {
        let txn = client.get(&late).await.unwrap().unwrap();
        (txn.state == treaty_sdk::client::TransactionState::Compensating as i32).then_some(txn)
    })
    .await;
    assert_eq!(txn.reason, "the saga's deadline passed");
    // A deadline in the past is refused, naming the field.
    let refused = client
        .submit_saga(
            vec![dead_step("x")],
            SubmitOptions {
                deadline_unix_ms: Some(1),
                ..SubmitOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("deadline_unix_ms"),
        "{refused}"
    );

    participant.stop().await;
    coordinator.stop().await.unwrap();
}
