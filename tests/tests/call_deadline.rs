//! A participant that does not answer within the call's deadline is reported as a
//! timeout: not as unreachable, and not as an answer (an answer would count for its
//! circuit). The coordinator enforces the deadline itself; a `grpc-timeout` header sent
//! with the same deadline let tonic's client or the participant's server end the call
//! first, and the failure then read "unreachable" or "answered Cancelled".

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use treaty_sdk::SagaStep;
use treaty_sdk::SubmitOptions;
use treaty_tests::harness::{Coordinator, ParticipantServer, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_an_answer_in_time_fails_as_a_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    let submitted = client
        .submit_saga(
            vec![
                SagaStep::new("slow", &participant.endpoint, "slow:3000")
                    .compensation("undo")
                    .timeout_ms(300)
                    .retry(3, 10, 50),
            ],
            SubmitOptions::default(),
        )
        .await
        .unwrap();
    let id = submitted.transaction_id;
    let errors = eventually("the step failed three times", || async {
        let txn = client.get(&id).await.unwrap()?;
        let step = txn.branches.iter().find(|b| b.branch_id == "slow")?;
        let errors: Vec<String> = step
            .history
            .iter()
            .map(|attempt| attempt.result.clone())
            .filter(|result| result.starts_with("error"))
            .collect();
        (errors.len() >= 3).then_some(errors)
    })
    .await;
    for error in &errors {
        assert!(
            error.contains("participant did not answer within 300 ms"),
            "a missed deadline reported as {error:?}; all: {errors:?}"
        );
    }
    coordinator.stop().await.unwrap();
    participant.stop().await;
}
