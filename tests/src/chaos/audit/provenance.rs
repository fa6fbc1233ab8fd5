//! Invariant (no effect from nowhere), from each participant's journal: every effect —
//! money at a bank, points at rewards — belongs to a leg of a transfer the client
//! started, on that leg's account or member, for that leg's amount (its opposite for a
//! compensation).

use std::collections::HashMap;

use treaty_examples::journal::Effect;

use super::Violations;
use super::evidence::Evidence;
use crate::chaos::workload::Transfer;

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    let by_id: HashMap<&str, &Transfer> = evidence
        .transfers
        .iter()
        .filter_map(|t| Some((t.transaction_id.as_deref()?, t)))
        .collect();
    for (service, data) in &evidence.participants {
        for entry in &data.journal {
            let leg = by_id
                .get(entry.transaction_id.as_str())
                .and_then(|transfer| transfer.leg(*service, &entry.branch_id));
            let Some(leg) = leg else {
                violations.add(format!(
                    "{service}: {:?} for {}/{}, which no transfer has",
                    entry.effect, entry.transaction_id, entry.branch_id
                ));
                continue;
            };
            let amount = match entry.effect {
                Effect::Compensate => -leg.amount,
                Effect::Hold | Effect::Commit | Effect::Release => leg.amount,
            };
            if entry.account != leg.account || entry.amount != amount {
                violations.add(format!(
                    "{service}: {:?} of {} on {:?} for {}/{}, whose leg is {} on {:?}",
                    entry.effect,
                    entry.amount,
                    entry.account,
                    entry.transaction_id,
                    entry.branch_id,
                    leg.amount,
                    leg.account
                ));
            }
        }
    }
}
