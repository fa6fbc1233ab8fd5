//! The `treaty` binary: the coordinator daemon (`treaty serve`) and its CLI.

use clap::{CommandFactory, FromArgMatches};
use treaty_coordinator::cli::{Cli, Command, LogCommand, TXN_COMMAND_TIMEOUT, run_txn};
use treaty_coordinator::daemon;

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TREATY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The matches are kept: `serve --config` needs to know which settings a flag or an
    // environment variable gave (those win over the file).
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_tracing();
    if let Err(message) = treaty_sdk::failpoint::configure_from_env() {
        anyhow::bail!(message);
    }
    match cli.command {
        Command::Serve(args) => {
            let serve_matches = matches
                .subcommand_matches("serve")
                .ok_or_else(|| anyhow::anyhow!("serve parsed without its arguments"))?;
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
        Command::Bench(args) => treaty_coordinator::bench::run(args).await?,
        Command::Txn {
            endpoint,
            access,
            command,
        } => {
            let options = access.client_options();
            tokio::time::timeout(TXN_COMMAND_TIMEOUT, run_txn(&endpoint, &options, command))
                .await
                .map_err(|_| {
                    anyhow::anyhow!("no answer from {endpoint} within {TXN_COMMAND_TIMEOUT:?}")
                })??;
        }
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
