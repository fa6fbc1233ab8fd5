//! What the example service binaries share: their common flags, logging, and serving a
//! participant until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use treaty_sdk::Participant;
use treaty_sdk::barrier_store::BarrierStore;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::ServeOptions;

use crate::shop::FaultArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address to serve on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The service's own sled directory (its data and its barrier).
    #[arg(long)]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub faults: FaultArgs,
}

/// Logs to stderr, filtered by `env_var` (default: info).
pub fn init_logging(env_var: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(env_var)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Opens the service's durable store, arming failpoints from `FAILPOINTS` first.
pub fn open_store(args: &ServiceArgs) -> anyhow::Result<Arc<DurableStore>> {
    treaty_sdk::failpoint::configure_from_env().map_err(anyhow::Error::msg)?;
    Ok(Arc::new(DurableStore::open(
        &args.data_dir,
        Default::default(),
    )?))
}

/// Serves `participant` on `args.listen`, printing `<name> listening on ADDR` once ready.
pub async fn serve<P: Participant, S: BarrierStore>(
    name: &str,
    participant: Arc<P>,
    store: Arc<S>,
    args: &ServiceArgs,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    println!("{name} listening on {}", listener.local_addr()?);
    treaty_sdk::serve(
        participant,
        store,
        listener,
        ServeOptions::default(),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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
