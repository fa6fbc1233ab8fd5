//! The rewards service as its own process: loyalty points in SQLite, with the barrier's
//! records in the same database (see `treaty_examples::rewards`). Prints
//! `rewards listening on ADDR` once serving.

use std::sync::Arc;

use clap::Parser;
use treaty_examples::ledger::parse_counters;
use treaty_examples::rewards::{DATABASE_FILE, Rewards, SqliteStore};
use treaty_examples::service::{self, ServiceArgs};

#[derive(Debug, Parser)]
#[command(about = "An example participant whose data (and barrier) live in SQLite")]
struct Args {
    /// Members to create if missing, as NAME=POINTS,NAME=POINTS.
    #[arg(long, default_value = "")]
    members: String,
    /// Keep a journal of every effect in the database, for audits (rows of transactions
    /// older than --journal-retention-ms are pruned).
    #[arg(long)]
    journal: bool,
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service::init_logging("REWARDS_LOG")?;
    treaty_sdk::failpoint::configure_from_env().map_err(anyhow::Error::msg)?;
    let members = parse_counters(&args.members).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&args.service.data_dir)?;
    let store = Arc::new(SqliteStore::open(
        &args.service.data_dir.join(DATABASE_FILE),
    )?);
    let mut rewards = Rewards::new(store.clone());
    if args.journal {
        rewards = rewards.with_journal();
    }
    let rewards = Arc::new(rewards);
    rewards.open_members(&members).await?;
    service::serve("rewards", rewards, store, &args.service).await
}
