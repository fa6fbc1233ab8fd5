//! The `treaty` command line: `serve` runs the daemon; `txn ...` inspects transactions
//! through a running coordinator and, for admins, moves stuck ones (see `operator`);
//! `endpoints` shows the participants' health; `tck` checks a participant against the
//! participant protocol (see `crate::tck`).

mod operator;

use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{ArgMatches, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use treaty_sdk::client::{
    ClientOptions, ClientTlsFiles, Decision, Transaction, TransactionState, TreatyClient,
    credentials, endpoint_with,
};

use treaty_sdk::logging::{LOG_FORMAT_ENV, LogFormat};

use crate::config::ServeConfig;

#[derive(Debug, Parser)]
#[command(
    name = "treaty",
    version,
    about = "Treaty: a distributed transaction coordinator"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` (coloured only on a terminal) or `json` (one object per line,
    /// with the transaction, branch and trace ids of its spans), to stderr.
    #[arg(long, global = true, env = LOG_FORMAT_ENV, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export participant-call spans to this OpenTelemetry collector over OTLP/gRPC
    /// (`http://HOST:4317`). Needs a build with the `otlp` feature.
    #[arg(long, global = true, env = "TREATY_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the coordinator daemon.
    Serve(Box<ServeArgs>),
    /// Measure 2PC, sagas, compensating sagas and the bare-call ceiling over loopback
    /// gRPC: throughput, latency, calls, fsyncs and CPU per transaction.
    Bench(crate::bench::BenchArgs),
    /// One participant of `treaty bench --processes` (started by the bench itself).
    #[command(hide = true)]
    BenchParticipant(crate::bench::BenchParticipantArgs),
    /// Inspect transactions of a running coordinator, and move stuck ones (admins).
    Txn {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
        #[command(subcommand)]
        command: TxnCommand,
    },
    /// Each participant endpoint the coordinator called lately: health, circuit, calls
    /// in flight, error rate (admins).
    Endpoints {
        #[command(flatten)]
        coordinator: CoordinatorArgs,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Check a participant against the participant protocol (the conformance kit):
    /// duplicates, reordering, concurrency, late calls, restarts. Needs a test
    /// participant that serves treaty.v1.Conformance. Exit 1 on any failure.
    Tck(Box<crate::tck::TckArgs>),
    /// Offline checks of a stopped coordinator's log or participant's store.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
}

/// `treaty serve`: the daemon's settings, and where else they may come from.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// A TOML file of settings, named like these flags with `_` for `-` (see
    /// docs/CONFIG.md). A flag or TREATY_* variable wins over the file, which wins over
    /// the defaults. Read once, at start.
    #[arg(long, env = "TREATY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration as TOML (secrets left out) and exit, after
    /// checking it as at start (the files it names are not read).
    #[arg(long)]
    pub print_config: bool,

    #[command(flatten)]
    pub settings: ServeConfig,
}

impl ServeArgs {
    /// The settings to run with: `--config`'s file merged in when given. `matches` are
    /// the `serve` subcommand's, to tell which settings a flag or variable gave.
    pub fn effective_config(
        self,
        matches: &ArgMatches,
    ) -> Result<ServeConfig, crate::config_file::ConfigFileError> {
        match &self.config {
            None => Ok(self.settings),
            Some(path) => crate::config_file::read_and_merge(path, self.settings, |key| {
                from_args(matches, key)
            }),
        }
    }
}

/// Whether setting `key` was given by a flag or an environment variable (not defaulted).
pub fn from_args(matches: &ArgMatches, key: &str) -> bool {
    matches!(
        matches.value_source(key),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Which coordinator the CLI asks, and how it gets in.
#[derive(Debug, Clone, clap::Args)]
pub struct CoordinatorArgs {
    /// The coordinator to ask.
    #[arg(
        long = "coordinator",
        env = "TREATY_ENDPOINT",
        default_value = "http://127.0.0.1:7420",
        global = true
    )]
    pub address: String,
    /// How long to wait for the connection and for each answer of the coordinator (a
    /// verb on many transactions waits this long for each; `txn watch` waits this long
    /// for the stream to open, then for as long as the transaction takes).
    #[arg(
        long,
        env = "TREATY_CALL_TIMEOUT_MS",
        default_value_t = 30_000,
        value_parser = clap::value_parser!(u64).range(1..=3_600_000),
        global = true
    )]
    pub call_timeout_ms: u64,
    #[command(flatten)]
    pub access: AccessArgs,
}

impl CoordinatorArgs {
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// The client's options: a ping unanswered for `--call-timeout-ms` is an answer
    /// that did not come, so it ends a `txn watch` whose connection went silent.
    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            keepalive_interval_ms: self
                .call_timeout_ms
                .min(treaty_sdk::client::DEFAULT_KEEPALIVE_INTERVAL_MS),
            keepalive_timeout_ms: self.call_timeout_ms,
            ..self.access.client_options()
        }
    }
}

/// Waits at most `timeout` for one answer of the coordinator.
pub(crate) async fn answered<T, E>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T>
where
    anyhow::Error: From<E>,
{
    match tokio::time::timeout(timeout, call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => {
            anyhow::bail!("the coordinator did not answer within {timeout:?} (--call-timeout-ms)")
        }
    }
}

/// How the CLI proves who it is and verifies the coordinator.
#[derive(Clone, clap::Args)]
pub struct AccessArgs {
    /// Bearer token (prefer the environment variable: flags are visible to other users).
    #[arg(long, env = "TREATY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// CA (PEM) to verify an https:// coordinator with (default: the system's roots).
    #[arg(long, env = "TREATY_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a coordinator that requires mutual TLS.
    #[arg(long, env = "TREATY_CERT", global = true, requires = "key")]
    pub cert: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "TREATY_KEY", global = true, requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for AccessArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessArgs")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl AccessArgs {
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            tls: Some(ClientTlsFiles {
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
            token: self.token.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Check integrity (on a copy: the directory is not changed), print counts by
    /// state and what could not be read; exit 1 on damage.
    Verify {
        /// The store's directory (`treaty serve --data-dir`, or a participant's).
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TxnCommand {
    /// List transactions, oldest first.
    List {
        #[command(flatten)]
        filter: operator::FilterArgs,
        /// Most transactions to print, 1 to 100000; a note on stderr says when more may
        /// match.
        #[arg(long, default_value_t = 100, value_parser = operator::limit_parser())]
        limit: usize,
        /// One JSON array for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Show one transaction with its branches and history.
    Show {
        transaction_id: String,
        #[arg(long)]
        json: bool,
    },
    /// The heuristic report: what each branch applied, which is unknown, and what
    /// operators resolved.
    Report {
        transaction_id: String,
        #[arg(long)]
        json: bool,
    },
    /// Send now every delivery waiting for its retry (admins).
    RetryNow(VerbArgs),
    /// Stop retries and resends until `resume` (admins); a call left unanswered is
    /// marked lost, so that its branch can be resolved.
    Pause(VerbArgs),
    /// Let retries go on; what waits is sent now (admins).
    Resume(VerbArgs),
    /// Compensate a saga; abort an undecided two-phase commit (admins).
    Cancel(VerbArgs),
    /// State a branch's outcome where the protocol cannot settle it (admins). Refused
    /// where it contradicts the decision, and while a call for it is in flight whose
    /// answer may settle it or do again what was done by hand: any call for a branch
    /// still owed phase 2 or a one-phase probe; a saga step's own call (--commit) or,
    /// while compensating, any call for the step (--abort). Pause first.
    Resolve {
        #[command(flatten)]
        verb: VerbArgs,
        /// The branch (saga: step) to resolve.
        #[arg(long)]
        branch: String,
        /// Its work stands (committed, or applied by hand). A saga step so resolved
        /// that must later be compensated waits for an operator to state it undone.
        #[arg(long, conflicts_with = "abort", required_unless_present = "abort")]
        commit: bool,
        /// Its work is not there (aborted, compensated, or undone by hand).
        #[arg(long)]
        abort: bool,
    },
    /// Remove final transactions from memory and the log (admins).
    Forget(VerbArgs),
    /// Print each state change of a transaction until it is final. Exit 1, naming the
    /// last state seen, if the watch ends before (the coordinator stopped).
    Watch { transaction_id: String },
    /// What a participant in doubt would be told (COMMIT, ABORT or PENDING).
    Outcome { transaction_id: String },
}

/// What every operator verb takes.
#[derive(Debug, Clone, clap::Args)]
pub struct VerbArgs {
    #[command(flatten)]
    pub selection: operator::Selection,
    /// Why: kept in each transaction's history.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// One JSON array (one object per transaction) for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StateArg {
    Active,
    Preparing,
    Committing,
    Aborting,
    Committed,
    Aborted,
    Running,
    Compensating,
    Completed,
    Compensated,
}

impl From<StateArg> for TransactionState {
    fn from(state: StateArg) -> Self {
        match state {
            StateArg::Active => TransactionState::Active,
            StateArg::Preparing => TransactionState::Preparing,
            StateArg::Committing => TransactionState::Committing,
            StateArg::Aborting => TransactionState::Aborting,
            StateArg::Committed => TransactionState::Committed,
            StateArg::Aborted => TransactionState::Aborted,
            StateArg::Running => TransactionState::Running,
            StateArg::Compensating => TransactionState::Compensating,
            StateArg::Completed => TransactionState::Completed,
            StateArg::Compensated => TransactionState::Compensated,
        }
    }
}

fn state_name(value: i32) -> &'static str {
    TransactionState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("TRANSACTION_STATE_"))
        .unwrap_or("?")
}

/// `text` from the coordinator with control characters escaped, so that what others
/// wrote into endpoints or reasons cannot move the cursor or recolour the terminal.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    std::borrow::Cow::Owned(escaped)
}

fn summary(txn: &Transaction) -> String {
    let kind = if txn.kind == treaty_proto::v1::TransactionKind::Saga as i32 {
        "saga"
    } else {
        "2pc"
    };
    let mut line = format!(
        "{}  {kind:<4}  {:<12}  {} branch(es)",
        txn.transaction_id,
        state_name(txn.state),
        txn.branches.len()
    );
    if txn.stuck {
        line.push_str("  STUCK");
    }
    if !txn.reason.is_empty() {
        line.push_str(&format!("  ({})", printable(&txn.reason)));
    }
    line
}

fn details(txn: &Transaction) -> String {
    let mut out = summary(txn);
    out.push_str(&format!("\n  created {} ms", txn.created_unix_ms));
    if txn.kind == treaty_proto::v1::TransactionKind::TwoPhase as i32 {
        out.push_str(&format!(
            ", deadline {} ms, prepare timeout {} ms",
            txn.deadline_unix_ms, txn.prepare_timeout_ms
        ));
    }
    if !txn.idempotency_key.is_empty() {
        out.push_str(&format!(
            ", idempotency key {}",
            printable(&txn.idempotency_key)
        ));
    }
    for branch in &txn.branches {
        let state = operator::branch_state_name(branch.state);
        out.push_str(&format!(
            "\n  branch {:<16} {:<17} {} attempts  {}",
            printable(&branch.branch_id),
            state,
            branch.attempts,
            printable(&branch.endpoint)
        ));
        if !branch.last_error.is_empty() {
            out.push_str(&format!("  last error: {}", printable(&branch.last_error)));
        }
        for attempt in &branch.history {
            let operation = operator::operation_name(attempt.operation);
            let result = if attempt.finished_unix_ms == 0 {
                "(in flight)".into()
            } else {
                printable(&attempt.result)
            };
            out.push_str(&format!(
                "\n      at {} ms  {operation:<16} {result}",
                attempt.started_unix_ms
            ));
        }
    }
    for transition in &txn.transitions {
        out.push_str(&format!(
            "\n  at {} ms  -> {}  {}",
            transition.at_unix_ms,
            state_name(transition.state),
            printable(&transition.reason)
        ));
    }
    out
}

/// The coordinator's Coordinator and Admin clients over one connection.
async fn connect(coordinator: &CoordinatorArgs) -> anyhow::Result<(TreatyClient, operator::Admin)> {
    let options = coordinator.client_options();
    let channel = endpoint_with(&coordinator.address, &options)?
        .connect()
        .await?;
    let credentials = credentials(&options)?;
    let admin = treaty_proto::v1::admin_client::AdminClient::with_interceptor(
        channel.clone(),
        credentials.clone(),
    );
    Ok((TreatyClient::from_channel_with(channel, credentials), admin))
}

/// Runs `treaty endpoints`.
pub async fn run_endpoints(coordinator: &CoordinatorArgs, json: bool) -> anyhow::Result<()> {
    let (_, admin) = answered(coordinator.call_timeout(), connect(coordinator)).await?;
    answered(
        coordinator.call_timeout(),
        operator::print_endpoints(admin, json),
    )
    .await
}

/// Runs a `txn` subcommand, printing to stdout.
pub async fn run_txn(coordinator: &CoordinatorArgs, command: TxnCommand) -> anyhow::Result<()> {
    let timeout = coordinator.call_timeout();
    // Bounded as a call: the connection's own timeout covers TCP, not a TLS handshake.
    let (client, admin) = answered(timeout, connect(coordinator)).await?;
    let verb = |verb: operator::Verb, args: VerbArgs, branch: Option<String>| {
        let client = client.clone();
        let admin = admin.clone();
        async move {
            operator::run_verb(
                &client,
                &admin,
                timeout,
                verb,
                &args.selection,
                branch.as_deref(),
                &args.reason,
                args.json,
            )
            .await
        }
    };
    match command {
        TxnCommand::List {
            filter,
            limit,
            json,
        } => {
            let listed = operator::select(&client, timeout, &filter.to_filter(), limit).await?;
            if json {
                let rows: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|t| operator::transaction_json(t, false))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                operator::print_table(&listed, crate::runtime::now_unix_ms());
            }
        }
        TxnCommand::Show {
            transaction_id,
            json,
        } => match answered(timeout, client.get(&transaction_id)).await? {
            Some(txn) if json => println!("{}", operator::transaction_json(&txn, true)),
            Some(txn) => println!("{}", details(&txn)),
            None => anyhow::bail!(
                "unknown transaction {transaction_id} (never begun here, removed after retention, or presumed aborted)"
            ),
        },
        TxnCommand::Report {
            transaction_id,
            json,
        } => match answered(timeout, client.get(&transaction_id)).await? {
            Some(txn) => operator::print_report(&txn, json),
            None => anyhow::bail!("unknown transaction {transaction_id}"),
        },
        TxnCommand::RetryNow(args) => verb(operator::Verb::RetryNow, args, None).await?,
        TxnCommand::Pause(args) => verb(operator::Verb::Pause, args, None).await?,
        TxnCommand::Resume(args) => verb(operator::Verb::Resume, args, None).await?,
        TxnCommand::Cancel(args) => verb(operator::Verb::Cancel, args, None).await?,
        TxnCommand::Forget(args) => verb(operator::Verb::Forget, args, None).await?,
        TxnCommand::Resolve {
            verb: args,
            branch,
            commit,
            abort: _,
        } => verb(operator::Verb::Resolve { commit }, args, Some(branch)).await?,
        TxnCommand::Watch { transaction_id } => {
            let Some(stream) = answered(timeout, client.watch(&transaction_id)).await? else {
                anyhow::bail!("unknown transaction {transaction_id}");
            };
            let mut stream = std::pin::pin!(stream);
            // The coordinator also ends the stream, without an error, when it stops:
            // only a final state is the end the watch waits for.
            let mut last_state = None;
            while let Some(update) = stream.next().await {
                // A ping unanswered for the call timeout ends the stream too.
                let update = update.with_context(|| {
                    format!("the watch ended before transaction {transaction_id} did")
                })?;
                println!(
                    "{} ms  {}  {}",
                    update.transition.at_unix_ms,
                    state_name(update.transition.state),
                    printable(&update.transition.reason)
                );
                last_state = Some(update.transaction.state);
            }
            let is_final = |state: i32| {
                crate::api::pb::state_from_pb("state", state).is_ok_and(|s| s.is_final())
            };
            match last_state {
                Some(state) if is_final(state) => {}
                Some(state) => anyhow::bail!(
                    "the watch ended before transaction {transaction_id} did (last state seen: \
                     {}); the coordinator may have stopped",
                    state_name(state)
                ),
                None => anyhow::bail!(
                    "the watch ended before transaction {transaction_id} did (no state seen); \
                     the coordinator may have stopped"
                ),
            }
        }
        TxnCommand::Outcome { transaction_id } => {
            let decision = answered(timeout, client.outcome(&transaction_id)).await?;
            println!(
                "{}",
                match decision {
                    Decision::Commit => "COMMIT",
                    Decision::Abort => "ABORT",
                    Decision::Pending => "PENDING",
                }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `treaty ARGS` as clap parses it.
    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("treaty").chain(args.iter().copied()))
    }

    /// `--limit 0` selected nothing and exited 0 ("no transaction matches"): a usage
    /// error naming the flag instead, for `txn list` and for every verb's selection.
    #[test]
    fn a_limit_outside_its_range_is_a_usage_error_naming_the_flag() {
        for args in [
            &["txn", "list", "--limit", "0"][..],
            &["txn", "list", "--limit", "100001"],
            &["txn", "pause", "--state", "active", "--limit", "0"],
            &["txn", "forget", "--state", "committed", "--limit", "100001"],
            &[
                "txn", "resolve", "--stuck", "--branch", "b", "--abort", "--limit", "0",
            ],
        ] {
            let error = parse(args).expect_err(&format!("{args:?} was accepted"));
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}"
            );
            assert!(error.to_string().contains("--limit"), "{args:?}: {error}");
        }
        for args in [
            &["txn", "list", "--limit", "1"][..],
            &["txn", "list", "--limit", "100000"],
            &["txn", "cancel", "--state", "active", "--limit", "1"],
        ] {
            assert!(parse(args).is_ok(), "{args:?} was refused");
        }
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(printable("plain text"), "plain text");
        assert_eq!(
            printable("red\u{1b}[31m\r\nnext\u{9b}"),
            "red\\u{1b}[31m\\r\\nnext\\u{9b}"
        );
    }
}
