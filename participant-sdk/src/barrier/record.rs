//! The barrier's record of one branch: its mode and status, how it is encoded (a
//! format byte, then the fields with postcard), and whether it leaves the branch in
//! doubt, which can be read from an encoded record's first fields alone (what the
//! in-doubt marks' seed reads of every record), and the record a vote starts. A record
//! that cannot be read is an error naming its branch.

use serde::{Deserialize, Serialize};

use super::*;

const RECORD_FORMAT_VERSION: u8 = 1;

/// How a branch takes part: it decides which operations may follow which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchMode {
    TwoPhase,
    OnePhase,
    SagaStep,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BranchStatus {
    /// Voted YES (or, one-phase / saga, prepared on the way to commit). In doubt.
    Prepared,
    VotedNo {
        reason: String,
    },
    ReadOnly,
    Committed,
    /// `after_prepare` is false for a null abort: prepare never ran, and never will.
    Aborted {
        after_prepare: bool,
    },
    /// `after_commit` is false for a null compensation.
    Compensated {
        after_commit: bool,
    },
}

impl BranchStatus {
    /// No operation can make the branch in doubt again: everything but a YES vote
    /// waiting for its outcome. Such a record may be collected once it is old enough.
    pub fn is_final(&self) -> bool {
        !matches!(self, BranchStatus::Prepared)
    }
}

/// What the barrier knows of one branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchRecord {
    pub mode: BranchMode,
    pub status: BranchStatus,
    /// The prepare payload, kept while the branch is `Prepared` (commit and abort get it).
    pub payload: Vec<u8>,
    pub coordinator_endpoint: String,
    pub updated_unix_ms: u64,
}

/// Whether a branch with this record is in doubt: it voted YES in a two-phase or
/// one-phase commit and has no outcome yet (a saga step's YES is followed by its
/// commit without waiting for anyone, so it is never in doubt).
pub(crate) fn is_in_doubt(record: &BranchRecord) -> bool {
    is_in_doubt_by(record.mode, &record.status)
}

/// [`is_in_doubt`], from the two fields it depends on.
fn is_in_doubt_by(mode: BranchMode, status: &BranchStatus) -> bool {
    *status == BranchStatus::Prepared && mode != BranchMode::SagaStep
}

/// [`is_in_doubt`] of an encoded record, from its first fields (mode and status) alone:
/// what the in-doubt marks' seed reads of every record, without decoding the rest
/// (payload, endpoint, time), which is not checked. An unknown format byte, or a mode
/// and status that do not decode, is an error: its message, which
/// [`corrupt_error`] turns into the branch's error.
pub(crate) fn encoded_is_in_doubt(bytes: &[u8]) -> Result<bool, String> {
    let ((mode, status), _): ((BranchMode, BranchStatus), &[u8]) =
        postcard::take_from_bytes(record_body(bytes)?).map_err(|e| e.to_string())?;
    Ok(is_in_doubt_by(mode, &status))
}

/// An encoded record's fields, after its format byte; an error message if it has none
/// or one this version does not read.
fn record_body(bytes: &[u8]) -> Result<&[u8], String> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT_VERSION, rest)) => Ok(rest),
        Some((version, _)) => Err(format!("unknown format version {version}")),
        None => Err("empty record".into()),
    }
}

/// The error for the record of `key` that cannot be read, for `message`.
pub(crate) fn corrupt_error(key: &BranchKey, message: String) -> BarrierError {
    BarrierError::Corrupt {
        key: format!("{}/{}", key.transaction_id, key.branch_id),
        message,
    }
}

pub(super) fn status_after_vote(vote: &Vote) -> BranchStatus {
    match vote {
        Vote::Yes => BranchStatus::Prepared,
        Vote::No { reason } => BranchStatus::VotedNo {
            reason: reason.clone(),
        },
        Vote::ReadOnly => BranchStatus::ReadOnly,
    }
}

pub(super) fn new_record(
    mode: BranchMode,
    status: BranchStatus,
    coordinator_endpoint: &str,
) -> BranchRecord {
    BranchRecord {
        mode,
        status,
        payload: Vec::new(),
        coordinator_endpoint: coordinator_endpoint.to_string(),
        updated_unix_ms: now_unix_ms(),
    }
}

pub(crate) fn encode(record: &BranchRecord) -> Vec<u8> {
    let mut bytes = vec![RECORD_FORMAT_VERSION];
    // Serializing plain data into a Vec cannot fail.
    bytes.extend(postcard::to_allocvec(record).unwrap_or_default());
    bytes
}

pub(crate) fn decode(key: &BranchKey, bytes: &[u8]) -> Result<BranchRecord, BarrierError> {
    record_body(bytes)
        .and_then(|rest| postcard::from_bytes(rest).map_err(|e| e.to_string()))
        .map_err(|message| corrupt_error(key, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whether_a_record_is_in_doubt_reads_the_same_from_its_first_fields_as_from_all() {
        let modes = [
            BranchMode::TwoPhase,
            BranchMode::OnePhase,
            BranchMode::SagaStep,
        ];
        let statuses = [
            BranchStatus::Prepared,
            BranchStatus::VotedNo {
                reason: "no".into(),
            },
            BranchStatus::ReadOnly,
            BranchStatus::Committed,
            BranchStatus::Aborted {
                after_prepare: true,
            },
            BranchStatus::Compensated {
                after_commit: false,
            },
        ];
        let key = BranchKey {
            transaction_id: "t".into(),
            branch_id: "b".into(),
        };
        for mode in modes {
            for status in statuses.clone() {
                let record = BranchRecord {
                    mode,
                    status,
                    payload: vec![7; 300],
                    coordinator_endpoint: "https://coordinator:7300".into(),
                    updated_unix_ms: 1,
                };
                let bytes = encode(&record);
                assert_eq!(
                    encoded_is_in_doubt(&bytes),
                    Ok(is_in_doubt(&decode(&key, &bytes).unwrap())),
                    "{record:?}"
                );
            }
        }
        assert!(encoded_is_in_doubt(&[]).is_err());
        assert!(encoded_is_in_doubt(&[RECORD_FORMAT_VERSION + 1, 0, 0]).is_err());
        assert!(encoded_is_in_doubt(&[RECORD_FORMAT_VERSION]).is_err());
    }
}
