//! The inventory service as its own process (see `treaty_examples::shop::inventory`).
//! Prints `inventory listening on ADDR` once serving.

use std::sync::Arc;

use clap::Parser;
use treaty_examples::ledger::parse_counters;
use treaty_examples::service::{self, ServiceArgs};
use treaty_examples::shop::inventory::Inventory;
use treaty_examples::shop::{Faults, check_rate};

#[derive(Debug, Parser)]
#[command(about = "The shop's inventory service: reservations and releases")]
struct Args {
    /// Stock to put on the shelves if missing, as SKU=QUANTITY,SKU=QUANTITY.
    #[arg(long, default_value = "")]
    stock: String,
    /// Chance (0..1) that a reservation is refused as out of stock regardless of stock.
    #[arg(long, default_value_t = 0.0)]
    out_of_stock_rate: f64,
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service::init_logging("SHOP_LOG")?;
    check_rate("out-of-stock-rate", args.out_of_stock_rate).map_err(anyhow::Error::msg)?;
    let stock = parse_counters(&args.stock).map_err(anyhow::Error::msg)?;
    let faults = Faults::new(&args.service.faults).map_err(anyhow::Error::msg)?;
    let store = service::open_store(&args.service)?;
    let inventory = Arc::new(Inventory::new(
        store.clone(),
        faults,
        args.out_of_stock_rate,
    ));
    inventory.open_stock(&stock).await?;
    service::serve("inventory", inventory, store, &args.service).await
}
