//! Invariant (agreement, at the barrier): once everything settled, each leg of a
//! finished transfer has a COMMITTED barrier record at its participant exactly when its
//! transaction committed (two-phase) or completed (saga) — an unknown transaction is
//! presumed aborted — and no leg is left PREPARED.

use treaty_sdk::barrier::BranchStatus;

use super::Violations;
use super::evidence::Evidence;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    for decided in &evidence.decided {
        let statuses: Vec<(String, Option<&BranchStatus>)> = decided
            .transfer
            .legs
            .iter()
            .map(|leg| {
                let status = evidence
                    .participant(leg.service)
                    .record(decided.id, leg.branch_id);
                (format!("{}@{}", leg.branch_id, leg.service), status)
            })
            .collect();
        let applied = |(_, status): &(String, Option<&BranchStatus>)| {
            *status == Some(&BranchStatus::Committed)
        };
        let (id, state) = (decided.id, decided.state);
        if decided.committed && !statuses.iter().all(applied) {
            violations.add(format!(
                "{id}: {state:?} at the coordinator, but the participants hold {statuses:?}"
            ));
        }
        if !decided.committed && statuses.iter().any(applied) {
            violations.add(format!(
                "{id}: {state:?} at the coordinator, but a participant still has it \
                 applied: {statuses:?}"
            ));
        }
        if statuses
            .iter()
            .any(|(_, status)| *status == Some(&BranchStatus::Prepared))
        {
            violations.add(format!("{id}: a branch is still prepared: {statuses:?}"));
        }
    }
}
