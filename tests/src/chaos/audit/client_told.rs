//! Invariant (validity of answers): a client that was told an outcome — committed or
//! completed, aborted or compensated — was told the transaction's final outcome.

use super::Violations;
use super::evidence::Evidence;
use crate::chaos::workload::Told;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    for decided in &evidence.decided {
        let told_right = match decided.transfer.told {
            Told::Committed => decided.committed,
            Told::Aborted => !decided.committed,
            Told::Nothing => true,
        };
        if !told_right {
            violations.add(format!(
                "{}: the client was told {:?}, the outcome is {:?}",
                decided.id, decided.transfer.told, decided.state
            ));
        }
    }
}
