//! Invariant: after the chaos, every transaction the coordinator knows (also those the
//! client never learned of) is final and not stuck, and no two sagas share an
//! idempotency key (a retried submit found the first saga rather than starting another).

use std::collections::HashMap;

use treaty_sdk::TreatyClient;
use treaty_sdk::client::TransactionState;

use super::Violations;

/// Most pages of ListTransactions read.
const MAX_PAGES: usize = 10_000;

/// Committed, aborted, completed or compensated: it will not change again.
pub fn is_final(state: TransactionState) -> bool {
    matches!(
        state,
        TransactionState::Committed
            | TransactionState::Aborted
            | TransactionState::Completed
            | TransactionState::Compensated
    )
}

pub async fn check(client: &TreatyClient, violations: &mut Violations) {
    let mut keys: HashMap<String, String> = HashMap::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        let (page, next) = match client.list(&[], 1_000, &token).await {
            Ok(answer) => answer,
            Err(error) => {
                violations.add(format!("listing transactions failed: {error}"));
                return;
            }
        };
        for txn in page {
            let state = TransactionState::try_from(txn.state);
            let finished = state.is_ok_and(is_final);
            if !finished || txn.stuck {
                violations.add(format!(
                    "{}: {state:?}, stuck {} after the chaos",
                    txn.transaction_id, txn.stuck
                ));
            }
            if !txn.idempotency_key.is_empty() {
                if let Some(other) =
                    keys.insert(txn.idempotency_key.clone(), txn.transaction_id.clone())
                {
                    violations.add(format!(
                        "sagas {other} and {} share the key {}",
                        txn.transaction_id, txn.idempotency_key
                    ));
                }
            }
        }
        match next {
            Some(next) => token = next,
            None => return,
        }
    }
    violations.add(format!("more than {MAX_PAGES} pages of transactions"));
}
