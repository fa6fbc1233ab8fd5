//! What the example service binaries share: their common flags, logging, and serving a
//! participant until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use treaty_sdk::Participant;
use treaty_sdk::barrier_store::BarrierStore;
use treaty_sdk::client::{ClientOptions, ClientTlsFiles};
use treaty_sdk::durable::DurableStore;
use treaty_sdk::limits::check_endpoint;
use treaty_sdk::logging::LogFormat;
use treaty_sdk::server::{CoordinatorTrust, MetricsListen, ServeOptions};
use treaty_sdk::tls::{ReloadableServerTls, ServerTlsFiles};

use crate::retention::{Prune, RetentionArgs, prune_periodically};
use crate::shop::FaultArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address to serve on (port 0 picks a free one; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// The service's own sled directory (its data and its barrier).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Serve the participant's Prometheus metrics at http(s)://ADDR/metrics (IP:PORT;
    /// port 0 picks a free one, printed as `<name> metrics on ADDR`; TLS with --tls-cert).
    /// Beyond loopback it needs --allow-unauthenticated. Off unless given.
    #[arg(long, env = "TREATY_PARTICIPANT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub faults: FaultArgs,
    #[command(flatten)]
    pub security: SecurityArgs,
    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// TLS and which coordinators the service trusts (see docs/SECURITY.md).
#[derive(Clone, Default, clap::Args)]
pub struct SecurityArgs {
    /// The service's certificate chain (PEM): serve TLS only. Reloaded on SIGHUP.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) the coordinator's client certificate must chain to (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// The token the coordinator presents (its `TREATY_PARTICIPANT_TOKEN`).
    #[arg(long, env = "TREATY_COORDINATOR_TOKEN", hide_env_values = true)]
    pub coordinator_token: Option<String>,
    /// A name of the coordinator's client certificate (repeatable; needs --tls-client-ca).
    #[arg(long = "coordinator-identity", requires = "tls_client_ca")]
    pub coordinator_identities: Vec<String>,
    /// The coordinator to ask about branches in doubt (repeatable); requests naming any
    /// other are refused. Without it, the one each request names.
    #[arg(long = "coordinator-endpoint")]
    pub coordinator_endpoints: Vec<String>,
    /// CA (PEM) to verify an https:// coordinator with (default: the system's roots).
    #[arg(long)]
    pub coordinator_ca: Option<PathBuf>,
    /// Serve callers without credentials even on a non-loopback address.
    #[arg(long)]
    pub allow_unauthenticated: bool,
}

impl std::fmt::Debug for SecurityArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityArgs")
            .field("tls_cert", &self.tls_cert)
            .field("tls_client_ca", &self.tls_client_ca)
            .field(
                "coordinator_token",
                &self.coordinator_token.as_ref().map(|_| "<redacted>"),
            )
            .field("coordinator_identities", &self.coordinator_identities)
            .field("coordinator_endpoints", &self.coordinator_endpoints)
            .field("coordinator_ca", &self.coordinator_ca)
            .field("allow_unauthenticated", &self.allow_unauthenticated)
            .finish()
    }
}

impl SecurityArgs {
    /// The serve options these flags stand for, with certificates read.
    pub fn serve_options(&self) -> anyhow::Result<ServeOptions> {
        let mut options = ServeOptions::default();
        let mut trust = CoordinatorTrust::default();
        if let Some(token) = &self.coordinator_token {
            trust = trust.token(token);
        }
        for identity in &self.coordinator_identities {
            trust = trust.identity(identity);
        }
        for endpoint in &self.coordinator_endpoints {
            check_endpoint("coordinator_endpoint", endpoint)?;
            trust = trust.endpoint(endpoint);
        }
        options.trust = trust;
        let files = ServerTlsFiles::from_options(
            self.tls_cert.clone(),
            self.tls_key.clone(),
            self.tls_client_ca.clone(),
        )?;
        options.tls = files
            .map(ReloadableServerTls::load)
            .transpose()?
            .map(Arc::new);
        options.in_doubt.coordinator_client = ClientOptions {
            tls: Some(ClientTlsFiles {
                ca: self.coordinator_ca.clone(),
                cert: None,
                key: None,
            }),
            token: None,
            ..Default::default()
        };
        options.allow_unauthenticated = self.allow_unauthenticated;
        Ok(options)
    }
}

/// Logs to stderr, filtered by `env_var` (default: info), as text or, with
/// `TREATY_LOG_FORMAT=json`, one JSON object per line. A filter or a format that does not
/// parse is an error naming its variable.
pub fn init_logging(env_var: &str) -> anyhow::Result<()> {
    let format = LogFormat::from_env().map_err(anyhow::Error::msg)?;
    treaty_sdk::logging::init(env_var, format).map_err(anyhow::Error::msg)
}

/// Opens the service's durable store, arming failpoints from `FAILPOINTS` first.
pub fn open_store(args: &ServiceArgs) -> anyhow::Result<Arc<DurableStore>> {
    treaty_sdk::failpoint::configure_from_env().map_err(anyhow::Error::msg)?;
    Ok(Arc::new(DurableStore::open(
        &args.data_dir,
        Default::default(),
    )?))
}

/// Serves `participant` on `args.listen`, printing `<name> listening on ADDR` once ready
/// (then `<name> metrics on ADDR` with `--metrics-listen`), with its barrier's and its
/// own entries' retention.
pub async fn serve<P: Participant + Prune, S: BarrierStore>(
    name: &str,
    participant: Arc<P>,
    store: Arc<S>,
    args: &ServiceArgs,
) -> anyhow::Result<()> {
    args.retention.validate().map_err(anyhow::Error::msg)?;
    let mut options = args.security.serve_options()?;
    options.barrier_gc.retention_ms = args.retention.barrier_retention_ms;
    tokio::spawn(prune_periodically(
        participant.clone(),
        args.retention.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    if let Some(address) = args.metrics_listen {
        treaty_sdk::metrics::check_metrics_listen(address, options.allow_unauthenticated)
            .map_err(anyhow::Error::msg)?;
        options.metrics_listen = Some(std::net::TcpListener::bind(address)?.into());
    }
    let shutdown = shutdown_signal();
    if let (Some(tls), Some(hangups)) = (options.tls.clone(), treaty_sdk::server::hangups()) {
        tokio::spawn(reload_on_hangup(hangups, tls));
    }
    println!("{name} listening on {}", listener.local_addr()?);
    if let Some(MetricsListen::Listener(metrics)) = &options.metrics_listen {
        println!("{name} metrics on {}", metrics.local_addr()?);
    }
    treaty_sdk::serve(participant, store, listener, options, shutdown).await?;
    Ok(())
}

/// Reloads the service's certificates on every SIGHUP (which then never kills it).
async fn reload_on_hangup(mut hangups: tokio::signal::unix::Signal, tls: Arc<ReloadableServerTls>) {
    while hangups.recv().await.is_some() {
        match tls.reload() {
            Ok(()) => tracing::info!("SIGHUP: certificates reloaded"),
            Err(error) => {
                tracing::error!(%error, "certificates not reloaded; keeping the old ones")
            }
        }
    }
}

pub use treaty_sdk::server::shutdown_signal;
