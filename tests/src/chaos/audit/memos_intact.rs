//! Invariant (big values survive intact): a bank keeps the memo of every leg it applied
//! that carried one — byte for byte what was sent — and no other. Big transfers' memos
//! are nearly 16 KiB each, so sled writes the leaves that hold them to blob files: this
//! is what a kill -9 while sled writes blobs must neither damage nor lose.

use std::collections::HashMap;

use treaty_examples::journal::Effect;

use super::Violations;
use super::evidence::Evidence;
use crate::chaos::cluster::Service;
use crate::chaos::workload::Transfer;

/// Returns how many memos were compared.
pub fn check(evidence: &Evidence, violations: &mut Violations) -> usize {
    let by_id: HashMap<&str, &Transfer> = evidence
        .transfers
        .iter()
        .filter_map(|t| Some((t.transaction_id.as_deref()?, t)))
        .collect();
    let mut compared = 0;
    for (service, data) in &evidence.participants {
        let Service::Bank(_) = service else {
            continue;
        };
        for ((id, branch_id), effects) in &data.effects {
            let applied = effects.contains(&Effect::Commit);
            let sent = by_id
                .get(id.as_str())
                .and_then(|transfer| sent_memo(transfer, *service, branch_id));
            let kept = data.memos.get(&(id.clone(), branch_id.clone()));
            match (applied.then_some(sent).flatten(), kept) {
                (None, None) => {}
                (Some(sent), Some(kept)) if sent == *kept => compared += 1,
                (Some(sent), Some(kept)) => violations.add(format!(
                    "{service}: {id}/{branch_id}: kept a memo of {} bytes, not the {} sent",
                    kept.len(),
                    sent.len()
                )),
                (Some(sent), None) => violations.add(format!(
                    "{service}: {id}/{branch_id}: applied, but its memo of {} bytes is lost",
                    sent.len()
                )),
                (None, Some(kept)) => violations.add(format!(
                    "{service}: {id}/{branch_id}: kept a memo of {} bytes for a leg that \
                     was not applied or sent none",
                    kept.len()
                )),
            }
        }
        for (id, branch_id) in data.memos.keys() {
            if !data.effects.contains_key(&(id.clone(), branch_id.clone())) {
                violations.add(format!(
                    "{service}: {id}/{branch_id}: a memo kept without any effect"
                ));
            }
        }
    }
    compared
}

/// The memo the transfer sent with its leg `branch_id` at `service`, if any.
fn sent_memo(transfer: &Transfer, service: Service, branch_id: &str) -> Option<String> {
    let index = transfer
        .legs
        .iter()
        .position(|leg| leg.service == service && leg.branch_id == branch_id)?;
    let payload = transfer.payloads().into_iter().nth(index)?;
    let leg: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    leg.get("memo")?.as_str().map(str::to_string)
}
