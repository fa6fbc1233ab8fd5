//! A bank as its own process: serves the Participant service for transfers between its
//! accounts and other banks' (see `treaty_examples::bank`). Prints
//! `bank listening on ADDR` once serving, then one line per ledger change.

use std::sync::Arc;

use clap::Parser;
use treaty_examples::bank::Bank;
use treaty_examples::ledger::parse_counters;
use treaty_examples::service::{self, ServiceArgs};

#[derive(Debug, Parser)]
#[command(about = "An example bank taking part in Treaty transfers")]
struct Args {
    /// The name printed before each ledger change.
    #[arg(long, default_value = "bank")]
    name: String,
    /// Accounts to open if missing, as NAME=BALANCE,NAME=BALANCE.
    #[arg(long, default_value = "")]
    accounts: String,
    /// Keep a journal of every effect in the store, for audits (entries of transactions
    /// older than --journal-retention-ms are pruned).
    #[arg(long)]
    journal: bool,
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service::init_logging("BANK_LOG")?;
    let accounts = parse_counters(&args.accounts).map_err(anyhow::Error::msg)?;
    let store = service::open_store(&args.service)?;
    let mut bank = Bank::new(args.name, store.clone());
    if args.journal {
        bank = bank.with_journal();
    }
    let bank = Arc::new(bank);
    bank.open_accounts(&accounts).await?;
    service::serve("bank", bank, store, &args.service).await
}
