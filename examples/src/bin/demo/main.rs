//! The Treaty demo: an online shop whose orders are sagas across three services.
//!
//! It builds and starts the coordinator and the payment, inventory and shipping services
//! as separate processes on loopback, places orders through the coordinator (some run out
//! of stock, find no courier, hit insufficient funds or transient errors), kills the
//! coordinator with SIGKILL half-way and restarts it, then stops everything and checks
//! the shop's invariants from each service's own data. Exits non-zero if one fails.
//!
//! With `--secure`, every hop runs TLS and every call is authenticated: the demo makes a
//! CA, server certificates and tokens for the run in its work directory (see
//! `treaty_examples::tls_and_tokens`) and passes the tokens to its children in
//! environment variables; everything else is the same.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand::rngs::StdRng;
use treaty_examples::process::{killed_by_sigkill, workspace_binaries};
use treaty_examples::shop::audit::{Check, ShippingData, audit};
use treaty_examples::shop::check_rate;
use treaty_examples::shop::orders::{Order, Placed, Shop, place};
use treaty_examples::shop::strangers;
use treaty_examples::tls_and_tokens::TlsAndTokens;
use treaty_sdk::TreatyClient;
use treaty_sdk::client::TransactionState;

mod services;

use services::{Services, endpoint, start_coordinator, start_services};

/// How long a process may take to start or stop.
const PROCESS_PATIENCE: Duration = Duration::from_secs(30);
/// How long one order may take, coordinator crash included.
const ORDER_PATIENCE: Duration = Duration::from_secs(120);

const CUSTOMERS: [&str; 8] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
];
const SKUS: [&str; 4] = ["widget", "gadget", "gizmo", "doohickey"];

#[derive(Debug, Parser)]
#[command(about = "Treaty's demo: orders as sagas across payment, inventory and shipping")]
struct Args {
    /// Orders to place.
    #[arg(long, default_value_t = 200)]
    orders: usize,
    /// Orders in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Chance that inventory refuses a reservation for no reason (besides real shortages).
    #[arg(long, default_value_t = 0.1)]
    out_of_stock_rate: f64,
    /// Chance that shipping refuses a delivery.
    #[arg(long, default_value_t = 0.1)]
    rejection_rate: f64,
    /// Chance that any service call fails without an answer (and is retried).
    #[arg(long, default_value_t = 0.05)]
    transient_error_rate: f64,
    /// Delay added to every service call.
    #[arg(long, default_value_t = 2)]
    latency_ms: u64,
    /// From the first refund on, refunds fail for this long: sagas are flagged stuck, then
    /// recover once refunds work again.
    #[arg(long, default_value_t = 1000)]
    refund_outage_ms: u64,
    /// Do not kill the coordinator half-way.
    #[arg(long)]
    no_crash: bool,
    /// Seed of the orders and of the injected failures.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Keep the data directories (printed at the end).
    #[arg(long)]
    keep: bool,
    /// TLS on every hop and a token on every call, with a CA, certificates and tokens
    /// made for this run in its work directory.
    #[arg(long)]
    secure: bool,
    /// Run the shipping service in Python (`examples/python/shipping.py`, on the Python
    /// participant SDK) in place of the Rust one. Its virtual environment is made the
    /// first time (grpcio and protobuf from PyPI).
    #[arg(long)]
    python_shipping: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("\ndemo failed: an invariant does not hold");
            ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("\ndemo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    anyhow::ensure!(
        (1..=100_000).contains(&args.orders),
        "--orders must be 1..=100000"
    );
    anyhow::ensure!(
        (1..=1_000).contains(&args.concurrency),
        "--concurrency must be 1..=1000"
    );
    for (name, rate) in [
        ("out-of-stock-rate", args.out_of_stock_rate),
        ("rejection-rate", args.rejection_rate),
        ("transient-error-rate", args.transient_error_rate),
    ] {
        check_rate(name, rate).map_err(anyhow::Error::msg)?;
    }

    println!("Building the coordinator and the shop's services (quick once built)...");
    let bin_dir = workspace_binaries(&[
        ("treaty-coordinator", "treaty"),
        ("treaty-examples", "payment"),
        ("treaty-examples", "inventory"),
        ("treaty-examples", "shipping"),
    ])?;
    let workdir = tempfile::Builder::new().prefix("treaty-shop-").tempdir()?;
    let work = workdir.path().to_path_buf();
    let outcome = run_shop(&args, bin_dir, work).await;
    if args.keep {
        println!("\nData and logs kept in {}", workdir.keep().display());
    }
    outcome
}

async fn run_shop(args: &Args, bin_dir: PathBuf, work: PathBuf) -> anyhow::Result<bool> {
    println!(
        "\n== Treaty demo: {} orders as sagas: charge ∥ reserve → schedule ==\n",
        args.orders
    );
    let security = if args.secure {
        let made = TlsAndTokens::create(&work.join("credentials"))
            .context("making certificates and tokens")?;
        println!(
            "Secure: TLS on every hop and a token on every call (a CA, certificates and \
             tokens made for this run; tokens reach the processes in environment variables).\n"
        );
        Some(made)
    } else {
        None
    };
    println!("1. Start the coordinator and three services, each a process with its own data:");
    let mut services = start_services(args, bin_dir, work, security).await?;

    println!(
        "\n2. Place the orders ({} at a time){}:",
        args.concurrency,
        if args.no_crash {
            ""
        } else {
            "; half-way, kill -9 the coordinator and restart it"
        }
    );
    let started = Instant::now();
    let (placed, failed) = place_orders(args, &mut services).await?;
    let elapsed = started.elapsed();

    println!(
        "\n3. Outcomes ({} orders in {:.1} s):",
        placed.len(),
        elapsed.as_secs_f64()
    );
    summarize(&placed);

    let mut all_hold = true;
    let mut step = 4;
    if let Some(security) = &services.security {
        println!(
            "\n{step}. A stranger who trusts the CA but holds no token tries to charge alice \
             at payment, refund a completed order, and place an order:"
        );
        let stranger = security.stranger_options();
        let payment = services.payment.https_endpoint();
        let completed = placed
            .iter()
            .find(|p| p.state() == TransactionState::Completed);
        let checks = [
            strangers::participant_refuses(&payment, &stranger, completed).await,
            strangers::coordinator_refuses(
                &services.coordinator.https_endpoint(),
                &payment,
                &stranger,
            )
            .await,
        ];
        all_hold &= report(&checks);
        step += 1;
    }

    println!(
        "\n{step}. Stop every process (SIGTERM) and check the shop from each service's own data:"
    );
    for process in [
        &mut services.coordinator,
        &mut services.payment,
        &mut services.inventory,
        &mut services.shipping,
    ] {
        let status = process.stop(PROCESS_PATIENCE).await?;
        anyhow::ensure!(status.success(), "a process exited with {status}");
    }
    let work = &services.work;
    let shipping_dir = work.join("shipping");
    let shipping_data = match args.python_shipping {
        true => ShippingData::Sqlite(&shipping_dir),
        false => ShippingData::Sled(&shipping_dir),
    };
    let mut checks = audit(
        &work.join("payment"),
        &work.join("inventory"),
        shipping_data,
        &placed,
    )
    .map_err(anyhow::Error::msg)?;
    checks.push(Check {
        name: "every order finished (completed or compensated)",
        violations: failed,
    });
    all_hold &= report(&checks);
    Ok(all_hold)
}

/// Prints each check, ✓ or ✗ with what was found; whether all hold.
fn report(checks: &[Check]) -> bool {
    for check in checks {
        if check.holds() {
            println!("   ✓ {}", check.name);
        } else {
            println!("   ✗ {}: {}", check.name, check.violations.join("; "));
        }
    }
    checks.iter().all(Check::holds)
}

/// The orders that finished, and what went wrong with those that did not.
async fn place_orders(
    args: &Args,
    services: &mut Services,
) -> anyhow::Result<(Vec<Placed>, Vec<String>)> {
    let security = services.security.as_ref();
    let client_options = security
        .map(TlsAndTokens::client_options)
        .unwrap_or_default();
    let client = TreatyClient::connect_lazy_with(
        endpoint(&services.coordinator, security),
        &client_options,
    )?;
    let shop = Shop {
        payment: endpoint(&services.payment, security),
        inventory: endpoint(&services.inventory, security),
        shipping: endpoint(&services.shipping, security),
    };
    let customers: Vec<String> = CUSTOMERS.iter().map(|s| s.to_string()).collect();
    let skus: Vec<String> = SKUS.iter().map(|s| s.to_string()).collect();
    let mut rng = StdRng::seed_from_u64(args.seed);
    let run = format!("{:x}", rand::random::<u32>());
    let orders: Vec<Order> = (0..args.orders)
        .map(|n| Order::random(format!("{run}-{n}"), &customers, &skus, &mut rng))
        .collect();

    let bar = ProgressBar::new(args.orders as u64);
    bar.set_style(
        ProgressStyle::with_template("   {bar:40} {pos}/{len} orders  {msg}")
            .map(|style| style.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let finished = Arc::new(AtomicUsize::new(0));
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency));
    let mut tasks = Vec::with_capacity(orders.len());
    for order in orders {
        let (client, shop, bar, finished, slots) = (
            client.clone(),
            shop.clone(),
            bar.clone(),
            finished.clone(),
            slots.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.map_err(|e| e.to_string())?;
            let placed = place(&client, &shop, order, ORDER_PATIENCE).await;
            finished.fetch_add(1, Ordering::SeqCst);
            bar.inc(1);
            placed
        }));
    }

    if !args.no_crash {
        // Half-way, with orders in flight: kill -9, then restart on the same address
        // and data. The orders in flight finish after recovery.
        let half = args.orders / 2;
        while finished.load(Ordering::SeqCst) < half {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let address = services.coordinator.address.to_string();
        let status = services.coordinator.kill9(PROCESS_PATIENCE).await?;
        anyhow::ensure!(
            killed_by_sigkill(status),
            "the coordinator did not die by SIGKILL"
        );
        say(
            &bar,
            format!(
                "   ! coordinator killed with SIGKILL after {} orders; restarting it on {address}",
                finished.load(Ordering::SeqCst)
            ),
        );
        services.coordinator = start_coordinator(
            &services.bin_dir,
            &services.work,
            &address,
            services.security.as_ref(),
        )
        .await
        .context("restarting the coordinator")?;
        say(
            &bar,
            "   ! coordinator back: it resumed the sagas in flight from its log".into(),
        );
    }

    let mut placed = Vec::with_capacity(tasks.len());
    let mut failed = Vec::new();
    for task in tasks {
        match task.await? {
            Ok(order) => placed.push(order),
            Err(error) => failed.push(error),
        }
    }
    bar.finish_and_clear();
    Ok((placed, failed))
}

/// Prints above the progress bar, or plainly where there is no bar (not a terminal).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

fn summarize(placed: &[Placed]) {
    let count = |state: TransactionState| placed.iter().filter(|p| p.state() == state).count();
    let stuck = placed
        .iter()
        .filter(|p| {
            p.transaction
                .transitions
                .iter()
                .any(|t| t.reason.starts_with("stuck:"))
        })
        .count();
    let retries: u32 = placed.iter().map(Placed::retries).sum();
    println!("   completed    {}", count(TransactionState::Completed));
    println!("   compensated  {}", count(TransactionState::Compensated));
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for p in placed
        .iter()
        .filter(|p| p.state() == TransactionState::Compensated)
    {
        *reasons
            .entry(reason_kind(&p.transaction.reason))
            .or_default() += 1;
    }
    for (reason, n) in reasons {
        println!("      {n:>4}  {reason}");
    }
    if stuck > 0 {
        println!(
            "   stuck        {stuck} (flagged while refunds were down; all compensated once they were back)"
        );
    } else {
        println!("   stuck        0");
    }
    println!("   retries      {retries} calls repeated after transient failures");
}

/// "step reserve was rejected: out of stock: gizmo has 0, needs 2" → "reserve: out of stock".
fn reason_kind(reason: &str) -> String {
    let Some(rest) = reason.strip_prefix("step ") else {
        return reason.to_string();
    };
    let step = rest.split_whitespace().next().unwrap_or("?");
    let why = if rest.contains("failed") {
        "no answer after its retries".to_string()
    } else {
        // The participant's reason without its particulars (quantities, addresses).
        let reason = rest.split(": ").nth(1).unwrap_or("rejected");
        let end = [" for ", " (", ":"]
            .iter()
            .filter_map(|cut| reason.find(cut))
            .min()
            .unwrap_or(reason.len());
        reason[..end].to_string()
    };
    format!("{step}: {why}")
}
