//! A bank as its own process: serves the Participant service for transfers between its
//! accounts and other banks' (see `treaty_examples::bank`). Prints
//! `bank listening on ADDR` once serving, then one line per ledger change.

use std::sync::Arc;

use clap::Parser;
use treaty_examples::bank::{Bank, parse_accounts};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::ServeOptions;

#[derive(Debug, Parser)]
#[command(about = "An example bank taking part in Treaty transfers")]
struct Args {
    /// The name printed before each ledger change.
    #[arg(long, default_value = "bank")]
    name: String,
    #[arg(long, env = "BANK_LISTEN", default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    #[arg(long, env = "BANK_DATA_DIR")]
    data_dir: std::path::PathBuf,
    /// Accounts to open if missing, as NAME=BALANCE,NAME=BALANCE.
    #[arg(long, default_value = "")]
    accounts: String,
}

async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => return std::future::pending().await,
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BANK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    treaty_sdk::failpoint::configure_from_env().map_err(anyhow::Error::msg)?;
    let accounts = parse_accounts(&args.accounts).map_err(anyhow::Error::msg)?;
    let store = Arc::new(DurableStore::open(&args.data_dir, Default::default())?);
    let bank = Arc::new(Bank::new(args.name, store.clone()));
    bank.open_accounts(&accounts).await?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("bank listening on {}", listener.local_addr()?);
    treaty_sdk::serve(
        bank,
        store,
        listener,
        ServeOptions::default(),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}
