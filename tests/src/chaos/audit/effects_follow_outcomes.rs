//! Invariant (all or nothing, in effects), from each participant's journal: every leg
//! of a committed or completed transfer was applied and stays applied; no leg of an
//! aborted two-phase transfer was applied; a leg of a compensated saga was never
//! applied, or applied and then compensated (net zero). A hold is always settled.

use treaty_examples::journal::Effect;

use super::Violations;
use super::evidence::Evidence;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    for decided in &evidence.decided {
        for leg in &decided.transfer.legs {
            let effects = evidence
                .participant(leg.service)
                .effects_of(decided.id, leg.branch_id);
            let count = |effect| effects.iter().filter(|e| **e == effect).count();
            let standing = count(Effect::Commit) as i64 - count(Effect::Compensate) as i64;
            let expected = i64::from(decided.committed);
            if standing != expected {
                violations.add(format!(
                    "{}: {:?} at the coordinator, but {}@{} has effects {effects:?}",
                    decided.id, decided.state, leg.branch_id, leg.service
                ));
            }
            let settled = count(Effect::Commit) + count(Effect::Release);
            if count(Effect::Hold) != settled {
                violations.add(format!(
                    "{}: {}@{} was held but not settled once: {effects:?}",
                    decided.id, leg.branch_id, leg.service
                ));
            }
        }
    }
}
