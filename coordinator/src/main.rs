//! The `treaty` binary: the coordinator daemon (`treaty serve`) and its CLI.

use clap::Parser;
use treaty_coordinator::cli::{Cli, Command, LogCommand, TXN_COMMAND_TIMEOUT, run_txn};
use treaty_coordinator::daemon;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Filtered by TREATY_LOG (`RUST_LOG` syntax; default info).
    treaty_sdk::logging::init("TREATY_LOG", cli.log_format);
    if let Err(message) = treaty_sdk::failpoint::configure_from_env() {
        anyhow::bail!(message);
    }
    match cli.command {
        Command::Serve(config) => {
            let shutdown = daemon::shutdown_signal();
            daemon::run(*config, shutdown).await?;
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
