//! What the audit reads once every process has stopped, and nothing else: the final
//! state of each transfer's transaction at the coordinator, and from each participant's
//! own store — sled for a bank, SQLite for rewards — the barrier's records of the
//! transfers' legs, the journal of effects, the balances (money or points) and a bank's
//! memos.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use treaty_examples::bank;
use treaty_examples::journal::{Effect, JournalEntry};
use treaty_examples::rewards::{self, SqliteStore};
use treaty_sdk::BranchContext;
use treaty_sdk::barrier::{Barrier, BranchStatus};
use treaty_sdk::barrier_store::BarrierStore;
use treaty_sdk::client::TransactionState;
use treaty_sdk::durable::DurableStore;

use super::{Tally, Violations};
use crate::chaos::cluster::{Cluster, Role, Service};
use crate::chaos::workload::{Kind, Told, Transfer};

/// The final state of a transaction at the coordinator; `None`: it does not know it
/// (a two-phase commit forgotten before its decision: presumed abort).
pub type Finals = HashMap<String, Option<TransactionState>>;

/// A leg at one participant: (transaction id, branch id).
pub type LegKey = (String, String);

/// A transfer whose transaction finished, with its outcome.
#[derive(Debug)]
pub struct Decided<'a> {
    pub transfer: &'a Transfer,
    pub id: &'a str,
    /// `None`: unknown to the coordinator (presumed abort).
    pub state: Option<TransactionState>,
    /// Committed (two-phase) or completed (saga): every leg must stand.
    pub committed: bool,
}

/// What one participant kept.
#[derive(Debug)]
pub struct ParticipantData {
    /// What it opened with.
    pub initial: BTreeMap<String, i64>,
    pub balances: BTreeMap<String, i64>,
    /// Oldest first.
    pub journal: Vec<JournalEntry>,
    /// The journal's effects, leg by leg, in order.
    pub effects: HashMap<LegKey, Vec<Effect>>,
    /// The barrier's record of each leg of a decided transfer at this participant (no
    /// entry: no record).
    pub records: HashMap<LegKey, BranchStatus>,
    /// The memos a bank kept with the legs it applied (none at rewards).
    pub memos: HashMap<LegKey, String>,
}

impl ParticipantData {
    pub fn record(&self, id: &str, branch_id: &str) -> Option<&BranchStatus> {
        self.records.get(&(id.to_string(), branch_id.to_string()))
    }

    /// The effects of a leg, in order (empty: none).
    pub fn effects_of(&self, id: &str, branch_id: &str) -> &[Effect] {
        self.effects
            .get(&(id.to_string(), branch_id.to_string()))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

#[derive(Debug)]
pub struct Evidence<'a> {
    pub transfers: &'a [Transfer],
    /// The transfers whose transaction finished (the others are reported already).
    pub decided: Vec<Decided<'a>>,
    pub participants: BTreeMap<Service, ParticipantData>,
}

impl<'a> Evidence<'a> {
    /// Reads everything from the stopped `cluster`; counts the outcomes into `tally`.
    pub fn read(
        cluster: &Cluster,
        initial: &BTreeMap<Service, BTreeMap<String, i64>>,
        transfers: &'a [Transfer],
        finals: &Finals,
        tally: &mut Tally,
        violations: &mut Violations,
    ) -> Self {
        let decided = decide(transfers, finals, tally, violations);
        let participants = cluster
            .services()
            .into_iter()
            .map(|service| {
                let legs: Vec<LegKey> = decided
                    .iter()
                    .flat_map(|d| {
                        d.transfer
                            .legs
                            .iter()
                            .filter(move |leg| leg.service == service)
                            .map(|leg| (d.id.to_string(), leg.branch_id.to_string()))
                    })
                    .collect();
                let dir = cluster.data_dir(Role::Participant(service));
                let opened = initial.get(&service).cloned().unwrap_or_default();
                let data = match service {
                    Service::Bank(_) => read_bank(dir, opened, &legs),
                    Service::Rewards => read_rewards(dir, opened, &legs),
                };
                match service {
                    Service::Bank(_) => tally.bank_journal_entries += data.journal.len(),
                    Service::Rewards => tally.rewards_journal_entries += data.journal.len(),
                }
                (service, data)
            })
            .collect();
        Self {
            transfers,
            decided,
            participants,
        }
    }

    pub fn participant(&self, service: Service) -> &ParticipantData {
        self.participants
            .get(&service)
            .unwrap_or_else(|| panic!("no data read from {service}"))
    }
}

/// The outcome of every transfer whose transaction finished.
fn decide<'a>(
    transfers: &'a [Transfer],
    finals: &Finals,
    tally: &mut Tally,
    violations: &mut Violations,
) -> Vec<Decided<'a>> {
    let mut decided = Vec::new();
    for transfer in transfers {
        let Some(id) = &transfer.transaction_id else {
            if transfer.kind == Kind::TwoPhase {
                tally.never_begun += 1;
            }
            continue;
        };
        let Some(&state) = finals.get(id) else {
            continue; // reported as not finished
        };
        let committed = match (transfer.kind, state) {
            (Kind::TwoPhase, Some(TransactionState::Committed)) => {
                tally.committed += 1;
                true
            }
            (Kind::TwoPhase, Some(TransactionState::Aborted) | None) => {
                tally.aborted += 1;
                false
            }
            (Kind::Saga, Some(TransactionState::Completed)) => {
                tally.completed += 1;
                true
            }
            (Kind::Saga, Some(TransactionState::Compensated)) => {
                tally.compensated += 1;
                false
            }
            (kind, state) => {
                violations.add(format!("{id}: a {kind:?} ended {state:?}"));
                continue;
            }
        };
        tally.transactions_checked += 1;
        if transfer.told == Told::Nothing {
            tally.told_nothing += 1;
        }
        if transfer.legs.iter().any(|l| l.service == Service::Rewards) {
            tally.with_points += 1;
            tally.with_points_committed += usize::from(committed);
        }
        if transfer.big {
            tally.big += 1;
            tally.big_committed += usize::from(committed);
        }
        decided.push(Decided {
            transfer,
            id,
            state,
            committed,
        });
    }
    decided
}

fn read_bank(dir: &Path, initial: BTreeMap<String, i64>, legs: &[LegKey]) -> ParticipantData {
    let store = open_bank(dir);
    let journal = bank::journal(&store).expect("read a bank's journal");
    let memos = bank::memos(&store)
        .expect("read a bank's memos")
        .into_iter()
        .map(|(leg, memo)| {
            let (id, branch_id) = leg.split_once('/').expect("memo keys are txn/branch");
            ((id.to_string(), branch_id.to_string()), memo)
        })
        .collect();
    ParticipantData {
        initial,
        balances: bank::balances(&store).expect("read a bank's balances"),
        effects: effects(&journal),
        journal,
        records: records(&Barrier::new(store), legs),
        memos,
    }
}

fn read_rewards(dir: &Path, initial: BTreeMap<String, i64>, legs: &[LegKey]) -> ParticipantData {
    let database = dir.join(rewards::DATABASE_FILE);
    let store =
        SqliteStore::open(&database).unwrap_or_else(|e| panic!("open {}: {e}", database.display()));
    let journal = rewards::journal(&database).expect("read the rewards journal");
    ParticipantData {
        initial,
        balances: rewards::balances(&database).expect("read the rewards balances"),
        effects: effects(&journal),
        journal,
        records: records(&Barrier::new(Arc::new(store)), legs),
        memos: HashMap::new(),
    }
}

/// Branches in doubt and holds open at a stopped participant.
pub fn unsettled(service: Service, dir: &Path) -> (usize, usize) {
    match service {
        Service::Bank(_) => {
            let store = open_bank(dir);
            let holds = bank::open_holds(&store);
            (in_doubt(&Barrier::new(store)), holds)
        }
        Service::Rewards => {
            let database = dir.join(rewards::DATABASE_FILE);
            let store = SqliteStore::open(&database)
                .unwrap_or_else(|e| panic!("open {}: {e}", database.display()));
            let holds = rewards::open_holds(&database).expect("count the rewards holds");
            let holds = usize::try_from(holds).expect("a count is not negative");
            (in_doubt(&Barrier::new(Arc::new(store))), holds)
        }
    }
}

fn open_bank(dir: &Path) -> Arc<DurableStore> {
    Arc::new(
        DurableStore::open(dir, Default::default())
            .unwrap_or_else(|e| panic!("open the store in {}: {e}", dir.display())),
    )
}

fn in_doubt<S: BarrierStore>(barrier: &Barrier<S>) -> usize {
    barrier
        .in_doubt(usize::MAX)
        .expect("read the in-doubt branches")
        .len()
}

fn records<S: BarrierStore>(
    barrier: &Barrier<S>,
    legs: &[LegKey],
) -> HashMap<LegKey, BranchStatus> {
    legs.iter()
        .filter_map(|(id, branch_id)| {
            let record = barrier
                .record(&BranchContext::new(id.clone(), branch_id.clone()))
                .expect("read a barrier record")?;
            Some(((id.clone(), branch_id.clone()), record.status))
        })
        .collect()
}

fn effects(journal: &[JournalEntry]) -> HashMap<LegKey, Vec<Effect>> {
    let mut effects: HashMap<LegKey, Vec<Effect>> = HashMap::new();
    for entry in journal {
        effects
            .entry((entry.transaction_id.clone(), entry.branch_id.clone()))
            .or_default()
            .push(entry.effect);
    }
    effects
}
