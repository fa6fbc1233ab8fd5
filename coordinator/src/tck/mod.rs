//! `treaty tck`: the conformance kit. It drives a participant as a hostile coordinator
//! would — duplicates, reordering, concurrent copies, late calls, restarts — and checks
//! every answer against the table of docs/PARTICIPANT-PROTOCOL.md, and, through the
//! `treaty.v1.Conformance` service a test participant serves, that its user code acted
//! exactly once and in a legal order.
//!
//! It speaks only the protos, so it checks a participant in any language. What it keeps:
//! - every case uses fresh UUIDv7 transaction ids (as a coordinator names them), so
//!   cases never see each other's records and the kit can run against a participant
//!   that keeps its data;
//! - every call is bounded by `--timeout-ms`, every wait for a restart by
//!   `--restart-timeout-ms` and every wait for in-doubt resolution by
//!   `--in-doubt-within-ms`: the kit always ends;
//! - a case it cannot run (no restart command, unknown retention) is reported
//!   `skipped` with why, never silently left out;
//! - exit status: 0 when no case failed, 1 when one did (or the participant cannot be
//!   reached), 2 for bad command-line input.
//!
//! Files: `target` (the calls), `check` (cases, steps, expectations), `cases` (the
//! table, duplicates, reordering), `failures` (failing user code, malformed requests,
//! the limits), `auth` (calls without the right token),
//! `concurrency`, `late` (past the barrier retention), `stream` (calls on the `Calls`
//! stream: ids, order, withdrawals), `in_doubt` (the stand-in coordinator the
//! participant asks `GetOutcome`), `restart`, `report`.

mod auth;
mod cases;
mod check;
mod concurrency;
mod failures;
mod in_doubt;
mod late;
mod report;
mod restart;
mod stream;
mod target;

use std::path::PathBuf;

use treaty_sdk::client::{ClientOptions, ClientTlsFiles};

use check::{Case, Ctx, Presenting, Settings};
use report::CaseResult;
use target::{Branch, Target};

/// Longest call timeout and restart wait accepted: ten minutes.
const MAX_WAIT_MS: u64 = 600_000;

/// The participant's channel pings only after this long without a frame: the 5 minutes
/// that gRPC servers permit between pings by default.
const PARTICIPANT_KEEPALIVE_INTERVAL_MS: u64 = 300_000;

/// `treaty tck`: check a participant against the participant protocol.
#[derive(Clone, clap::Args)]
pub struct TckArgs {
    /// The participant to check: `http://host:port` or `https://host:port` (not needed
    /// with `--list`).
    #[arg(long, required_unless_present = "list")]
    pub participant: Option<String>,
    /// Where it serves `treaty.v1.Conformance` (default: the participant's endpoint).
    #[arg(long)]
    pub conformance: Option<String>,
    /// Bearer token to present, as the coordinator does (prefer the environment
    /// variable: flags are visible to other users).
    #[arg(long, env = "TREATY_PARTICIPANT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA (PEM) to verify an https:// participant with (default: the system's roots).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for a participant that requires mutual TLS.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// A shell command (run with `sh -c`) that restarts the participant, e.g. kills it
    /// with SIGKILL and lets its supervisor start it again. It may return at once: the
    /// kit then waits until the participant serves again. Without it the restart cases
    /// are skipped.
    #[arg(long)]
    pub restart_command: Option<String>,
    /// Longest wait for the restart command and for the participant to serve again.
    #[arg(long, default_value_t = 30_000)]
    pub restart_timeout_ms: u64,
    /// The participant's barrier retention, to check calls about older transactions.
    /// Without it those cases are skipped.
    #[arg(long)]
    pub barrier_retention_ms: Option<u64>,
    /// A coordinator endpoint the participant was configured not to trust (its list of
    /// trusted coordinators does not hold it), to check that calls naming it are
    /// refused PERMISSION_DENIED. Without it that case is skipped.
    #[arg(long, value_name = "URL")]
    pub untrusted_coordinator: Option<String>,
    /// Serve a stand-in coordinator's `GetOutcome` here (`host:port`, a specific
    /// address), and name `http://host:port` as the coordinator of the in-doubt cases'
    /// Prepares: the participant must trust it and ask it about its branches in doubt.
    /// Without it those cases are skipped.
    #[arg(long, value_name = "ADDRESS")]
    pub coordinator_listen: Option<std::net::SocketAddr>,
    /// Longest wait for the participant to ask `GetOutcome`, and to apply the decision
    /// it was given.
    #[arg(long, default_value_t = 30_000)]
    pub in_doubt_within_ms: u64,
    /// Run only the cases whose name contains one of these comma-separated words
    /// (e.g. `reorder,restart.yes`).
    #[arg(long)]
    pub cases: Option<String>,
    /// Longest wait for each call.
    #[arg(long, default_value_t = 5_000)]
    pub timeout_ms: u64,
    /// One JSON object for scripts instead of lines.
    #[arg(long)]
    pub json: bool,
    /// List the cases and what each checks, then exit.
    #[arg(long)]
    pub list: bool,
}

impl std::fmt::Debug for TckArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TckArgs")
            .field("participant", &self.participant)
            .field("conformance", &self.conformance)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("restart_command", &self.restart_command)
            .field("cases", &self.cases)
            .finish_non_exhaustive()
    }
}

/// A command-line mistake: printed, exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(String);

impl TckArgs {
    fn validate(&self) -> Result<(), UsageError> {
        let bad = |message: String| Err(UsageError(message));
        for (flag, endpoint) in [
            ("--participant", self.participant.as_ref()),
            ("--conformance", self.conformance.as_ref()),
            (
                "--untrusted-coordinator",
                self.untrusted_coordinator.as_ref(),
            ),
        ] {
            if let Some(endpoint) = endpoint {
                if let Err(error) = treaty_sdk::limits::check_endpoint(flag, endpoint) {
                    return bad(error.to_string());
                }
            }
        }
        for (flag, value) in [
            ("--timeout-ms", self.timeout_ms),
            ("--restart-timeout-ms", self.restart_timeout_ms),
            ("--in-doubt-within-ms", self.in_doubt_within_ms),
        ] {
            if !(1..=MAX_WAIT_MS).contains(&value) {
                return bad(format!("{flag}: {value} is not in 1..={MAX_WAIT_MS}"));
            }
        }
        if self
            .coordinator_listen
            .is_some_and(|address| address.ip().is_unspecified())
        {
            return bad(
                "--coordinator-listen: give a specific address (the participant is told \
                 http:// and it), not an unspecified one"
                    .into(),
            );
        }
        if let (Some(untrusted), Some(listen)) =
            (&self.untrusted_coordinator, self.coordinator_listen)
        {
            let canonical = |endpoint: &str| {
                treaty_sdk::limits::canonical_endpoint("endpoint", endpoint)
                    .unwrap_or_else(|_| endpoint.to_string())
            };
            if canonical(untrusted) == canonical(&format!("http://{listen}")) {
                return bad(format!(
                    "--untrusted-coordinator: {untrusted} is the kit's own coordinator \
                     (--coordinator-listen), which the participant must trust"
                ));
            }
        }
        if self.barrier_retention_ms == Some(0) {
            return bad("--barrier-retention-ms: must be at least 1".into());
        }
        if self
            .restart_command
            .as_deref()
            .is_some_and(|c| c.trim().is_empty())
        {
            return bad("--restart-command: must not be empty".into());
        }
        Ok(())
    }

    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            tls: Some(ClientTlsFiles {
                ca: self.ca.clone(),
                cert: self.cert.clone(),
                key: self.key.clone(),
            }),
            token: self.token.clone(),
            // Each call has its own timeout; pings every 10 s on a long call would be
            // policed by gRPC servers in other languages (GOAWAY "too_many_pings" after
            // a few within their 5 minutes).
            keepalive_interval_ms: PARTICIPANT_KEEPALIVE_INTERVAL_MS,
            ..Default::default()
        }
    }

    /// Whether the case named `name` is selected by `--cases`.
    fn selects(&self, name: &str) -> bool {
        match &self.cases {
            None => true,
            Some(filter) => filter
                .split(',')
                .map(str::trim)
                .filter(|word| !word.is_empty())
                .any(|word| name.contains(word)),
        }
    }
}

/// Every case but the restart ones, in the order they run.
fn ordinary_cases() -> Vec<Case> {
    let mut all = cases::all();
    all.extend(failures::all());
    all.extend(auth::all());
    all.extend(concurrency::all());
    all.extend(late::all());
    all.extend(stream::all());
    all.extend(in_doubt::all());
    all
}

/// Runs the kit and returns the process's exit status.
pub async fn run(args: TckArgs) -> i32 {
    if let Err(error) = args.validate() {
        eprintln!("error: {error}");
        return 2;
    }
    if args.list {
        for case in ordinary_cases() {
            println!("{:<40} {}", case.name, case.checks);
        }
        for (name, checks) in restart::names() {
            println!("{name:<40} {checks}");
        }
        return 0;
    }
    let Some(participant) = args.participant.clone() else {
        eprintln!("error: --participant: name the participant to check");
        return 2;
    };
    let conformance = args
        .conformance
        .clone()
        .unwrap_or_else(|| participant.clone());
    let options = args.client_options();
    let timeout_ms = args.timeout_ms;
    let make_target: check::MakeTarget = {
        let (participant, conformance) = (participant.clone(), conformance.clone());
        Box::new(move |credentials| {
            let mut options = options.clone();
            match credentials {
                Presenting::Given => {}
                Presenting::WrongToken => {
                    options.token = Some(wrong_token(options.token.as_deref()));
                }
                Presenting::NoToken => options.token = None,
            }
            Target::new(&participant, &conformance, &options, timeout_ms)
        })
    };
    let settings = Settings {
        token_given: args.token.is_some(),
        cert_given: args.cert.is_some(),
        barrier_retention_ms: args.barrier_retention_ms,
        untrusted_coordinator: args.untrusted_coordinator.clone(),
        restart_command: args.restart_command.clone(),
        restart_timeout_ms: args.restart_timeout_ms,
    };
    // Served only when a case that names it runs.
    let in_doubt_selected = ordinary_cases()
        .iter()
        .map(|case| case.name)
        .chain(restart::names().map(|(name, _)| name))
        .any(|name| name.contains("in-doubt") && args.selects(name));
    let coordinator = match args.coordinator_listen {
        Some(listen) if in_doubt_selected => {
            let within = std::time::Duration::from_millis(args.in_doubt_within_ms);
            match in_doubt::serve(listen, within).await {
                Ok(serving) => Some(serving),
                Err(error) => {
                    eprintln!("error: {error}");
                    return 1;
                }
            }
        }
        _ => None,
    };
    let ctx = match Ctx::new(make_target, settings, coordinator) {
        Ok(ctx) => ctx,
        Err(error) => {
            eprintln!("error: {error}");
            return 2;
        }
    };
    if let Err(error) = preflight(&ctx).await {
        eprintln!("error: cannot check {participant}: {error}");
        return 1;
    }
    if !args.json {
        println!("treaty tck: checking {participant} (effects from {conformance})");
        if let Some(serving) = &ctx.coordinator {
            println!(
                "treaty tck: answering GetOutcome as the coordinator {}",
                serving.endpoint
            );
        }
    }
    let mut results = Vec::new();
    for case in ordinary_cases()
        .into_iter()
        .filter(|c| args.selects(c.name))
    {
        let result = CaseResult {
            name: case.name,
            checks: case.checks,
            outcome: (case.run)(&ctx).await,
        };
        if !args.json {
            println!("{}", report::line(&result));
        }
        results.push(result);
    }
    for result in restart::run(&ctx, |name| args.selects(name)).await {
        if !args.json {
            println!("{}", report::line(&result));
        }
        results.push(result);
    }
    let summary = report::summary(&results);
    if args.json {
        println!("{}", report::json(&participant, &conformance, &results));
    } else {
        println!("{}", report::summary_line(summary));
    }
    if summary.failed > 0 { 1 } else { 0 }
}

/// A well-formed bearer token other than `given`.
fn wrong_token(given: Option<&str>) -> String {
    const WRONG: &str = "treaty-tck-not-the-participants-token";
    if given == Some(WRONG) {
        format!("{WRONG}-either")
    } else {
        WRONG.to_string()
    }
}

/// Checks that the conformance service answers before any case runs, so that an
/// unreachable participant is one clear error rather than every case failing.
async fn preflight(ctx: &Ctx) -> Result<(), String> {
    match ctx.target().effects(&Branch::fresh()).await {
        Ok(effects) if effects.is_empty() => Ok(()),
        Ok(effects) => Err(format!(
            "Conformance.Effects lists {} effect(s) for a branch never used",
            effects.len()
        )),
        Err(answer) if answer.name() == "UNIMPLEMENTED" => Err(
            "it does not serve treaty.v1.Conformance (a test participant must; see \
             docs/PARTICIPANT-PROTOCOL.md, \"Checking a participant\"), or --conformance \
             names the wrong endpoint"
                .into(),
        ),
        Err(answer) => Err(format!("Conformance.Effects answered {answer}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        tck: TckArgs,
    }

    fn args(extra: &[&str]) -> TckArgs {
        let mut argv = vec!["tck", "--participant", "http://127.0.0.1:7001"];
        argv.extend_from_slice(extra);
        Wrapper::parse_from(argv).tck
    }

    #[test]
    fn cases_are_selected_by_any_word_of_the_filter() {
        let all = args(&[]);
        assert!(all.selects("restart.yes-survives"));
        let some = args(&["--cases", "reorder, restart.yes"]);
        assert!(some.selects("reorder.abort-before-prepare"));
        assert!(some.selects("restart.yes-survives"));
        assert!(!some.selects("restart.commit-survives"));
        assert!(!some.selects("dup.prepare"));
    }

    #[test]
    fn case_names_are_unique() {
        let mut names: Vec<&str> = ordinary_cases().iter().map(|c| c.name).collect();
        names.extend(restart::names().map(|(name, _)| name));
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
    }

    #[test]
    fn bad_flags_are_refused_naming_the_flag() {
        assert!(args(&[]).validate().is_ok());
        for (extra, flag) in [
            (vec!["--conformance", "127.0.0.1:1"], "--conformance"),
            (vec!["--timeout-ms", "0"], "--timeout-ms"),
            (
                vec!["--restart-timeout-ms", "600001"],
                "--restart-timeout-ms",
            ),
            (
                vec!["--barrier-retention-ms", "0"],
                "--barrier-retention-ms",
            ),
            (vec!["--restart-command", " "], "--restart-command"),
        ] {
            let error = args(&extra).validate().unwrap_err().to_string();
            assert!(error.starts_with(flag), "{error}");
        }
        let mut bad = args(&[]);
        bad.participant = Some("ftp://x:1".into());
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .starts_with("--participant")
        );
    }

    #[test]
    fn answers_are_named_as_the_table_names_them() {
        use target::Answer;
        use treaty_proto::v1 as pb;
        let vote = Answer::Vote {
            vote: pb::Vote::No as i32,
            reason: "no stock".into(),
        };
        assert_eq!(vote.name(), "VOTE_NO");
        assert_eq!(vote.to_string(), "VOTE_NO (\"no stock\")");
        let status = Answer::Status {
            code: tonic::Code::InvalidArgument,
            message: "branch_id: must not be empty".into(),
        };
        assert_eq!(status.name(), "INVALID_ARGUMENT");
        assert_eq!(Answer::Abort(7).name(), "unknown value 7");
        assert!(check::expect("step", vote, "VOTE_YES").is_err());
    }
}
