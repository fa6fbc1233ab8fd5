//! The coordinator's vocabulary: transaction ids, states, and the record of a transaction
//! that the decision log stores (a branch's calls in `model/attempts.rs`). Plain data,
//! shared by the engine, the log and the API; no protobuf types here (the API converts
//! at its edge).

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

mod attempts;

pub use attempts::{Attempt, AttemptLog, CallNumber, MAX_ATTEMPTS_KEPT, Operation};

/// Milliseconds since the Unix epoch.
pub type UnixMs = u64;

/// A transaction id: a UUIDv7 (48-bit millisecond timestamp + 74 random bits). Unique
/// across restarts and across coordinators without any persisted counter (sled's
/// `generate_id` is not crash-safe), and ordered by creation time, which keeps log
/// scans and listings in time order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TxnId(uuid::Uuid);

impl TxnId {
    /// A new id for a transaction created at `now_unix_ms`.
    pub fn generate(now_unix_ms: UnixMs) -> Self {
        let timestamp = uuid::Timestamp::from_unix(
            uuid::NoContext,
            now_unix_ms / 1000,
            ((now_unix_ms % 1000) * 1_000_000) as u32,
        );
        Self(uuid::Uuid::new_v7(timestamp))
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    /// When it was generated: the UUIDv7's 48-bit millisecond timestamp (the
    /// coordinator's clock then).
    pub fn created_unix_ms(&self) -> UnixMs {
        self.0.as_bytes()[..6]
            .iter()
            .fold(0, |ms, byte| (ms << 8) | UnixMs::from(*byte))
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(uuid::Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl fmt::Debug for TxnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for TxnId {
    type Err = String;

    /// Accepts only the canonical form this coordinator hands out (lowercase, hyphenated).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // The input is quoted bounded and escaped: it comes from clients.
        let quoted = || treaty_sdk::limits::quote_input(text);
        let uuid = uuid::Uuid::try_parse(text).map_err(|_| {
            format!(
                "{} is not a transaction id (a UUID such as 019a0b6e-8d2f-7c3a-9b1e-2f4d5c6b7a80)",
                quoted()
            )
        })?;
        if uuid.hyphenated().to_string() != text {
            return Err(format!(
                "{} is not in canonical form (lowercase, hyphenated)",
                quoted()
            ));
        }
        Ok(Self(uuid))
    }
}

/// A transaction's state as users see it. Two-phase commits go Active → Preparing →
/// Committing/Aborting → Committed/Aborted; sagas go Running → (Compensating →)
/// Completed/Compensated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TxnState {
    Active,
    Preparing,
    Committing,
    Aborting,
    Committed,
    Aborted,
    Running,
    Compensating,
    Completed,
    Compensated,
}

impl TxnState {
    /// The outcome is fixed (and durable where the protocol says so).
    pub fn is_decided(self) -> bool {
        !matches!(
            self,
            TxnState::Active | TxnState::Preparing | TxnState::Running
        )
    }

    /// Nothing is left to do: every participant has the outcome.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TxnState::Committed | TxnState::Aborted | TxnState::Completed | TxnState::Compensated
        )
    }

    /// For a decided state, whether the outcome is that the work stands.
    pub fn is_commit(self) -> bool {
        matches!(
            self,
            TxnState::Committing | TxnState::Committed | TxnState::Completed
        )
    }
}

/// One branch's (or saga step's) progress as the coordinator knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchState {
    Enlisted,
    Preparing,
    Prepared,
    VotedNo,
    ReadOnly,
    /// Prepare got no answer (transport error or timeout).
    Unreachable,
    Committed,
    Aborted,
    /// A saga step waiting for the steps it runs after.
    Pending,
    /// A saga step's forward action is under way (in flight or waiting to retry).
    Running,
    /// The participant refused the step (business failure).
    Rejected,
    /// The step's attempts ran out without a definitive answer; it is compensated.
    Uncertain,
    Compensating,
    Compensated,
    /// Never started: the saga was compensated first.
    Skipped,
}

impl BranchState {
    /// A saga step whose forward action may have taken effect.
    pub fn may_have_run(self) -> bool {
        matches!(
            self,
            BranchState::Running | BranchState::Committed | BranchState::Uncertain
        )
    }
}

/// A change of state, or a notable event (a saga flagged stuck), kept as the
/// transaction's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: TxnState,
    pub at_unix_ms: UnixMs,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnKind {
    TwoPhase,
    Saga,
}

/// A branch (or saga step) as recorded in the log and shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub id: String,
    pub endpoint: String,
    /// A two-phase branch's prepare payload while phase 1 runs with its intent logged
    /// (parallel commit), for asking again after a restart; empty otherwise. Stored after
    /// the branch notes (log format 4).
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub state: BranchState,
    /// Phase-2 deliveries tried (two-phase), forward attempts (saga step).
    pub attempts: u32,
    /// Compensations tried (saga step).
    pub compensation_attempts: u32,
    pub last_error: Option<String>,
    pub history: AttemptLog,
    /// What the participant answered against the decision (it lost or overrode its
    /// vote), if it did. Stored after the record's serde form (log format 3).
    #[serde(skip)]
    pub heuristic: Option<String>,
    /// An operator's decision about this branch, if one was taken. Stored like
    /// `heuristic`.
    #[serde(skip)]
    pub resolution: Option<OperatorResolution>,
    /// A saga step stated committed by an operator, compensated at its participant,
    /// that waits for an operator to state what was done by hand undone (the engine's
    /// `Step::awaits_operator`). Shown, never logged: after a restart the compensation
    /// is sent again, and its answer sets it again.
    #[serde(skip)]
    pub awaits_operator: bool,
}

/// The outcome an operator states for a branch the protocol could not settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resolution {
    /// The branch's work stands (it was committed, or applied by hand).
    Commit,
    /// The branch's work is not there (aborted, compensated, or undone by hand).
    Abort,
}

/// An operator's decision about one branch, kept in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorResolution {
    pub outcome: Resolution,
    /// The principal that decided (empty without authentication).
    pub by: String,
    pub at_unix_ms: UnixMs,
    pub reason: String,
}

/// How often a saga step is retried after failures that gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Forward attempts in all, the first included (≥ 1).
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

/// A step's timeout and retry policy as the client sent them (zeros: server defaults),
/// so that a retried submit is recognised even if the server's defaults changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRequest {
    pub timeout_ms: u64,
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

/// One step of a saga as submitted (validated, with the server's defaults applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepDefinition {
    pub id: String,
    pub endpoint: String,
    pub payload: Vec<u8>,
    pub compensation: Vec<u8>,
    /// Deadline of each forward or compensation call.
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    /// Indices of the steps this one runs after.
    pub after: Vec<usize>,
    pub requested: StepRequest,
}

impl StepDefinition {
    /// Whether `other` is the same step as the client submitted it.
    pub fn same_request(&self, other: &StepDefinition) -> bool {
        self.id == other.id
            && self.endpoint == other.endpoint
            && self.payload == other.payload
            && self.compensation == other.compensation
            && self.after == other.after
            && self.requested == other.requested
    }
}

/// A saga's definition: forced to the log before its first step runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SagaDefinition {
    pub steps: Vec<StepDefinition>,
    /// Compensation attempts of one step after which the saga is flagged stuck.
    pub stuck_after_attempts: u32,
}

/// What the log stores of a transaction, and what GetTransaction shows.
///
/// Two-phase: a commit decision is written (forced) with `state == Committing`; the end
/// (`Committed`) lazily with `ended_unix_ms` set. Sagas: the definition is forced before
/// the first step, progress is lazy, the decision to compensate and the final state are
/// forced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    pub id: TxnId,
    pub kind: TxnKind,
    pub state: TxnState,
    pub created_unix_ms: UnixMs,
    pub deadline_unix_ms: UnixMs,
    pub prepare_timeout_ms: u64,
    pub reason: Option<String>,
    pub branches: Vec<BranchRecord>,
    pub transitions: Vec<Transition>,
    pub ended_unix_ms: Option<UnixMs>,
    /// Sagas: the client's key that makes submitting idempotent.
    pub idempotency_key: Option<String>,
    /// Sagas: a compensation keeps failing, or a step stated committed waits for an
    /// operator to undo it; an operator should look.
    pub stuck: bool,
    /// Sagas: the definition, shared with the saga's engine (it never changes), so that
    /// building a record to log or show does not copy it.
    pub saga: Option<Arc<SagaDefinition>>,
    /// The principal that began or submitted it (`None`: no authentication). Not part of
    /// the record's serde form: the log appends it (format 2), so records written before
    /// owners existed still decode (without an owner).
    #[serde(skip)]
    pub owner: Option<String>,
    /// An operator paused its retries (in memory only: a restart resumes them).
    #[serde(skip)]
    pub paused: bool,
}

/// Longest error text kept once a record has to be trimmed.
const TRIMMED_ERROR_BYTES: usize = 128;

impl TxnRecord {
    /// Drops history, oldest first, until `fits(self)`: first attempts (from the branch
    /// with the most; a call in flight last), then long error texts and operators'
    /// reasons, then transitions between the first and the last few. The protocol's
    /// fields (states, decisions, the saga's definition) are never touched. Returns
    /// whether it fits in the end.
    pub fn trim_history(&mut self, fits: impl Fn(&TxnRecord) -> bool) -> bool {
        while !fits(self) {
            let busiest = self
                .branches
                .iter_mut()
                .max_by_key(|b| b.history.attempts().len());
            if let Some(branch) = busiest {
                if branch.history.drop_oldest() {
                    continue;
                }
            }
            let mut cut = false;
            for branch in &mut self.branches {
                let texts = [
                    branch.last_error.as_mut(),
                    branch.resolution.as_mut().map(|r| &mut r.reason),
                ];
                for text in texts.into_iter().flatten() {
                    if text.len() > TRIMMED_ERROR_BYTES {
                        let mut end = TRIMMED_ERROR_BYTES;
                        while !text.is_char_boundary(end) {
                            end -= 1;
                        }
                        text.truncate(end);
                        cut = true;
                    }
                }
            }
            if cut {
                continue;
            }
            if self.transitions.len() > 8 {
                self.transitions.remove(1);
                continue;
            }
            return fits(self);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_order_by_time() {
        let early = TxnId::generate(1_700_000_000_000);
        let late = TxnId::generate(1_700_000_000_001);
        assert!(early < late);
        let text = early.to_string();
        assert_eq!(text.parse::<TxnId>().unwrap(), early);
        assert_eq!(early.created_unix_ms(), 1_700_000_000_000);
        assert_eq!(TxnId::from_bytes(*early.as_bytes()), early);
    }

    #[test]
    fn a_huge_bad_id_gives_a_small_escaped_error() {
        // A 4 MiB id once came back as a 35 MB error message.
        let huge = "\u{1b}[31m".to_string() + &"x".repeat(4 * 1024 * 1024);
        let error = huge.parse::<TxnId>().unwrap_err();
        assert!(error.len() < 512, "{} bytes", error.len());
        assert!(!error.contains('\u{1b}'), "{error}");
        let upper = TxnId::generate(1_700_000_000_000)
            .to_string()
            .to_uppercase();
        assert!(
            upper
                .parse::<TxnId>()
                .unwrap_err()
                .contains("canonical form")
        );
    }

    #[test]
    fn ids_must_be_canonical() {
        let id = TxnId::generate(1_700_000_000_000).to_string();
        assert!(id.to_uppercase().parse::<TxnId>().is_err());
        assert!(id.replace('-', "").parse::<TxnId>().is_err());
        assert!("not-an-id".parse::<TxnId>().is_err());
        assert!("".parse::<TxnId>().is_err());
    }

    #[test]
    fn state_predicates() {
        assert!(!TxnState::Preparing.is_decided());
        assert!(TxnState::Committing.is_decided() && !TxnState::Committing.is_final());
        assert!(TxnState::Aborted.is_final() && !TxnState::Aborted.is_commit());
        assert!(!TxnState::Running.is_decided());
        assert!(TxnState::Compensating.is_decided() && !TxnState::Compensating.is_commit());
        assert!(TxnState::Completed.is_final() && TxnState::Completed.is_commit());
    }
}
