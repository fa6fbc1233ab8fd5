//! What someone gets who can reach the shop's ports and verify its certificates but holds
//! no token: nothing. The stranger tries what issue 8 found open before tokens: charging
//! a customer for an order nobody placed and refunding a completed order, by calling the
//! payment service directly, and placing an order through the coordinator. Each must be
//! refused as UNAUTHENTICATED.
//!
//! `demo --secure` runs this after the orders and before the audit, so a call that was
//! served would also show in the audit (a charge without an order, a completed order
//! refunded).

use tonic::Code;
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::client::{ClientOptions, endpoint_with};
use treaty_sdk::{SagaStep, SubmitOptions, TreatyClient};

use super::Charge;
use super::audit::Check;
use super::orders::Placed;

/// The stranger's order: not one the demo placed.
const STRANGER_ORDER: &str = "stranger";

fn stranger_charge() -> Charge {
    Charge {
        order: STRANGER_ORDER.into(),
        customer: "alice".into(),
        amount: 1_000,
    }
}

fn json(charge: &Charge) -> Vec<u8> {
    // Serializing the shop's plain payloads cannot fail.
    serde_json::to_vec(charge).unwrap_or_default()
}

/// A call's answer: served, or refused with this code (if the server answered at all)
/// and this error.
type Answer = Result<(), (Option<Code>, String)>;

/// Nothing if the call was refused as UNAUTHENTICATED, else what happened instead.
fn unless_unauthenticated(what: &str, answer: Answer) -> Vec<String> {
    match answer {
        Err((Some(Code::Unauthenticated), _)) => Vec::new(),
        Err((_, error)) => vec![format!("{what}: not UNAUTHENTICATED but {error}")],
        Ok(()) => vec![format!("{what}: served")],
    }
}

fn status_answer<T>(outcome: Result<T, tonic::Status>) -> Answer {
    outcome
        .map(drop)
        .map_err(|status| (Some(status.code()), status.to_string()))
}

/// Calls the payment service at `payment` directly with `stranger`'s options: a charge
/// to alice for an order nobody placed (a saga step), and a refund (a compensation) of
/// `completed`'s charge, which would give its customer the money back for goods shipped
/// (of the stranger's own order if there is no completed one).
pub async fn participant_refuses(
    payment: &str,
    stranger: &ClientOptions,
    completed: Option<&Placed>,
) -> Check {
    let name = "a caller without the coordinator's token is refused";
    let channel = match endpoint_with(payment, stranger) {
        Ok(endpoint) => endpoint.connect().await,
        Err(error) => {
            return Check {
                name,
                violations: vec![format!("no channel to {payment}: {error}")],
            };
        }
    };
    let mut client = match channel {
        Ok(channel) => ParticipantClient::new(channel),
        Err(error) => {
            return Check {
                name,
                violations: vec![format!("cannot reach {payment}: {error}")],
            };
        }
    };
    let charge = client
        .commit(pb::CommitBranchRequest {
            transaction_id: STRANGER_ORDER.into(),
            branch_id: "charge".into(),
            mode: pb::CommitMode::SagaStep as i32,
            payload: json(&stranger_charge()),
            coordinator_endpoint: String::new(),
        })
        .await;
    let (transaction_id, refund) = match completed {
        Some(placed) => (
            placed.transaction.transaction_id.clone(),
            placed.order.charge(),
        ),
        None => (STRANGER_ORDER.to_string(), stranger_charge()),
    };
    let refund = client
        .compensate(pb::CompensateBranchRequest {
            transaction_id,
            branch_id: "charge".into(),
            payload: json(&refund),
        })
        .await;
    let mut violations = unless_unauthenticated("a direct charge", status_answer(charge));
    violations.extend(unless_unauthenticated(
        "a direct refund",
        status_answer(refund),
    ));
    Check { name, violations }
}

/// Submits an order to the coordinator at `coordinator` with `stranger`'s options.
pub async fn coordinator_refuses(
    coordinator: &str,
    payment: &str,
    stranger: &ClientOptions,
) -> Check {
    let name = "a client without a token is refused by the coordinator";
    let submitted = match TreatyClient::connect_with(coordinator, stranger).await {
        Ok(client) => {
            client
                .submit_saga(
                    vec![SagaStep::new("charge", payment, json(&stranger_charge()))],
                    SubmitOptions::default(),
                )
                .await
        }
        Err(error) => Err(error),
    };
    let answer = submitted
        .map(drop)
        .map_err(|error| (error.code(), error.to_string()));
    Check {
        name,
        violations: unless_unauthenticated("an order", answer),
    }
}
