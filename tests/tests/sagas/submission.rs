//! Submitting sagas: invalid step graphs refused with the step named and nothing
//! logged; a repeated idempotency key, even after the deadline passed or a restart with
//! other settings, finds the first saga; a submit that returns at once, watched.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_step_graphs_are_refused_naming_the_step_and_nothing_is_logged() {
    let world = World::start().await;
    let refused = |steps: Vec<SagaStep>| {
        let client = world.client.clone();
        async move {
            client
                .submit_saga(steps, SubmitOptions::default())
                .await
                .expect_err("the saga should be refused")
        }
    };
    let cases: Vec<(Vec<SagaStep>, &str)> = vec![
        (
            vec![
                world.step("a", "yes").after(["c"]),
                world.step("b", "yes").after(["a"]),
                world.step("c", "yes").after(["b"]),
            ],
            "steps[0].after: is part of a cycle",
        ),
        (
            vec![world.step("a", "yes"), world.step("b", "yes").after(["x"])],
            "steps[1].after: runs after unknown step \"x\"",
        ),
        (
            vec![world.step("a", "yes"), world.step("a", "yes")],
            "steps[1].step_id",
        ),
        (
            vec![world.step("a", "yes").after(["a"])],
            "steps[0].after: runs after itself",
        ),
        (vec![], "steps: a saga needs at least one step"),
        (
            (0..33)
                .map(|i| world.step(&format!("s{i}"), "yes"))
                .collect(),
            "steps: 33 steps",
        ),
        (
            (0..5)
                .map(|i| world.step(&format!("s{i}"), &"x".repeat(16 * 1024)))
                .collect(),
            "steps: payloads and compensation payloads total",
        ),
        (
            vec![SagaStep::new("a", "not-a-url", "yes")],
            "steps[0].endpoint",
        ),
        (
            vec![world.step("a", "yes").retry(1000, 0, 0)],
            "steps[0].retry.max_attempts",
        ),
        (
            vec![world.step("a", "yes").timeout_ms(3_600_000)],
            "steps[0].timeout_ms",
        ),
    ];
    for (steps, expected) in cases {
        let error = refused(steps).await;
        assert_eq!(error.code(), Some(Code::InvalidArgument), "{error}");
        assert!(
            error.to_string().contains(expected),
            "{expected:?} not in {error}"
        );
    }
    let key_error = world
        .client
        .submit_saga(
            vec![world.step("a", "yes")],
            SubmitOptions {
                idempotency_key: Some("has a space".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        key_error.to_string().contains("idempotency_key"),
        "{key_error}"
    );
    assert!(world.participant.participant.calls().is_empty());
    let (listed, _) = world.client.list(&[], 100, "").await.unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    let data_dir = world.coordinator.data_dir.clone();
    let _kept = world.stop().await;
    let log = treaty_coordinator::log::SledLog::open(&data_dir).unwrap();
    use treaty_coordinator::log::DecisionLog;
    assert!(
        log.scan(None, 10).unwrap().is_empty(),
        "a refused saga reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_idempotency_key_returns_the_first_saga() {
    let world = World::start().await;
    let steps = || {
        vec![
            world.step("charge", "yes"),
            world.step("ship", "yes").after(["charge"]),
        ]
    };
    let options = SubmitOptions {
        idempotency_key: Some("order-7".into()),
        wait_for_outcome: false,
        ..SubmitOptions::default()
    };
    // Submitted concurrently, as a client retrying after a timeout would.
    let (first, second) = tokio::join!(
        world.client.submit_saga(steps(), options.clone()),
        world.client.submit_saga(steps(), options.clone())
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first.transaction_id, second.transaction_id);
    assert_eq!(
        [first.created, second.created]
            .iter()
            .filter(|c| **c)
            .count(),
        1,
        "exactly one submit created the saga"
    );
    let done = world
        .client
        .wait_until_finished(&first.transaction_id, PATIENCE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state(&done), TransactionState::Completed);
    assert_eq!(done.idempotency_key, "order-7");
    let again = world
        .client
        .submit_saga(steps(), options.clone())
        .await
        .unwrap();
    assert_eq!(again.transaction_id, first.transaction_id);
    assert!(!again.created);
    assert_eq!(
        world
            .participant
            .participant
            .ops(&first.transaction_id, "charge"),
        [Op::Prepare, Op::Commit]
    );
    // The same key with other steps is a client bug, not a retry.
    let conflict = world
        .client
        .submit_saga(vec![world.step("refund", "yes")], options.clone())
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Some(Code::InvalidArgument));
    assert!(
        conflict.to_string().contains("idempotency_key"),
        "{conflict}"
    );

    // After a restart, the key is found in the log.
    let data_dir = world.coordinator.data_dir.clone();
    world.coordinator.stop().await.unwrap();
    let coordinator = Coordinator::start(&data_dir).await;
    let client = coordinator.client().await;
    let after_restart = client
        .submit_saga(
            vec![
                SagaStep::new("charge", &world.participant.endpoint, "yes")
                    .compensation("undo charge"),
                SagaStep::new("ship", &world.participant.endpoint, "yes")
                    .compensation("undo ship")
                    .after(["charge"]),
            ],
            options,
        )
        .await
        .unwrap();
    assert_eq!(after_restart.transaction_id, first.transaction_id);
    assert!(!after_restart.created);
    assert_eq!(
        state(&after_restart.transaction),
        TransactionState::Completed
    );
    coordinator.stop().await.unwrap();
    world.participant.stop().await;
}

/// A client that retries a submit with its idempotency key after the deadline it first
/// asked for has passed gets the saga it submitted, not an error about the deadline;
/// only a new saga with a deadline in the past is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_the_deadline_passed_finds_the_first_saga() {
    let world = World::start().await;
    let now_unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let deadline_unix_ms = now_unix_ms() + 30_000;
    let options = |key: &str, deadline_unix_ms: u64| SubmitOptions {
        idempotency_key: Some(key.into()),
        deadline_unix_ms: Some(deadline_unix_ms),
        ..SubmitOptions::default()
    };
    let steps = || vec![world.step("charge", "yes")];
    let first = world
        .client
        .submit_saga(steps(), options("order-8", deadline_unix_ms))
        .await
        .unwrap();
    assert!(first.created);
    // The retry's request carries a deadline that has passed by now.
    let past = now_unix_ms() - 1_000;
    let retried = world
        .client
        .submit_saga(steps(), options("order-8", past))
        .await
        .unwrap();
    assert_eq!(retried.transaction_id, first.transaction_id);
    assert!(!retried.created);
    let refused = world
        .client
        .submit_saga(steps(), options("order-9", past))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::InvalidArgument));
    assert!(
        refused.to_string().contains("deadline_unix_ms"),
        "{refused}"
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_returns_at_once_and_watch_streams_every_state() {
    let world = World::start().await;
    let submitted = world
        .client
        .submit_saga(
            vec![
                world.step("a", "slow:500"),
                world.step("b", "no").after(["a"]),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(state(&submitted.transaction), TransactionState::Running);
    let stream = world
        .client
        .watch(&submitted.transaction_id)
        .await
        .unwrap()
        .expect("known saga");
    let states: Vec<i32> = tokio::time::timeout(
        PATIENCE,
        stream.map(|u| u.unwrap().transition.state).collect(),
    )
    .await
    .expect("the stream ends after the final state");
    assert_eq!(
        states,
        [
            TransactionState::Running,
            TransactionState::Compensating,
            TransactionState::Compensated
        ]
        .map(|s| s as i32)
    );
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_submit_finds_its_unfinished_saga_after_a_restart_with_other_settings() {
    let world = World::start().await;
    // Stuck compensating, so still unfinished across the restart.
    world.participant.participant.fail_compensations(true);
    let steps = || {
        vec![
            SagaStep::new("a", &world.participant.endpoint, "yes").compensation("undo a"),
            SagaStep::new("b", &world.participant.endpoint, "no")
                .compensation("undo b")
                .after(["a"]),
        ]
    };
    let options = SubmitOptions {
        idempotency_key: Some("order-restart".into()),
        wait_for_outcome: false,
        ..SubmitOptions::default()
    };
    let first = world
        .client
        .submit_saga(steps(), options.clone())
        .await
        .unwrap();
    eventually("the saga is compensating", || async {
        let txn = world.client.get(&first.transaction_id).await.unwrap()?;
        (state(&txn) == TransactionState::Compensating).then_some(())
    })
    .await;
    let data_dir = world.coordinator.data_dir.clone();
    world.coordinator.stop().await.unwrap();

    // Other defaults (which the request left to the server) and another shard count.
    let mut config = treaty_tests::harness::coordinator_config(&data_dir);
    config.default_step_attempts = 7;
    config.default_step_timeout_ms = 1_234;
    config.shards = 3;
    let coordinator = Coordinator::start_with(config).await;
    let client = coordinator.client().await;
    let again = client.submit_saga(steps(), options).await.unwrap();
    assert_eq!(again.transaction_id, first.transaction_id);
    assert!(!again.created);
    assert_eq!(state(&again.transaction), TransactionState::Compensating);

    world.participant.participant.fail_compensations(false);
    let done = client
        .wait_until_finished(&first.transaction_id, PATIENCE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state(&done), TransactionState::Compensated);
    coordinator.stop().await.unwrap();
    world.participant.stop().await;
}
