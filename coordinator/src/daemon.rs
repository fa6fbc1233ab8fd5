//! `treaty serve`: the coordinator daemon's life from start to stop.
//!
//! Start: validate the configuration and read its files (certificates, tokens), open the
//! decision log, recover (every logged commit not yet acknowledged is delivered again),
//! then serve the Coordinator service with the standard health service and server
//! reflection (v1, and v1alpha for older clients), over TLS when configured, and
//! Prometheus metrics when asked (`--metrics-listen`). SIGHUP reloads certificates and
//! tokens; its handler is installed before anything else, so that it never stops the
//! daemon, even while the log recovers (one sent then reloads once serving).
//!
//! Stop (on the caller's shutdown signal, or at once on a fatal log error; a signal that
//! comes while the log opens and recovers stops the daemon before it serves): stop taking
//! requests, end watch streams, and report NOT_SERVING for the Coordinator service and
//! the server as a whole (health service ""); abort undecided transactions and give work in flight
//! `shutdown_grace_ms`; then close the log durably. Whatever is left is recovery's job at
//! the next start. A fatal log error makes `run` return an error after the stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic_health::ServingStatus;
use treaty_proto::v1::admin_server::AdminServer;
use treaty_proto::v1::coordinator_server::CoordinatorServer;

use treaty_sdk::connections::incoming;
use treaty_sdk::durable::{CompactionPolicy, CompactionReport, GroupCommitted, StoreOptions};
use treaty_sdk::tls::ReloadableServerTls;

use crate::api::CoordinatorService;
use crate::api::admin::AdminService;
use crate::api::auth::Authenticator;
use crate::config::{ConfigError, ServeConfig};
use crate::defaults::{self, MemoryBudget};
use crate::log::{DecisionLog, LogError, SledLog};
use crate::metrics::{Metrics, serve_metrics};
use crate::runtime::memory::{self, Governor};
use crate::runtime::{Purged, Runtime};
use crate::security::SecurityConfig;

/// Final log records purged per batch, and the pause between the batches of a round
/// that has more to purge: together they cap the purge rate (about 100,000 records/s)
/// while letting it keep up with any rate of transactions the coordinator sustains.
const PURGE_BATCH: usize = 1_000;
const PURGE_BATCH_PAUSE: Duration = Duration::from_millis(10);
/// Most batches one round runs; the rest waits for the next round.
const MAX_PURGE_BATCHES_PER_ROUND: usize = 1_000;
/// Rounds start every tenth of the log retention, between these bounds: a final record
/// stays at most that much longer than its retention, and the log holds at most what
/// that long adds beyond its limit (`log_finished_max`), about 10,000 records at 2,000
/// transactions/s. A round that finds nothing to purge costs two short range reads.
const PURGE_INTERVAL_MIN: Duration = Duration::from_secs(1);
const PURGE_INTERVAL_MAX: Duration = Duration::from_secs(5);
/// The warning that history is purged early for the memory budget is repeated at most
/// this often (the metric counts every purge).
const LIMIT_REPORT_INTERVAL: Duration = Duration::from_secs(3_600);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("stopped after a fatal error: {0}")]
    Fatal(String),
    #[error("TLS: {0}")]
    Tls(#[from] treaty_sdk::tls::TlsError),
    #[error("authentication: {0}")]
    Auth(#[from] treaty_sdk::auth::TokenFileError),
}

/// Binds `config.listen` and runs the daemon until `shutdown` resolves.
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    config.validate()?;
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| DaemonError::Listen {
                address: config.listen,
                source,
            })?;
    run_on(config, listener, shutdown).await
}

/// Runs the daemon on an already bound listener (tests bind port 0 themselves).
pub async fn run_on(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    run_on_announcing(config, listener, shutdown, true).await
}

/// [`run_on`]; `announce`: print the listening addresses on stdout (`treaty bench
/// --json` runs a coordinator in its own process, whose stdout is the report alone).
pub async fn run_on_announcing(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    announce: bool,
) -> Result<(), DaemonError> {
    run_on_listeners(config, listener, None, shutdown, announce).await
}

/// [`run_on_announcing`], with `/metrics` served on `metrics_listener` when given (bound
/// by the caller, so that its address is known before the daemon starts and no other
/// process can take it in between) instead of on `config.metrics_listen`, which must
/// then be its address.
pub async fn run_on_listeners(
    config: ServeConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    announce: bool,
) -> Result<(), DaemonError> {
    // First of all: SIGHUP's default action ends the process, and opening and recovering
    // the log can take long. One that comes before the reloader runs waits in the stream
    // and reloads then (the files may have changed after they were read below).
    let hangups = treaty_sdk::server::hangups();
    config.validate()?;
    // Taken whole since 2026-12-07; a list written for the old splitting names one
    // identity no certificate has, and its admins lose the role: say so.
    for identity in config
        .security
        .admin_identities
        .iter()
        .filter(|identity| identity.contains(','))
    {
        tracing::warn!(
            identity = %identity,
            "an admin identity holds a comma: it is one identity, taken whole (repeat \
             --admin-identity, or use the config file's array, for several)"
        );
    }
    let api_config = config.api()?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            address: config.listen,
            source,
        })?;
    // Every file is read before the log is opened: a bad file changes nothing.
    let server_tls = config.security.server_tls()?.map(Arc::new);
    let authenticator = Arc::new(config.security.authenticator()?);
    let participant_tls = config.security.participant_tls()?;
    let metrics_listener = match (metrics_listener, config.metrics_listen) {
        (Some(listener), _) => Some(listener),
        (None, Some(address)) => Some(
            TcpListener::bind(address)
                .await
                .map_err(|source| DaemonError::Listen { address, source })?,
        ),
        (None, None) => None,
    };
    let metrics = Arc::new(Metrics::new());
    let budget = config.memory_budget();
    metrics.memory_budget(&budget);
    let data_dir = config.data_dir.clone();
    let log_options = log_options(&config, &budget, &metrics);
    let log: Arc<dyn DecisionLog> = Arc::new(
        tokio::task::spawn_blocking(move || {
            treaty_sdk::failpoint::hold_point("coordinator::before_log_open");
            SledLog::open_with(&data_dir, log_options)
        })
        .await
        .map_err(|e| DaemonError::Fatal(format!("opening the log panicked: {e}")))??,
    );
    let mut runtime_config = config.runtime(bound);
    runtime_config.participant_tls = participant_tls;
    runtime_config.metrics = metrics.clone();
    let governor = Governor::new(
        budget.budget_bytes,
        runtime_config.max_retained_bytes,
        runtime_config.retained_allowance.clone(),
    );
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    // Recovery reads every record of the log: on a blocking thread, as the open.
    let (runtime, tasks, recovery) = {
        let (log, runtime_config) = (log.clone(), runtime_config.clone());
        tokio::task::spawn_blocking(move || Runtime::start(log, runtime_config, fatal_tx))
            .await
            .map_err(|e| DaemonError::Fatal(format!("recovery panicked: {e}")))??
    };
    tracing::info!(
        resumed = recovery.resumed,
        finished_kept = log.finished_count(),
        finished_limit = budget.log_finished_max,
        "recovered the decision log"
    );
    // A stop asked for while the log opened and recovered (which can take a while): the
    // daemon never serves, and closes the log at once.
    tokio::pin!(shutdown);
    if futures::FutureExt::now_or_never(&mut shutdown).is_some() {
        tracing::info!("shutdown requested while starting; stopping before serving");
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        runtime.shutdown(tasks, grace).await;
        tokio::task::spawn_blocking(move || log.close())
            .await
            .map_err(|e| DaemonError::Fatal(format!("closing the log panicked: {e}")))??;
        tracing::info!("coordinator stopped");
        return Ok(());
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    set_health(&health_reporter, ServingStatus::Serving).await;
    let (reflection_v1, reflection_v1alpha) = treaty_sdk::server::reflection_services()
        .map_err(|e| DaemonError::Reflection(e.to_string()))?;

    let (stopping_tx, stopping_rx) = watch::channel(false);
    let service = CoordinatorService::new(runtime.clone(), api_config, stopping_rx.clone())
        .with_authenticator(authenticator.clone());
    let admin = AdminService::new(runtime.clone(), authenticator.clone());
    let reloader = hangups.map(|hangups| {
        tokio::spawn(reload_on_hangup(
            hangups,
            config.security.clone(),
            server_tls.clone(),
            authenticator,
            runtime.clone(),
        ))
    });
    let mut server_stop = stopping_rx.clone();
    let server = treaty_sdk::connections::server_builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(CoordinatorServer::new(service))
        .add_service(AdminServer::new(admin))
        .serve_with_incoming_shutdown(
            incoming(
                listener,
                server_tls.clone(),
                config.security.connection_limits(),
            ),
            async move {
                let _ = server_stop.wait_for(|stopping| *stopping).await;
            },
        );
    let mut server = tokio::spawn(server);
    let purger = tokio::spawn(purge_periodically(
        runtime.clone(),
        runtime_config.log_retention_ms,
        runtime_config.log_finished_max,
    ));
    let governing = tokio::spawn(memory::govern(
        governor,
        runtime.clone(),
        metrics,
        stopping_rx.clone(),
    ));

    if announce {
        println!("treaty listening on {bound}");
    }
    let metrics_server = match metrics_listener {
        Some(listener) => {
            let address = listener
                .local_addr()
                .map_err(|source| DaemonError::Listen {
                    address: bound,
                    source,
                })?;
            if announce {
                println!("treaty metrics on {address}");
            }
            tracing::info!(%address, "serving metrics at /metrics");
            let runtime = runtime.clone();
            Some(tokio::spawn(serve_metrics(
                listener,
                server_tls.clone(),
                config.security.connection_limits(),
                move || {
                    let runtime = runtime.clone();
                    async move { runtime.render_metrics().await }
                },
                stopping_rx.clone(),
            )))
        }
        None => None,
    };
    tracing::info!(%bound, tls = server_tls.is_some(), authenticated = config.security.authenticates(), advertise = %runtime_config.advertise_endpoint, data_dir = %config.data_dir.display(), "coordinator serving");

    let mut fatal = None;
    let mut server_result = None;
    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutdown requested"),
        Some(message) = fatal_rx.recv() => {
            tracing::error!(error = %message, "fatal error; stopping");
            fatal = Some(message);
        }
        result = &mut server => server_result = Some(result),
    }
    let _ = stopping_tx.send(true);
    set_health(&health_reporter, ServingStatus::NotServing).await;
    purger.abort();
    governing.abort();
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    // One grace period for the runtime's work in flight and the server's requests
    // alike, which both began it now: operators size their supervisor's stop timeout
    // on it.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(config.shutdown_grace_ms);
    runtime.shutdown_by(tasks, deadline).await;
    // Answers the runtime's stop gave (requests waiting on it are told it is shutting
    // down) still get a moment to leave, even when it used the whole grace.
    let server_deadline = deadline.max(tokio::time::Instant::now() + SERVER_LAST_ANSWERS);
    let server_result = match server_result {
        Some(result) => result,
        // Requests still in flight have had the grace period; the rest are cut off.
        None => match tokio::time::timeout_at(server_deadline, &mut server).await {
            Ok(result) => result,
            Err(_) => {
                server.abort();
                Ok(Ok(()))
            }
        },
    };
    if fatal.is_none() {
        fatal = fatal_rx.try_recv().ok();
    }
    let closed = tokio::task::spawn_blocking(move || log.close())
        .await
        .map_err(|e| DaemonError::Fatal(format!("closing the log panicked: {e}")))?;
    tracing::info!("coordinator stopped");
    if let Some(message) = fatal {
        return Err(DaemonError::Fatal(message));
    }
    match server_result {
        Ok(result) => result?,
        Err(join_error) => {
            return Err(DaemonError::Fatal(format!(
                "gRPC server task: {join_error}"
            )));
        }
    }
    closed?;
    Ok(())
}

/// How long the server still has for its last answers once the runtime has stopped,
/// if the grace is over by then: a shutdown takes at most `shutdown_grace_ms` and this.
const SERVER_LAST_ANSWERS: Duration = Duration::from_millis(250);

/// Sets the health of the Coordinator service and of the server as a whole (service
/// "", which generic probes ask by default) together: the server serves nothing else
/// that a client would be sent to it for, so a stopping coordinator is drained whichever
/// a load balancer checks.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter
        .set_service_status(
            <CoordinatorServer<CoordinatorService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter.set_service_status("", status).await;
}

/// How often purge rounds start for a log retention.
fn purge_interval(log_retention_ms: u64) -> Duration {
    Duration::from_millis(log_retention_ms / 10).clamp(PURGE_INTERVAL_MIN, PURGE_INTERVAL_MAX)
}

/// The decision log's store: its cache from the memory budget, group commit and
/// compaction from the configuration, its groups and compactions counted in `metrics`.
fn log_options(
    config: &ServeConfig,
    budget: &MemoryBudget,
    metrics: &Arc<Metrics>,
) -> StoreOptions {
    StoreOptions {
        // An eighth of the log's share of the memory budget, per database (see
        // `defaults::MemoryBudget`).
        cache_capacity_bytes: budget.log_cache_bytes,
        group_commit_hold: Duration::from_micros(config.log_group_commit_hold_us),
        // The coordinator's forced writes are decisions of independent transactions:
        // the more arrive per sync, the more a longer wait gathers.
        group_commit_max_holds: defaults::LOG_GROUP_COMMIT_MAX_HOLDS,
        group_commit_hold_after_writes: defaults::LOG_GROUP_COMMIT_HOLD_AFTER_WRITES,
        group_observer: Some({
            let metrics = metrics.clone();
            Arc::new(move |group: GroupCommitted| {
                metrics.log_group(group.records, group.sync_seconds)
            })
        }),
        compaction_observer: Some({
            let metrics = metrics.clone();
            Arc::new(move |result: &Result<CompactionReport, String>| {
                metrics.log_compacted(result.is_ok())
            })
        }),
        compaction: (config.log_compaction_min_bytes > 0).then(|| CompactionPolicy {
            min_bytes: config.log_compaction_min_bytes,
            growth_factor: config.log_compaction_growth_factor,
            min_removed_records: config.log_compaction_min_removed_records,
            ..CompactionPolicy::default()
        }),
        ..StoreOptions::default()
    }
}

/// Deletes final records past the log retention, and the oldest beyond
/// `log_finished_max`, round after round. A round purges batch after batch until one
/// comes back short (caught up), so the log's size follows the retention and the limit
/// whatever the rate of transactions; work per batch and per round is bounded.
async fn purge_periodically(runtime: Runtime, log_retention_ms: u64, log_finished_max: u64) {
    let mut interval = tokio::time::interval(purge_interval(log_retention_ms));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limit_last_reported: Option<tokio::time::Instant> = None;
    loop {
        interval.tick().await;
        let mut purged_in_round = Purged::default();
        for _ in 0..MAX_PURGE_BATCHES_PER_ROUND {
            let runtime = runtime.clone();
            let purged = tokio::task::spawn_blocking(move || {
                runtime.purge_log(log_retention_ms, log_finished_max, PURGE_BATCH)
            })
            .await;
            let purged = match purged {
                Ok(Ok(purged)) => purged,
                Ok(Err(error)) => {
                    tracing::error!(%error, "purging the log failed");
                    break;
                }
                Err(error) => {
                    tracing::error!(%error, "purge task failed");
                    break;
                }
            };
            purged_in_round.past_retention += purged.past_retention;
            purged_in_round.over_limit += purged.over_limit;
            if purged.total() < PURGE_BATCH {
                break;
            }
            tokio::time::sleep(PURGE_BATCH_PAUSE).await;
        }
        if purged_in_round.past_retention > 0 {
            tracing::info!(
                purged = purged_in_round.past_retention,
                "purged finished transactions past retention"
            );
        }
        if purged_in_round.over_limit > 0 {
            let due = limit_last_reported.is_none_or(|at| at.elapsed() >= LIMIT_REPORT_INTERVAL);
            if due {
                limit_last_reported = Some(tokio::time::Instant::now());
                tracing::warn!(
                    purged = purged_in_round.over_limit,
                    limit = log_finished_max,
                    "purged finished transactions before their log retention was up: the \
                     memory budget lets the log keep this many (treaty_log_purged_total\
                     {{reason=\"limit\"}} counts them; a larger --memory-budget-bytes keeps more)"
                );
            } else {
                tracing::debug!(
                    purged = purged_in_round.over_limit,
                    "purged finished transactions beyond the log's limit"
                );
            }
        }
    }
}

/// Reads certificates, the token file and the participant TLS files again on every
/// SIGHUP (so SIGHUP never kills the daemon). A file that fails to load is reported and
/// the old settings stay.
async fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    security: SecurityConfig,
    server_tls: Option<Arc<ReloadableServerTls>>,
    authenticator: Arc<Authenticator>,
    runtime: Runtime,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading certificates and tokens");
        if let Some(tls) = &server_tls {
            if let Err(error) = tls.reload() {
                tracing::error!(%error, "server certificate not reloaded; keeping the old one");
            }
        }
        if let Err(error) = authenticator.reload() {
            tracing::error!(%error, "token file not reloaded; keeping the old tokens");
        }
        match security.participant_tls() {
            Ok(tls) => runtime.reload_participant_tls(tls),
            Err(error) => {
                tracing::error!(%error, "participant TLS not reloaded; keeping the old settings")
            }
        }
    }
}

pub use treaty_sdk::server::shutdown_signal;

#[cfg(test)]
mod tests;
