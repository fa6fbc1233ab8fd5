//! Conversions between protobuf messages and the coordinator's own types. Requests are
//! checked here, field by field; a failure names the field and nothing reaches the
//! runtime.

use treaty_proto::v1 as pb;
use treaty_sdk::limits::{FieldError, MAX_BRANCHES, check_endpoint, check_id, check_payload};

use crate::engine::twopc::BranchSpec;
use crate::model::{BranchState, Transition, TxnId, TxnRecord, TxnState};

pub fn parse_txn_id(field: &str, text: &str) -> Result<TxnId, FieldError> {
    if text.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    text.parse()
        .map_err(|message: String| FieldError::new(field, message))
}

pub fn branch_spec(field: &str, spec: pb::BranchSpec) -> Result<BranchSpec, FieldError> {
    check_id(&format!("{field}.branch_id"), &spec.branch_id)?;
    check_endpoint(&format!("{field}.endpoint"), &spec.endpoint)?;
    check_payload(&format!("{field}.payload"), &spec.payload)?;
    Ok(BranchSpec {
        id: spec.branch_id,
        endpoint: spec.endpoint,
        payload: spec.payload,
    })
}

/// The branches of a Begin: each valid, ids unique, at most [`MAX_BRANCHES`].
pub fn branch_specs(specs: Vec<pb::BranchSpec>) -> Result<Vec<BranchSpec>, FieldError> {
    if specs.len() > MAX_BRANCHES {
        return Err(FieldError::new(
            "branches",
            format!("{} branches; the limit is {MAX_BRANCHES}", specs.len()),
        ));
    }
    let mut branches: Vec<BranchSpec> = Vec::with_capacity(specs.len());
    for (index, spec) in specs.into_iter().enumerate() {
        let field = format!("branches[{index}]");
        let branch = branch_spec(&field, spec)?;
        if branches.iter().any(|b| b.id == branch.id) {
            return Err(FieldError::new(
                format!("{field}.branch_id"),
                format!("{:?} appears twice", branch.id),
            ));
        }
        branches.push(branch);
    }
    Ok(branches)
}

pub fn state_from_pb(field: &str, value: i32) -> Result<TxnState, FieldError> {
    match pb::TransactionState::try_from(value) {
        Ok(pb::TransactionState::Active) => Ok(TxnState::Active),
        Ok(pb::TransactionState::Preparing) => Ok(TxnState::Preparing),
        Ok(pb::TransactionState::Committing) => Ok(TxnState::Committing),
        Ok(pb::TransactionState::Aborting) => Ok(TxnState::Aborting),
        Ok(pb::TransactionState::Committed) => Ok(TxnState::Committed),
        Ok(pb::TransactionState::Aborted) => Ok(TxnState::Aborted),
        _ => Err(FieldError::new(
            field,
            format!("{value} is not a transaction state"),
        )),
    }
}

pub fn state_to_pb(state: TxnState) -> pb::TransactionState {
    match state {
        TxnState::Active => pb::TransactionState::Active,
        TxnState::Preparing => pb::TransactionState::Preparing,
        TxnState::Committing => pb::TransactionState::Committing,
        TxnState::Aborting => pb::TransactionState::Aborting,
        TxnState::Committed => pb::TransactionState::Committed,
        TxnState::Aborted => pb::TransactionState::Aborted,
    }
}

fn branch_state_to_pb(state: BranchState) -> pb::BranchState {
    match state {
        BranchState::Enlisted => pb::BranchState::Enlisted,
        BranchState::Preparing => pb::BranchState::Preparing,
        BranchState::Prepared => pb::BranchState::Prepared,
        BranchState::VotedNo => pb::BranchState::VotedNo,
        BranchState::ReadOnly => pb::BranchState::ReadOnly,
        BranchState::Unreachable => pb::BranchState::Unreachable,
        BranchState::Committed => pb::BranchState::Committed,
        BranchState::Aborted => pb::BranchState::Aborted,
    }
}

pub fn transition_to_pb(transition: &Transition) -> pb::Transition {
    pb::Transition {
        state: state_to_pb(transition.state) as i32,
        at_unix_ms: transition.at_unix_ms,
        reason: transition.reason.clone(),
    }
}

pub fn transaction_to_pb(record: &TxnRecord) -> pb::Transaction {
    pb::Transaction {
        transaction_id: record.id.to_string(),
        kind: pb::TransactionKind::TwoPhase as i32,
        state: state_to_pb(record.state) as i32,
        created_unix_ms: record.created_unix_ms,
        deadline_unix_ms: record.deadline_unix_ms,
        prepare_timeout_ms: record.prepare_timeout_ms,
        branches: record
            .branches
            .iter()
            .map(|b| pb::Branch {
                branch_id: b.id.clone(),
                endpoint: b.endpoint.clone(),
                state: branch_state_to_pb(b.state) as i32,
                attempts: b.attempts,
                last_error: b.last_error.clone().unwrap_or_default(),
            })
            .collect(),
        reason: record.reason.clone().unwrap_or_default(),
        transitions: record.transitions.iter().map(transition_to_pb).collect(),
    }
}
