//! `treaty bench --recovery --in-flight N`: how long a coordinator takes, after kill -9
//! with N transactions in flight, to resolve them all once it is started again
//! (issue 11: 10,000 in flight, all resolved within 10 s of the restart).
//!
//! The run, with the coordinator and participants as child processes:
//! 1. participants start holding (`treaty bench-participant --hold`, see
//!    [`super::participant`]);
//! 2. N/2 two-phase commits are run whose commits the participants refuse until released:
//!    each is decided (its commit durable in the log) and stays in flight, phase 2
//!    retried with backoff;
//! 3. the other N − N/2 are begun with prepares the participants hold: they stay
//!    undecided (with parallel commit, the default, their intents are in the log; with
//!    `TREATY_PARALLEL_COMMIT=false` in the bench's environment, which its coordinator
//!    inherits, the coordinator keeps them in memory only);
//! 4. once the coordinator reports at least N in progress, it is killed with SIGKILL;
//!    the participants are released (SIGUSR1): held prepares now vote YES and are in
//!    doubt, held commits will succeed;
//! 5. the coordinator is started again on the same data directory and addresses, and
//!    the bench polls every [`POLL`] until the coordinator has nothing in progress and
//!    every participant reports no branch in doubt.
//!
//! Measured from the restart (the spawn of the new process): until it serves (it has
//! announced its addresses), until it has nothing in progress, and until everything is
//! resolved. The decided half is committed by the coordinator's recovery. The undecided
//! half, with parallel commit, is asked again by the coordinator's recovery (its intents
//! name every branch, with its payload) and committed, the participants voting YES from
//! their records; without it (or for one whose intent was not durable at the kill), it is
//! aborted by presumed abort when the participants ask (`GetOutcome`), so the last figure
//! includes the participants' in-doubt poll interval (`--in-doubt-poll-ms`, the SDK's 2 s
//! by default, which is also how long a branch must have been in doubt before it is asked
//! about). A participant's in-doubt gauge is as of its resolver's last
//! pass, so a participant counts as resolved once its gauge reads 0 and it has ended two
//! passes since the release (the second began after it). The coordinator's gauges are
//! rendered at most once a second: its figures may be late by up to that much.
//!
//! "Resolved" is checked, not only timed: the run fails unless the restarted
//! coordinator answers COMMIT for every transaction of the decided half, asked one by
//! one (`GetOutcome`, what a participant in doubt would be told), the participants
//! answered at least that half's branches' commits COMMITTED after the release, and
//! none answered a commit "already aborted" (a branch aborted that a decided commit
//! named). A coordinator that had lost decisions would resolve them quickly too, by
//! presumed abort; totals alone would not show it, since the undecided half may commit.
//!
//! Every wait is bounded (`--recovery-timeout-s`) and fails with what it waited for.

use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinSet;
use treaty_sdk::client::{BeginOptions, BranchSpec, Decision, Outcome, TreatyClient};

use super::cluster::{Cluster, ClusterOptions, ParticipantSettings};
use super::observe;
use super::participant::{HOLD_COMMIT, HOLD_PREPARE};

/// How often the bench looks at the servers' metrics while it waits.
const POLL: Duration = Duration::from_millis(50);
/// Concurrent calls the bench puts on one connection to the coordinator (its servers
/// take 256 per connection).
const CALLS_PER_CONNECTION: usize = 200;
/// The SDK's in-doubt poll interval, when the bench does not set one.
const SDK_IN_DOUBT_POLL_MS: u64 = 2_000;

/// What `--recovery` is run with.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    pub in_flight: usize,
    pub participants: usize,
    pub in_doubt_poll_ms: Option<u64>,
    pub memory_budget_bytes: Option<u64>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoveryReport {
    pub in_flight: usize,
    /// Two-phase commits decided before the kill (their commits held).
    pub decided: usize,
    /// Of those, how many the restarted coordinator answered COMMIT for, asked each.
    pub decided_still_committed: usize,
    /// The coordinator's gauges just before the kill.
    pub in_progress_at_kill: f64,
    pub in_doubt_at_kill: f64,
    pub restart_to_serving_ms: f64,
    /// Until the restarted coordinator had nothing in progress.
    pub restart_to_coordinator_idle_ms: f64,
    /// Until, also, no participant had a branch in doubt.
    pub restart_to_all_resolved_ms: f64,
    /// Transactions the restarted coordinator saw end, by outcome.
    pub committed_after_restart: f64,
    pub aborted_after_restart: f64,
    /// The participants' `GetOutcome` calls after the kill, by answer (branches).
    pub participant_inquiries_commit: f64,
    pub participant_inquiries_abort: f64,
    /// Commits the participants answered COMMITTED after the release, over all branches.
    pub participant_commits_committed: f64,
    /// Commits the participants answered "already aborted" after the release: a branch
    /// aborted that a commit named (0 unless atomicity was lost).
    pub participant_commits_already_aborted: f64,
    pub in_doubt_poll_ms: u64,
}

impl RecoveryReport {
    pub fn lines(&self) -> Vec<String> {
        vec![
            format!(
                "recovery: {} in flight ({} decided, commits held; the rest with prepares held); at the kill the coordinator had {} in progress, {} in doubt",
                self.in_flight, self.decided, self.in_progress_at_kill, self.in_doubt_at_kill
            ),
            format!(
                "  restart to serving {:.0} ms; to nothing in progress {:.0} ms; to all resolved (participants included) {:.0} ms",
                self.restart_to_serving_ms,
                self.restart_to_coordinator_idle_ms,
                self.restart_to_all_resolved_ms
            ),
            format!(
                "  after the restart: {} committed and {} aborted by the coordinator; participants asked and heard COMMIT {} times, ABORT {} times (in-doubt poll {} ms)",
                self.committed_after_restart,
                self.aborted_after_restart,
                self.participant_inquiries_commit,
                self.participant_inquiries_abort,
                self.in_doubt_poll_ms
            ),
            format!(
                "  participants answered {} commits COMMITTED and {} \"already aborted\" after the release; the coordinator answered COMMIT for {} of the {} decided",
                self.participant_commits_committed,
                self.participant_commits_already_aborted,
                self.decided_still_committed,
                self.decided
            ),
        ]
    }

    /// Whether what was resolved was resolved right: every decided commit committed,
    /// at the coordinator and at each of its `participants` branches, and no commit
    /// met an aborted branch.
    fn check(&self, participants: usize) -> anyhow::Result<()> {
        let decided = self.decided as f64;
        let mut wrong = Vec::new();
        if self.decided_still_committed < self.decided {
            wrong.push(format!(
                "the restarted coordinator answered COMMIT for {} of the {} transactions \
                 decided before the kill",
                self.decided_still_committed, self.decided
            ));
        }
        if self.participant_commits_committed < decided * participants as f64 {
            wrong.push(format!(
                "the participants committed {} branches, fewer than the decided half's {}",
                self.participant_commits_committed,
                self.decided * participants
            ));
        }
        if self.participant_commits_already_aborted > 0.0 {
            wrong.push(format!(
                "the participants answered {} commits \"already aborted\"",
                self.participant_commits_already_aborted
            ));
        }
        anyhow::ensure!(
            wrong.is_empty(),
            "recovery resolved transactions wrongly: {}\n{}",
            wrong.join("; "),
            self.lines().join("\n")
        );
        Ok(())
    }
}

pub async fn run(options: &RecoveryOptions) -> anyhow::Result<RecoveryReport> {
    let n = options.in_flight;
    let mut cluster = Cluster::start(&ClusterOptions {
        processes: true,
        participants: options.participants,
        max_active_transactions: (n * 2).max(1_000),
        log_retention_ms: None,
        memory_budget_bytes: options.memory_budget_bytes,
        hold: true,
        participant: ParticipantSettings {
            in_doubt_poll_ms: options.in_doubt_poll_ms,
            ..ParticipantSettings::default()
        },
        endpoint: None,
        coordinator_metrics: None,
        coordinator_pid: None,
    })
    .await?;
    let coordinator_metrics = cluster
        .coordinator_metrics
        .ok_or_else(|| anyhow::anyhow!("the coordinator serves no metrics"))?;
    let deadline = Instant::now() + options.timeout;
    let clients = connect(&cluster.coordinator_endpoint, n).await?;
    let endpoints: Vec<String> = cluster
        .participants
        .iter()
        .map(|p| p.endpoint.clone())
        .collect();
    let decided = n / 2;
    eprintln!("recovery: {decided} two-phase commits decided with their commits held");
    let mut commits = JoinSet::new();
    for i in 0..decided {
        let client = clients[i % clients.len()].clone();
        let branches = branches(HOLD_COMMIT, i, &endpoints);
        commits.spawn(async move { client.run_two_phase(branches, long_options()).await });
    }
    let mut decided_ids = Vec::with_capacity(decided);
    while let Some(joined) =
        within(deadline, "the decided half's commits", commits.join_next()).await?
    {
        let (id, outcome) = joined?.context("a commit of the decided half")?;
        anyhow::ensure!(
            outcome == Outcome::Committed,
            "transaction {id} of the decided half ended {outcome:?}"
        );
        decided_ids.push(id);
    }
    eprintln!(
        "recovery: {} more begun with their prepares held",
        n - decided
    );
    let mut held = JoinSet::new();
    for i in decided..n {
        let client = clients[i % clients.len()].clone();
        let branches = branches(HOLD_PREPARE, i, &endpoints);
        held.spawn(async move { client.run_two_phase(branches, long_options()).await });
    }
    let (in_progress_at_kill, in_doubt_at_kill) =
        within(deadline, "N transactions in progress", async {
            loop {
                let text = observe::scrape(coordinator_metrics).await?;
                let in_progress = observe::sum(&text, "treaty_transactions_in_progress");
                if in_progress >= n as f64 {
                    return Ok::<_, anyhow::Error>((
                        in_progress,
                        observe::sum(&text, "treaty_in_doubt_transactions"),
                    ));
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await??;
    eprintln!("recovery: {in_progress_at_kill} in progress; kill -9 of the coordinator");
    cluster.kill_coordinator().await?;
    held.abort_all();
    let counts_before = participant_counts(&cluster).await?;
    let passes_at_release: Vec<f64> = in_doubt(&cluster)
        .await?
        .into_iter()
        .map(|(passes, _)| passes)
        .collect();
    cluster.signal_participants(nix::sys::signal::Signal::SIGUSR1)?;
    let restarted = Instant::now();
    within(
        deadline,
        "the coordinator's restart",
        cluster.restart_coordinator(),
    )
    .await??;
    let restart_to_serving = restarted.elapsed();
    let poll_ms = options.in_doubt_poll_ms.unwrap_or(SDK_IN_DOUBT_POLL_MS);
    let mut idle: Option<Duration> = None;
    let resolved = within(deadline, "every transaction resolved", async {
        loop {
            let text = observe::scrape(coordinator_metrics).await?;
            if idle.is_none() && observe::sum(&text, "treaty_transactions_in_progress") == 0.0 {
                idle = Some(restarted.elapsed());
            }
            if idle.is_some() {
                let now = in_doubt(&cluster).await?;
                let settled = now.iter().zip(&passes_at_release).all(|(state, before)| {
                    let (passes, count) = *state;
                    passes >= before + 2.0 && count == Some(0.0)
                });
                if settled {
                    return Ok::<_, anyhow::Error>(restarted.elapsed());
                }
            }
            tokio::time::sleep(POLL).await;
        }
    })
    .await??;
    let text = observe::scrape(coordinator_metrics).await?;
    // `+ 0.0`: a sum of no samples is -0.0.
    let ended = |outcome: &str| {
        0.0 + observe::sum(
            &text,
            &format!("treaty_transactions_total{{protocol=\"two_phase\",outcome=\"{outcome}\"}}"),
        )
    };
    let counted = participant_counts(&cluster).await?.since(&counts_before);
    let asker = TreatyClient::connect(cluster.coordinator_endpoint.clone())
        .await
        .context("connecting to the restarted coordinator")?;
    let mut decided_still_committed = 0;
    for id in &decided_ids {
        let decision = within(deadline, "the decided half's outcomes", asker.outcome(id))
            .await?
            .with_context(|| format!("asking the outcome of {id}"))?;
        if decision == Decision::Commit {
            decided_still_committed += 1;
        }
    }
    let report = RecoveryReport {
        in_flight: n,
        decided,
        decided_still_committed,
        in_progress_at_kill,
        in_doubt_at_kill,
        restart_to_serving_ms: millis(restart_to_serving),
        restart_to_coordinator_idle_ms: millis(idle.unwrap_or(resolved)),
        restart_to_all_resolved_ms: millis(resolved),
        committed_after_restart: ended("committed"),
        aborted_after_restart: ended("aborted"),
        participant_inquiries_commit: counted.inquiries_commit,
        participant_inquiries_abort: counted.inquiries_abort,
        participant_commits_committed: counted.commits_committed,
        participant_commits_already_aborted: counted.commits_already_aborted,
        in_doubt_poll_ms: poll_ms,
    };
    cluster.stop().await?;
    report.check(options.participants)?;
    Ok(report)
}

/// Enough connections to the coordinator for `n` calls at once.
async fn connect(endpoint: &str, n: usize) -> anyhow::Result<Vec<TreatyClient>> {
    let connections = n.div_ceil(CALLS_PER_CONNECTION).clamp(1, 512);
    let mut clients = Vec::with_capacity(connections);
    for _ in 0..connections {
        clients.push(
            TreatyClient::connect(endpoint.to_string())
                .await
                .with_context(|| format!("connecting to the coordinator at {endpoint}"))?,
        );
    }
    Ok(clients)
}

/// One branch on each participant, named for the hold.
fn branches(hold: &str, i: usize, endpoints: &[String]) -> Vec<BranchSpec> {
    endpoints
        .iter()
        .enumerate()
        .map(|(p, endpoint)| {
            BranchSpec::new(format!("{hold}{i}-{p}"), endpoint.clone(), b"x".to_vec())
        })
        .collect()
}

/// Deadlines far beyond the run: nothing may time out while it is held.
fn long_options() -> BeginOptions {
    BeginOptions {
        deadline_unix_ms: Some(crate::runtime::now_unix_ms() + 30 * 60_000),
        prepare_timeout_ms: Some(crate::defaults::MAX_PREPARE_TIMEOUT_MS),
    }
}

async fn within<T>(
    deadline: Instant,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> anyhow::Result<T> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, future)
        .await
        .map_err(|_| anyhow::anyhow!("--recovery-timeout-s passed waiting for {what}"))
}

/// Each participant's in-doubt passes ended so far, and its branches in doubt as of the
/// last one (`None` before its first pass ends).
async fn in_doubt(cluster: &Cluster) -> anyhow::Result<Vec<(f64, Option<f64>)>> {
    let mut states = Vec::with_capacity(cluster.participants.len());
    for participant in &cluster.participants {
        let text = observe::scrape(participant.metrics).await?;
        let gauge = "treaty_participant_branches_in_doubt";
        let count = text
            .contains(&format!("{gauge} "))
            .then(|| observe::sum(&text, gauge));
        states.push((
            observe::sum(&text, "treaty_participant_in_doubt_passes_total"),
            count,
        ));
    }
    Ok(states)
}

/// What the participants counted so far, summed over them.
#[derive(Debug, Default)]
struct ParticipantCounts {
    /// `GetOutcome` calls answered COMMIT and ABORT.
    inquiries_commit: f64,
    inquiries_abort: f64,
    /// Phase-2 commits answered COMMITTED, and "already aborted".
    commits_committed: f64,
    commits_already_aborted: f64,
}

impl ParticipantCounts {
    /// What was counted after `before`.
    fn since(&self, before: &Self) -> Self {
        Self {
            inquiries_commit: self.inquiries_commit - before.inquiries_commit,
            inquiries_abort: self.inquiries_abort - before.inquiries_abort,
            commits_committed: self.commits_committed - before.commits_committed,
            commits_already_aborted: self.commits_already_aborted - before.commits_already_aborted,
        }
    }
}

async fn participant_counts(cluster: &Cluster) -> anyhow::Result<ParticipantCounts> {
    let mut counts = ParticipantCounts::default();
    for participant in &cluster.participants {
        let text = observe::scrape(participant.metrics).await?;
        let inquiry = |result: &str| {
            observe::sum(
                &text,
                &format!("treaty_participant_outcome_inquiries_total{{result=\"{result}\"}}"),
            )
        };
        let commit = |result: &str| {
            observe::sum(
                &text,
                &format!(
                    "treaty_participant_operations_total{{operation=\"commit\",result=\"{result}\"}}"
                ),
            )
        };
        counts.inquiries_commit += inquiry("commit");
        counts.inquiries_abort += inquiry("abort");
        counts.commits_committed += commit("committed");
        counts.commits_already_aborted += commit("already_aborted");
    }
    Ok(counts)
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved_right() -> RecoveryReport {
        RecoveryReport {
            in_flight: 20,
            decided: 10,
            decided_still_committed: 10,
            in_progress_at_kill: 20.0,
            in_doubt_at_kill: 10.0,
            restart_to_serving_ms: 40.0,
            restart_to_coordinator_idle_ms: 900.0,
            restart_to_all_resolved_ms: 1_000.0,
            committed_after_restart: 20.0,
            aborted_after_restart: 0.0,
            participant_inquiries_commit: 0.0,
            participant_inquiries_abort: 0.0,
            participant_commits_committed: 40.0,
            participant_commits_already_aborted: 0.0,
            in_doubt_poll_ms: 200,
        }
    }

    #[test]
    fn a_recovery_that_lost_or_broke_a_decision_fails_the_run() {
        resolved_right().check(2).unwrap();
        // One decision lost, though the totals look right: the undecided half committed.
        let lost_at_the_coordinator = RecoveryReport {
            decided_still_committed: 9,
            ..resolved_right()
        };
        let error = lost_at_the_coordinator.check(2).unwrap_err().to_string();
        assert!(error.contains("COMMIT for 9 of the 10"), "{error}");
        let branch_not_committed = RecoveryReport {
            participant_commits_committed: 19.0,
            ..resolved_right()
        };
        let error = branch_not_committed.check(2).unwrap_err().to_string();
        assert!(
            error.contains("fewer than the decided half's 20"),
            "{error}"
        );
        let commit_met_an_abort = RecoveryReport {
            participant_commits_already_aborted: 1.0,
            ..resolved_right()
        };
        let error = commit_met_an_abort.check(2).unwrap_err().to_string();
        assert!(error.contains("already aborted"), "{error}");
    }
}
