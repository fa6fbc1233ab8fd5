//! Invariant (money is neither created nor lost): the sum of every bank's balances is
//! what the accounts opened with. (Rewards points are earned and redeemed, not moved:
//! [`super::outcome_balances`] checks them.)

use super::Violations;
use super::evidence::Evidence;
use crate::chaos::cluster::Service;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    let banks = || {
        evidence
            .participants
            .iter()
            .filter(|(service, _)| matches!(service, Service::Bank(_)))
            .map(|(_, data)| data)
    };
    let initial: i64 = banks().flat_map(|data| data.initial.values()).sum();
    let total: i64 = banks().flat_map(|data| data.balances.values()).sum();
    if total != initial {
        violations.add(format!(
            "money was created or lost: {initial} before, {total} after"
        ));
    }
}
