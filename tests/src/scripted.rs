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
//! | `flaky:N`     | fails the first N times for a branch, then votes YES |
//!
//! A saga step arrives as prepare + commit, so the same scripts drive saga steps (`no`
//! is a rejection). Every call that reaches user code is recorded; `fail_next_commits(n)`
//! makes the next `n` commits fail (phase-2 retry tests) and `fail_compensations(true)`
//! makes every compensation fail until switched off (stuck sagas). Each call keeps the
//! trace context (`traceparent`, `tracestate`) it carried, for the tracing tests.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use treaty_sdk::trace::TraceContext;
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
    /// The W3C trace context (`traceparent`, `tracestate`) the call carried, as the
    /// SDK passed it on.
    pub trace: Option<TraceContext>,
}

#[derive(Debug, Default)]
pub struct Scripted {
    calls: Mutex<Vec<Call>>,
    failing_commits: AtomicU32,
    failing_compensations: AtomicBool,
    /// Prepares seen per (transaction, branch), for `flaky:N`.
    prepares: Mutex<HashMap<(String, String), u32>>,
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

    pub fn fail_compensations(&self, failing: bool) {
        self.failing_compensations.store(failing, Ordering::SeqCst);
    }

    /// The transactions and branches user code compensated, in order.
    pub fn compensated(&self) -> Vec<(String, String)> {
        self.calls()
            .into_iter()
            .filter(|c| c.op == Op::Compensate)
            .map(|c| (c.transaction_id, c.branch_id))
            .collect()
    }

    fn record(&self, op: Op, branch: &BranchContext) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Call {
                op,
                transaction_id: branch.transaction_id.clone(),
                branch_id: branch.branch_id.clone(),
                trace: branch.trace().cloned(),
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
        let seen = {
            let mut prepares = self.prepares.lock().unwrap_or_else(|e| e.into_inner());
            let count = prepares
                .entry((branch.transaction_id.clone(), branch.branch_id.clone()))
                .or_default();
            *count += 1;
            *count
        };
        // Trailing spaces pad a payload to a size without changing its script.
        let script = String::from_utf8_lossy(payload);
        let script = script.trim_end();
        match script {
            "" | "yes" => Ok(Vote::Yes),
            "no" => Ok(Vote::no("scripted NO")),
            "readonly" => Ok(Vote::ReadOnly),
            "error" => Err(ParticipantError::new("scripted error")),
            other => {
                if let Some(ms) = other.strip_prefix("slow:").and_then(|ms| ms.parse().ok()) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    return Ok(Vote::Yes);
                }
                if let Some(failures) = other
                    .strip_prefix("flaky:")
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    return if seen <= failures {
                        Err(ParticipantError::new(format!(
                            "scripted transient failure {seen}"
                        )))
                    } else {
                        Ok(Vote::Yes)
                    };
                }
                Ok(Vote::no(format!("unknown script {other:?}")))
            }
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
        if self.failing_compensations.load(Ordering::SeqCst) {
            return Err(ParticipantError::new("scripted compensation failure"));
        }
        self.record(Op::Compensate, branch);
        Ok(())
    }
}
