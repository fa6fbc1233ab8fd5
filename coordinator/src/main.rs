//! The `treaty` binary: the coordinator daemon (`treaty serve`) and its CLI.

use clap::{CommandFactory, FromArgMatches};
use treaty_coordinator::cli::{Cli, Command, LogCommand, run_endpoints, run_txn};
use treaty_coordinator::daemon;

/// mimalloc rather than glibc's malloc: every call allocates and frees many small
/// buffers (HTTP/2 frames, messages, records), and a profile of `treaty bench` spent a
/// fifth of its CPU in glibc's allocator (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Asks the kernel for no transparent huge pages in this process and the children it
/// starts (the kernel's switch is per process; regions mimalloc already advised get no
/// more huge pages from here on). Only for the servers and the bench: `treaty tck`
/// starts the user's participant, which keeps its own setting. mimalloc advises huge
/// pages for its arenas, and a huge page is resident whole for any byte of it in use:
/// with them, the coordinator's resident set stood about 70 MiB higher for the same
/// work, over its memory budget (docs/PERFORMANCE.md, "Memory"). Off Linux, nothing
/// changes.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = nix::sys::prctl::set_thp_disable(true) {
        tracing::warn!(%error, "transparent huge pages stay on");
    }
}

/// Logs to stderr, filtered by TREATY_LOG (`RUST_LOG` syntax; default info), in the
/// format asked for; with `--otlp-endpoint`, also exports spans (flushed when the
/// returned guard drops).
#[cfg(feature = "otlp")]
fn init_tracing(cli: &Cli) -> anyhow::Result<Option<treaty_coordinator::otlp::OtlpGuard>> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (exporter, guard) = match &cli.otlp_endpoint {
        Some(endpoint) => {
            let (layer, guard) = treaty_coordinator::otlp::layer(endpoint)?;
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(treaty_sdk::logging::env_filter("TREATY_LOG").map_err(anyhow::Error::msg)?)
        .with(treaty_sdk::logging::stderr_layer(cli.log_format))
        .with(exporter)
        .try_init()?;
    Ok(guard)
}

#[cfg(not(feature = "otlp"))]
fn init_tracing(cli: &Cli) -> anyhow::Result<Option<()>> {
    if cli.otlp_endpoint.is_some() {
        anyhow::bail!(
            "--otlp-endpoint / TREATY_OTLP_ENDPOINT: this treaty was built without the `otlp` \
             feature (cargo build --features otlp)"
        );
    }
    treaty_sdk::logging::init("TREATY_LOG", cli.log_format).map_err(anyhow::Error::msg)?;
    Ok(None)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The matches are kept: `serve --config` needs to know which settings a flag or an
    // environment variable gave (those win over the file).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let _exporter = init_tracing(&cli)?;
    if let Err(message) = treaty_sdk::failpoint::configure_from_env() {
        anyhow::bail!(message);
    }
    match cli.command {
        Command::Serve(args) => {
            no_transparent_huge_pages();
            let serve_matches = matches
                .subcommand_matches("serve")
                .ok_or_else(|| anyhow::anyhow!("serve parsed without its arguments"))?;
            // Renamed on 2026-12-07: refused rather than ignored, since the admins it
            // named would lose their role without a word.
            if std::env::var_os("TREATY_ADMIN_IDENTITIES").is_some() {
                anyhow::bail!(
                    "TREATY_ADMIN_IDENTITIES is now TREATY_ADMIN_IDENTITY (as --admin-identity), \
                     which names one identity, taken whole, commas included: for several, \
                     repeat --admin-identity or use the config file's admin_identity array"
                );
            }
            let print_config = args.print_config;
            let config = args.effective_config(serve_matches)?;
            if print_config {
                config.validate()?;
                print!("{}", treaty_coordinator::config_file::to_toml(&config)?);
                return Ok(());
            }
            let shutdown = daemon::shutdown_signal();
            daemon::run(config, shutdown).await?;
        }
        Command::Bench(args) => {
            no_transparent_huge_pages();
            treaty_coordinator::bench::run(args).await?
        }
        Command::BenchParticipant(args) => {
            no_transparent_huge_pages();
            treaty_coordinator::bench::run_participant(args).await?
        }
        Command::Txn {
            coordinator,
            command,
        } => run_txn(&coordinator, command).await?,
        Command::Endpoints { coordinator, json } => {
            run_endpoints(&coordinator, json).await?;
        }
        Command::Tck(args) => std::process::exit(treaty_coordinator::tck::run(*args).await),
        Command::Log {
            command: LogCommand::Verify { data_dir },
        } => {
            let verdict = treaty_coordinator::log::verify::verify(&data_dir)
                .map_err(|message| anyhow::anyhow!(message))?;
            print!("{}", verdict.report);
            if verdict.damaged {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
