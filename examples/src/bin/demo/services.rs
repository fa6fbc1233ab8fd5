//! The demo's processes: the coordinator and the shop's three services, each started as
//! a child process on loopback that announces its address, with the flags that inject
//! the run's failures and, in a `--secure` run, its TLS and tokens. The coordinator is
//! started again on the same address after the demo kills it.

use std::path::{Path, PathBuf};

use treaty_examples::process::ServerProcess;
use treaty_examples::shop::python_shipping;
use treaty_examples::tls_and_tokens::TlsAndTokens;

use super::{Args, CUSTOMERS, PROCESS_PATIENCE, SKUS};

/// The demo's running processes, and what starting the coordinator again needs.
pub(super) struct Services {
    pub(super) bin_dir: PathBuf,
    pub(super) work: PathBuf,
    pub(super) coordinator: ServerProcess,
    pub(super) payment: ServerProcess,
    pub(super) inventory: ServerProcess,
    pub(super) shipping: ServerProcess,
    /// The credentials of a `--secure` run.
    pub(super) security: Option<TlsAndTokens>,
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn path(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// How the others reach `process`: over TLS in a `--secure` run.
pub(super) fn endpoint(process: &ServerProcess, security: Option<&TlsAndTokens>) -> String {
    match security {
        Some(_) => process.https_endpoint(),
        None => process.endpoint(),
    }
}

/// Starts `program args…`, which announces itself as `<name> listening on ADDR`; its
/// stderr goes to `<name>.log` in `work`.
async fn start(
    program: &Path,
    work: &Path,
    name: &str,
    args: Vec<String>,
    envs: &[(&str, &str)],
) -> anyhow::Result<ServerProcess> {
    let log_env = if name == "treaty" {
        "TREATY_LOG"
    } else {
        "SHOP_LOG"
    };
    let mut envs = envs.to_vec();
    envs.push((log_env, "warn"));
    let process = ServerProcess::start(
        program,
        &args,
        &envs,
        &format!("{name} listening on"),
        work.join(format!("{name}.log")),
        PROCESS_PATIENCE,
    )
    .await?;
    Ok(process)
}

/// Starts `treaty serve` on `listen` (again, after the crash, on the same address).
pub(super) async fn start_coordinator(
    bin_dir: &Path,
    work: &Path,
    listen: &str,
    security: Option<&TlsAndTokens>,
) -> anyhow::Result<ServerProcess> {
    let mut args = coordinator_args(work, listen);
    let mut envs = Vec::new();
    if let Some(security) = security {
        args.extend(security.coordinator_args());
        envs.extend(security.coordinator_env());
    }
    start(&bin_dir.join("treaty"), work, "treaty", args, &envs).await
}

/// Starts service `name` (`program args…`), and in a `--secure` run its TLS and its trust
/// in the coordinator at `coordinator_endpoint`.
async fn start_service(
    program: &Path,
    work: &Path,
    name: &str,
    mut args: Vec<String>,
    security: Option<&TlsAndTokens>,
    coordinator_endpoint: &str,
) -> anyhow::Result<ServerProcess> {
    let mut envs = Vec::new();
    if let Some(security) = security {
        args.extend(security.service_args(name, coordinator_endpoint)?);
        envs.extend(security.service_env());
    }
    start(program, work, name, args, &envs).await
}

fn coordinator_args(work: &Path, listen: &str) -> Vec<String> {
    strings(&[
        "serve",
        "--listen",
        listen,
        "--data-dir",
        &path(&work.join("coordinator")),
        "--retry-backoff-initial-ms",
        "20",
        "--retry-backoff-max-ms",
        "500",
        "--compensation-stuck-after-attempts",
        "3",
    ])
}

pub(super) async fn start_services(
    args: &Args,
    bin_dir: PathBuf,
    work: PathBuf,
    security: Option<TlsAndTokens>,
) -> anyhow::Result<Services> {
    let python = match args.python_shipping {
        true => Some(treaty_examples::python::sdk_interpreter().await?),
        false => None,
    };
    let stock = (args.orders / 3).max(5);
    let fault_flags = |service: &str, seed: u64| {
        let mut flags = strings(&[
            "--data-dir",
            &path(&work.join(service)),
            "--transient-error-rate",
            &args.transient_error_rate.to_string(),
            "--latency-ms",
            &args.latency_ms.to_string(),
            "--seed",
            &seed.to_string(),
        ]);
        flags.shrink_to_fit();
        flags
    };
    let coordinator = start_coordinator(&bin_dir, &work, "127.0.0.1:0", security.as_ref()).await?;
    let coordinator_endpoint = endpoint(&coordinator, security.as_ref());
    let start_shop_service = |name: &'static str, program: PathBuf, args: Vec<String>| {
        let security = security.as_ref();
        let (work, coordinator_endpoint) = (&work, &coordinator_endpoint);
        async move { start_service(&program, work, name, args, security, coordinator_endpoint).await }
    };
    let accounts: Vec<String> = CUSTOMERS.iter().map(|c| format!("{c}=3000")).collect();
    let mut payment_args = fault_flags("payment", args.seed + 1);
    payment_args.extend(strings(&[
        "--accounts",
        &accounts.join(","),
        "--compensation-outage-ms",
        &args.refund_outage_ms.to_string(),
    ]));
    let payment = start_shop_service("payment", bin_dir.join("payment"), payment_args).await?;
    let shelves: Vec<String> = SKUS.iter().map(|s| format!("{s}={stock}")).collect();
    let mut inventory_args = fault_flags("inventory", args.seed + 2);
    inventory_args.extend(strings(&[
        "--stock",
        &shelves.join(","),
        "--out-of-stock-rate",
        &args.out_of_stock_rate.to_string(),
    ]));
    let inventory =
        start_shop_service("inventory", bin_dir.join("inventory"), inventory_args).await?;
    let mut shipping_args = fault_flags("shipping", args.seed + 3);
    shipping_args.extend(strings(&[
        "--rejection-rate",
        &args.rejection_rate.to_string(),
    ]));
    let shipping = match &python {
        Some(python) => {
            let mut args = vec![path(&python_shipping::script())];
            args.extend(shipping_args);
            start_shop_service("shipping", python.clone(), args).await?
        }
        None => start_shop_service("shipping", bin_dir.join("shipping"), shipping_args).await?,
    };
    let reach = |process| endpoint(process, security.as_ref());
    println!("  coordinator  {coordinator_endpoint}  (treaty serve)");
    println!(
        "  payment      {}  8 customers with 3000 each; refunds down for {} ms after the first",
        reach(&payment),
        args.refund_outage_ms
    );
    println!(
        "  inventory    {}  {} each of {}",
        reach(&inventory),
        stock,
        SKUS.join(", ")
    );
    println!(
        "  shipping     {}{}",
        reach(&shipping),
        if python.is_some() {
            "  in Python (examples/python/shipping.py, the Python participant SDK)"
        } else {
            ""
        }
    );
    Ok(Services {
        bin_dir,
        work,
        coordinator,
        payment,
        inventory,
        shipping,
        security,
    })
}
