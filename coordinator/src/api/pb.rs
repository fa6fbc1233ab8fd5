//! Conversions between protobuf messages and the coordinator's own types. Requests are
//! checked here, field by field; a failure names the field and nothing reaches the
//! runtime.

use treaty_proto::v1 as pb;
use treaty_sdk::limits::{FieldError, MAX_BRANCHES, check_id, check_payload};

use crate::endpoint_policy::EndpointPolicy;
use crate::engine::twopc::BranchSpec;
use crate::model::{
    Attempt, BranchState, Operation, OperatorResolution, Resolution, Transition, TxnId, TxnKind,
    TxnRecord, TxnState,
};

pub fn parse_txn_id(field: &str, text: &str) -> Result<TxnId, FieldError> {
    if text.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    text.parse()
        .map_err(|message: String| FieldError::new(field, message))
}

/// A field of one item of a request's list, `list[index].name` (or
/// `list[index].name[position]`), formatted only when a check of it fails.
#[derive(Debug, Clone, Copy)]
pub struct ItemField {
    pub list: &'static str,
    pub index: usize,
    pub name: &'static str,
    pub position: Option<usize>,
}

impl ItemField {
    pub fn new(list: &'static str, index: usize, name: &'static str) -> Self {
        Self {
            list,
            index,
            name,
            position: None,
        }
    }
}

impl std::fmt::Display for ItemField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}].{}", self.list, self.index, self.name)?;
        match self.position {
            Some(position) => write!(f, "[{position}]"),
            None => Ok(()),
        }
    }
}

/// A branch, its endpoint in canonical form and allowed by `policy`.
pub fn branch_spec(
    field: impl std::fmt::Display,
    spec: pb::BranchSpec,
    policy: &EndpointPolicy,
) -> Result<BranchSpec, FieldError> {
    check_id(format_args!("{field}.branch_id"), &spec.branch_id)?;
    let endpoint = policy.check(format_args!("{field}.endpoint"), &spec.endpoint)?;
    check_payload(format_args!("{field}.payload"), &spec.payload)?;
    Ok(BranchSpec {
        id: spec.branch_id,
        endpoint,
        payload: spec.payload,
    })
}

/// The branches of a Begin: each valid, ids unique, at most [`MAX_BRANCHES`].
pub fn branch_specs(
    specs: Vec<pb::BranchSpec>,
    policy: &EndpointPolicy,
) -> Result<Vec<BranchSpec>, FieldError> {
    if specs.len() > MAX_BRANCHES {
        return Err(FieldError::new(
            "branches",
            format!("{} branches; the limit is {MAX_BRANCHES}", specs.len()),
        ));
    }
    let mut branches: Vec<BranchSpec> = Vec::with_capacity(specs.len());
    for (index, spec) in specs.into_iter().enumerate() {
        let branch = branch_spec(format_args!("branches[{index}]"), spec, policy)?;
        if branches.iter().any(|b| b.id == branch.id) {
            return Err(FieldError::new(
                format!("branches[{index}].branch_id"),
                format!("{:?} appears twice", branch.id),
            ));
        }
        branches.push(branch);
    }
    Ok(branches)
}

/// How many states a transaction can be in: the values [`state_from_pb`] accepts.
pub const TRANSACTION_STATES: usize = 10;

pub fn state_from_pb(field: &str, value: i32) -> Result<TxnState, FieldError> {
    let unknown = || FieldError::new(field, format!("{value} is not a transaction state"));
    Ok(
        match pb::TransactionState::try_from(value).map_err(|_| unknown())? {
            pb::TransactionState::Unspecified => return Err(unknown()),
            pb::TransactionState::Active => TxnState::Active,
            pb::TransactionState::Preparing => TxnState::Preparing,
            pb::TransactionState::Committing => TxnState::Committing,
            pb::TransactionState::Aborting => TxnState::Aborting,
            pb::TransactionState::Committed => TxnState::Committed,
            pb::TransactionState::Aborted => TxnState::Aborted,
            pb::TransactionState::Running => TxnState::Running,
            pb::TransactionState::Compensating => TxnState::Compensating,
            pb::TransactionState::Completed => TxnState::Completed,
            pb::TransactionState::Compensated => TxnState::Compensated,
        },
    )
}

pub fn state_to_pb(state: TxnState) -> pb::TransactionState {
    match state {
        TxnState::Active => pb::TransactionState::Active,
        TxnState::Preparing => pb::TransactionState::Preparing,
        TxnState::Committing => pb::TransactionState::Committing,
        TxnState::Aborting => pb::TransactionState::Aborting,
        TxnState::Committed => pb::TransactionState::Committed,
        TxnState::Aborted => pb::TransactionState::Aborted,
        TxnState::Running => pb::TransactionState::Running,
        TxnState::Compensating => pb::TransactionState::Compensating,
        TxnState::Completed => pb::TransactionState::Completed,
        TxnState::Compensated => pb::TransactionState::Compensated,
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
        BranchState::Pending => pb::BranchState::Pending,
        BranchState::Running => pb::BranchState::Running,
        BranchState::Rejected => pb::BranchState::Rejected,
        BranchState::Uncertain => pb::BranchState::Uncertain,
        BranchState::Compensating => pb::BranchState::Compensating,
        BranchState::Compensated => pb::BranchState::Compensated,
        BranchState::Skipped => pb::BranchState::Skipped,
    }
}

fn operation_to_pb(operation: Operation) -> pb::Operation {
    match operation {
        Operation::Prepare => pb::Operation::Prepare,
        Operation::Commit => pb::Operation::Commit,
        Operation::OnePhaseCommit => pb::Operation::OnePhaseCommit,
        Operation::Abort => pb::Operation::Abort,
        Operation::Step => pb::Operation::Step,
        Operation::Compensate => pb::Operation::Compensate,
    }
}

fn attempt_to_pb(attempt: &Attempt) -> pb::Attempt {
    pb::Attempt {
        operation: operation_to_pb(attempt.operation) as i32,
        started_unix_ms: attempt.started_unix_ms,
        finished_unix_ms: attempt.finished_unix_ms.unwrap_or(0),
        result: attempt.result.clone().unwrap_or_default(),
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
    let kind = match record.kind {
        TxnKind::TwoPhase => pb::TransactionKind::TwoPhase,
        TxnKind::Saga => pb::TransactionKind::Saga,
    };
    // A step's dependencies, by id.
    let after = |index: usize| -> Vec<String> {
        let Some(saga) = &record.saga else {
            return Vec::new();
        };
        saga.steps
            .get(index)
            .map(|step| {
                step.after
                    .iter()
                    .map(|&d| saga.steps[d].id.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    pb::Transaction {
        transaction_id: record.id.to_string(),
        kind: kind as i32,
        state: state_to_pb(record.state) as i32,
        created_unix_ms: record.created_unix_ms,
        deadline_unix_ms: record.deadline_unix_ms,
        prepare_timeout_ms: record.prepare_timeout_ms,
        branches: record
            .branches
            .iter()
            .enumerate()
            .map(|(index, b)| pb::Branch {
                branch_id: b.id.clone(),
                endpoint: b.endpoint.clone(),
                state: if b.awaits_operator {
                    pb::BranchState::AwaitingOperator as i32
                } else {
                    branch_state_to_pb(b.state) as i32
                },
                attempts: b.attempts,
                last_error: b.last_error.clone().unwrap_or_default(),
                compensation_attempts: b.compensation_attempts,
                history: b.history.attempts().iter().map(attempt_to_pb).collect(),
                after: after(index),
                heuristic: b.heuristic.clone().unwrap_or_default(),
                resolution: b.resolution.as_ref().map(resolution_to_pb),
            })
            .collect(),
        reason: record.reason.clone().unwrap_or_default(),
        transitions: record.transitions.iter().map(transition_to_pb).collect(),
        stuck: record.stuck,
        idempotency_key: record
            .idempotency_key
            .as_deref()
            .map(super::unscoped_key)
            .unwrap_or_default()
            .to_string(),
        paused: record.paused,
    }
}

pub fn resolution_from_pb(field: &str, value: i32) -> Result<Resolution, FieldError> {
    match pb::Resolution::try_from(value) {
        Ok(pb::Resolution::Commit) => Ok(Resolution::Commit),
        Ok(pb::Resolution::Abort) => Ok(Resolution::Abort),
        _ => Err(FieldError::new(
            field,
            format!("{value} is not RESOLUTION_COMMIT (1) or RESOLUTION_ABORT (2)"),
        )),
    }
}

fn resolution_to_pb(resolution: &OperatorResolution) -> pb::BranchResolution {
    let outcome = match resolution.outcome {
        Resolution::Commit => pb::Resolution::Commit,
        Resolution::Abort => pb::Resolution::Abort,
    };
    pb::BranchResolution {
        outcome: outcome as i32,
        by: resolution.by.clone(),
        at_unix_ms: resolution.at_unix_ms,
        reason: resolution.reason.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_states_counts_the_states_accepted() {
        let accepted = (-1..=1024)
            .filter(|value| state_from_pb("states[0]", *value).is_ok())
            .count();
        assert_eq!(accepted, TRANSACTION_STATES);
    }
}
