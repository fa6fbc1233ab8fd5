//! The scripted participant (see `treaty_tests::scripted`) as its own process, for tests
//! that kill participants. Prints `participant listening on ADDR` once serving.

use std::sync::Arc;

use clap::Parser;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::ServeOptions;
use treaty_tests::harness::quick_in_doubt;
use treaty_tests::scripted::Scripted;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    #[arg(long)]
    data_dir: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();
    treaty_sdk::failpoint::configure_from_env().map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let shutdown = treaty_sdk::server::shutdown_signal();
    println!("participant listening on {}", listener.local_addr()?);
    let options = ServeOptions {
        in_doubt: quick_in_doubt(),
        ..ServeOptions::default()
    };
    let store = Arc::new(DurableStore::open(&args.data_dir, Default::default())?);
    treaty_sdk::serve(
        Arc::new(Scripted::new()),
        store,
        listener,
        options,
        shutdown,
    )
    .await?;
    Ok(())
}
