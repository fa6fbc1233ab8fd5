//! A bank: accounts with balances, taking part in transfers as a two-phase-commit
//! participant or as saga steps.
//!
//! A branch's payload is one leg of a transfer, `{"account":"alice","amount":-30}`,
//! perhaps with a `"memo"` (remittance text, of any length the payload limit allows).
//! - prepare: a withdrawal places a hold if the available balance (balance minus holds)
//!   covers it, else votes NO; a deposit only records its hold (nothing to check).
//! - commit: applies the amount, releases the hold and keeps the leg's memo, if any.
//! - abort: releases the hold.
//! - compensate (sagas): applies the compensation payload, the opposite leg. A
//!   compensation must succeed, so it may take a balance below zero (the money was spent
//!   meanwhile); the barrier runs it only after the step's commit, and once.
//!
//! Balances live under `acct/`, holds under `hold/<transaction>/<branch>`, memos of
//! applied legs under `memo/<transaction>/<branch>` (see [`crate::ledger`]; a memo stays
//! when its saga step is compensated, as a statement line would). With the journal on, every effect also appends an entry under
//! `journal/<sequence>` in the same write (see [`crate::journal`]), so an audit can tell
//! what ran, in which order and how often (it grows by one entry per operation: for
//! audits and tests). Journal entries and memos of transactions older than the journal
//! retention are deleted in the background ([`crate::retention`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

pub use crate::journal::{Effect, JournalEntry};
use crate::ledger::{Changes, Ledger, Pass, counters, records};
use crate::retention::{Prune, PruneRound, created_before};

/// One leg of a transfer: what a branch asks of the bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leg<'a> {
    pub account: &'a str,
    /// Positive: deposit; negative: withdrawal.
    pub amount: i64,
}

impl Leg<'_> {
    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// What a leg may carry beside its account and amount.
#[derive(Debug, Default, Deserialize)]
struct Remittance {
    #[serde(default)]
    memo: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Hold {
    account: String,
    amount: i64,
}

const BALANCES: &str = "acct/";
const HOLDS: &str = "hold/";
const MEMOS: &str = "memo/";

fn balance_key(account: &str) -> String {
    format!("{BALANCES}{account}")
}

fn hold_key(branch: &BranchContext) -> String {
    format!("{HOLDS}{}/{}", branch.transaction_id, branch.branch_id)
}

fn memo_key(branch: &BranchContext) -> String {
    format!("{MEMOS}{}/{}", branch.transaction_id, branch.branch_id)
}

const JOURNAL: &str = "journal/";
const JOURNAL_NEXT: &str = "journal-next";

#[derive(Debug)]
pub struct Bank {
    name: String,
    ledger: Ledger,
    journal: bool,
    journal_pass: Pass,
    memo_pass: Pass,
}

impl Bank {
    pub fn new(name: impl Into<String>, store: Arc<DurableStore>) -> Self {
        Self {
            name: name.into(),
            ledger: Ledger::new(store),
            journal: false,
            journal_pass: Pass::default(),
            memo_pass: Pass::default(),
        }
    }

    /// Keeps a journal of every effect (see the module docs).
    pub fn with_journal(mut self) -> Self {
        self.journal = true;
        self
    }

    /// Adds the journal entry of an effect to `changes` (the caller holds the lock).
    fn journal(
        &self,
        changes: &mut Changes,
        branch: &BranchContext,
        effect: Effect,
        account: &str,
        amount: i64,
    ) -> Result<(), ParticipantError> {
        if !self.journal {
            return Ok(());
        }
        let next = self.ledger.i64(JOURNAL_NEXT)?.unwrap_or(0);
        changes.set_i64(JOURNAL_NEXT, next + 1);
        changes.put(
            &format!("{JOURNAL}{next:020}"),
            &JournalEntry {
                transaction_id: branch.transaction_id.clone(),
                branch_id: branch.branch_id.clone(),
                effect,
                account: account.to_string(),
                amount,
            },
        );
        Ok(())
    }

    /// Creates the accounts that do not exist yet, with these balances.
    pub async fn open_accounts(&self, accounts: &[(String, i64)]) -> Result<(), ParticipantError> {
        let counters: Vec<(String, i64)> = accounts
            .iter()
            .map(|(account, balance)| (balance_key(account), *balance))
            .collect();
        self.ledger.open_counters(&counters).await
    }

    /// The sum of the holds withdrawing from `account`.
    fn withheld(&self, account: &str) -> Result<i64, ParticipantError> {
        let holds: BTreeMap<String, Hold> = records(self.ledger.store(), HOLDS)?;
        Ok(holds
            .values()
            .filter(|hold| hold.account == account && hold.amount < 0)
            .map(|hold| -hold.amount)
            .sum())
    }

    /// Releases the branch's hold; with `applying` (the prepared payload), applies its
    /// amount first and keeps its memo.
    async fn settle(
        &self,
        branch: &BranchContext,
        applying: Option<&[u8]>,
    ) -> Result<(), ParticipantError> {
        let _guard = self.ledger.lock().await;
        let Some(hold) = self.ledger.json::<Hold>(&hold_key(branch))? else {
            return Ok(());
        };
        let mut changes = Changes::default();
        changes.remove(&hold_key(branch));
        let apply = applying.is_some();
        if let Some(payload) = applying {
            let before = self.ledger.i64(&balance_key(&hold.account))?.unwrap_or(0);
            let after = before + hold.amount;
            changes.set_i64(&balance_key(&hold.account), after);
            // The payload was read as a leg when it was prepared.
            let remittance: Remittance = serde_json::from_slice(payload).unwrap_or_default();
            if !remittance.memo.is_empty() {
                changes.put(&memo_key(branch), &remittance.memo);
            }
            println!(
                "{}: commit {}: {} {before} -> {after}",
                self.name, branch.transaction_id, hold.account
            );
        } else {
            println!(
                "{}: abort {}: hold on {} released",
                self.name, branch.transaction_id, hold.account
            );
        }
        let effect = if apply {
            Effect::Commit
        } else {
            Effect::Release
        };
        self.journal(&mut changes, branch, effect, &hold.account, hold.amount)?;
        self.ledger.apply_with(branch, changes).await
    }
}

impl Participant for Bank {
    async fn prepare(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<Vote, ParticipantError> {
        let leg: Leg = match serde_json::from_slice(payload) {
            Ok(leg) => leg,
            Err(e) => return Ok(Vote::no(format!("not a transfer leg: {e}"))),
        };
        let _guard = self.ledger.lock().await;
        if self.ledger.json::<Hold>(&hold_key(branch))?.is_some() {
            // A prepare repeated after a crash, before the barrier recorded the vote.
            return Ok(Vote::Yes);
        }
        let Some(balance) = self.ledger.i64(&balance_key(leg.account))? else {
            println!(
                "{}: prepare {}: no account {} -> NO",
                self.name, branch.transaction_id, leg.account
            );
            return Ok(Vote::no(format!(
                "no account {:?} at {}",
                leg.account, self.name
            )));
        };
        let available = balance - self.withheld(leg.account)?;
        if leg.amount < 0 && available < -leg.amount {
            println!(
                "{}: prepare {}: {} {} (available {available}) -> NO",
                self.name, branch.transaction_id, leg.account, leg.amount
            );
            return Ok(Vote::no(format!(
                "insufficient funds: {} has {available} available, needs {}",
                leg.account, -leg.amount
            )));
        }
        let mut changes = Changes::default();
        changes.put(
            &hold_key(branch),
            &Hold {
                account: leg.account.to_string(),
                amount: leg.amount,
            },
        );
        self.journal(&mut changes, branch, Effect::Hold, leg.account, leg.amount)?;
        self.ledger.apply_with(branch, changes).await?;
        println!(
            "{}: prepare {}: {} {:+} (available {available}) -> YES, hold placed",
            self.name, branch.transaction_id, leg.account, leg.amount
        );
        Ok(Vote::Yes)
    }

    async fn commit(&self, branch: &BranchContext, payload: &[u8]) -> Result<(), ParticipantError> {
        self.settle(branch, Some(payload)).await
    }

    async fn abort(&self, branch: &BranchContext, _payload: &[u8]) -> Result<(), ParticipantError> {
        self.settle(branch, None).await
    }

    async fn compensate(
        &self,
        branch: &BranchContext,
        payload: &[u8],
    ) -> Result<(), ParticipantError> {
        // A compensation that cannot be read can never succeed: an error keeps it
        // retried (and the saga flagged stuck) for an operator to see.
        let leg: Leg = serde_json::from_slice(payload)
            .map_err(|e| ParticipantError::new(format!("not a compensation leg: {e}")))?;
        let _guard = self.ledger.lock().await;
        let before = self.ledger.i64(&balance_key(leg.account))?.ok_or_else(|| {
            ParticipantError::new(format!("no account {:?} to compensate", leg.account))
        })?;
        let after = before + leg.amount;
        let mut changes = Changes::default();
        changes.set_i64(&balance_key(leg.account), after);
        self.journal(
            &mut changes,
            branch,
            Effect::Compensate,
            leg.account,
            leg.amount,
        )?;
        self.ledger.apply_with(branch, changes).await?;
        println!(
            "{}: compensate {}: {} {before} -> {after}",
            self.name, branch.transaction_id, leg.account
        );
        Ok(())
    }
}

impl Prune for Bank {
    /// Deletes journal entries and memos of old transactions among the next `limit` of
    /// each.
    async fn prune_round(
        &self,
        cutoff_unix_ms: u64,
        limit: usize,
    ) -> Result<PruneRound, ParticipantError> {
        let _guard = self.ledger.lock().await;
        let store = self.ledger.store();
        let mut changes = Changes::default();
        let mut pruned = 0;
        let (entries, more_entries) = self.journal_pass.next_page(store, JOURNAL, limit)?;
        for (key, value) in entries {
            let entry: JournalEntry =
                serde_json::from_slice(&value).map_err(crate::ledger::failed)?;
            if created_before(&entry.transaction_id, cutoff_unix_ms) {
                changes.remove(&key);
                pruned += 1;
            }
        }
        let (memos, more_memos) = self.memo_pass.next_page(store, MEMOS, limit)?;
        for (key, _) in memos {
            // memo/<transaction>/<branch>
            let transaction_id = key[MEMOS.len()..].split('/').next().unwrap_or_default();
            if created_before(transaction_id, cutoff_unix_ms) {
                changes.remove(&key);
                pruned += 1;
            }
        }
        if !changes.is_empty() {
            self.ledger.apply(changes).await?;
        }
        Ok(PruneRound {
            pruned,
            more: more_entries || more_memos,
        })
    }
}

/// The balances recorded in a bank's store (for checks after it stopped).
pub fn balances(store: &DurableStore) -> Result<BTreeMap<String, i64>, ParticipantError> {
    counters(store, BALANCES)
}

/// How many holds a bank's store still has (zero once every transfer is settled).
pub fn open_holds(store: &DurableStore) -> usize {
    store.db().scan_prefix(HOLDS).count()
}

/// The memos of the legs a bank applied, by `<transaction>/<branch>`.
pub fn memos(store: &DurableStore) -> Result<BTreeMap<String, String>, ParticipantError> {
    records(store, MEMOS)
}

/// The journal recorded in a bank's store, oldest first (empty if it was off).
pub fn journal(store: &DurableStore) -> Result<Vec<JournalEntry>, ParticipantError> {
    Ok(records::<JournalEntry>(store, JOURNAL)?
        .into_values()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(txn: &str) -> BranchContext {
        BranchContext::new(txn, "leg")
    }

    #[tokio::test]
    async fn holds_protect_the_balance_until_commit_or_abort() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
        let bank = Bank::new("bank", store.clone());
        bank.open_accounts(&[("alice".into(), 100)]).await.unwrap();
        let withdraw = |amount| {
            Leg {
                account: "alice",
                amount,
            }
            .payload()
        };

        assert_eq!(
            bank.prepare(&branch("t1"), &withdraw(-70)).await.unwrap(),
            Vote::Yes
        );
        // 70 is held: another 70 is not available.
        let second = bank.prepare(&branch("t2"), &withdraw(-70)).await.unwrap();
        assert!(matches!(second, Vote::No { .. }), "{second:?}");
        bank.abort(&branch("t1"), &[]).await.unwrap();
        assert_eq!(
            bank.prepare(&branch("t3"), &withdraw(-70)).await.unwrap(),
            Vote::Yes
        );
        bank.commit(&branch("t3"), &[]).await.unwrap();
        assert_eq!(balances(&store).unwrap()["alice"], 30);
        assert_eq!(open_holds(&store), 0);
    }

    #[tokio::test]
    async fn an_applied_leg_keeps_its_memo() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
        let bank = Bank::new("bank", store.clone());
        bank.open_accounts(&[("alice".into(), 100)]).await.unwrap();
        let memo = "x".repeat(16 * 1024);
        let payload = |amount| {
            serde_json::to_vec(&serde_json::json!({
                "account": "alice",
                "amount": amount,
                "memo": memo,
            }))
            .unwrap()
        };
        for txn in ["t1", "t2"] {
            assert_eq!(
                bank.prepare(&branch(txn), &payload(-40)).await.unwrap(),
                Vote::Yes
            );
        }
        // The barrier hands commit and abort the prepared payload.
        bank.commit(&branch("t1"), &payload(-40)).await.unwrap();
        bank.abort(&branch("t2"), &payload(-40)).await.unwrap();
        assert_eq!(balances(&store).unwrap()["alice"], 60);
        assert_eq!(
            memos(&store).unwrap(),
            BTreeMap::from([("t1/leg".to_string(), memo.clone())])
        );
    }

    #[tokio::test]
    async fn compensation_applies_the_opposite_leg_and_the_journal_tells_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DurableStore::open(dir.path(), Default::default()).unwrap());
        let bank = Bank::new("bank", store.clone()).with_journal();
        bank.open_accounts(&[("bob".into(), 10)]).await.unwrap();
        let leg = |amount| {
            Leg {
                account: "bob",
                amount,
            }
            .payload()
        };
        assert_eq!(
            bank.prepare(&branch("t1"), &leg(25)).await.unwrap(),
            Vote::Yes
        );
        bank.commit(&branch("t1"), &[]).await.unwrap();
        // Bob spent it meanwhile: the compensation still succeeds, below zero.
        let mut spend = Changes::default();
        spend.set_i64(&balance_key("bob"), 0);
        bank.ledger.apply(spend).await.unwrap();
        bank.compensate(&branch("t1"), &leg(-25)).await.unwrap();
        assert_eq!(balances(&store).unwrap()["bob"], -25);
        let effects: Vec<(Effect, i64)> = journal(&store)
            .unwrap()
            .iter()
            .map(|e| (e.effect, e.amount))
            .collect();
        assert_eq!(
            effects,
            [
                (Effect::Hold, 25),
                (Effect::Commit, 25),
                (Effect::Compensate, -25)
            ]
        );
        let unreadable = bank.compensate(&branch("t2"), b"?").await;
        assert!(unreadable.is_err());
        assert_eq!(journal(&store).unwrap().len(), 3);
    }
}
