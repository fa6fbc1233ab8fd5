//! The conformance participant: user code for `treaty tck` (see
//! `proto/treaty/v1/conformance.proto` and docs/PARTICIPANT-PROTOCOL.md, "Checking a
//! participant"). It reads each payload as a script (`vote=yes|no|read_only`, `fail=N`,
//! `delay_ms=N`), and records an *effect* each time its code acts: a YES vote's
//! reservation, a commit, an abort of a prepared branch, a compensation. The
//! `Conformance` service lists a branch's effects so the kit can check that user code ran
//! exactly once, in a legal order.
//!
//! Invariants:
//! - an effect is written in the same forced write as the barrier's record of the
//!   operation ([`BranchContext::include_barrier_record`]): after any crash, both or
//!   neither are on disk;
//! - effects of one branch are listed in the order they were written: keys end with a
//!   sequence number that grows across restarts (seeded above every key on disk);
//! - `fail=N` counts runs per (transaction, branch, operation) since the process started.
//!
//! The deliberately broken variants (`crate::broken`) reuse this user code and bypass
//! the SDK's barrier in one way each.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::{Request, Response, Status};
use treaty_proto::v1 as pb;
use treaty_sdk::durable::{Durability, DurableStore, WriteBatch};
use treaty_sdk::limits::check_id;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

/// Where effects live in the participant's store: `c/e/<transaction>/<branch>/<seq>`.
const EFFECT_PREFIX: &str = "c/e/";
/// The longest `delay_ms` obeyed.
const MAX_DELAY_MS: u64 = 10_000;

/// What a payload asks of the user code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub vote: Vote,
    pub fail: u32,
    pub delay_ms: u64,
}

impl Script {
    /// Directives `name=value` separated by `;`; unknown names and unreadable values are
    /// ignored (the default stays).
    pub fn parse(payload: &[u8]) -> Self {
        let mut script = Script {
            vote: Vote::Yes,
            fail: 0,
            delay_ms: 0,
        };
        let text = String::from_utf8_lossy(payload);
        for directive in text.split(';') {
            let Some((name, value)) = directive.split_once('=') else {
                continue;
            };
            match (name.trim(), value.trim()) {
                ("vote", "yes") => script.vote = Vote::Yes,
                ("vote", "no") => script.vote = Vote::no("the script votes no"),
                ("vote", "read_only") => script.vote = Vote::ReadOnly,
                ("fail", n) => script.fail = n.parse().unwrap_or(script.fail),
                ("delay_ms", n) => {
                    script.delay_ms = n.parse::<u64>().unwrap_or(0).min(MAX_DELAY_MS)
                }
                _ => {}
            }
        }
        script
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Op {
    Prepare,
    Commit,
    Abort,
    Compensate,
}

/// The user code of the conformance participant, its effects in `store`.
#[derive(Debug)]
pub struct ConformanceParticipant {
    store: Arc<DurableStore>,
    next_sequence: AtomicU64,
    runs: Mutex<HashMap<(String, String, Op), u32>>,
}

impl ConformanceParticipant {
    /// User code keeping its effects in `store` (the barrier's store too, for
    /// exactly-once effects).
    pub fn new(store: Arc<DurableStore>) -> Result<Self, String> {
        let mut highest = 0u64;
        for entry in store.db().scan_prefix(EFFECT_PREFIX.as_bytes()) {
            let (key, _) = entry.map_err(|e| format!("reading effects: {e}"))?;
            let sequence = String::from_utf8_lossy(&key)
                .rsplit('/')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            highest = highest.max(sequence);
        }
        Ok(Self {
            store,
            next_sequence: AtomicU64::new(highest + 1),
            runs: Mutex::default(),
        })
    }

    /// The effects of one branch, oldest first.
    pub fn effects(
        &self,
        transaction_id: &str,
        branch_id: &str,
    ) -> Result<Vec<pb::Effect>, String> {
        let prefix = format!("{EFFECT_PREFIX}{transaction_id}/{branch_id}/");
        let mut effects = Vec::new();
        for entry in self.store.db().scan_prefix(prefix.as_bytes()) {
            let (_, value) = entry.map_err(|e| format!("reading effects: {e}"))?;
            let (kind, payload) = value.split_first().ok_or("an empty effect record")?;
            effects.push(pb::Effect {
                kind: i32::from(*kind),
                payload: payload.to_vec(),
            });
        }
        Ok(effects)
    }

    /// Waits as the script says, then fails if this is one of its first `fail` runs of
    /// `op` for the branch.
    async fn obey(
        &self,
        branch: &BranchContext,
        op: Op,
        script: &Script,
    ) -> Result<(), ParticipantError> {
        let run = {
            let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
            let count = runs
                .entry((branch.transaction_id.clone(), branch.branch_id.clone(), op))
                .or_default();
            *count += 1;
            *count
        };
        if script.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(script.delay_ms)).await;
        }
        if run <= script.fail {
            return Err(ParticipantError::new(format!(
                "the script fails {op:?} {} time(s); this was run {run}",
                script.fail
            )));
        }
        Ok(())
    }

    /// Writes the effect, with the barrier's record of the operation when the SDK offers
    /// it, durably.
    async fn record(
        &self,
        branch: &BranchContext,
        kind: pb::EffectKind,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        let sequence = self.next_sequence.fetch_add(1, Ordering::SeqCst);
        let key = format!(
            "{EFFECT_PREFIX}{}/{}/{sequence:020}",
            branch.transaction_id, branch.branch_id
        );
        let mut value = vec![kind as u8];
        value.extend_from_slice(payload);
        let mut batch = WriteBatch::new();
        batch.insert(key, value);
        branch.include_barrier_record(&mut batch);
        self.store
            .write(batch, Durability::Forced)
            .await
            .map_err(|e| ParticipantError::new(format!("writing the effect: {e}")))
    }
}

impl Participant for ConformanceParticipant {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        let script = Script::parse(payload);
        self.obey(branch, Op::Prepare, &script).await?;
        if script.vote == Vote::Yes {
            self.record(branch, pb::EffectKind::Prepare, payload)
                .await?;
        }
        Ok(script.vote)
    }

    async fn commit(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        self.obey(branch, Op::Commit, &Script::parse(payload))
            .await?;
        self.record(branch, pb::EffectKind::Commit, payload).await
    }

    async fn abort(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        self.obey(branch, Op::Abort, &Script::parse(payload))
            .await?;
        self.record(branch, pb::EffectKind::Abort, payload).await
    }

    async fn compensate(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.obey(branch, Op::Compensate, &Script::parse(payload))
            .await?;
        self.record(branch, pb::EffectKind::Compensate, payload)
            .await
    }
}

/// `treaty.v1.Conformance` over a [`ConformanceParticipant`].
#[derive(Debug, Clone)]
pub struct ConformanceService {
    participant: Arc<ConformanceParticipant>,
}

impl ConformanceService {
    pub fn new(participant: Arc<ConformanceParticipant>) -> Self {
        Self { participant }
    }

    pub fn server(self) -> pb::conformance_server::ConformanceServer<Self> {
        pb::conformance_server::ConformanceServer::new(self)
    }
}

#[tonic::async_trait]
impl pb::conformance_server::Conformance for ConformanceService {
    async fn effects(
        &self,
        request: Request<pb::EffectsRequest>,
    ) -> Result<Response<pb::EffectsResponse>, Status> {
        let request = request.into_inner();
        for (field, value) in [
            ("transaction_id", &request.transaction_id),
            ("branch_id", &request.branch_id),
        ] {
            check_id(field, value).map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let effects = self
            .participant
            .effects(&request.transaction_id, &request.branch_id)
            .map_err(Status::internal)?;
        Ok(Response::new(pb::EffectsResponse { effects }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_read_their_directives_and_ignore_the_rest() {
        assert_eq!(
            Script::parse(b""),
            Script {
                vote: Vote::Yes,
                fail: 0,
                delay_ms: 0
            }
        );
        let script = Script::parse(b"vote=read_only; fail=2;delay_ms=50;colour=blue;junk");
        assert_eq!(script.vote, Vote::ReadOnly);
        assert_eq!((script.fail, script.delay_ms), (2, 50));
        assert!(matches!(Script::parse(b"vote=no").vote, Vote::No { .. }));
        assert_eq!(Script::parse(b"delay_ms=999999").delay_ms, MAX_DELAY_MS);
    }
}
