//! Bad input: every malformed request is INVALID_ARGUMENT naming the field, and changes
//! nothing. Sent with the raw generated client, so that any value can be sent; bytes
//! that are not the message at all, and huge inputs, in `wire.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use std::collections::HashMap;

use tonic::Code;
use tonic_types::{ErrorInfo, StatusExt};
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;
use treaty_sdk::limits::{MAX_BRANCHES, MAX_PAYLOAD_BYTES, MAX_REASON_BYTES};
use treaty_tests::harness::{Coordinator, ParticipantServer};

mod wire;

fn spec(id: &str, endpoint: &str) -> pb::BranchSpec {
    pb::BranchSpec {
        branch_id: id.into(),
        endpoint: endpoint.into(),
        payload: b"yes".to_vec(),
    }
}

fn now_ms() -> u64 {
    treaty_coordinator::runtime::now_unix_ms()
}

/// Asserts `result` is INVALID_ARGUMENT whose message starts with `field: `.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = result.expect_err("the request should be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with(&format!("{field}: ")),
        "expected the message to name {field:?}: {:?}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let good = participant.endpoint.clone();
    let mut api = CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();

    let begin = |branches: Vec<pb::BranchSpec>, deadline_unix_ms: u64, prepare_timeout_ms: u64| {
        pb::BeginRequest {
            deadline_unix_ms,
            prepare_timeout_ms,
            branches,
            ..Default::default()
        }
    };

    // Begin.
    assert_invalid(
        api.begin(pb::BeginRequest {
            commit: true,
            ..begin(Vec::new(), 0, 0)
        })
        .await,
        "branches",
    );
    assert_invalid(
        api.begin(begin(vec![spec("a", "localhost:1")], 0, 0)).await,
        "branches[0].endpoint",
    );
    assert_invalid(
        api.begin(begin(vec![spec("a", "http://host")], 0, 0)).await,
        "branches[0].endpoint",
    );
    assert_invalid(
        api.begin(begin(vec![spec("a/b", &good)], 0, 0)).await,
        "branches[0].branch_id",
    );
    assert_invalid(
        api.begin(begin(vec![spec("", &good)], 0, 0)).await,
        "branches[0].branch_id",
    );
    assert_invalid(
        api.begin(begin(vec![spec("a", &good), spec("a", &good)], 0, 0))
            .await,
        "branches[1].branch_id",
    );
    let mut big = spec("a", &good);
    big.payload = vec![0; MAX_PAYLOAD_BYTES + 1];
    assert_invalid(
        api.begin(begin(vec![big], 0, 0)).await,
        "branches[0].payload",
    );
    let too_many = (0..=MAX_BRANCHES)
        .map(|i| spec(&format!("b{i}"), &good))
        .collect();
    assert_invalid(api.begin(begin(too_many, 0, 0)).await, "branches");
    assert_invalid(
        api.begin(begin(vec![], now_ms() - 1_000, 0)).await,
        "deadline_unix_ms",
    );
    assert_invalid(
        api.begin(begin(vec![], now_ms() + 24 * 3_600_000, 0)).await,
        "deadline_unix_ms",
    );
    assert_invalid(
        api.begin(begin(vec![], 0, 3_600_000)).await,
        "prepare_timeout_ms",
    );

    // A valid transaction to aim the remaining bad requests at.
    let id = api
        .begin(begin(vec![spec("a", &good)], 0, 0))
        .await
        .unwrap()
        .into_inner()
        .transaction_id;
    let enlist = |transaction_id: &str, branch: Option<pb::BranchSpec>| pb::EnlistRequest {
        transaction_id: transaction_id.into(),
        branch,
    };
    assert_invalid(
        api.enlist(enlist("", Some(spec("b", &good)))).await,
        "transaction_id",
    );
    assert_invalid(
        api.enlist(enlist("not-an-id", Some(spec("b", &good))))
            .await,
        "transaction_id",
    );
    let unknown = treaty_coordinator::model::TxnId::generate(now_ms()).to_string();
    assert_invalid(
        api.enlist(enlist(&unknown, Some(spec("b", &good)))).await,
        "transaction_id",
    );
    assert_invalid(api.enlist(enlist(&id, None)).await, "branch");
    assert_invalid(
        api.enlist(enlist(&id, Some(spec("a", &good)))).await,
        "branch.branch_id",
    );
    assert_invalid(
        api.enlist(enlist(&id, Some(spec("b", "http://h:0")))).await,
        "branch.endpoint",
    );
    for i in 1..MAX_BRANCHES {
        api.enlist(enlist(&id, Some(spec(&format!("b{i}"), &good))))
            .await
            .unwrap();
    }
    assert_invalid(
        api.enlist(enlist(&id, Some(spec("one-too-many", &good))))
            .await,
        "branch",
    );
    assert_invalid(
        api.abort(pb::AbortRequest {
            transaction_id: id.clone(),
            reason: "x".repeat(MAX_REASON_BYTES + 1),
        })
        .await,
        "reason",
    );
    assert_invalid(
        api.commit(pb::CommitRequest {
            transaction_id: unknown.clone(),
        })
        .await,
        "transaction_id",
    );

    // Nothing above changed the transaction.
    let txn = api
        .get_transaction(pb::GetTransactionRequest {
            transaction_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .transaction
        .unwrap();
    assert_eq!(txn.branches.len(), MAX_BRANCHES);
    assert_eq!(txn.state, pb::TransactionState::Active as i32);

    // Finished transactions take no branches; a committed one cannot be aborted.
    api.abort(pb::AbortRequest {
        transaction_id: id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    assert_invalid(
        api.enlist(enlist(&id, Some(spec("late", &good)))).await,
        "transaction_id",
    );
    let empty = api
        .begin(begin(vec![], 0, 0))
        .await
        .unwrap()
        .into_inner()
        .transaction_id;
    assert_invalid(
        api.commit(pb::CommitRequest {
            transaction_id: empty.clone(),
        })
        .await,
        "branches",
    );
    let committed = api
        .begin(begin(vec![spec("solo", &good)], 0, 0))
        .await
        .unwrap()
        .into_inner()
        .transaction_id;
    let outcome = api
        .commit(pb::CommitRequest {
            transaction_id: committed.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(outcome.outcome, pb::Outcome::Committed as i32);
    assert_invalid(
        api.abort(pb::AbortRequest {
            transaction_id: committed,
            reason: String::new(),
        })
        .await,
        "transaction_id",
    );

    // Listing.
    let list = |states: Vec<i32>, page_size: u32, page_token: &str| pb::ListTransactionsRequest {
        states,
        page_size,
        page_token: page_token.into(),
        ..Default::default()
    };
    assert_invalid(
        api.list_transactions(list(vec![], 5_000, "")).await,
        "page_size",
    );
    assert_invalid(
        api.list_transactions(list(vec![99], 10, "")).await,
        "states[0]",
    );
    // More entries than there are states only repeats some, and each entry is looked at
    // for every transaction listed: a long list is refused before any is read.
    let committed_state = pb::TransactionState::Committed as i32;
    assert_invalid(
        api.list_transactions(list(vec![committed_state; 11], 10, ""))
            .await,
        "states",
    );
    assert_invalid(
        api.list_transactions(list(vec![], 10, "garbage")).await,
        "page_token",
    );
    // Only the three transactions begun above exist: no refused request created one.
    let all = api
        .list_transactions(list(vec![], 100, ""))
        .await
        .unwrap()
        .into_inner()
        .transactions;
    assert_eq!(all.len(), 3, "{all:?}");

    // Queries about unknown transactions are answers, not errors.
    let found = api
        .get_transaction(pb::GetTransactionRequest {
            transaction_id: unknown.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!found.found);
    let decision = api
        .get_outcome(pb::GetOutcomeRequest {
            transaction_id: unknown,
            branch_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .decision;
    assert_eq!(decision, pb::Decision::Abort as i32);

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// Reason, domain and metadata of the `google.rpc.ErrorInfo` of `result`'s status, if it
/// carries one.
type Info = (String, String, HashMap<String, String>);
fn error_info<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> Option<Info> {
    let status = result.expect_err("the request should be refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("transaction_id: "),
        "{status:?}"
    );
    status
        .get_details_error_info()
        .map(|info: ErrorInfo| (info.reason, info.domain, info.metadata))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_transaction_is_told_from_a_malformed_id_by_a_machine_readable_detail() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let mut api = CoordinatorClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    // Well formed (a UUIDv7), but never begun here.
    let unknown = treaty_coordinator::model::TxnId::generate(now_ms()).to_string();
    let expected: Info = (
        "UNKNOWN_TRANSACTION".into(),
        "treaty.v1".into(),
        HashMap::from([("transaction_id".to_string(), unknown.clone())]),
    );

    let commit = |id: &str| pb::CommitRequest {
        transaction_id: id.into(),
    };
    let detail = error_info(api.commit(commit(&unknown)).await);
    assert_eq!(detail, Some(expected.clone()));
    let detail = error_info(
        api.abort(pb::AbortRequest {
            transaction_id: unknown.clone(),
            reason: String::new(),
        })
        .await,
    );
    assert_eq!(detail, Some(expected.clone()));
    let detail = error_info(
        api.enlist(pb::EnlistRequest {
            transaction_id: unknown.clone(),
            branch: Some(spec("b", "http://127.0.0.1:1")),
        })
        .await,
    );
    assert_eq!(detail, Some(expected));
    // The text stays as it was, for people.
    let status = api.commit(commit(&unknown)).await.unwrap_err();
    assert!(
        status
            .message()
            .starts_with(&format!("transaction_id: unknown transaction {unknown}")),
        "{status:?}"
    );

    // A malformed id is a malformed request, not an unknown transaction.
    for malformed in ["not-an-id", "", &unknown.to_uppercase()] {
        assert_eq!(error_info(api.commit(commit(malformed)).await), None);
    }

    // The SDK client reads the detail.
    let client = coordinator.client().await;
    let error = client.commit(&unknown).await.unwrap_err();
    assert!(error.is_unknown_transaction(), "{error}");
    assert_eq!(error.unknown_transaction(), Some(unknown.clone()));
    let error = client.abort(&unknown, "").await.unwrap_err();
    assert!(error.is_unknown_transaction(), "{error}");
    let error = client.commit("not-an-id").await.unwrap_err();
    assert_eq!(error.code(), Some(Code::InvalidArgument));
    assert!(!error.is_unknown_transaction(), "{error}");
    assert_eq!(error.unknown_transaction(), None);

    coordinator.stop().await.unwrap();
}

/// The Admin service's verbs check their fields like every other call: a malformed id,
/// branch, outcome or reason is INVALID_ARGUMENT naming it, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_operator_requests_are_refused_naming_the_field() {
    use treaty_proto::v1::admin_client::AdminClient;
    let dir = tempfile::tempdir().unwrap();
    // Without authentication every caller may use the Admin service.
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let mut admin = AdminClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let operator = |transaction_id: &str, reason: &str| pb::OperatorRequest {
        transaction_id: transaction_id.into(),
        reason: reason.into(),
    };
    let well_formed = treaty_coordinator::model::TxnId::generate(now_ms()).to_string();
    let long_reason = "r".repeat(MAX_REASON_BYTES + 1);
    for (transaction_id, reason, field) in [
        ("", "", "transaction_id"),
        ("not-an-id", "", "transaction_id"),
        (well_formed.as_str(), long_reason.as_str(), "reason"),
    ] {
        let request = || operator(transaction_id, reason);
        assert_invalid(admin.retry_now(request()).await, field);
        assert_invalid(admin.pause(request()).await, field);
        assert_invalid(admin.resume(request()).await, field);
        assert_invalid(admin.cancel(request()).await, field);
        assert_invalid(admin.forget(request()).await, field);
    }
    let resolve = |branch_id: &str, outcome: i32, reason: &str| pb::ResolveRequest {
        transaction_id: well_formed.clone(),
        branch_id: branch_id.into(),
        outcome,
        reason: reason.into(),
    };
    let commit = pb::Resolution::Commit as i32;
    assert_invalid(admin.resolve(resolve("a/b", commit, "")).await, "branch_id");
    assert_invalid(admin.resolve(resolve("", commit, "")).await, "branch_id");
    assert_invalid(admin.resolve(resolve("a", 0, "")).await, "outcome");
    assert_invalid(admin.resolve(resolve("a", 99, "")).await, "outcome");
    assert_invalid(
        admin.resolve(resolve("a", commit, &long_reason)).await,
        "reason",
    );
    // A well-formed id nobody began is told apart by its machine-readable detail.
    let unknown = admin.pause(operator(&well_formed, "")).await;
    let (reason, _, _) = error_info(unknown).expect("an ErrorInfo detail");
    assert_eq!(reason, "UNKNOWN_TRANSACTION");
    coordinator.stop().await.unwrap();
}
