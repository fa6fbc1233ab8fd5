//! Invariant (the data is what the outcomes made it), independent of the journals: at
//! every participant, each balance — money at a bank, points at rewards — is its first
//! value plus the legs there of the transfers that committed or completed; aborted and
//! compensated transfers left no trace. (A two-phase transfer never begun can have
//! applied nothing; one that never finished is reported already.)

use std::collections::BTreeMap;

use super::Violations;
use super::evidence::Evidence;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    for (service, data) in &evidence.participants {
        let mut expected: BTreeMap<String, i64> = data.initial.clone();
        for decided in evidence.decided.iter().filter(|d| d.committed) {
            for leg in &decided.transfer.legs {
                if leg.service == *service {
                    *expected.entry(leg.account.clone()).or_default() += leg.amount;
                }
            }
        }
        if data.balances != expected {
            violations.add(format!(
                "{service}: balances {:?}, but the committed transfers add up to {expected:?}",
                data.balances
            ));
        }
    }
}
