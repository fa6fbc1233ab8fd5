//! Rewards: loyalty points kept in SQLite — the example of a participant whose data lives
//! outside the SDK's store. [`SqliteStore`] (`rewards/sqlite_store.rs`) implements the
//! SDK's `BarrierStore` in the same database file, and every operation writes its effect
//! and the barrier's record (`BranchContext::take_barrier_write`) in one SQLite
//! transaction: exactly-once effects across crashes, as the sled examples get with
//! `include_barrier_record`.
//!
//! A branch's payload is `{"member":"alice","points":-30}`: earn (positive) or redeem
//! (negative), like a bank's leg; other fields (a `memo`, say) are ignored.
//! - prepare: a redemption is held if the member has that many points not already held,
//!   else the vote is NO; an earning is held as it is.
//! - commit: applies the hold; abort: releases it.
//! - compensate (sagas): applies the compensation payload, the opposite leg.
//!
//! Tables: `points(member, balance)`, `holds(transaction_id, branch_id, member, points)`
//! and the barrier's `treaty_barrier(transaction_id, branch_id, record, in_doubt)`. With
//! the journal on ([`Rewards::with_journal`]), every effect also appends a row to
//! `journal(sequence, transaction_id, branch_id, effect, member, points)` in its
//! transaction (see [`crate::journal`]): for audits and tests; rows of transactions
//! older than the journal retention are deleted in the background
//! ([`crate::retention`]).
//! SQLite runs in WAL mode with `synchronous=FULL`, so a commit is on disk when it
//! returns. Writes go through one connection on blocking threads, reads through another:
//! an example, not a benchmark.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

use crate::journal::{Effect, JournalEntry};
use crate::retention::{Prune, PruneRound, created_before};

mod sqlite_store;

pub use sqlite_store::{SqliteStore, write_barrier};

/// The database's file name in the service's data directory.
pub const DATABASE_FILE: &str = "rewards.sqlite3";

/// One leg: points earned (positive) or redeemed (negative) by a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsLeg<'a> {
    pub member: &'a str,
    pub points: i64,
}

impl PointsLeg<'_> {
    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Why a rewards operation failed (the caller may try again).
#[derive(Debug, thiserror::Error)]
pub enum RewardsError {
    #[error("sqlite: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("no member {0:?}")]
    NoMember(String),
    #[error("the write task ended: {0}")]
    Task(String),
}

fn participant_failed(error: impl std::fmt::Display) -> ParticipantError {
    ParticipantError::new(format!("rewards: {error}"))
}

/// Appends the journal entry of an effect, in the operation's transaction `tx`.
fn write_journal(
    tx: &Transaction<'_>,
    branch: &BranchContext,
    effect: Effect,
    member: &str,
    points: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO journal (transaction_id, branch_id, effect, member, points)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            branch.transaction_id,
            branch.branch_id,
            effect.name(),
            member,
            points
        ],
    )?;
    Ok(())
}

#[derive(Debug)]
pub struct Rewards {
    store: Arc<SqliteStore>,
    journal: bool,
    /// The last journal sequence the pruning pass examined (0: start over).
    pruned_up_to: Mutex<i64>,
}

impl Rewards {
    pub fn new(store: Arc<SqliteStore>) -> Self {
        Self {
            store,
            journal: false,
            pruned_up_to: Mutex::new(0),
        }
    }

    /// Keeps a journal of every effect (see the module docs).
    pub fn with_journal(mut self) -> Self {
        self.journal = true;
        self
    }

    /// Creates the members that do not exist yet, with these balances.
    pub async fn open_members(&self, members: &[(String, i64)]) -> Result<(), ParticipantError> {
        let members = members.to_vec();
        self.store
            .transaction(move |tx| {
                for (member, balance) in &members {
                    tx.execute(
                        "INSERT OR IGNORE INTO points (member, balance) VALUES (?1, ?2)",
                        params![member, balance],
                    )?;
                }
                Ok(())
            })
            .await
            .map_err(participant_failed)
    }

    /// Settles the branch's hold (applying it first if `apply`) with the barrier's record.
    async fn settle(&self, branch: &BranchContext, apply: bool) -> Result<(), ParticipantError> {
        let branch = branch.clone();
        let journal = self.journal;
        self.store
            .transaction(move |tx| {
                let hold: Option<(String, i64)> = tx
                    .query_row(
                        "DELETE FROM holds WHERE transaction_id = ?1 AND branch_id = ?2
                         RETURNING member, points",
                        params![branch.transaction_id, branch.branch_id],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()?;
                if let Some((member, points)) = hold {
                    if apply {
                        tx.execute(
                            "UPDATE points SET balance = balance + ?2 WHERE member = ?1",
                            params![member, points],
                        )?;
                    }
                    if journal {
                        let effect = if apply {
                            Effect::Commit
                        } else {
                            Effect::Release
                        };
                        write_journal(tx, &branch, effect, &member, points)?;
                    }
                }
                if let Some(write) = branch.take_barrier_write() {
                    write_barrier(tx, &write)?;
                }
                Ok(())
            })
            .await
            .map_err(participant_failed)
    }
}

impl Participant for Rewards {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        let leg: PointsLeg = match serde_json::from_slice(payload) {
            Ok(leg) => leg,
            Err(e) => return Ok(Vote::no(format!("not a points leg: {e}"))),
        };
        let (member, points) = (leg.member.to_string(), leg.points);
        let branch = branch.clone();
        let journal = self.journal;
        self.store
            .transaction(move |tx| {
                let balance: Option<i64> = tx
                    .query_row(
                        "SELECT balance FROM points WHERE member = ?1",
                        params![member],
                        |row| row.get(0),
                    )
                    .optional()?;
                let Some(balance) = balance else {
                    return Ok(Vote::no(format!("no member {member:?}")));
                };
                let held: i64 = tx.query_row(
                    "SELECT COALESCE(SUM(-points), 0) FROM holds WHERE member = ?1 AND points < 0",
                    params![member],
                    |row| row.get(0),
                )?;
                let available = balance - held;
                if points < 0 && available < -points {
                    return Ok(Vote::no(format!(
                        "{member} has {available} points available, needs {}",
                        -points
                    )));
                }
                tx.execute(
                    "INSERT OR REPLACE INTO holds (transaction_id, branch_id, member, points)
                     VALUES (?1, ?2, ?3, ?4)",
                    params![branch.transaction_id, branch.branch_id, member, points],
                )?;
                if journal {
                    write_journal(tx, &branch, Effect::Hold, &member, points)?;
                }
                if let Some(write) = branch.take_barrier_write() {
                    write_barrier(tx, &write)?;
                }
                Ok(Vote::Yes)
            })
            .await
            .map_err(participant_failed)
    }

    async fn commit(
        &self,
        branch: &BranchContext,
        _payload: &[u8],
    ) -> Result<(), ParticipantError> {
        self.settle(branch, true).await
    }

    async fn abort(&self, branch: &BranchContext, _payload: &[u8]) -> Result<(), ParticipantError> {
        self.settle(branch, false).await
    }

    async fn compensate(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        let leg: PointsLeg = serde_json::from_slice(payload)
            .map_err(|e| participant_failed(format!("not a compensation leg: {e}")))?;
        let (member, points) = (leg.member.to_string(), leg.points);
        let branch = branch.clone();
        let journal = self.journal;
        self.store
            .transaction(move |tx| {
                let changed = tx.execute(
                    "UPDATE points SET balance = balance + ?2 WHERE member = ?1",
                    params![member, points],
                )?;
                if changed == 0 {
                    return Err(RewardsError::NoMember(member));
                }
                if journal {
                    write_journal(tx, &branch, Effect::Compensate, &member, points)?;
                }
                if let Some(write) = branch.take_barrier_write() {
                    write_barrier(tx, &write)?;
                }
                Ok(())
            })
            .await
            .map_err(participant_failed)
    }
}

impl Prune for Rewards {
    /// Deletes the journal rows of old transactions among the next `limit`.
    async fn prune_round(
        &self,
        cutoff_unix_ms: u64,
        limit: usize,
    ) -> Result<PruneRound, ParticipantError> {
        let after = *self.pruned_up_to.lock().unwrap_or_else(|e| e.into_inner());
        let page_limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(i64, String)> = self
            .store
            .read(|connection| {
                let mut query = connection.prepare(
                    "SELECT sequence, transaction_id FROM journal WHERE sequence > ?1
                     ORDER BY sequence LIMIT ?2",
                )?;
                let rows = query.query_map(params![after, page_limit], |row| {
                    Ok((row.get(0)?, row.get(1)?))
                })?;
                rows.collect()
            })
            .map_err(participant_failed)?;
        let more = rows.len() == limit;
        let next = if more {
            rows.last().map_or(0, |(sequence, _)| *sequence)
        } else {
            0
        };
        *self.pruned_up_to.lock().unwrap_or_else(|e| e.into_inner()) = next;
        let old: Vec<i64> = rows
            .into_iter()
            .filter(|(_, transaction_id)| created_before(transaction_id, cutoff_unix_ms))
            .map(|(sequence, _)| sequence)
            .collect();
        let pruned = old.len();
        if pruned > 0 {
            self.store
                .transaction(move |tx| {
                    let mut delete = tx.prepare("DELETE FROM journal WHERE sequence = ?1")?;
                    for sequence in old {
                        delete.execute(params![sequence])?;
                    }
                    Ok(())
                })
                .await
                .map_err(participant_failed)?;
        }
        Ok(PruneRound { pruned, more })
    }
}

/// The balances in a rewards database (for checks after the service stopped).
pub fn balances(path: &Path) -> rusqlite::Result<BTreeMap<String, i64>> {
    let connection = Connection::open(path)?;
    let mut query = connection.prepare("SELECT member, balance FROM points ORDER BY member")?;
    let rows = query.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
    rows.collect()
}

/// How many holds a rewards database still has.
pub fn open_holds(path: &Path) -> rusqlite::Result<i64> {
    let connection = Connection::open(path)?;
    connection.query_row("SELECT COUNT(*) FROM holds", [], |row| row.get(0))
}

/// The journal in a rewards database, oldest first (empty if it was off), with each
/// member in `account` and its points in `amount`.
pub fn journal(path: &Path) -> rusqlite::Result<Vec<JournalEntry>> {
    let connection = Connection::open(path)?;
    let mut query = connection.prepare(
        "SELECT transaction_id, branch_id, effect, member, points FROM journal
         ORDER BY sequence",
    )?;
    let rows = query.query_map([], |row| {
        let effect: String = row.get(2)?;
        Ok(JournalEntry {
            transaction_id: row.get(0)?,
            branch_id: row.get(1)?,
            effect: Effect::from_name(&effect).ok_or_else(|| {
                rusqlite::Error::FromSqlConversionFailure(
                    2,
                    rusqlite::types::Type::Text,
                    format!("unknown effect {effect:?}").into(),
                )
            })?,
            account: row.get(3)?,
            amount: row.get(4)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use treaty_sdk::barrier::{Barrier, BranchMode, BranchStatus, CommitAnswer};

    fn branch(txn: &str, id: &str) -> BranchContext {
        BranchContext::new(txn, id)
    }

    fn leg(member: &str, points: i64) -> Vec<u8> {
        PointsLeg { member, points }.payload()
    }

    #[tokio::test]
    async fn effects_and_barrier_records_commit_together_and_run_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rewards.sqlite3");
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let rewards = Rewards::new(store.clone()).with_journal();
        rewards
            .open_members(&[("alice".into(), 100), ("bob".into(), 0)])
            .await
            .unwrap();
        let barrier = Barrier::new(store.clone());

        // A redemption alice can afford, prepared and committed; the duplicate commit is
        // answered from the record.
        let redeem = branch("t1", "redeem");
        let vote = barrier
            .prepare(&rewards, &redeem, &leg("alice", -70), "http://c:1")
            .await
            .unwrap();
        assert_eq!(vote, Vote::Yes);
        assert_eq!(barrier.in_doubt(10).unwrap().len(), 1);
        // 70 are held: another 70 are not available.
        let second = barrier
            .prepare(&rewards, &branch("t2", "redeem"), &leg("alice", -70), "")
            .await
            .unwrap();
        assert!(matches!(second, Vote::No { .. }), "{second:?}");
        for _ in 0..2 {
            let answer = barrier
                .commit(&rewards, &redeem, BranchMode::TwoPhase, &[], "")
                .await
                .unwrap();
            assert_eq!(answer, CommitAnswer::Committed);
        }
        assert!(barrier.in_doubt(10).unwrap().is_empty());
        assert_eq!(
            barrier.record(&redeem).unwrap().unwrap().status,
            BranchStatus::Committed
        );

        // A saga step: earned, then compensated twice (the second from the record); a
        // compensation of a step that never ran is a recorded no-op.
        let earn = branch("t3", "earn");
        let answer = barrier
            .commit(&rewards, &earn, BranchMode::SagaStep, &leg("bob", 40), "")
            .await
            .unwrap();
        assert_eq!(answer, CommitAnswer::Committed);
        for _ in 0..2 {
            barrier
                .compensate(&rewards, &earn, &leg("bob", -40))
                .await
                .unwrap();
        }
        barrier
            .compensate(&rewards, &branch("t4", "earn"), &leg("bob", -40))
            .await
            .unwrap();

        assert_eq!(
            balances(&path).unwrap(),
            BTreeMap::from([("alice".to_string(), 30), ("bob".to_string(), 0)])
        );
        assert_eq!(open_holds(&path).unwrap(), 0);
        // The journal has each effect once, in order; the refused prepare, the repeats
        // and the null compensation left nothing.
        let effects: Vec<(String, Effect, i64)> = journal(&path)
            .unwrap()
            .into_iter()
            .map(|e| (e.transaction_id, e.effect, e.amount))
            .collect();
        let expected = [
            ("t1", Effect::Hold, -70),
            ("t1", Effect::Commit, -70),
            ("t3", Effect::Hold, 40),
            ("t3", Effect::Commit, 40),
            ("t3", Effect::Compensate, -40),
        ]
        .map(|(t, effect, points)| (t.to_string(), effect, points));
        assert_eq!(effects, expected);
    }

    #[tokio::test]
    async fn a_leg_may_carry_a_memo_rewards_ignores() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DATABASE_FILE);
        let store = Arc::new(SqliteStore::open(&path).unwrap());
        let rewards = Rewards::new(store.clone());
        rewards.open_members(&[("alice".into(), 0)]).await.unwrap();
        let payload = serde_json::to_vec(&serde_json::json!({
            "member": "alice",
            "points": 12,
            "memo": "x".repeat(16 * 1024),
        }))
        .unwrap();
        let barrier = Barrier::new(store);
        let answer = barrier
            .commit(
                &rewards,
                &branch("t1", "earn"),
                BranchMode::SagaStep,
                &payload,
                "",
            )
            .await
            .unwrap();
        assert_eq!(answer, CommitAnswer::Committed);
        assert_eq!(balances(&path).unwrap()["alice"], 12);
    }
}
