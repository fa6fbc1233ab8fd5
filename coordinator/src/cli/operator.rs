//! `treaty txn` operator verbs (retry-now, pause, resume, cancel, resolve, forget), the
//! heuristic report, and `treaty endpoints`: tables for people, `--json` for scripts.
//!
//! A verb acts on one transaction id or on every transaction a filter selects (at most
//! `--limit`, listed through the API first, each then acted on by its id): the
//! coordinator checks each one when it acts, so a transaction that changed in between
//! is reported as not applied, never acted on blindly. A filter without any condition is
//! refused: an operator must say what to touch.

use std::time::Duration;

use serde_json::{Value, json};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use treaty_proto::v1 as pb;
use treaty_proto::v1::admin_client::AdminClient;
use treaty_sdk::auth::Credentials;
use treaty_sdk::client::{Transaction, TransactionFilter, TransactionState, TreatyClient};

use super::{StateArg, answered, printable, state_name};

pub type Admin = AdminClient<InterceptedService<Channel, Credentials>>;

/// Which transactions a verb or a list acts on.
#[derive(Debug, Clone, clap::Args)]
pub struct Selection {
    /// One transaction; or leave it out and select with the filters below.
    pub transaction_id: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Most transactions to act on (or print), 1 to 100000; a note on stderr says when
    /// more may match.
    #[arg(long, default_value_t = 100, value_parser = limit_parser())]
    pub limit: usize,
}

/// The most `--limit` takes: 100 pages of the largest a page asks for.
pub const MAX_LIMIT: u64 = 100_000;

/// `--limit`: at least 1 (0 selected nothing and exited 0), at most [`MAX_LIMIT`].
pub fn limit_parser() -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=MAX_LIMIT)
}

#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only transactions in this state (repeatable).
    #[arg(long = "state", value_enum)]
    pub states: Vec<StateArg>,
    /// Only transactions flagged stuck (a delivery or compensation keeps failing, or a
    /// saga step waits for an operator).
    #[arg(long)]
    pub stuck: bool,
    /// Only transactions created longer ago than this ("90s", "15m", "2h", "1d"; at
    /// least 1ms).
    #[arg(long, value_parser = parse_older_than)]
    pub older_than: Option<Duration>,
    /// Only transactions with a branch (or saga step) at this participant endpoint.
    #[arg(long)]
    pub endpoint: Option<String>,
}

/// An age of at least a millisecond: the coordinator takes 0 ms as no condition, so a
/// shorter one would select everything while the command line counted it as a filter.
fn parse_older_than(text: &str) -> Result<Duration, String> {
    let age = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if age < Duration::from_millis(1) {
        return Err(format!(
            "{text} is less than 1ms, which would select everything"
        ));
    }
    Ok(age)
}

impl FilterArgs {
    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
            && !self.stuck
            && self.older_than.is_none()
            && self.endpoint.is_none()
    }

    pub fn to_filter(&self) -> TransactionFilter {
        TransactionFilter {
            states: self
                .states
                .iter()
                .map(|s| TransactionState::from(*s))
                .collect(),
            stuck: self.stuck,
            older_than_ms: self
                .older_than
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            endpoint: self.endpoint.clone(),
        }
    }
}

/// What an operator verb does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    RetryNow,
    Pause,
    Resume,
    Cancel,
    Resolve { commit: bool },
    Forget,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::RetryNow => "retry-now",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Cancel => "cancel",
            Verb::Resolve { commit: true } => "resolve --commit",
            Verb::Resolve { commit: false } => "resolve --abort",
            Verb::Forget => "forget",
        }
    }
}

/// The most pages one selection asks for.
const MAX_PAGES: usize = 1000;

/// Up to `limit` transactions matching `filter`, page by page, waiting at most
/// `timeout` for each (bounded: each page advances the token, and it stops at `limit`
/// or after `MAX_PAGES` pages, saying so on stderr whenever the coordinator gave a
/// token for more).
pub async fn select(
    client: &TreatyClient,
    timeout: Duration,
    filter: &TransactionFilter,
    limit: usize,
) -> anyhow::Result<Vec<Transaction>> {
    let mut selected = Vec::new();
    let mut token = String::new();
    for _ in 0..MAX_PAGES {
        if selected.len() >= limit {
            break;
        }
        let page_size = (limit - selected.len()).min(1000) as u32;
        let (page, next) =
            answered(timeout, client.list_filtered(filter, page_size, &token)).await?;
        selected.extend(page);
        match next {
            Some(next) => token = next,
            None => {
                token.clear();
                break;
            }
        }
    }
    if !token.is_empty() {
        if selected.len() >= limit {
            eprintln!(
                "treaty: stopped at --limit {limit}; more transactions may match (a larger \
                 --limit or a narrower filter)"
            );
        } else {
            eprintln!(
                "treaty: stopped after {MAX_PAGES} pages with {} found; more transactions may \
                 match",
                selected.len()
            );
        }
    }
    selected.truncate(limit);
    Ok(selected)
}

/// The ids a verb acts on: the one given, or those the filter selects.
async fn targets(
    client: &TreatyClient,
    timeout: Duration,
    selection: &Selection,
) -> anyhow::Result<Vec<String>> {
    match &selection.transaction_id {
        Some(id) => {
            if !selection.filter.is_empty() {
                anyhow::bail!("give a transaction id or filters, not both");
            }
            Ok(vec![id.clone()])
        }
        None if selection.filter.is_empty() => anyhow::bail!(
            "name a transaction id, or select with --state, --stuck, --older-than or --endpoint"
        ),
        None => Ok(select(
            client,
            timeout,
            &selection.filter.to_filter(),
            selection.limit,
        )
        .await?
        .into_iter()
        .map(|t| t.transaction_id)
        .collect()),
    }
}

/// What became of a verb on one transaction, as far as the command knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VerbOutcome {
    /// The coordinator applied it.
    Applied,
    /// The coordinator answered that it did not, or refused the request.
    NotApplied,
    /// No answer came, or the call failed in a way that does not say: it may have been
    /// applied.
    Unknown,
    /// Not sent: the coordinator had stopped answering.
    NotAttempted,
}

impl VerbOutcome {
    /// From a call that failed: only the coordinator's refusal of the request, or a
    /// connection it refused (nothing was sent), says that nothing was done; a broken
    /// connection or a server failure does not. Any other status with a source was made
    /// by this client from a transport error (an HTTP/2 reset can read as
    /// RESOURCE_EXHAUSTED or PERMISSION_DENIED), and an answer too large to decode
    /// (OUT_OF_RANGE) came after the verb was applied.
    fn of_failed_call(status: &tonic::Status) -> Self {
        use tonic::Code;
        if let Some(source) = std::error::Error::source(status) {
            return if connection_refused(source) {
                VerbOutcome::NotApplied
            } else {
                VerbOutcome::Unknown
            };
        }
        match status.code() {
            Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Unimplemented => VerbOutcome::NotApplied,
            _ => VerbOutcome::Unknown,
        }
    }

    /// The JSON field `outcome`.
    fn name(self) -> &'static str {
        match self {
            VerbOutcome::Applied => "applied",
            VerbOutcome::NotApplied => "not_applied",
            VerbOutcome::Unknown => "unknown",
            VerbOutcome::NotAttempted => "not_attempted",
        }
    }

    /// The text column.
    fn text(self) -> &'static str {
        match self {
            VerbOutcome::Applied => "applied",
            VerbOutcome::NotApplied => "not applied",
            VerbOutcome::Unknown => "unknown",
            VerbOutcome::NotAttempted => "not attempted",
        }
    }
}

/// Whether `error`, or an error it was made from, is a connection the peer refused: the
/// request never left this process.
fn connection_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    // Bounded: a chain of sources is finite, but nothing stops a cycle.
    for _ in 0..32 {
        let Some(error) = next else { return false };
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        next = error.source();
    }
    false
}

/// Runs `verb` on each selected transaction, waiting at most `timeout` for each, and
/// prints one line (or JSON object) per transaction. Fails (exit 1) if any was not
/// applied or failed. When the coordinator does not answer in time, or the call fails
/// without saying that nothing was done, it stops there: that transaction's outcome is
/// unknown (the verb may have been applied), and each one after it is not attempted.
#[allow(clippy::too_many_arguments)] // one per part of the command line
pub async fn run_verb(
    client: &TreatyClient,
    admin: &Admin,
    timeout: Duration,
    verb: Verb,
    selection: &Selection,
    branch_id: Option<&str>,
    reason: &str,
    json_output: bool,
) -> anyhow::Result<()> {
    let ids = targets(client, timeout, selection).await?;
    let mut results = Vec::with_capacity(ids.len());
    for (done, id) in ids.iter().enumerate() {
        let answer = tokio::time::timeout(timeout, act(admin.clone(), verb, id, branch_id, reason));
        let (outcome, detail, transaction) = match answer.await {
            Ok(Ok(response)) => {
                let outcome = if response.applied {
                    VerbOutcome::Applied
                } else {
                    VerbOutcome::NotApplied
                };
                (outcome, response.detail, response.transaction)
            }
            Ok(Err(status)) => {
                let outcome = VerbOutcome::of_failed_call(&status);
                let detail = match outcome {
                    VerbOutcome::Unknown => format!(
                        "{}: {}; it may have been applied (`treaty txn show`)",
                        status.code(),
                        status.message()
                    ),
                    _ if std::error::Error::source(&status).is_some() => {
                        "the coordinator refused the connection: nothing was sent".to_string()
                    }
                    _ => status.message().to_string(),
                };
                (outcome, detail, None)
            }
            Err(_) => (
                VerbOutcome::Unknown,
                format!(
                    "no answer within {timeout:?}: it may have been applied (`treaty txn show`)"
                ),
                None,
            ),
        };
        results.push((id.clone(), outcome, detail, transaction));
        if outcome == VerbOutcome::Unknown {
            for rest in &ids[done + 1..] {
                let skipped = "not attempted: the coordinator stopped answering".to_string();
                results.push((rest.clone(), VerbOutcome::NotAttempted, skipped, None));
            }
            break;
        }
    }
    if json_output {
        let rows: Vec<Value> = results
            .iter()
            .map(|(id, outcome, detail, transaction)| {
                json!({
                    "transaction_id": id,
                    "verb": verb.name(),
                    "applied": *outcome == VerbOutcome::Applied,
                    "outcome": outcome.name(),
                    "detail": detail,
                    "state": transaction.as_ref().map(|t| state_name(t.state)),
                })
            })
            .collect();
        println!("{}", Value::Array(rows));
    } else {
        if results.is_empty() {
            println!("no transaction matches");
        }
        for (id, outcome, detail, transaction) in &results {
            let state = transaction.as_ref().map_or("", |t| state_name(t.state));
            println!(
                "{id}  {:<16} {:<13} {state:<12} {}",
                verb.name(),
                outcome.text(),
                printable(detail)
            );
        }
    }
    if results
        .iter()
        .any(|(_, outcome, _, _)| *outcome != VerbOutcome::Applied)
    {
        anyhow::bail!("{} not applied to every transaction selected", verb.name());
    }
    Ok(())
}

async fn act(
    mut admin: Admin,
    verb: Verb,
    id: &str,
    branch_id: Option<&str>,
    reason: &str,
) -> Result<pb::OperatorResponse, tonic::Status> {
    let request = pb::OperatorRequest {
        transaction_id: id.to_string(),
        reason: reason.to_string(),
    };
    let response = match verb {
        Verb::RetryNow => admin.retry_now(request).await,
        Verb::Pause => admin.pause(request).await,
        Verb::Resume => admin.resume(request).await,
        Verb::Cancel => admin.cancel(request).await,
        Verb::Forget => admin.forget(request).await,
        Verb::Resolve { commit } => {
            let outcome = if commit {
                pb::Resolution::Commit
            } else {
                pb::Resolution::Abort
            };
            admin
                .resolve(pb::ResolveRequest {
                    transaction_id: id.to_string(),
                    branch_id: branch_id.unwrap_or_default().to_string(),
                    outcome: outcome as i32,
                    reason: reason.to_string(),
                })
                .await
        }
    };
    response.map(tonic::Response::into_inner)
}

fn age_text(created_unix_ms: u64, now_unix_ms: u64) -> String {
    let seconds = now_unix_ms.saturating_sub(created_unix_ms) / 1000;
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

fn kind_name(txn: &Transaction) -> &'static str {
    if txn.kind == pb::TransactionKind::Saga as i32 {
        "saga"
    } else {
        "2pc"
    }
}

pub fn branch_state_name(value: i32) -> &'static str {
    pb::BranchState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("BRANCH_STATE_"))
        .unwrap_or("?")
}

pub fn operation_name(value: i32) -> &'static str {
    pb::Operation::try_from(value)
        .map(|o| o.as_str_name().trim_start_matches("OPERATION_"))
        .unwrap_or("?")
}

/// A transaction for scripts: the fields people filter on, and every branch, with its
/// latest calls if `with_history` (`txn show`; `txn list` pages stay small). A branch is
/// `in_flight` while the coordinator waits for an answer to a call for it (so an
/// operator waits before resolving it); a final transaction waits for none.
pub fn transaction_json(txn: &Transaction, with_history: bool) -> Value {
    let waiting = !crate::api::pb::state_from_pb("state", txn.state).is_ok_and(|s| s.is_final());
    json!({
        "transaction_id": txn.transaction_id,
        "kind": kind_name(txn),
        "state": state_name(txn.state),
        "created_unix_ms": txn.created_unix_ms,
        "deadline_unix_ms": txn.deadline_unix_ms,
        "stuck": txn.stuck,
        "paused": txn.paused,
        "reason": txn.reason,
        "idempotency_key": txn.idempotency_key,
        "branches": txn.branches.iter().map(|b| json!({
            "branch_id": b.branch_id,
            "endpoint": b.endpoint,
            "state": branch_state_name(b.state),
            "attempts": b.attempts,
            "compensation_attempts": b.compensation_attempts,
            "last_error": b.last_error,
            "heuristic": b.heuristic,
            "resolution": b.resolution.as_ref().map(resolution_json),
            "in_flight": waiting && b.history.iter().any(|a| a.finished_unix_ms == 0),
            "history": with_history.then(|| b.history.iter().map(|a| {
                let finished = a.finished_unix_ms != 0;
                json!({
                    "operation": operation_name(a.operation),
                    "started_unix_ms": a.started_unix_ms,
                    "finished_unix_ms": finished.then_some(a.finished_unix_ms),
                    "result": finished.then_some(&a.result),
                })
            }).collect::<Vec<_>>()),
        })).collect::<Vec<_>>(),
        "transitions": txn.transitions.iter().map(|t| json!({
            "state": state_name(t.state),
            "at_unix_ms": t.at_unix_ms,
            "reason": t.reason,
        })).collect::<Vec<_>>(),
    })
}

fn resolution_json(resolution: &pb::BranchResolution) -> Value {
    json!({
        "outcome": resolution_name(resolution.outcome),
        "by": resolution.by,
        "at_unix_ms": resolution.at_unix_ms,
        "reason": resolution.reason,
    })
}

fn resolution_name(value: i32) -> &'static str {
    match pb::Resolution::try_from(value) {
        Ok(pb::Resolution::Commit) => "commit",
        Ok(pb::Resolution::Abort) => "abort",
        _ => "?",
    }
}

/// The list as a table: one row per transaction.
pub fn print_table(transactions: &[Transaction], now_unix_ms: u64) {
    println!(
        "{:<36}  {:<4}  {:<12}  {:>10}  {:>8}  {:<14}  REASON",
        "ID", "KIND", "STATE", "AGE", "BRANCHES", "FLAGS"
    );
    for txn in transactions {
        let mut flags = Vec::new();
        if txn.stuck {
            flags.push("STUCK");
        }
        if txn.paused {
            flags.push("PAUSED");
        }
        if txn.branches.iter().any(|b| !b.heuristic.is_empty()) {
            flags.push("HEURISTIC");
        }
        println!(
            "{:<36}  {:<4}  {:<12}  {:>10}  {:>8}  {:<14}  {}",
            txn.transaction_id,
            kind_name(txn),
            state_name(txn.state),
            age_text(txn.created_unix_ms, now_unix_ms),
            txn.branches.len(),
            flags.join(","),
            printable(&txn.reason)
        );
    }
}

/// What each branch of `txn` applied, as far as the coordinator knows: the heuristic
/// report. "unknown" means no participant answer settles it yet.
pub fn branch_report(txn: &Transaction) -> Vec<(String, &'static str, String)> {
    let decided_commit = matches!(
        pb::TransactionState::try_from(txn.state),
        Ok(pb::TransactionState::Committing
            | pb::TransactionState::Committed
            | pb::TransactionState::Completed)
    );
    txn.branches
        .iter()
        .map(|b| {
            let state = pb::BranchState::try_from(b.state).unwrap_or(pb::BranchState::Unspecified);
            let applied = match state {
                pb::BranchState::Committed => "committed",
                pb::BranchState::Aborted | pb::BranchState::VotedNo => "aborted",
                pb::BranchState::ReadOnly => "nothing (read-only)",
                pb::BranchState::Compensated => "compensated",
                pb::BranchState::Rejected => "nothing (rejected)",
                pb::BranchState::Skipped | pb::BranchState::Pending => "nothing (never ran)",
                pb::BranchState::AwaitingOperator => {
                    "undone by its participant; work done by hand, if any, stands"
                }
                _ => "unknown",
            };
            let mut note = String::new();
            if !b.heuristic.is_empty() {
                note.push_str(&format!(
                    "HEURISTIC: {} (the decision was {})",
                    printable(&b.heuristic),
                    if decided_commit { "commit" } else { "abort" }
                ));
            } else if applied == "unknown" && !b.last_error.is_empty() {
                note.push_str(&format!("last error: {}", printable(&b.last_error)));
            } else if state == pb::BranchState::AwaitingOperator {
                note.push_str(
                    "awaits an operator: undo any work done by hand, then resolve --abort",
                );
            }
            if let Some(resolution) = &b.resolution {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                let by = if resolution.by.is_empty() {
                    "an operator"
                } else {
                    resolution.by.as_str()
                };
                note.push_str(&format!(
                    "resolved as {} by {by} at {} ms: {}",
                    resolution_name(resolution.outcome),
                    resolution.at_unix_ms,
                    printable(&resolution.reason)
                ));
            }
            (b.branch_id.clone(), applied, note)
        })
        .collect()
}

pub fn print_report(txn: &Transaction, json_output: bool) {
    let rows = branch_report(txn);
    if json_output {
        let branches: Vec<Value> = rows
            .iter()
            .zip(&txn.branches)
            .map(|((id, applied, note), b)| {
                json!({
                    "branch_id": id,
                    "endpoint": b.endpoint,
                    "applied": applied,
                    "heuristic": b.heuristic,
                    "resolution": b.resolution.as_ref().map(resolution_json),
                    "note": note,
                })
            })
            .collect();
        let report = json!({
            "transaction_id": txn.transaction_id,
            "state": state_name(txn.state),
            "heuristic": txn.branches.iter().any(|b| !b.heuristic.is_empty()),
            "branches": branches,
        });
        println!("{report}");
        return;
    }
    println!(
        "{}  {}  {}",
        txn.transaction_id,
        kind_name(txn),
        state_name(txn.state)
    );
    println!("  {:<24} {:<20} NOTE", "BRANCH", "APPLIED");
    for (id, applied, note) in rows {
        println!("  {:<24} {applied:<20} {note}", printable(&id));
    }
}

/// `treaty endpoints`: every participant endpoint the coordinator called lately.
pub async fn print_endpoints(mut admin: Admin, json_output: bool) -> anyhow::Result<()> {
    let endpoints = admin
        .list_endpoints(pb::ListEndpointsRequest {})
        .await?
        .into_inner()
        .endpoints;
    let circuit = |value: i32| {
        pb::CircuitState::try_from(value)
            .map(|s| s.as_str_name().trim_start_matches("CIRCUIT_STATE_"))
            .unwrap_or("?")
    };
    let health = |e: &pb::EndpointHealth| {
        if e.circuit != pb::CircuitState::Closed as i32 {
            "down"
        } else if e.recent_failures > 0 {
            "failing"
        } else {
            "ok"
        }
    };
    let transport = |e: &pb::EndpointHealth| match pb::CallTransport::try_from(e.transport) {
        Ok(pb::CallTransport::Stream) => "stream",
        Ok(pb::CallTransport::Unary) => "unary",
        Ok(pb::CallTransport::NoStreamOpen) => "none open",
        _ => "?",
    };
    let error_rate = |e: &pb::EndpointHealth| {
        if e.recent_calls == 0 {
            0.0
        } else {
            f64::from(e.recent_failures) / f64::from(e.recent_calls)
        }
    };
    if json_output {
        let rows: Vec<Value> = endpoints
            .iter()
            .map(|e| {
                json!({
                    "endpoint": e.endpoint,
                    "health": health(e),
                    "circuit": circuit(e.circuit),
                    "calls_in_flight": e.calls_in_flight,
                    "failures_in_a_row": e.failures_in_a_row,
                    "recent_calls": e.recent_calls,
                    "recent_failures": e.recent_failures,
                    "error_rate": error_rate(e),
                    "last_failure": e.last_failure,
                    "last_failure_unix_ms": e.last_failure_unix_ms,
                    "calls": transport(e),
                })
            })
            .collect();
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<40}  {:<7}  {:<9}  {:<9}  {:>9}  {:>11}  {:>10}  LAST FAILURE",
        "ENDPOINT", "HEALTH", "CIRCUIT", "CALLS", "IN FLIGHT", "CALLS (1m)", "ERROR RATE"
    );
    for e in &endpoints {
        println!(
            "{:<40}  {:<7}  {:<9}  {:<9}  {:>9}  {:>11}  {:>9.1}%  {}",
            printable(&e.endpoint),
            health(e),
            circuit(e.circuit),
            transport(e),
            e.calls_in_flight,
            e.recent_calls,
            error_rate(e) * 100.0,
            printable(&e.last_failure)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a refusal of the request says that nothing was done.
    #[test]
    fn a_failed_call_is_not_applied_only_when_the_request_was_refused() {
        let outcome = |code| VerbOutcome::of_failed_call(&tonic::Status::new(code, "x"));
        for refused in [
            tonic::Code::InvalidArgument,
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
            tonic::Code::FailedPrecondition,
        ] {
            assert_eq!(outcome(refused), VerbOutcome::NotApplied, "{refused:?}");
        }
        for unsaid in [
            tonic::Code::Unavailable,
            tonic::Code::Unknown,
            tonic::Code::Internal,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Cancelled,
            tonic::Code::OutOfRange,
        ] {
            assert_eq!(outcome(unsaid), VerbOutcome::Unknown, "{unsaid:?}");
        }
        // Made by the client from a transport error, whatever its code.
        let mut reset = tonic::Status::new(tonic::Code::ResourceExhausted, "reset");
        reset.set_source(std::sync::Arc::new(std::io::Error::other("reset")));
        assert_eq!(VerbOutcome::of_failed_call(&reset), VerbOutcome::Unknown);
    }

    /// A connection the coordinator's host refused carried nothing: the verb was not
    /// applied, and the operator is not told that it may have been.
    #[tokio::test]
    async fn a_call_whose_connection_was_refused_is_not_applied() {
        // A loopback port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a loopback port")
            .port();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("a valid endpoint")
            .connect_lazy();
        let mut client = AdminClient::new(channel);
        let status = tokio::time::timeout(
            Duration::from_secs(30),
            client.list_endpoints(pb::ListEndpointsRequest {}),
        )
        .await
        .expect("a refused connection fails at once")
        .expect_err("nothing listens there");
        assert!(std::error::Error::source(&status).is_some(), "{status:?}");
        assert_eq!(
            VerbOutcome::of_failed_call(&status),
            VerbOutcome::NotApplied,
            "{status:?}"
        );
    }
}
