//! Transactions in progress, in total and per principal, and the payload bytes they
//! hold in memory, shared by every shard: the admission limits
//! (`max_active_transactions`, `max_active_per_principal`, `max_payload_memory_bytes`).
//!
//! Invariant: a transaction is counted from its admission (or its recovery) until it
//! becomes final, once, under its owner (transactions without an owner count only in
//! the total), with the payload bytes it was admitted with plus those of branches
//! enlisted later.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::RuntimeError;

#[derive(Debug, Default)]
pub(super) struct Load {
    total: AtomicUsize,
    per_owner: Mutex<HashMap<String, usize>>,
    payload_bytes: AtomicUsize,
}

/// The limits [`Load::admit`] applies.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_total: usize,
    pub(super) max_per_owner: usize,
    pub(super) max_payload_bytes: usize,
}

impl Load {
    pub(super) fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    fn payload_bytes(&self) -> usize {
        self.payload_bytes.load(Ordering::SeqCst)
    }

    /// Counts a recovered transaction, whatever the limits.
    pub(super) fn count(&self, owner: Option<&str>, payload_bytes: usize) {
        self.total.fetch_add(1, Ordering::SeqCst);
        self.payload_bytes
            .fetch_add(payload_bytes, Ordering::SeqCst);
        if let Some(owner) = owner {
            *self.owners().entry(owner.to_string()).or_default() += 1;
        }
    }

    /// Counts a new transaction of `owner` holding `payload_bytes`, or refuses it past
    /// any limit (then nothing is counted).
    pub(super) fn admit(
        &self,
        owner: Option<&str>,
        payload_bytes: usize,
        limits: Limits,
    ) -> Result<(), RuntimeError> {
        let total = self.total.fetch_add(1, Ordering::SeqCst);
        if total >= limits.max_total {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(RuntimeError::Overloaded(total));
        }
        if let Err(error) = self.reserve(payload_bytes, limits.max_payload_bytes) {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(error);
        }
        if let Some(owner) = owner {
            let mut owners = self.owners();
            let count = owners.entry(owner.to_string()).or_default();
            if *count >= limits.max_per_owner {
                self.total.fetch_sub(1, Ordering::SeqCst);
                self.payload_bytes
                    .fetch_sub(payload_bytes, Ordering::SeqCst);
                return Err(RuntimeError::PrincipalOverloaded {
                    principal: owner.to_string(),
                    limit: limits.max_per_owner,
                });
            }
            *count += 1;
        }
        Ok(())
    }

    /// Holds `bytes` more of payloads (a branch enlisted later), or refuses past `max`.
    pub(super) fn reserve(&self, bytes: usize, max: usize) -> Result<(), RuntimeError> {
        let held = self.payload_bytes.fetch_add(bytes, Ordering::SeqCst);
        if held.saturating_add(bytes) > max {
            self.payload_bytes.fetch_sub(bytes, Ordering::SeqCst);
            return Err(RuntimeError::PayloadBudget { held, budget: max });
        }
        Ok(())
    }

    pub(super) fn unreserve(&self, bytes: usize) {
        self.payload_bytes.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Stops counting a transaction (final, or refused after admission) and the payload
    /// bytes it held.
    pub(super) fn release(&self, owner: Option<&str>, payload_bytes: usize) {
        self.unreserve(payload_bytes);
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

    const LIMITS: Limits = Limits {
        max_total: 10,
        max_per_owner: 2,
        max_payload_bytes: 100,
    };

    #[test]
    fn each_principal_has_its_own_cap_within_the_total() {
        let load = Load::default();
        load.admit(Some("alice"), 0, LIMITS).unwrap();
        load.admit(Some("alice"), 0, LIMITS).unwrap();
        assert!(matches!(
            load.admit(Some("alice"), 0, LIMITS),
            Err(RuntimeError::PrincipalOverloaded { .. })
        ));
        load.admit(Some("bob"), 0, LIMITS).unwrap();
        load.admit(None, 0, LIMITS).unwrap();
        assert_eq!(load.total(), 4);
        load.release(Some("alice"), 0);
        load.admit(Some("alice"), 0, LIMITS).unwrap();
        let four = Limits {
            max_total: 4,
            ..LIMITS
        };
        assert!(matches!(
            load.admit(None, 0, four),
            Err(RuntimeError::Overloaded(4))
        ));
        assert_eq!(load.total(), 4);
    }

    #[test]
    fn payload_bytes_are_held_until_released_and_refusals_hold_nothing() {
        let load = Load::default();
        load.admit(None, 60, LIMITS).unwrap();
        assert!(matches!(
            load.admit(None, 41, LIMITS),
            Err(RuntimeError::PayloadBudget { held: 60, .. })
        ));
        assert_eq!((load.total(), load.payload_bytes()), (1, 60));
        load.reserve(40, LIMITS.max_payload_bytes).unwrap();
        assert!(load.reserve(1, LIMITS.max_payload_bytes).is_err());
        // A principal over its cap holds no bytes either.
        load.release(None, 100);
        load.admit(Some("alice"), 10, LIMITS).unwrap();
        load.admit(Some("alice"), 10, LIMITS).unwrap();
        assert!(load.admit(Some("alice"), 10, LIMITS).is_err());
        assert_eq!((load.total(), load.payload_bytes()), (2, 20));
    }
}
