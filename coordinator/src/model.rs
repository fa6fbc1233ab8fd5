//! The coordinator's vocabulary: transaction ids, states, and the record of a transaction
//! that the decision log stores. Plain data, shared by the engine, the log and the API;
//! no protobuf types here (the API converts at its edge).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

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
        let uuid = uuid::Uuid::try_parse(text).map_err(|_| {
            format!("{text:?} is not a transaction id (a UUID such as 019a0b6e-8d2f-7c3a-9b1e-2f4d5c6b7a80)")
        })?;
        if uuid.hyphenated().to_string() != text {
            return Err(format!(
                "{text:?} is not in canonical form (lowercase, hyphenated)"
            ));
        }
        Ok(Self(uuid))
    }
}

/// A transaction's state as users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TxnState {
    Active,
    Preparing,
    Committing,
    Aborting,
    Committed,
    Aborted,
}

impl TxnState {
    /// The outcome is fixed (and, for a commit, durable).
    pub fn is_decided(self) -> bool {
        !matches!(self, TxnState::Active | TxnState::Preparing)
    }

    /// Every participant has acknowledged the outcome; nothing is left to do.
    pub fn is_final(self) -> bool {
        matches!(self, TxnState::Committed | TxnState::Aborted)
    }

    /// For a decided state, whether the decision is commit.
    pub fn is_commit(self) -> bool {
        matches!(self, TxnState::Committing | TxnState::Committed)
    }
}

/// One branch's progress as the coordinator knows it.
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
}

/// A change of state, kept forever as the transaction's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub state: TxnState,
    pub at_unix_ms: UnixMs,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnKind {
    TwoPhase,
}

/// A branch as recorded in the log and shown to users (no payload: it is not kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub id: String,
    pub endpoint: String,
    pub state: BranchState,
    /// Phase-2 deliveries tried.
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// What the log stores of a transaction, and what GetTransaction shows.
///
/// A commit decision is written (forced) with `state == Committing`; the end of a
/// transaction (`Committed` / `Aborted`) is written lazily with `ended_unix_ms` set.
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
        assert_eq!(TxnId::from_bytes(*early.as_bytes()), early);
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
    }
}
