//! Invariant (the data is what the effects made it): at every participant, each balance
//! — money at a bank, points at rewards — is its first value plus the amounts its
//! journal applied and compensated, and no account appeared from elsewhere.

use std::collections::BTreeMap;

use treaty_examples::journal::Effect;

use super::Violations;
use super::evidence::Evidence;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    for (service, data) in &evidence.participants {
        let mut expected: BTreeMap<String, i64> = data.initial.clone();
        for entry in &data.journal {
            if matches!(entry.effect, Effect::Commit | Effect::Compensate) {
                *expected.entry(entry.account.clone()).or_default() += entry.amount;
            }
        }
        if data.balances != expected {
            violations.add(format!(
                "{service}: balances {:?}, but the journal adds up to {expected:?}",
                data.balances
            ));
        }
    }
}
