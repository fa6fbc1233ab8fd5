//! `treaty serve`: the coordinator daemon's life from start to stop.
//!
//! Start: validate the configuration, open the decision log, recover (every logged commit
//! not yet acknowledged is delivered again), then serve the Coordinator service with the
//! standard health service and server reflection.
//!
//! Stop (on the caller's shutdown signal, or at once on a fatal log error): stop taking
//! requests and end watch streams; abort undecided transactions and give work in flight
//! `shutdown_grace_ms`; then close the log durably. Whatever is left is recovery's job at
//! the next start. A fatal log error makes `run` return an error after the stop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use treaty_proto::v1::coordinator_server::CoordinatorServer;

use crate::api::CoordinatorService;
use crate::config::{ConfigError, ServeConfig};
use crate::log::{DecisionLog, LogError, SledLog};
use crate::runtime::Runtime;

/// Final log records purged per round, and how often rounds run.
const PURGE_BATCH: usize = 1_000;
const PURGE_INTERVAL: Duration = Duration::from_secs(60);

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
    config.validate()?;
    let api_config = config.api()?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            address: config.listen,
            source,
        })?;
    let data_dir = config.data_dir.clone();
    let log: Arc<dyn DecisionLog> = Arc::new(
        tokio::task::spawn_blocking(move || SledLog::open(&data_dir))
            .await
            .map_err(|e| DaemonError::Fatal(format!("opening the log panicked: {e}")))??,
    );
    let runtime_config = config.runtime(bound);
    let (fatal_tx, mut fatal_rx) = mpsc::unbounded_channel();
    let (runtime, tasks, recovery) = Runtime::start(log.clone(), runtime_config.clone(), fatal_tx)?;
    tracing::info!(resumed = recovery.resumed, "recovered the decision log");

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(treaty_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| DaemonError::Reflection(e.to_string()))?;

    let (stopping_tx, stopping_rx) = watch::channel(false);
    let service = CoordinatorService::new(runtime.clone(), api_config, stopping_rx.clone());
    let mut server_stop = stopping_rx.clone();
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CoordinatorServer::new(service))
        .serve_with_incoming_shutdown(
            // Without TCP_NODELAY on accepted sockets, replies wait on delayed ACKs (~40 ms).
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = server_stop.wait_for(|stopping| *stopping).await;
            },
        );
    let mut server = tokio::spawn(server);
    let purger = tokio::spawn(purge_periodically(
        runtime.clone(),
        runtime_config.log_retention_ms,
    ));

    println!("treaty listening on {bound}");
    tracing::info!(%bound, advertise = %runtime_config.advertise_endpoint, data_dir = %config.data_dir.display(), "coordinator serving");

    tokio::pin!(shutdown);
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
    health_reporter
        .set_not_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    purger.abort();
    let grace = Duration::from_millis(config.shutdown_grace_ms);
    runtime.shutdown(tasks, grace).await;
    let server_result = match server_result {
        Some(result) => result,
        // Requests still in flight have had the grace period; the rest are cut off.
        None => match tokio::time::timeout(grace, &mut server).await {
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

async fn purge_periodically(runtime: Runtime, log_retention_ms: u64) {
    let mut interval = tokio::time::interval(PURGE_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let runtime = runtime.clone();
        let purged =
            tokio::task::spawn_blocking(move || runtime.purge_log(log_retention_ms, PURGE_BATCH))
                .await;
        match purged {
            Ok(Ok(0)) => {}
            Ok(Ok(purged)) => tracing::info!(purged, "purged finished transactions past retention"),
            Ok(Err(error)) => tracing::error!(%error, "purging the log failed"),
            Err(error) => tracing::error!(%error, "purge task failed"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
