//! How many bytes of memory a transaction's state machine holds: its own size plus what
//! its fields hold on the heap (ids, endpoints, payloads, attempts with their results,
//! transitions with their reasons, a saga's definition).
//!
//! The figure is an estimate, used to bound the final transactions the runtime keeps in
//! memory by bytes (`--memory-budget-bytes`). It follows the record, not a constant: a
//! transaction with many branches, long error texts or a saga with large payloads counts
//! for more. Each heap block counts at its capacity (at its length where only a slice is
//! exposed), rounded up as the allocator rounds it ([`block_bytes`]: mimalloc's size
//! classes, four per doubling). What it leaves out (allocator pages only partly used,
//! fragmentation) makes it err low: docs/PERFORMANCE.md, "Memory", compares it with RSS.
//!
//! Invariant: pure (no I/O, no clock) and linear in the size of the record.

use std::mem::size_of;

use super::saga::{Saga, Step};
use super::twopc::{Branch, TwoPhaseCommit};
use crate::model::{
    Attempt, AttemptLog, OperatorResolution, SagaDefinition, StepDefinition, Transition,
};

/// Heap bytes held by a value (not counting the value itself).
trait Heap {
    fn heap_bytes(&self) -> usize;
}

/// The bytes the allocator takes for a block of `n` bytes: up to 64 bytes in steps of
/// 8, then in four size classes per doubling (mimalloc's, the binaries' allocator).
pub fn block_bytes(n: usize) -> usize {
    match n {
        0 => 0,
        1..=64 => n.next_multiple_of(8),
        _ => {
            let step = n.next_power_of_two() / 8;
            n.next_multiple_of(step)
        }
    }
}

impl Heap for String {
    fn heap_bytes(&self) -> usize {
        block_bytes(self.capacity())
    }
}

impl Heap for Vec<u8> {
    fn heap_bytes(&self) -> usize {
        block_bytes(self.capacity())
    }
}

impl<T: Heap> Heap for Option<T> {
    fn heap_bytes(&self) -> usize {
        self.as_ref().map_or(0, Heap::heap_bytes)
    }
}

/// A vector's block (at its capacity) and what its elements hold.
fn vec_bytes<T>(items: &[T], capacity: usize, each: impl Fn(&T) -> usize) -> usize {
    block_bytes(capacity * size_of::<T>()) + items.iter().map(each).sum::<usize>()
}

impl Heap for Attempt {
    fn heap_bytes(&self) -> usize {
        self.result.heap_bytes()
    }
}

impl Heap for AttemptLog {
    fn heap_bytes(&self) -> usize {
        vec_bytes(self.attempts(), self.capacity(), Heap::heap_bytes)
    }
}

impl Heap for Transition {
    fn heap_bytes(&self) -> usize {
        self.reason.heap_bytes()
    }
}

impl Heap for OperatorResolution {
    fn heap_bytes(&self) -> usize {
        self.by.heap_bytes() + self.reason.heap_bytes()
    }
}

impl Heap for Branch {
    fn heap_bytes(&self) -> usize {
        self.id.heap_bytes()
            + self.endpoint.heap_bytes()
            + self.payload.heap_bytes()
            + self.last_error.heap_bytes()
            + self.history.heap_bytes()
            + self.heuristic.heap_bytes()
            + self.resolution.heap_bytes()
    }
}

impl Heap for Step {
    fn heap_bytes(&self) -> usize {
        self.last_error.heap_bytes() + self.history.heap_bytes() + self.resolution.heap_bytes()
    }
}

impl Heap for StepDefinition {
    fn heap_bytes(&self) -> usize {
        self.id.heap_bytes()
            + self.endpoint.heap_bytes()
            + self.payload.heap_bytes()
            + self.compensation.heap_bytes()
            + block_bytes(self.after.capacity() * size_of::<usize>())
    }
}

impl Heap for SagaDefinition {
    fn heap_bytes(&self) -> usize {
        vec_bytes(&self.steps, self.steps.capacity(), Heap::heap_bytes)
    }
}

/// A saga's definition, in a block of its own behind an `Arc` (its two counts and the
/// struct), and what it holds. Records built from the saga share it: a record's own
/// estimate leaves it out (`Saga::shared_heap_bytes`).
fn shared_definition_bytes(definition: &SagaDefinition) -> usize {
    block_bytes(2 * size_of::<usize>() + size_of::<SagaDefinition>()) + definition.heap_bytes()
}

fn transitions_bytes(transitions: &[Transition], capacity: usize) -> usize {
    vec_bytes(transitions, capacity, Heap::heap_bytes)
}

/// Texts exposed as `&str` only: their length stands for their capacity.
fn text_bytes(text: Option<&str>) -> usize {
    text.map_or(0, |t| block_bytes(t.len()))
}

impl TwoPhaseCommit {
    /// The estimated bytes this transaction holds in memory (see the module docs).
    pub fn estimated_bytes(&self) -> usize {
        size_of::<Self>() + self.heap_bytes()
    }

    /// What its fields hold on the heap (the estimate without the struct itself).
    pub fn heap_bytes(&self) -> usize {
        let (branches_capacity, transitions_capacity) = self.capacities();
        vec_bytes(self.branches(), branches_capacity, Heap::heap_bytes)
            + transitions_bytes(self.transitions(), transitions_capacity)
            + text_bytes(self.reason())
            + text_bytes(self.owner())
    }
}

impl Saga {
    /// The estimated bytes this saga holds in memory (see the module docs).
    pub fn estimated_bytes(&self) -> usize {
        size_of::<Self>() + self.heap_bytes()
    }

    /// What of [`heap_bytes`](Self::heap_bytes) the records built from it share: its
    /// definition.
    pub fn shared_heap_bytes(&self) -> usize {
        shared_definition_bytes(self.definition())
    }

    /// What its fields hold on the heap (the estimate without the struct itself).
    pub fn heap_bytes(&self) -> usize {
        let (steps_capacity, transitions_capacity) = self.capacities();
        self.shared_heap_bytes()
            + vec_bytes(self.steps(), steps_capacity, Heap::heap_bytes)
            + transitions_bytes(self.transitions(), transitions_capacity)
            + text_bytes(self.reason())
            + text_bytes(self.owner())
            + text_bytes(self.idempotency_key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::messages::{BranchSpec, Command, NewTransaction};
    use crate::model::TxnId;

    fn two_phase(branches: usize, payload_bytes: usize) -> TwoPhaseCommit {
        let (mut txn, _) = TwoPhaseCommit::begin(NewTransaction {
            id: TxnId::generate(1),
            created_unix_ms: 1,
            deadline_unix_ms: 1_000_000,
            prepare_timeout_ms: 1_000,
            max_branches: 32,
            owner: None,
            parallel_commit: false,
        });
        for index in 0..branches {
            let spec = BranchSpec {
                id: format!("branch-{index}"),
                endpoint: "http://127.0.0.1:7001".into(),
                payload: vec![0; payload_bytes],
            };
            txn.handle_command(Command::Enlist(spec), 1).unwrap();
        }
        txn
    }

    #[test]
    fn the_estimate_follows_branches_and_payloads() {
        let empty = two_phase(0, 0).estimated_bytes();
        assert!(empty >= size_of::<TwoPhaseCommit>());
        let two = two_phase(2, 0).estimated_bytes();
        let eight = two_phase(8, 0).estimated_bytes();
        // Each branch adds its own size (vectors grow by doubling: room for 4, then 8)
        // and its id and endpoint at least.
        let strings = "branch-0".len() + "http://127.0.0.1:7001".len();
        assert!(
            two >= empty + 4 * size_of::<Branch>() + 2 * strings,
            "{empty} {two}"
        );
        assert!(
            eight >= two + 4 * size_of::<Branch>() + 6 * strings,
            "{two} {eight}"
        );
        // Payloads count as the allocator's blocks for them.
        assert_eq!(
            two_phase(2, 1_000).estimated_bytes(),
            two + 2 * block_bytes(1_000)
        );
    }

    #[test]
    fn blocks_round_up_to_the_allocators_size_classes() {
        let cases = [
            (0, 0),
            (1, 8),
            (8, 8),
            (9, 16),
            (64, 64),
            (65, 80),
            (129, 160),
        ];
        for (n, bytes) in cases {
            assert_eq!(block_bytes(n), bytes, "{n}");
        }
        assert_eq!(block_bytes(1_000), 1_024);
        assert_eq!(block_bytes(1_025), 1_280);
    }
}
