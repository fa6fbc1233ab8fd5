//! A participant whose behaviour is written in each branch's payload, so a test states
//! what every branch does right where it builds the transaction:
//!
//! | payload       | prepare                                   |
//! |---------------|-------------------------------------------|
//! | `yes` or ``   | votes YES                                 |
//! | `no`          | votes NO ("scripted NO")                  |
//! | `readonly`    | votes READ_ONLY                           |
//! | `slow:MS`     | sleeps MS milliseconds, then votes YES    |
//! | `error`       | fails (no answer)                         |
//!
//! Every call that reaches user code is recorded; `fail_next_commits(n)` makes the next
//! `n` commits fail, for phase-2 retry tests.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Prepare,
    Commit,
    Abort,
    Compensate,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub transaction_id: String,
    pub branch_id: String,
}

#[derive(Debug, Default)]
pub struct Scripted {
    calls: Mutex<Vec<Call>>,
    failing_commits: AtomicU32,
}

impl Scripted {
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls that reached user code, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The operations user code ran for one branch, in order.
    pub fn ops(&self, transaction_id: &str, branch_id: &str) -> Vec<Op> {
        self.calls()
            .into_iter()
            .filter(|c| c.transaction_id == transaction_id && c.branch_id == branch_id)
            .map(|c| c.op)
            .collect()
    }

    pub fn fail_next_commits(&self, count: u32) {
        self.failing_commits.store(count, Ordering::SeqCst);
    }

    fn record(&self, op: Op, branch: &BranchContext) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call {
                op,
                transaction_id: branch.transaction_id.clone(),
                branch_id: branch.branch_id.clone(),
            });
    }
}

impl Participant for Scripted {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        self.record(Op::Prepare, branch);
        let script = String::from_utf8_lossy(payload);
        match script.as_ref() {
            "" | "yes" => Ok(Vote::Yes),
            "no" => Ok(Vote::no("scripted NO")),
            "readonly" => Ok(Vote::ReadOnly),
            "error" => Err(ParticipantError::new("scripted error")),
            other => match other.strip_prefix("slow:").and_then(|ms| ms.parse().ok()) {
                Some(ms) => {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(Vote::Yes)
                }
                None => Ok(Vote::no(format!("unknown script {other:?}"))),
            },
        }
    }

    async fn commit(
        &self,
        branch: &BranchContext,
        _payload: &[u8],
    ) -> Result<(), ParticipantError> {
        let failing = self
            .failing_commits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(ParticipantError::new("scripted commit failure"));
        }
        self.record(Op::Commit, branch);
        Ok(())
    }

    async fn abort(&self, branch: &BranchContext, _payload: &[u8]) -> Result<(), ParticipantError> {
        self.record(Op::Abort, branch);
        Ok(())
    }

    async fn compensate(
        &self,
        branch: &BranchContext,
        _payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.record(Op::Compensate, branch);
        Ok(())
    }
}
