//! A bank: accounts with balances, taking part in transfers as a Treaty participant.
//!
//! A branch's payload is one leg of a transfer, `{"account":"alice","amount":-30}`.
//! - prepare: a withdrawal places a hold if the available balance (balance minus holds)
//!   covers it, else votes NO; a deposit only records its hold (nothing to check).
//! - commit: applies the amount and releases the hold.
//! - abort: releases the hold.
//!
//! The ledger lives in the participant's durable store, beside the barrier, under `acct/`
//! (balances) and `hold/` (holds by transaction and branch). Every change is forced to
//! disk before the operation returns. One lock serializes ledger updates: the bank is an
//! example, not a benchmark.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use treaty_sdk::durable::{Durability, DurableStore, WriteBatch};
use treaty_sdk::{BranchContext, Participant, ParticipantError, Vote};

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Hold {
    account: String,
    amount: i64,
}

const BALANCE_PREFIX: &str = "acct/";
const HOLD_PREFIX: &str = "hold/";

#[derive(Debug)]
pub struct Bank {
    name: String,
    store: Arc<DurableStore>,
    ledger: tokio::sync::Mutex<()>,
}

fn failed(error: impl std::fmt::Display) -> ParticipantError {
    ParticipantError::new(format!("ledger: {error}"))
}

impl Bank {
    pub fn new(name: impl Into<String>, store: Arc<DurableStore>) -> Self {
        Self {
            name: name.into(),
            store,
            ledger: tokio::sync::Mutex::new(()),
        }
    }

    /// Creates the accounts that do not exist yet, with these balances.
    pub async fn open_accounts(&self, accounts: &[(String, i64)]) -> Result<(), ParticipantError> {
        let _ledger = self.ledger.lock().await;
        let mut batch = WriteBatch::new();
        for (account, balance) in accounts {
            if self.balance(account)?.is_none() {
                batch.insert(balance_key(account), balance.to_be_bytes().to_vec());
            }
        }
        self.store
            .write(batch, Durability::Forced)
            .await
            .map_err(failed)
    }

    /// Every account's balance (holds not subtracted).
    pub fn balances(&self) -> Result<BTreeMap<String, i64>, ParticipantError> {
        balances(&self.store)
    }

    fn balance(&self, account: &str) -> Result<Option<i64>, ParticipantError> {
        let value = self.store.db().get(balance_key(account)).map_err(failed)?;
        value.map(|bytes| decode_i64(&bytes)).transpose()
    }

    /// The sum of the holds withdrawing from `account`.
    fn withheld(&self, account: &str) -> Result<i64, ParticipantError> {
        let mut total = 0;
        for entry in self.store.db().scan_prefix(HOLD_PREFIX) {
            let (_, value) = entry.map_err(failed)?;
            let hold: Hold = serde_json::from_slice(&value).map_err(failed)?;
            if hold.account == account && hold.amount < 0 {
                total += -hold.amount;
            }
        }
        Ok(total)
    }

    fn hold(&self, branch: &BranchContext) -> Result<Option<Hold>, ParticipantError> {
        let value = self.store.db().get(hold_key(branch)).map_err(failed)?;
        value
            .map(|bytes| serde_json::from_slice(&bytes).map_err(failed))
            .transpose()
    }

    /// Releases the branch's hold, applying its amount first if `apply`.
    async fn settle(&self, branch: &BranchContext, apply: bool) -> Result<(), ParticipantError> {
        let _ledger = self.ledger.lock().await;
        let Some(hold) = self.hold(branch)? else {
            return Ok(());
        };
        let mut batch = WriteBatch::new();
        batch.remove(hold_key(branch));
        if apply {
            let before = self.balance(&hold.account)?.unwrap_or(0);
            let after = before + hold.amount;
            batch.insert(balance_key(&hold.account), after.to_be_bytes().to_vec());
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
        self.store
            .write(batch, Durability::Forced)
            .await
            .map_err(failed)
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
        let _ledger = self.ledger.lock().await;
        let Some(balance) = self.balance(leg.account)? else {
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
        let hold = Hold {
            account: leg.account.to_string(),
            amount: leg.amount,
        };
        let mut batch = WriteBatch::new();
        batch.insert(hold_key(branch), serde_json::to_vec(&hold).map_err(failed)?);
        self.store
            .write(batch, Durability::Forced)
            .await
            .map_err(failed)?;
        println!(
            "{}: prepare {}: {} {:+} (available {available}) -> YES, hold placed",
            self.name, branch.transaction_id, leg.account, leg.amount
        );
        Ok(Vote::Yes)
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
}

/// The balances recorded in a bank's store (for the demo's checks after it stopped).
pub fn balances(store: &DurableStore) -> Result<BTreeMap<String, i64>, ParticipantError> {
    let mut balances = BTreeMap::new();
    for entry in store.db().scan_prefix(BALANCE_PREFIX) {
        let (key, value) = entry.map_err(failed)?;
        let account = String::from_utf8_lossy(&key[BALANCE_PREFIX.len()..]).into_owned();
        balances.insert(account, decode_i64(&value)?);
    }
    Ok(balances)
}

/// How many holds a bank's store still has (zero once every transfer is settled).
pub fn open_holds(store: &DurableStore) -> usize {
    store.db().scan_prefix(HOLD_PREFIX).count()
}

fn balance_key(account: &str) -> Vec<u8> {
    format!("{BALANCE_PREFIX}{account}").into_bytes()
}

fn hold_key(branch: &BranchContext) -> Vec<u8> {
    format!(
        "{HOLD_PREFIX}{}/{}",
        branch.transaction_id, branch.branch_id
    )
    .into_bytes()
}

fn decode_i64(bytes: &[u8]) -> Result<i64, ParticipantError> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| failed("a balance is not 8 bytes"))?;
    Ok(i64::from_be_bytes(bytes))
}

/// Parses `alice=100,bob=50`.
pub fn parse_accounts(text: &str) -> Result<Vec<(String, i64)>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|entry| {
            let (name, balance) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?} is not NAME=BALANCE"))?;
            let balance = balance
                .trim()
                .parse::<i64>()
                .map_err(|e| format!("{entry:?}: {e}"))?;
            Ok((name.trim().to_string(), balance))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn branch(txn: &str) -> BranchContext {
        BranchContext {
            transaction_id: txn.into(),
            branch_id: "leg".into(),
        }
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
        assert_eq!(bank.balances().unwrap()["alice"], 30);
        assert_eq!(open_holds(&store), 0);
    }

    #[test]
    fn accounts_parse() {
        assert_eq!(
            parse_accounts("alice=100, bob=-5").unwrap(),
            vec![("alice".to_string(), 100), ("bob".to_string(), -5)]
        );
        assert!(parse_accounts("alice").is_err());
        assert!(parse_accounts("alice=x").is_err());
    }
}
