//! Serving a participant: the options, what stops a server (a setting refused at start,
//! a store that fails, the transport), [`serve()`] and [`serve_with_routes`] (the
//! barrier over the store, the in-doubt resolver and the barrier collector started
//! beside the participant, health and reflection services, `/metrics`, until `shutdown`
//! resolves), and the signals a participant process listens for.

use super::*;

/// Where [`serve`] serves `/metrics`.
#[derive(Debug, Clone)]
pub enum MetricsListen {
    /// Bind this address.
    Address(SocketAddr),
    /// Accept on this listener, bound by the caller (e.g. on port 0, to print the port).
    Listener(Arc<std::net::TcpListener>),
}

impl From<SocketAddr> for MetricsListen {
    fn from(address: SocketAddr) -> Self {
        MetricsListen::Address(address)
    }
}

impl From<std::net::TcpListener> for MetricsListen {
    fn from(listener: std::net::TcpListener) -> Self {
        MetricsListen::Listener(Arc::new(listener))
    }
}

impl MetricsListen {
    fn address(&self) -> std::io::Result<SocketAddr> {
        match self {
            MetricsListen::Address(address) => Ok(*address),
            MetricsListen::Listener(listener) => listener.local_addr(),
        }
    }

    async fn bind(&self) -> std::io::Result<TcpListener> {
        match self {
            MetricsListen::Address(address) => TcpListener::bind(address).await,
            MetricsListen::Listener(listener) => {
                let listener = listener.try_clone()?;
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)
            }
        }
    }
}

/// How [`serve`] behaves.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub in_doubt: InDoubtOptions,
    /// How long records of final branches are kept, and how their collection runs.
    pub barrier_gc: BarrierGcOptions,
    /// The coordinators served and asked (default: every caller; see [`CoordinatorTrust`]).
    pub trust: CoordinatorTrust,
    /// TLS for the server (`None`: cleartext). Call `reload` on it to change certificates.
    pub tls: Option<Arc<ReloadableServerTls>>,
    pub connections: ConnectionLimits,
    /// Listening beyond loopback without `trust` authenticating callers is refused unless
    /// this is set.
    pub allow_unauthenticated: bool,
    /// Most requests served at once per connection, and most calls answered at once on
    /// its `Calls` streams, all together (a stream counts as one request of its
    /// connection besides).
    pub max_concurrent_requests: usize,
    /// How long shutdown waits for requests in flight and for operations whose callers
    /// went away (one deadline for both), before it closes the store.
    pub shutdown_grace_ms: u64,
    /// Serve Prometheus metrics at http(s)://ADDR/metrics (TLS with `tls` when set):
    /// an address to bind, or a listener already bound (to learn a port 0's number).
    /// `/metrics` has no authentication: beyond loopback it needs
    /// `allow_unauthenticated`.
    pub metrics_listen: Option<MetricsListen>,
    /// The metrics to count into, for a service that also registers them in a
    /// prometheus-client registry of its own ([`ParticipantMetrics::register`]). With
    /// this or `metrics_listen` set, the barrier's records are counted once at start.
    pub metrics: Option<Arc<ParticipantMetrics>>,
    /// A one-phase commit or saga step waits for one forced write instead of two; only
    /// for participants whose effects commit with the barrier's records (see
    /// [`Barrier::with_unforced_one_phase_yes`]). Off by default.
    pub unforced_one_phase_yes: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            in_doubt: InDoubtOptions::default(),
            barrier_gc: BarrierGcOptions::default(),
            trust: CoordinatorTrust::default(),
            tls: None,
            connections: ConnectionLimits::default(),
            allow_unauthenticated: false,
            max_concurrent_requests: 1024,
            shutdown_grace_ms: 5_000,
            metrics_listen: None,
            metrics: None,
            unforced_one_phase_yes: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] crate::durable::StoreError),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("listener: {0}")]
    Listener(#[from] std::io::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("serve options: {0}")]
    Options(String),
    #[error(
        "refusing to serve on {0} without authenticating the coordinator: configure a \
         coordinator token or identity, or allow unauthenticated callers explicitly"
    )]
    Unauthenticated(SocketAddr),
}

/// Serves `participant` on `listener`, with its barrier in `store`, the standard gRPC
/// health service, in-doubt resolution and the barrier's garbage collection, until
/// `shutdown` resolves. Requests in flight, and operations still running for callers
/// that went away, get `shutdown_grace_ms` in all to finish; `store` is then closed
/// durably.
///
/// The store is usually the participant's one sled database (see
/// [`DurableStore::open`]), where it may keep its own data too, under keys that do not
/// start with `b/` or `d/`; or a [`BarrierStore`] in the participant's own database.
pub async fn serve<P, S, F>(
    participant: Arc<P>,
    store: Arc<S>,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: F,
) -> Result<(), ServeError>
where
    P: Participant,
    S: BarrierStore,
    F: std::future::Future<Output = ()> + Send,
{
    serve_with_routes(
        participant,
        store,
        listener,
        options,
        tonic::service::Routes::default(),
        shutdown,
    )
    .await
}

/// [`serve`], with more gRPC services on the same port: `extra` (built with
/// `tonic::service::Routes::new(service).add_service(…)`). A test participant uses it to
/// serve `treaty.v1.Conformance` beside `treaty.v1.Participant` for `treaty tck`.
///
/// The extra services get the same TLS and connection limits, but not the SDK's
/// coordinator authentication: they check their callers themselves. They must not be
/// the services `serve` mounts (Participant, health, reflection): a name served twice
/// is a programming error (the router panics at start).
pub async fn serve_with_routes<P, S, F>(
    participant: Arc<P>,
    store: Arc<S>,
    listener: TcpListener,
    options: ServeOptions,
    extra: tonic::service::Routes,
    shutdown: F,
) -> Result<(), ServeError>
where
    P: Participant,
    S: BarrierStore,
    F: std::future::Future<Output = ()> + Send,
{
    let local_addr: SocketAddr = listener.local_addr()?;
    options.trust.validate().map_err(ServeError::Options)?;
    if !local_addr.ip().is_loopback()
        && !options.trust.authenticates()
        && !options.allow_unauthenticated
    {
        return Err(ServeError::Unauthenticated(local_addr));
    }
    options.barrier_gc.validate().map_err(ServeError::Options)?;
    // Among them the token in-doubt branches are asked about with: an unusable one would
    // leave them unresolved, so it stops the start instead.
    options.in_doubt.validate().map_err(ServeError::Options)?;
    // Without a list of coordinators, branches in doubt are asked about at the address
    // their Prepare named: a token would go to whoever sent that Prepare.
    if options.in_doubt.coordinator_client.token.is_some() && options.trust.endpoints().is_empty() {
        return Err(ServeError::Options(
            "in_doubt.coordinator_client.token: a token is only sent to listed coordinators; \
             list them (trust.endpoint) or send none"
                .into(),
        ));
    }
    let metrics_listener = match &options.metrics_listen {
        Some(listen) => {
            check_metrics_listen(listen.address()?, options.allow_unauthenticated)
                .map_err(|message| ServeError::Options(format!("metrics_listen: {message}")))?;
            Some(listen.bind().await?)
        }
        None => None,
    };
    let metrics = match (&options.metrics, &metrics_listener) {
        (Some(metrics), _) => Some(metrics.clone()),
        (None, Some(_)) => Some(Arc::new(ParticipantMetrics::new())),
        (None, None) => None,
    };
    let mut barrier = Barrier::new(store.clone())
        .with_retention_ms(options.barrier_gc.retention_ms)
        .with_unforced_one_phase_yes(options.unforced_one_phase_yes);
    if let Some(metrics) = &metrics {
        // Before the first call: records written from here on are counted as they come.
        let counted = store.clone();
        let found = tokio::task::spawn_blocking(move || counted.count_records())
            .await
            .map_err(|e| ServeError::Options(format!("counting barrier records: {e}")))??;
        metrics.barrier_records_found(found);
        if let Some(counters) = store.durability_counters() {
            metrics.observe_store(counters);
        }
        barrier = barrier.with_metrics(metrics.clone());
    }
    let barrier = Arc::new(barrier);
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let service = ParticipantService::new(participant.clone(), barrier.clone())
        .with_trust(options.trust.clone())
        .with_call_streams(stopping_rx.clone(), options.max_concurrent_requests);
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ParticipantServer<ParticipantService<P, S>>>()
        .await;

    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let resolver = InDoubtResolver::new(participant, barrier.clone(), options.in_doubt.clone())
        .map_err(ServeError::Options)?
        .with_trust(options.trust.clone());
    let collector = BarrierCollector::new(barrier.clone(), options.barrier_gc.clone())
        .map_err(ServeError::Options)?;
    let resolver_task = tokio::spawn(resolver.run(background_stopped.clone()));
    let collector_task = tokio::spawn(collector.run(background_stopped));

    let (reflection_v1, reflection_v1alpha) =
        reflection_services().map_err(|e| ServeError::Reflection(e.to_string()))?;

    tracing::info!(%local_addr, barrier = %store.describe(), tls = options.tls.is_some(), "participant serving");
    let incoming = incoming(listener, options.tls.clone(), options.connections.clone());
    let metrics_server = match (metrics_listener, metrics) {
        (Some(listener), Some(metrics)) => {
            tracing::info!(address = %listener.local_addr()?, "serving metrics at /metrics");
            Some(tokio::spawn(serve_metrics(
                listener,
                options.tls.clone(),
                options.connections.clone(),
                move || {
                    let text = metrics
                        .encode()
                        .map_err(|e| format!("encoding metrics: {e}"));
                    std::future::ready(text)
                },
                stopping_rx.clone(),
            )))
        }
        _ => None,
    };
    let server = crate::connections::server_builder()
        .concurrency_limit_per_connection(options.max_concurrent_requests)
        .add_routes(extra)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ParticipantServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopping_rx.wait_for(|stopping| *stopping).await;
        });
    tokio::pin!(server);
    tokio::pin!(shutdown);
    // A failed store cannot promise durability any more: stop serving at once.
    let mut store_failure = None;
    let served = tokio::select! {
        result = &mut server => Some(result),
        _ = &mut shutdown => None,
        message = store.failed() => {
            tracing::error!(error = %message, "the participant's store failed; stopping");
            store_failure = Some(message);
            None
        }
    };
    let _ = stopping_tx.send(true);
    let grace_ends = tokio::time::Instant::now() + Duration::from_millis(options.shutdown_grace_ms);
    let _ = health_reporter
        .set_not_serving::<ParticipantServer<ParticipantService<P, S>>>()
        .await;
    let served = match served {
        Some(result) => result,
        None => match tokio::time::timeout_at(grace_ends, &mut server).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    "requests still in flight after the shutdown grace period; stopping"
                );
                Ok(())
            }
        },
    };
    let _ = stop_background.send(true);
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    let _ = resolver_task.await;
    let _ = collector_task.await;
    // Operations whose callers went away run on by themselves: their records are
    // written before the store closes, within what is left of the grace period.
    if store_failure.is_none()
        && tokio::time::timeout_at(grace_ends, barrier.unfinished.none_left())
            .await
            .is_err()
    {
        tracing::warn!(
            "operations still running after the shutdown grace period; closing the store \
             under them: what they did is not recorded, and the coordinator asks again"
        );
    }
    let closed = tokio::task::spawn_blocking(move || store.close())
        .await
        .unwrap_or(Err(crate::durable::StoreError::Closed));
    if let Some(message) = store_failure {
        return Err(ServeError::Store(crate::durable::StoreError::Failed(
            message,
        )));
    }
    served?;
    closed?;
    Ok(())
}

/// gRPC server reflection of Treaty's services and the health service, in both versions
/// of the protocol: v1, and v1alpha for the clients that speak only it (Python's
/// grpcio-reflection, Postman, older grpcurl). The coordinator serves the same pair.
pub fn reflection_services() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(treaty_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Each version would list only itself: both are served, so both list both.
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when it is first polled: call it before announcing that the server is ready, so that
/// a signal sent right after the announcement stops it gracefully instead of killing it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut interrupt), Ok(mut terminate)) => {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
            }
            (interrupt, terminate) => {
                let error = interrupt.err().or(terminate.err());
                tracing::error!(
                    ?error,
                    "cannot listen for SIGINT/SIGTERM; stop with SIGKILL"
                );
                std::future::pending::<()>().await;
            }
        }
    }
}

/// A stream of SIGHUPs, installed now (so that from here on SIGHUP never kills the
/// process); `None` if it cannot be installed.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP; certificates will not reload");
            None
        }
    }
}
