//! Tests of the daemon's configuration: defaults, refusals naming their field, the memory
//! budget's split, flags and variables, and the advertised endpoint.

use super::*;

fn config() -> ServeConfig {
    ServeConfig::new("127.0.0.1:0".parse().unwrap(), "/tmp/x")
}

#[test]
fn defaults_are_valid() {
    assert_eq!(config().validate(), Ok(()));
}

/// Every setting has an upper bound that a config file can hold: a flag's value past
/// TOML's integers (i64) started the daemon, yet failed with --config or --print-config.
#[test]
fn settings_without_a_use_for_huge_values_refuse_them_naming_the_field() {
    let huge = u64::MAX / 2;
    type Set = fn(&mut ServeConfig, u64);
    let checks: [(&str, Set); 5] = [
        ("log_compaction_min_bytes", |c, v| {
            c.log_compaction_min_bytes = v
        }),
        ("log_compaction_min_removed_records", |c, v| {
            c.log_compaction_min_removed_records = v
        }),
        ("max_payload_memory_bytes", |c, v| {
            c.max_payload_memory_bytes = v as usize
        }),
        ("max_active_per_principal", |c, v| {
            c.max_active_per_principal = v as usize
        }),
        ("compensation_stuck_after_attempts", |c, v| {
            c.compensation_stuck_after_attempts = v.min(u64::from(u32::MAX)) as u32
        }),
    ];
    for (field, set) in checks {
        let mut c = config();
        set(&mut c, huge);
        let error = c.validate().unwrap_err();
        assert_eq!(error.field, field);
        assert!(error.to_string().contains("exceeds the limit"), "{error}");
    }
}

#[test]
fn inconsistent_values_are_named() {
    let mut c = config();
    c.default_prepare_timeout_ms = c.max_prepare_timeout_ms + 1;
    assert_eq!(
        c.validate().unwrap_err().field,
        "default_prepare_timeout_ms"
    );
    let mut c = config();
    c.retry_backoff_initial_ms = 0;
    assert_eq!(c.validate().unwrap_err().field, "retry_backoff_initial_ms");
    let mut c = config();
    c.max_transaction_timeout_ms = u64::MAX;
    assert_eq!(
        c.validate().unwrap_err().field,
        "max_transaction_timeout_ms"
    );
    let mut c = config();
    c.shutdown_grace_ms = u64::MAX;
    assert_eq!(c.validate().unwrap_err().field, "shutdown_grace_ms");
    let mut c = config();
    c.advertise_endpoint = Some("localhost:1".into());
    assert_eq!(c.validate().unwrap_err().field, "advertise_endpoint");
    let mut c = config();
    c.stale_after_ms = c.participant_call_timeout_ms;
    assert_eq!(c.validate().unwrap_err().field, "stale_after_ms");
    for factor in [0, 1, defaults::MAX_LOG_COMPACTION_GROWTH_FACTOR + 1] {
        let mut c = config();
        c.log_compaction_growth_factor = factor;
        assert_eq!(
            c.validate().unwrap_err().field,
            "log_compaction_growth_factor"
        );
    }
    for factor in [2, defaults::MAX_LOG_COMPACTION_GROWTH_FACTOR] {
        let mut c = config();
        c.log_compaction_growth_factor = factor;
        c.validate().unwrap();
    }
    let mut c = config();
    c.log_group_commit_hold_us = defaults::MAX_LOG_GROUP_COMMIT_HOLD_US + 1;
    assert_eq!(c.validate().unwrap_err().field, "log_group_commit_hold_us");
    let mut c = config();
    c.sweep_interval_ms = 0;
    assert_eq!(c.validate().unwrap_err().field, "sweep_interval_ms");
    let mut c = config();
    c.delivery_horizon_ms = c.max_transaction_timeout_ms;
    assert_eq!(c.validate().unwrap_err().field, "delivery_horizon_ms");
    let mut c = config();
    c.allow_endpoint = vec!["10.0.0.0/8:*".into(), "10.0.0.1/8:*".into()];
    let error = c.validate().unwrap_err();
    assert_eq!(error.field, "allow_endpoint");
    assert!(
        error.message.starts_with("pattern 1 (\"10.0.0.1/8:*\")"),
        "{error}"
    );
}

#[test]
fn a_memory_budget_below_the_minimum_is_refused_by_name() {
    let mut c = config();
    c.memory_budget_bytes = defaults::MIN_MEMORY_BUDGET_BYTES - 1;
    let error = c.validate().unwrap_err();
    assert_eq!(error.field, "memory_budget_bytes");
    assert!(error.message.contains("minimum"), "{error}");
    c.memory_budget_bytes = defaults::MIN_MEMORY_BUDGET_BYTES;
    assert_eq!(c.validate(), Ok(()));
    c.memory_budget_bytes = u64::MAX;
    assert_eq!(c.validate().unwrap_err().field, "memory_budget_bytes");
}

#[test]
fn the_memory_budget_is_split_in_quarters_and_reaches_the_runtime() {
    let budget = MemoryBudget::of(512 * 1024 * 1024);
    assert_eq!(budget.log_bytes, 128 * 1024 * 1024);
    assert_eq!(budget.log_cache_bytes, 16 * 1024 * 1024);
    assert_eq!(budget.log_finished_max, 96 * 1024 * 1024 / 256);
    assert_eq!(budget.retained_bytes, 128 * 1024 * 1024);
    assert_eq!(budget.headroom_bytes, 256 * 1024 * 1024);
    let odd = MemoryBudget::of(64 * 1024 * 1024 + 3);
    assert_eq!(
        odd.log_bytes + odd.retained_bytes as u64 + odd.headroom_bytes,
        odd.budget_bytes
    );
    let mut c = config();
    c.memory_budget_bytes = 256 * 1024 * 1024;
    let runtime = c.runtime("127.0.0.1:7420".parse().unwrap());
    assert_eq!(runtime.max_retained_bytes, 64 * 1024 * 1024);
    assert_eq!(runtime.log_finished_max, 48 * 1024 * 1024 / 256);
}

#[test]
fn the_memory_budget_flag_and_environment_variable_parse() {
    use clap::Parser;
    let parse = |args: &[&str]| {
        let cli = crate::cli::Cli::try_parse_from(args).unwrap();
        let crate::cli::Command::Serve(args) = cli.command else {
            panic!("parsed as serve");
        };
        args.settings.memory_budget_bytes
    };
    assert_eq!(parse(&["treaty", "serve"]), defaults::MEMORY_BUDGET_BYTES);
    assert_eq!(
        parse(&["treaty", "serve", "--memory-budget-bytes", "100000000"]),
        100_000_000
    );
}

#[test]
fn allow_endpoint_is_repeatable_and_takes_comma_separated_lists() {
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from([
        "treaty",
        "serve",
        "--allow-endpoint",
        "bank.internal:7001",
        "--allow-endpoint",
        "10.0.0.0/8:*,*.shop.internal:*",
    ])
    .unwrap();
    let crate::cli::Command::Serve(args) = cli.command else {
        panic!("parsed as serve");
    };
    let config = args.settings;
    assert_eq!(
        config.allow_endpoint,
        ["bank.internal:7001", "10.0.0.0/8:*", "*.shop.internal:*"]
    );
    assert_eq!(config.validate(), Ok(()));
    let api = config.api().unwrap();
    assert!(api.endpoint_policy.check("e", "http://10.1.1.1:80").is_ok());
    assert!(
        api.endpoint_policy
            .check("e", "http://11.1.1.1:80")
            .is_err()
    );
}

/// A certificate's common name may hold a comma ("Ops, Team"). The flag split its value
/// at commas (the config file never did), so `--admin-identity "Ops, Team"` gave the
/// admin role to a certificate named just "Ops". A value is now one identity, as in the
/// file; the flag is repeated for several.
#[test]
fn admin_identity_takes_each_value_whole_and_is_repeatable() {
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from([
        "treaty",
        "serve",
        "--admin-identity",
        "Ops, Team",
        "--admin-identity",
        "a,b",
        "--admin-identity",
        "ops.internal",
    ])
    .unwrap();
    let crate::cli::Command::Serve(args) = cli.command else {
        panic!("parsed as serve");
    };
    assert_eq!(
        args.settings.security.admin_identities,
        ["Ops, Team", "a,b", "ops.internal"]
    );
}

#[test]
fn the_advertised_endpoint_is_kept_in_canonical_form() {
    let mut c = config();
    c.advertise_endpoint = Some("HTTP://Coordinator.Internal.:7420/".into());
    assert_eq!(c.validate(), Ok(()));
    assert_eq!(
        c.runtime("127.0.0.1:7420".parse().unwrap())
            .advertise_endpoint,
        "http://coordinator.internal:7420"
    );
}

#[test]
fn unspecified_listen_address_advertises_loopback() {
    assert_eq!(
        advertised("0.0.0.0:7420".parse().unwrap(), false),
        "http://127.0.0.1:7420"
    );
    assert_eq!(
        advertised("10.0.0.5:7420".parse().unwrap(), false),
        "http://10.0.0.5:7420"
    );
    assert_eq!(
        advertised("10.0.0.5:7420".parse().unwrap(), true),
        "https://10.0.0.5:7420"
    );
}

/// The two print alike, field for field; a failure names the first field that differs.
fn assert_same_fields(a: &impl std::fmt::Debug, b: &impl std::fmt::Debug) {
    let (a, b) = (format!("{a:#?}"), format!("{b:#?}"));
    if let Some((line, (a, b))) = a
        .lines()
        .zip(b.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
    {
        panic!("line {line} differs: {a:?} against {b:?}");
    }
    assert_eq!(
        a.lines().count(),
        b.lines().count(),
        "one prints more fields"
    );
}

#[test]
fn the_runtimes_default_is_the_daemons_but_for_shards_and_endpoint() {
    let bound: SocketAddr = "127.0.0.1:7420".parse().unwrap();
    let mut from_daemon = ServeConfig::new(bound, "/tmp/x").runtime(bound);
    let default = RuntimeConfig::default();
    assert_eq!(default.shards, 2);
    assert_eq!(default.advertise_endpoint, "");
    // What an embedded runtime sets on its own; every other field must agree. The
    // metrics are shared: two registries print their families in hash order.
    from_daemon.shards = default.shards;
    from_daemon.advertise_endpoint = default.advertise_endpoint.clone();
    from_daemon.metrics = Arc::clone(&default.metrics);
    assert_same_fields(&from_daemon, &default);
}

#[test]
fn the_apis_default_is_the_daemons() {
    assert_same_fields(&config().api().unwrap(), &ApiConfig::default());
}

#[test]
fn the_flags_defaults_are_those_of_serve_config_new() {
    use clap::Parser;
    let cli = crate::cli::Cli::try_parse_from(["treaty", "serve"]).unwrap();
    let crate::cli::Command::Serve(args) = cli.command else {
        panic!("parsed as serve");
    };
    let parsed = args.settings;
    assert_same_fields(
        &parsed,
        &ServeConfig::new(parsed.listen, parsed.data_dir.clone()),
    );
}
