//! Transactions in progress, in total and per principal, shared by every shard: the
//! admission limits (`max_active_transactions`, `max_active_per_principal`).
//!
//! Invariant: a transaction is counted from its admission (or its recovery) until it
//! becomes final, once, under its owner (transactions without an owner count only in
//! the total).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::RuntimeError;

#[derive(Debug, Default)]
pub(super) struct Load {
    total: AtomicUsize,
    per_owner: Mutex<HashMap<String, usize>>,
}

impl Load {
    pub(super) fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Counts a recovered transaction, whatever the limits.
    pub(super) fn count(&self, owner: Option<&str>) {
        self.total.fetch_add(1, Ordering::SeqCst);
        if let Some(owner) = owner {
            *self.owners().entry(owner.to_string()).or_default() += 1;
        }
    }

    /// Counts a new transaction of `owner`, or refuses it past either limit.
    pub(super) fn admit(
        &self,
        owner: Option<&str>,
        max_total: usize,
        max_per_owner: usize,
    ) -> Result<(), RuntimeError> {
        let total = self.total.fetch_add(1, Ordering::SeqCst);
        if total >= max_total {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(RuntimeError::Overloaded(total));
        }
        if let Some(owner) = owner {
            let mut owners = self.owners();
            let count = owners.entry(owner.to_string()).or_default();
            if *count >= max_per_owner {
                self.total.fetch_sub(1, Ordering::SeqCst);
                return Err(RuntimeError::PrincipalOverloaded {
                    principal: owner.to_string(),
                    limit: max_per_owner,
                });
            }
            *count += 1;
        }
        Ok(())
    }

    /// Stops counting a transaction (final, or refused after admission).
    pub(super) fn release(&self, owner: Option<&str>) {
        self.total.fetch_sub(1, Ordering::SeqCst);
        if let Some(owner) = owner {
            let mut owners = self.owners();
            if let Some(count) = owners.get_mut(owner) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    owners.remove(owner);
                }
            }
        }
    }

    fn owners(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.per_owner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_principal_has_its_own_cap_within_the_total() {
        let load = Load::default();
        load.admit(Some("alice"), 10, 2).unwrap();
        load.admit(Some("alice"), 10, 2).unwrap();
        assert!(matches!(
            load.admit(Some("alice"), 10, 2),
            Err(RuntimeError::PrincipalOverloaded { .. })
        ));
        load.admit(Some("bob"), 10, 2).unwrap();
        load.admit(None, 10, 2).unwrap();
        assert_eq!(load.total(), 4);
        load.release(Some("alice"));
        load.admit(Some("alice"), 10, 2).unwrap();
        assert!(matches!(
            load.admit(None, 4, 2),
            Err(RuntimeError::Overloaded(4))
        ));
        assert_eq!(load.total(), 4);
    }
}
