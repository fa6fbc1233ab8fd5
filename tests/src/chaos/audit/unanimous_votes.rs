//! Invariant (atomic commitment): a two-phase transfer applied at any leg was voted YES
//! (a hold, in the journal) at every leg, whatever the coordinator now says of it.

use treaty_examples::journal::Effect;

use super::Violations;
use super::evidence::Evidence;
use crate::chaos::workload::Kind;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    for transfer in evidence.transfers {
        let (Kind::TwoPhase, Some(id)) = (transfer.kind, &transfer.transaction_id) else {
            continue;
        };
        let effects_of = |leg: &crate::chaos::workload::Leg| {
            evidence
                .participant(leg.service)
                .effects_of(id, leg.branch_id)
        };
        let committed_somewhere = transfer
            .legs
            .iter()
            .any(|leg| effects_of(leg).contains(&Effect::Commit));
        let voted_everywhere = transfer
            .legs
            .iter()
            .all(|leg| effects_of(leg).contains(&Effect::Hold));
        if committed_somewhere && !voted_everywhere {
            violations.add(format!("{id}: committed without a YES from every leg"));
        }
    }
}
