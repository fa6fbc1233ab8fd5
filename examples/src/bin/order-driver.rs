//! Places random orders, as sagas, through a running coordinator to running payment,
//! inventory and shipping services, and prints how each ended. (The demo does the same,
//! and starts everything itself.)

use clap::Parser;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Duration;
use treaty_examples::shop::orders::{Order, Shop, place};
use treaty_sdk::TreatyClient;

#[derive(Debug, Parser)]
#[command(about = "Place shop orders as sagas through a Treaty coordinator")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:7420")]
    coordinator: String,
    #[arg(long)]
    payment: String,
    #[arg(long)]
    inventory: String,
    #[arg(long)]
    shipping: String,
    /// Orders to place, one after the other.
    #[arg(long, default_value_t = 10)]
    orders: usize,
    /// Customers to charge (comma-separated).
    #[arg(long, default_value = "alice,bob")]
    customers: String,
    /// SKUs to order (comma-separated).
    #[arg(long, default_value = "widget")]
    skus: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let split = |text: &str| -> Vec<String> {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    let (customers, skus) = (split(&args.customers), split(&args.skus));
    anyhow::ensure!(
        !customers.is_empty() && !skus.is_empty(),
        "--customers and --skus must not be empty"
    );
    anyhow::ensure!(args.orders <= 100_000, "--orders must be at most 100000");
    let client = TreatyClient::connect_lazy(args.coordinator)?;
    let shop = Shop {
        payment: args.payment,
        inventory: args.inventory,
        shipping: args.shipping,
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let run = format!("{:x}", rand::random::<u32>());
    for n in 0..args.orders {
        let order = Order::random(format!("{run}-{n}"), &customers, &skus, &mut rng);
        let placed = place(&client, &shop, order, Duration::from_secs(120))
            .await
            .map_err(anyhow::Error::msg)?;
        println!(
            "{}  {:?}  {}",
            placed.transaction.transaction_id,
            placed.state(),
            placed.transaction.reason
        );
    }
    Ok(())
}
