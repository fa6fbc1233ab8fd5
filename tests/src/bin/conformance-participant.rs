//! The conformance participant (`treaty_tests::conformance`) as a process, for
//! `treaty tck`: serves `treaty.v1.Participant` through the Rust SDK and
//! `treaty.v1.Conformance` on the same port. Prints `participant listening on ADDR` once
//! serving.
//!
//! - `--broken MODE` serves one of the deliberately broken variants
//!   (`treaty_tests::broken`) instead: `no-barrier`, `yes-not-durable`, `no-anti-hanging`,
//!   `stream-in-order`, `user-failure-failed-precondition`, `gives-up-in-doubt`,
//!   `gives-up-on-error`; or one that is not broken: `late-stream-headers` (its stream's
//!   response headers come with its first answer), `user-failure-unknown` (user code
//!   that failed is answered UNKNOWN).
//! - `--supervise PIDFILE` runs the participant as a child, writes the child's pid to
//!   PIDFILE, and starts it again on the same address whenever it dies, so that
//!   `treaty tck --restart-command 'kill -9 $(cat PIDFILE)'` can restart it. The child
//!   exits when the supervisor does (its stdin closes). At most `MAX_STARTS` starts.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_stream::wrappers::TcpListenerStream;
use treaty_proto::v1::participant_server::{Participant as ParticipantRpc, ParticipantServer};
use treaty_sdk::barrier::Barrier;
use treaty_sdk::barrier_gc::BarrierGcOptions;
use treaty_sdk::durable::DurableStore;
use treaty_sdk::server::ServeOptions;
use treaty_tests::broken::{
    GiveUp, NoAntiHanging, NoBarrier, OddParticipant, Oddity, VolatileYes, give_up_in_doubt,
};
use treaty_tests::conformance::{ConformanceParticipant, ConformanceService};

const READY_PREFIX: &str = "participant listening on";
/// Most times the supervisor starts the participant.
const MAX_STARTS: u32 = 100;
/// How long the supervisor waits for a (re)started participant to announce itself.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Broken {
    /// User code runs on every call: no barrier.
    NoBarrier,
    /// YES votes are kept in memory only.
    YesNotDurable,
    /// A Prepare after an Abort runs user code and votes YES.
    NoAntiHanging,
    /// The `Calls` stream runs its calls one at a time and knows no withdrawals.
    StreamInOrder,
    /// Not broken: the `Calls` stream sends its response headers only with its first
    /// answer, as some gRPC servers do.
    LateStreamHeaders,
    /// Not broken: user code that failed is answered UNKNOWN, not UNAVAILABLE.
    UserFailureUnknown,
    /// User code that failed is answered FAILED_PRECONDITION, a refusal for good.
    UserFailureFailedPrecondition,
    /// Aborts a branch in doubt a second after its YES, whatever the coordinator says.
    GivesUpInDoubt,
    /// Aborts a branch in doubt as soon as GetOutcome fails.
    GivesUpOnError,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    #[arg(long)]
    data_dir: PathBuf,
    /// Serve a deliberately broken participant.
    #[arg(long, value_enum)]
    broken: Option<Broken>,
    /// Records of final branches are kept this long (default: the SDK's 8 days).
    #[arg(long)]
    barrier_retention_ms: Option<u64>,
    /// A bearer token the coordinator must present (default: any caller is served).
    #[arg(long)]
    token: Option<String>,
    /// A coordinator endpoint to trust; calls naming another are refused (default: any
    /// coordinator a caller names).
    #[arg(long, value_name = "URL")]
    trusted_coordinator: Vec<String>,
    /// Run the participant as a restartable child; its pid goes to this file.
    #[arg(long, value_name = "PIDFILE")]
    supervise: Option<PathBuf>,
    /// Exit when stdin closes (the supervisor's child).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();
    match args.supervise.clone() {
        Some(pid_file) => supervise(&args, &pid_file).await,
        None => run(args).await,
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.exit_on_stdin_eof {
        std::thread::spawn(|| {
            use std::io::Read;
            let mut buffer = [0u8; 64];
            loop {
                match std::io::stdin().read(&mut buffer) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // A pipe the parent left non-blocking: poll it.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading stdin");
                        break;
                    }
                }
            }
            tracing::info!("stdin closed: the supervisor is gone; exiting");
            std::process::exit(0);
        });
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let shutdown = treaty_sdk::server::shutdown_signal();
    let store = Arc::new(DurableStore::open(&args.data_dir, Default::default())?);
    let user = Arc::new(ConformanceParticipant::new(store.clone()).map_err(anyhow::Error::msg)?);
    let conformance = ConformanceService::new(user.clone()).server();
    let barrier_gc = BarrierGcOptions {
        retention_ms: args
            .barrier_retention_ms
            .unwrap_or(BarrierGcOptions::default().retention_ms),
        ..BarrierGcOptions::default()
    };
    let mut trust = treaty_sdk::server::CoordinatorTrust::default();
    if let Some(token) = &args.token {
        trust = trust.token(token);
    }
    for endpoint in &args.trusted_coordinator {
        trust = trust.endpoint(endpoint);
    }
    let options = ServeOptions {
        barrier_gc: barrier_gc.clone(),
        trust,
        ..ServeOptions::default()
    };
    println!("{READY_PREFIX} {}", listener.local_addr()?);
    let routes = tonic::service::Routes::new(conformance.clone());
    match args.broken {
        None => {
            treaty_sdk::serve_with_routes(user, store, listener, options, routes, shutdown).await?
        }
        Some(broken @ (Broken::GivesUpInDoubt | Broken::GivesUpOnError)) => {
            let rule = if broken == Broken::GivesUpOnError {
                GiveUp::OnError
            } else {
                GiveUp::AfterASecond
            };
            give_up_in_doubt(user.clone(), store.clone(), rule);
            treaty_sdk::serve_with_routes(user, store, listener, options, routes, shutdown).await?
        }
        Some(Broken::YesNotDurable) => {
            let volatile = Arc::new(VolatileYes::new(store));
            treaty_sdk::serve_with_routes(user, volatile, listener, options, routes, shutdown)
                .await?
        }
        Some(Broken::NoBarrier) => {
            serve_raw(NoBarrier::new(user), conformance, listener, shutdown).await?
        }
        Some(Broken::NoAntiHanging) => {
            let barrier = Arc::new(Barrier::new(store).with_retention_ms(barrier_gc.retention_ms));
            serve_raw(
                NoAntiHanging::new(user, barrier),
                conformance,
                listener,
                shutdown,
            )
            .await?
        }
        Some(
            broken @ (Broken::LateStreamHeaders
            | Broken::StreamInOrder
            | Broken::UserFailureUnknown
            | Broken::UserFailureFailedPrecondition),
        ) => {
            let barrier = Arc::new(Barrier::new(store).with_retention_ms(barrier_gc.retention_ms));
            let oddity = match broken {
                Broken::StreamInOrder => Oddity::StreamInOrder,
                Broken::UserFailureUnknown => Oddity::UserFailureAs(tonic::Code::Unknown),
                Broken::UserFailureFailedPrecondition => {
                    Oddity::UserFailureAs(tonic::Code::FailedPrecondition)
                }
                _ => Oddity::LateStreamHeaders,
            };
            // Never set: the process ends by a signal, and its streams with it.
            let (_stop, stopping) = tokio::sync::watch::channel(false);
            serve_raw(
                OddParticipant::new(user, barrier, stopping, oddity),
                conformance,
                listener,
                shutdown,
            )
            .await?
        }
    }
    Ok(())
}

/// Serves a broken participant service and the conformance service, without the SDK.
async fn serve_raw<S: ParticipantRpc>(
    service: S,
    conformance: treaty_proto::v1::conformance_server::ConformanceServer<ConformanceService>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tonic::transport::Server::builder()
        .add_service(conformance)
        .add_service(ParticipantServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

/// The arguments of the supervised child: these, on `listen`, exiting with the
/// supervisor.
fn child_args(args: &Args, listen: std::net::SocketAddr) -> Vec<String> {
    let mut child = vec![
        "--listen".to_string(),
        listen.to_string(),
        "--data-dir".to_string(),
        args.data_dir.to_string_lossy().into_owned(),
        "--exit-on-stdin-eof".to_string(),
    ];
    if let Some(broken) = args.broken {
        if let Some(value) = broken.to_possible_value() {
            child.extend(["--broken".to_string(), value.get_name().to_string()]);
        }
    }
    if let Some(token) = &args.token {
        child.extend(["--token".to_string(), token.clone()]);
    }
    for endpoint in &args.trusted_coordinator {
        child.extend(["--trusted-coordinator".to_string(), endpoint.clone()]);
    }
    if let Some(retention_ms) = args.barrier_retention_ms {
        child.extend([
            "--barrier-retention-ms".to_string(),
            retention_ms.to_string(),
        ]);
    }
    child
}

/// Starts the participant, announces its address once, and starts it again on that
/// address each time it dies, until SIGTERM/SIGINT (or `MAX_STARTS`).
async fn supervise(args: &Args, pid_file: &Path) -> anyhow::Result<()> {
    let program = std::env::current_exe()?;
    let mut listen = args.listen;
    let shutdown = treaty_sdk::server::shutdown_signal();
    tokio::pin!(shutdown);
    for start in 0..MAX_STARTS {
        let mut child = tokio::process::Command::new(&program)
            .args(child_args(args, listen))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the participant")?;
        // Held until the child ends (`wait` would close it): the child exits at EOF.
        let _stdin = child.stdin.take();
        let stdout = child.stdout.take().context("the child has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let announced = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(address) = line.strip_prefix(READY_PREFIX) {
                    return address.trim().parse::<std::net::SocketAddr>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .with_context(|| format!("start {start}: the participant did not announce itself"))?;
        listen = announced;
        let pid = child.id().context("the child has no pid")?;
        write_atomically(pid_file, &pid.to_string())?;
        if start == 0 {
            println!("{READY_PREFIX} {announced}");
        }
        tracing::info!(start, pid, %announced, "supervised participant serving");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        tokio::select! {
            status = child.wait() => {
                tracing::info!(?status, "supervised participant ended; starting it again");
            }
            _ = &mut shutdown => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Ok(());
            }
        }
    }
    anyhow::bail!("the participant was started {MAX_STARTS} times; giving up")
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}
