//! What the two-phase commit's property test requires once its world has settled.

use super::*;

/// Once the world settled: every YES voter knows the outcome (or, if the coordinator
/// forgot the transaction, has nothing to commit and would be told ABORT on asking), and
/// the log holds what the coordinator does.
pub(super) fn settled_as_it_should(world: &World) -> Result<(), TestCaseError> {
    if let Some(coordinator) = &world.coordinator {
        prop_assert!(
            coordinator.state().is_final(),
            "not final: {:?}",
            coordinator.state()
        );
        let committed = coordinator.state().is_commit();
        for (b, barrier) in world.barriers.iter().enumerate() {
            match world.collected[b].unwrap_or(*barrier) {
                Barrier::Prepared => prop_assert!(false, "branch {b} left in doubt"),
                Barrier::Committed => {
                    prop_assert!(committed, "branch {b} committed, outcome abort")
                }
                Barrier::Aborted => prop_assert!(!committed, "branch {b} aborted, outcome commit"),
                _ => {}
            }
        }
    } else if world.durable.as_ref().is_some_and(|r| r.state.is_commit()) {
        // Forgotten by the process, but its durable final record says committed:
        // nobody may have aborted a YES vote.
        let aborted = world
            .barriers
            .iter()
            .zip(&world.scripts)
            .any(|(b, s)| *b == Barrier::Aborted && *s == Script::Yes);
        prop_assert!(!aborted, "a durable commit, yet a YES voter aborted");
    } else if world.scripts.len() > 1 {
        // Forgotten without a durable decision: presumed abort, so nobody committed.
        // (A one-phase commit's outcome is its only participant's, logged nowhere
        // else; that participant is not in doubt either way.)
        prop_assert!(world.barriers.iter().all(|b| *b != Barrier::Committed));
    }
    // Nothing the coordinator recorded after its last write is missing from the log
    // (history records on): a late answer, heard after the last record was issued, was
    // written too.
    if let Some(coordinator) = &world.coordinator {
        let issued = world.last_issued.as_ref();
        prop_assert!(
            issued.is_some(),
            "final, and no write issued since the last start"
        );
        prop_assert_eq!(
            issued,
            Some(&coordinator.log_record()),
            "the log lacks what memory holds"
        );
    }
    Ok(())
}
