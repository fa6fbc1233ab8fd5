//! `treaty bench --postgres URL`: PostgreSQL's own two-phase commit, at the bench's
//! concurrency and for its duration, as a yardstick for the `twopc` workload.
//!
//! Each initiator has its own connection and its own row (no lock contention, as the
//! bench's participants have none) and runs, one after another: `BEGIN; UPDATE` its row
//! `; PREPARE TRANSACTION 'gid'` (one round trip), then `COMMIT PREPARED 'gid'` (a
//! second). That is one resource manager preparing and committing durably: two forced
//! WAL writes per transaction, against Treaty's coordinator log plus two participants.
//!
//! The server needs `max_prepared_transactions` of at least the concurrency (it is 0 by
//! default): that is checked first, with a clear error. The bench's table
//! (`treaty_bench_2pc`) is dropped and any transaction it left prepared is rolled back
//! at the end. A prepared transaction outlives its session, so a bench stopped before
//! its end (Ctrl-C, a crash) leaves some holding row locks on the table: each run rolls
//! back every `treaty-bench-` transaction it finds prepared before it touches the table
//! (two benches against one server at once are not supported: each drops the table at
//! its end). Every session runs with [`LOCK_TIMEOUT`] and [`STATEMENT_TIMEOUT`], so a
//! lock nobody releases fails a transaction instead of stopping the run.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_postgres::{Client, NoTls};

use super::workload::{MAX_LATENCIES, print_progress};

/// The table the bench updates (one row per initiator).
const TABLE: &str = "treaty_bench_2pc";
/// Prefix of the bench's global transaction ids.
const GID_PREFIX: &str = "treaty-bench-";
/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a statement of the bench waits for a lock (PostgreSQL's `lock_timeout`).
const LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a statement of the bench runs (PostgreSQL's `statement_timeout`).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, serde::Serialize)]
pub struct PostgresReport {
    pub transactions: u64,
    pub failed: u64,
    pub elapsed_s: f64,
    pub transactions_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Treaty's `twopc` transactions/s ÷ PostgreSQL's (`None` if twopc did not run).
    pub treaty_twopc_ratio: Option<f64>,
}

impl PostgresReport {
    pub fn line(&self) -> String {
        format!(
            "postgresql 2pc: {} transactions ({} failed) in {:.1} s: {:.0}/s; p50 {:.2} ms, \
             p99 {:.2} ms, p999 {:.2} ms; Treaty twopc ÷ PostgreSQL: {}",
            self.transactions,
            self.failed,
            self.elapsed_s,
            self.transactions_per_s,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.treaty_twopc_ratio
                .map_or_else(|| "n/a (twopc not run)".into(), |r| format!("{r:.2}"))
        )
    }
}

/// Checks `--postgres` before anything runs: a URL or key=value string
/// tokio-postgres understands.
pub fn check_url(url: &str) -> anyhow::Result<()> {
    tokio_postgres::Config::from_str(url)
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("--postgres: not a PostgreSQL connection string: {e}"))
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let mut config = tokio_postgres::Config::from_str(url).context("--postgres")?;
    config.connect_timeout(CONNECT_TIMEOUT);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .context("--postgres: connecting")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    client
        .batch_execute(&format!(
            "SET lock_timeout = {}; SET statement_timeout = {}",
            LOCK_TIMEOUT.as_millis(),
            STATEMENT_TIMEOUT.as_millis()
        ))
        .await
        .context("--postgres: setting the session's timeouts")?;
    Ok(client)
}

/// Connects and checks `max_prepared_transactions`: run before the Treaty workloads, so
/// that a server that cannot run the yardstick stops the bench before it starts.
pub async fn check_server(url: &str, concurrency: usize) -> anyhow::Result<()> {
    let admin = connect(url).await?;
    check_prepared_transactions(&admin, concurrency).await
}

async fn check_prepared_transactions(admin: &Client, concurrency: usize) -> anyhow::Result<()> {
    let row = admin
        .query_one("SHOW max_prepared_transactions", &[])
        .await
        .context("--postgres: SHOW max_prepared_transactions")?;
    let max_prepared: usize = row.get::<_, String>(0).trim().parse().unwrap_or(0);
    anyhow::ensure!(
        max_prepared >= concurrency,
        "--postgres: the server's max_prepared_transactions is {max_prepared}; PostgreSQL's \
         two-phase commit at --concurrency {concurrency} needs at least {concurrency} (set it \
         in postgresql.conf, e.g. max_prepared_transactions = {concurrency}, and restart the \
         server)"
    );
    Ok(())
}

pub async fn run(
    url: &str,
    concurrency: usize,
    duration: Duration,
    limit: u64,
) -> anyhow::Result<PostgresReport> {
    let admin = connect(url).await?;
    check_prepared_transactions(&admin, concurrency).await?;
    let left_before = roll_back_prepared(&admin, &format!("{GID_PREFIX}%")).await?;
    if left_before > 0 {
        eprintln!(
            "bench postgresql 2pc: rolled back {left_before} transaction(s) an earlier bench \
             left prepared"
        );
    }
    admin
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (id integer PRIMARY KEY, n bigint NOT NULL); \
             INSERT INTO {TABLE} SELECT g, 0 FROM generate_series(0, {}) g \
             ON CONFLICT (id) DO NOTHING",
            concurrency - 1
        ))
        .await
        .context("--postgres: creating the bench's table")?;
    let mut clients = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        clients.push(connect(url).await?);
    }
    let started_count = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + duration;
    let keep = MAX_LATENCIES / concurrency.max(1);
    let run_id = std::process::id();
    let progress = tokio::spawn(print_progress("postgresql", started, {
        let finished = finished.clone();
        move || finished.load(Ordering::Relaxed)
    }));
    let mut initiators = Vec::with_capacity(concurrency);
    for (row, client) in clients.into_iter().enumerate() {
        let started_count = started_count.clone();
        let finished = finished.clone();
        initiators.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut committed = 0u64;
            let mut failed = 0u64;
            let mut number = 0u64;
            while Instant::now() < until && started_count.fetch_add(1, Ordering::SeqCst) < limit {
                number += 1;
                let gid = format!("{GID_PREFIX}{run_id}-{row}-{number}");
                let begun = Instant::now();
                let prepared = client
                    .batch_execute(&format!(
                        "BEGIN; UPDATE {TABLE} SET n = n + 1 WHERE id = {row}; \
                         PREPARE TRANSACTION '{gid}'"
                    ))
                    .await;
                let outcome = if prepared.is_err() {
                    // Whatever the failure, leave the session out of any transaction.
                    let _ = client.batch_execute("ROLLBACK").await;
                    Err(())
                } else {
                    let committed = client
                        .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
                        .await
                        .map_err(|_| ());
                    if committed.is_err() {
                        // Left prepared, it would hold the row's lock and fail every
                        // later transaction of this initiator until the end.
                        let _ = client
                            .batch_execute(&format!("ROLLBACK PREPARED '{gid}'"))
                            .await;
                    }
                    committed
                };
                if outcome.is_ok() {
                    committed += 1;
                    if latencies.len() < keep {
                        latencies.push(begun.elapsed());
                    }
                } else {
                    failed += 1;
                }
                finished.fetch_add(1, Ordering::Relaxed);
            }
            (latencies, committed, failed)
        }));
    }
    let mut latencies = Vec::new();
    let mut committed = 0;
    let mut failed = 0;
    for initiator in initiators {
        let (mut theirs, their_committed, their_failed) = initiator.await?;
        latencies.append(&mut theirs);
        committed += their_committed;
        failed += their_failed;
    }
    let elapsed = started.elapsed();
    progress.abort();
    latencies.sort_unstable();
    clean_up(&admin, run_id).await;
    let percentile = |p: f64| super::stats::percentile_ms(&latencies, p);
    Ok(PostgresReport {
        transactions: committed,
        failed,
        elapsed_s: elapsed.as_secs_f64(),
        transactions_per_s: committed as f64 / elapsed.as_secs_f64().max(f64::EPSILON),
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        p999_ms: percentile(0.999),
        treaty_twopc_ratio: None,
    })
}

/// Rolls back every prepared transaction whose gid is `LIKE` `pattern`; returns how many
/// there were. One that cannot be rolled back is an error: its locks would stop the run.
async fn roll_back_prepared(admin: &Client, pattern: &str) -> anyhow::Result<usize> {
    let rows = admin
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE $1 \
             AND database = current_database()",
            &[&pattern],
        )
        .await
        .context("--postgres: listing prepared transactions")?;
    for row in &rows {
        let gid: String = row.get(0);
        let quoted = gid.replace('\'', "''");
        admin
            .batch_execute(&format!("ROLLBACK PREPARED '{quoted}'"))
            .await
            .with_context(|| format!("--postgres: rolling back the prepared transaction {gid}"))?;
    }
    Ok(rows.len())
}

/// Rolls back what this run left prepared (a failed COMMIT PREPARED) and drops its
/// table; failures are logged, not returned: the figures are already measured.
async fn clean_up(admin: &Client, run_id: u32) {
    if let Err(e) = roll_back_prepared(admin, &format!("{GID_PREFIX}{run_id}-%")).await {
        tracing::warn!(error = %e, "could not roll back what the bench left prepared");
    }
    if let Err(e) = admin
        .batch_execute(&format!("DROP TABLE IF EXISTS {TABLE}"))
        .await
    {
        tracing::warn!(error = %e, "could not drop the bench's table");
    }
}
