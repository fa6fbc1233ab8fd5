//! The two-phase commit demo: starts the coordinator and two banks as separate processes
//! on loopback, runs one transfer that commits and one that aborts, step by step, then
//! stops everything and checks from the banks' own data that no money was created or
//! lost. Exits non-zero if a check fails. (The README's demo is `demo`, the order saga.)

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use treaty_examples::bank::{Leg, balances, open_holds};
use treaty_examples::process::{ServerProcess, workspace_binaries};
use treaty_sdk::TreatyClient;
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome, Transaction, TransactionState};
use treaty_sdk::durable::DurableStore;

/// How long any one process may take to start or stop.
const PROCESS_PATIENCE: Duration = Duration::from_secs(30);
/// How long the demo waits for a transaction to finish everywhere.
const FINISH_PATIENCE: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(about = "Run Treaty's two-phase commit demo: two banks, one coordinator")]
struct Args {
    /// Keep the data directories (printed at the end) instead of deleting them.
    #[arg(long)]
    keep: bool,
}

struct Services {
    coordinator: ServerProcess,
    bank_a: ServerProcess,
    bank_b: ServerProcess,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("\ndemo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let bin_dir = build_binaries()?;
    let workdir = tempfile::Builder::new().prefix("treaty-demo-").tempdir()?;
    let work = workdir.path().to_path_buf();

    println!("== Treaty demo: a transfer between two banks, as a two-phase commit ==\n");
    let mut services = start_services(&bin_dir, &work).await?;
    let client = TreatyClient::connect(services.coordinator.endpoint()).await?;

    println!("3. A transfer alice can afford: it commits.");
    let first = transfer(&client, &mut services, "alice", "bob", 30).await?;
    anyhow::ensure!(first.is_committed(), "the first transfer should commit");
    println!("4. A transfer alice cannot afford: bank-a votes NO, so it aborts everywhere.");
    let second = transfer(&client, &mut services, "alice", "bob", 500).await?;
    anyhow::ensure!(!second.is_committed(), "the second transfer should abort");

    println!("5. The coordinator's list of transactions (`treaty txn list`):");
    let (listed, _) = client.list(&[], 100, "").await?;
    for txn in &listed {
        println!("  {}  {}", txn.transaction_id, state_name(txn.state));
    }

    println!("\n6. Stop the coordinator and the banks (SIGTERM).");
    for process in [
        &mut services.coordinator,
        &mut services.bank_a,
        &mut services.bank_b,
    ] {
        let status = process.stop(PROCESS_PATIENCE).await?;
        anyhow::ensure!(status.success(), "a process exited with {status}");
    }
    check_books(&work)?;
    if args.keep {
        println!("\nData kept in {}", workdir.keep().display());
    }
    Ok(())
}

/// Builds `treaty` and `bank` when run through cargo, and returns their directory.
fn build_binaries() -> anyhow::Result<PathBuf> {
    println!("Building the coordinator and the example bank (quick once built)...");
    Ok(workspace_binaries(&[
        ("treaty-coordinator", "treaty"),
        ("treaty-examples", "bank"),
    ])?)
}

async fn start_services(bin_dir: &Path, work: &Path) -> anyhow::Result<Services> {
    let coordinator_dir = work.join("coordinator");
    let args = strings(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &path(&coordinator_dir),
    ]);
    println!("1. Start the coordinator:  treaty {}", args.join(" "));
    let coordinator = ServerProcess::start(
        &bin_dir.join("treaty"),
        &args,
        &[("TREATY_LOG", "warn")],
        "treaty listening on",
        work.join("coordinator.log"),
        PROCESS_PATIENCE,
    )
    .await?;
    println!("   listening on {}\n", coordinator.endpoint());

    let mut banks = Vec::new();
    for (name, accounts) in [("bank-a", "alice=100"), ("bank-b", "bob=50")] {
        let dir = work.join(name);
        let args = strings(&[
            "--name",
            name,
            "--data-dir",
            &path(&dir),
            "--accounts",
            accounts,
        ]);
        let bank = ServerProcess::start(
            &bin_dir.join("bank"),
            &args,
            &[("BANK_LOG", "warn")],
            "bank listening on",
            work.join(format!("{name}.log")),
            PROCESS_PATIENCE,
        )
        .await?;
        println!("2. Start {name} with {accounts}:  bank {}", args.join(" "));
        println!("   listening on {}", bank.endpoint());
        banks.push(bank);
    }
    let bank_b = banks.pop().context("two banks")?;
    let bank_a = banks.pop().context("two banks")?;
    println!();
    Ok(Services {
        coordinator,
        bank_a,
        bank_b,
    })
}

async fn transfer(
    client: &TreatyClient,
    services: &mut Services,
    from: &str,
    to: &str,
    amount: i64,
) -> anyhow::Result<Outcome> {
    println!("   Transfer {amount} from {from} (bank-a) to {to} (bank-b)");
    let branches = vec![
        BranchSpec::new(
            from,
            services.bank_a.endpoint(),
            Leg {
                account: from,
                amount: -amount,
            }
            .payload(),
        ),
        BranchSpec::new(
            to,
            services.bank_b.endpoint(),
            Leg {
                account: to,
                amount,
            }
            .payload(),
        ),
    ];
    let id = client.begin(BeginOptions::default(), branches).await?;
    println!("   Begin  -> transaction {id}, two branches enlisted");
    println!("   Commit -> the coordinator asks both banks to prepare:");
    let outcome = client.commit(&id).await?;
    let finished = client
        .wait_until_finished(&id, FINISH_PATIENCE)
        .await?
        .context("the coordinator forgot the transaction")?;
    for bank in [&mut services.bank_a, &mut services.bank_b] {
        for line in drain(&mut bank.stdout).await {
            println!("     {line}");
        }
    }
    match &outcome {
        Outcome::Committed => {
            println!("   Outcome: COMMITTED (decision forced to the coordinator's log first)")
        }
        Outcome::Aborted { reason } => println!("   Outcome: ABORTED ({reason})"),
    }
    print_history(&finished);
    println!();
    Ok(outcome)
}

/// The lines a bank printed, waiting until it has been quiet for a moment.
async fn drain(lines: &mut tokio::sync::mpsc::Receiver<String>) -> Vec<String> {
    let mut drained = Vec::new();
    while drained.len() < 100 {
        match tokio::time::timeout(Duration::from_millis(300), lines.recv()).await {
            Ok(Some(line)) => drained.push(line),
            _ => break,
        }
    }
    drained
}

fn print_history(txn: &Transaction) {
    let steps: Vec<String> = txn
        .transitions
        .iter()
        .map(|t| {
            format!(
                "{} (+{} ms)",
                state_name(t.state),
                t.at_unix_ms.saturating_sub(txn.created_unix_ms)
            )
        })
        .collect();
    println!("   History: {}", steps.join(" -> "));
}

fn state_name(value: i32) -> &'static str {
    TransactionState::try_from(value)
        .map(|s| s.as_str_name().trim_start_matches("TRANSACTION_STATE_"))
        .unwrap_or("?")
}

/// Reads each bank's own data, now that it has stopped, and checks the books.
fn check_books(work: &Path) -> anyhow::Result<()> {
    let mut total = 0;
    let mut failures = Vec::new();
    println!("\n7. Check the banks' own data:");
    for (name, expected) in [("bank-a", [("alice", 70)]), ("bank-b", [("bob", 80)])] {
        let store = DurableStore::open(&work.join(name), Default::default())?;
        let books = balances(&store).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let holds = open_holds(&store);
        store.close()?;
        println!("   {name}: {books:?}, open holds: {holds}");
        for (account, balance) in expected {
            if books.get(account) != Some(&balance) {
                failures.push(format!(
                    "{name}: {account} should be {balance}, is {:?}",
                    books.get(account)
                ));
            }
        }
        if holds != 0 {
            failures.push(format!("{name}: {holds} holds were never settled"));
        }
        total += books.values().sum::<i64>();
    }
    if total == 150 {
        println!("   ✓ money conserved: 150 before, {total} after");
    } else {
        failures.push(format!("money not conserved: 150 before, {total} after"));
    }
    if failures.is_empty() {
        println!(
            "   ✓ the committed transfer is applied at both banks, the aborted one at neither"
        );
        Ok(())
    } else {
        bail!("{}", failures.join("; "))
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn path(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
