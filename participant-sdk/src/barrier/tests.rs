//! Tests of the barrier from inside the crate; its rules are tested through its public
//! API in participant-sdk/tests/barrier/.

use super::*;
use crate::durable::{MAX_GROUP_COMMIT_HOLD, StoreOptions};
use crate::{ParticipantError, Vote};

/// Votes YES and does nothing else (the crate's other tests use it too).
#[derive(Debug)]
pub(crate) struct Yes;

impl Participant for Yes {
    async fn prepare(&self, _: &BranchContext, _: &[u8]) -> Result<Vote, ParticipantError> {
        Ok(Vote::Yes)
    }
    async fn commit(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
    async fn abort(&self, _: &BranchContext, _: &[u8]) -> Result<(), ParticipantError> {
        Ok(())
    }
}

/// What the in-doubt resolver uses, settling one branch at a time: phase 2 written
/// forced, so it never waits out a patient write's wait (a minute here).
#[tokio::test]
async fn phase_two_written_forced_does_not_wait_for_company() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        patient_sync_wait: MAX_GROUP_COMMIT_HOLD,
        ..StoreOptions::default()
    };
    let barrier = Barrier::new(Arc::new(DurableStore::open(dir.path(), options).unwrap()));
    let patience = std::time::Duration::from_secs(30);
    let (committed, aborted) = (
        BranchContext::new("t", "committed"),
        BranchContext::new("t", "aborted"),
    );
    for branch in [&committed, &aborted] {
        barrier.prepare(&Yes, branch, b"", "c").await.unwrap();
    }
    let commit = barrier.commit_with(
        &Yes,
        &committed,
        BranchMode::TwoPhase,
        b"",
        "c",
        PhaseTwoWrite::Forced,
    );
    let answer = tokio::time::timeout(patience, commit)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, CommitAnswer::Committed);
    let abort = barrier.abort_with(&Yes, &aborted, PhaseTwoWrite::Forced);
    let answer = tokio::time::timeout(patience, abort)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, AbortAnswer::Aborted);
}
