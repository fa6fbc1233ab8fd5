//! The shipping service as its own process (see `treaty_examples::shop::shipping`).
//! Prints `shipping listening on ADDR` once serving.

use std::sync::Arc;

use clap::Parser;
use treaty_examples::service::{self, ServiceArgs};
use treaty_examples::shop::shipping::Shipping;
use treaty_examples::shop::{Faults, check_rate};

#[derive(Debug, Parser)]
#[command(about = "The shop's shipping service: deliveries and cancellations")]
struct Args {
    /// Chance (0..1) that a delivery is refused (no courier available).
    #[arg(long, default_value_t = 0.0)]
    rejection_rate: f64,
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    service::init_logging("SHOP_LOG")?;
    check_rate("rejection-rate", args.rejection_rate).map_err(anyhow::Error::msg)?;
    let faults = Faults::new(&args.service.faults).map_err(anyhow::Error::msg)?;
    let store = service::open_store(&args.service)?;
    let shipping = Arc::new(Shipping::new(store.clone(), faults, args.rejection_rate));
    service::serve("shipping", shipping, store, &args.service).await
}
