//! The payment service as its own process (see `treaty_examples::shop::payment`).
//! Prints `payment listening on ADDR` once serving.

use std::sync::Arc;

use clap::Parser;
use treaty_examples::ledger::parse_counters;
use treaty_examples::service::{self, ServiceArgs};
use treaty_examples::shop::Faults;
use treaty_examples::shop::payment::Payment;

#[derive(Debug, Parser)]
#[command(about = "The shop's payment service: charges and refunds")]
struct Args {
    /// Customer accounts to open if missing, as NAME=BALANCE,NAME=BALANCE.
    #[arg(long, default_value = "")]
    accounts: String,
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service::init_logging("SHOP_LOG")?;
    let accounts = parse_counters(&args.accounts).map_err(anyhow::Error::msg)?;
    let faults = Faults::new(&args.service.faults).map_err(anyhow::Error::msg)?;
    let store = service::open_store(&args.service)?;
    let payment = Arc::new(Payment::new(store.clone(), faults));
    payment.open_accounts(&accounts).await?;
    service::serve("payment", payment, store, &args.service).await
}
