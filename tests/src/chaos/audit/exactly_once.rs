//! Invariant (at most once, in order), from each participant's journal: no leg is held,
//! applied, released or compensated twice; nothing is applied or released without its
//! hold (the YES vote), never both; nothing is compensated without its forward step.

use std::collections::HashMap;

use treaty_examples::journal::Effect;

use super::Violations;
use super::evidence::{Evidence, LegKey};

pub fn check(evidence: &Evidence, violations: &mut Violations) {
    for (service, data) in &evidence.participants {
        let mut seen: HashMap<LegKey, Vec<Effect>> = HashMap::new();
        for entry in &data.journal {
            let effects = seen
                .entry((entry.transaction_id.clone(), entry.branch_id.clone()))
                .or_default();
            let first_of_kind = !effects.contains(&entry.effect);
            let in_order = match entry.effect {
                Effect::Hold => effects.is_empty(),
                Effect::Commit | Effect::Release => {
                    effects.contains(&Effect::Hold)
                        && !effects.contains(&Effect::Commit)
                        && !effects.contains(&Effect::Release)
                }
                Effect::Compensate => effects.contains(&Effect::Commit),
            };
            effects.push(entry.effect);
            if !first_of_kind || !in_order {
                violations.add(format!(
                    "{service}: {}/{}: effects {effects:?}",
                    entry.transaction_id, entry.branch_id
                ));
            }
        }
    }
}
