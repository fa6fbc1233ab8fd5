//! Transactions belong to the principal that began them; admins see all; no principal
//! can take every transaction slot, and payloads held in memory have a budget.

use super::*;

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
