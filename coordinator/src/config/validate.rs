//! The daemon's configuration checked once at start: every field against its limits and
//! against the fields it must agree with, each refusal naming its field (the same name
//! as its flag's, with `_` for `-`, and its key in the file).

use super::*;

fn at_most(field: &'static str, value: u64, max: u64, max_text: &str) -> Result<(), ConfigError> {
    if value > max {
        return Err(bad(
            field,
            format!("{value} exceeds the limit of {max_text}"),
        ));
    }
    Ok(())
}

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;

fn positive(field: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(bad(field, "must be greater than 0"));
    }
    Ok(())
}

impl ServeConfig {
    /// Checks every field against its limits and the fields it must agree with; the
    /// error names the field refused.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(metrics) = self.metrics_listen {
            // /metrics has no authentication of its own: beyond loopback only when asked.
            treaty_sdk::metrics::check_metrics_listen(metrics, self.security.allow_unauthenticated)
                .map_err(|message| bad("metrics_listen", message))?;
        }
        positive(
            "default_transaction_timeout_ms",
            self.default_transaction_timeout_ms,
        )?;
        positive(
            "default_prepare_timeout_ms",
            self.default_prepare_timeout_ms,
        )?;
        positive(
            "participant_call_timeout_ms",
            self.participant_call_timeout_ms,
        )?;
        positive("retry_backoff_initial_ms", self.retry_backoff_initial_ms)?;
        positive(
            "max_active_transactions",
            self.max_active_transactions as u64,
        )?;
        positive("max_in_flight_calls", self.max_in_flight_calls as u64)?;
        positive("max_undelivered_aborts", self.max_undelivered_aborts as u64)?;
        positive(
            "max_active_per_principal",
            self.max_active_per_principal as u64,
        )?;
        if self.max_payload_memory_bytes < treaty_sdk::limits::MAX_SAGA_PAYLOAD_BYTES {
            return Err(bad(
                "max_payload_memory_bytes",
                "must hold at least one saga's payloads (48 KiB)",
            ));
        }
        positive(
            "max_retained_transactions",
            self.max_retained_transactions as u64,
        )?;
        if self.memory_budget_bytes < defaults::MIN_MEMORY_BUDGET_BYTES {
            return Err(bad(
                "memory_budget_bytes",
                format!(
                    "{} is below the minimum of {} (64 MiB): the process itself takes \
                     20-30 MiB, and a quarter each goes to the decision log and to finished \
                     transactions kept in memory",
                    self.memory_budget_bytes,
                    defaults::MIN_MEMORY_BUDGET_BYTES
                ),
            ));
        }
        at_most(
            "memory_budget_bytes",
            self.memory_budget_bytes,
            1 << 40,
            "1 TiB",
        )?;
        if self.log_compaction_growth_factor < defaults::MIN_LOG_COMPACTION_GROWTH_FACTOR {
            return Err(bad(
                "log_compaction_growth_factor",
                format!(
                    "{} is below the minimum of {}: each compaction would call the next",
                    self.log_compaction_growth_factor,
                    defaults::MIN_LOG_COMPACTION_GROWTH_FACTOR
                ),
            ));
        }
        at_most(
            "log_compaction_growth_factor",
            self.log_compaction_growth_factor,
            defaults::MAX_LOG_COMPACTION_GROWTH_FACTOR,
            "100",
        )?;
        // Bounds past any use, so that every value given as a flag also fits a config
        // file (TOML's integers stop at i64) and --print-config.
        at_most(
            "log_compaction_min_bytes",
            self.log_compaction_min_bytes,
            1 << 40,
            "1 TiB",
        )?;
        at_most(
            "log_compaction_min_removed_records",
            self.log_compaction_min_removed_records,
            1_000_000_000,
            "1,000,000,000",
        )?;
        at_most(
            "max_payload_memory_bytes",
            self.max_payload_memory_bytes as u64,
            1 << 40,
            "1 TiB",
        )?;
        at_most(
            "max_active_per_principal",
            self.max_active_per_principal as u64,
            10_000_000,
            "10,000,000",
        )?;
        at_most(
            "log_group_commit_hold_us",
            self.log_group_commit_hold_us,
            defaults::MAX_LOG_GROUP_COMMIT_HOLD_US,
            "100 ms",
        )?;
        // Upper bounds keep every timer and deadline computation far from overflow.
        at_most(
            "max_transaction_timeout_ms",
            self.max_transaction_timeout_ms,
            7 * DAY_MS,
            "7 days",
        )?;
        at_most(
            "max_prepare_timeout_ms",
            self.max_prepare_timeout_ms,
            DAY_MS,
            "1 day",
        )?;
        at_most(
            "participant_call_timeout_ms",
            self.participant_call_timeout_ms,
            HOUR_MS,
            "1 hour",
        )?;
        at_most(
            "retry_backoff_max_ms",
            self.retry_backoff_max_ms,
            HOUR_MS,
            "1 hour",
        )?;
        at_most(
            "shutdown_grace_ms",
            self.shutdown_grace_ms,
            10 * 60_000,
            "10 minutes",
        )?;
        at_most(
            "memory_retention_ms",
            self.memory_retention_ms,
            30 * DAY_MS,
            "30 days",
        )?;
        // Work within its deadline is never cut off by the horizon.
        let longest_decision = self
            .max_transaction_timeout_ms
            .saturating_add(self.max_prepare_timeout_ms);
        if self.delivery_horizon_ms < longest_decision {
            return Err(bad(
                "delivery_horizon_ms",
                format!(
                    "{} is shorter than max_transaction_timeout_ms + max_prepare_timeout_ms \
                     ({longest_decision} ms): transactions could be cut off before their decision",
                    self.delivery_horizon_ms
                ),
            ));
        }
        at_most(
            "delivery_horizon_ms",
            self.delivery_horizon_ms,
            3650 * DAY_MS,
            "10 years",
        )?;
        at_most(
            "log_retention_ms",
            self.log_retention_ms,
            3650 * DAY_MS,
            "10 years",
        )?;
        at_most(
            "max_active_transactions",
            self.max_active_transactions as u64,
            10_000_000,
            "10,000,000",
        )?;
        at_most(
            "max_undelivered_aborts",
            self.max_undelivered_aborts as u64,
            10_000_000,
            "10,000,000",
        )?;
        at_most(
            "max_retained_transactions",
            self.max_retained_transactions as u64,
            10_000_000,
            "10,000,000",
        )?;
        at_most(
            "max_in_flight_calls",
            self.max_in_flight_calls as u64,
            1_000_000,
            "1,000,000",
        )?;
        at_most("shards", self.shards as u64, 1024, "1024")?;
        positive("default_step_timeout_ms", self.default_step_timeout_ms)?;
        at_most(
            "default_step_timeout_ms",
            self.default_step_timeout_ms,
            crate::api::saga::MAX_STEP_TIMEOUT_MS,
            "10 minutes",
        )?;
        positive(
            "default_step_attempts",
            u64::from(self.default_step_attempts),
        )?;
        at_most(
            "default_step_attempts",
            u64::from(self.default_step_attempts),
            u64::from(crate::api::saga::MAX_STEP_ATTEMPTS),
            "100",
        )?;
        positive(
            "compensation_stuck_after_attempts",
            u64::from(self.compensation_stuck_after_attempts),
        )?;
        at_most(
            "compensation_stuck_after_attempts",
            u64::from(self.compensation_stuck_after_attempts),
            1_000_000,
            "1,000,000",
        )?;
        positive("sweep_interval_ms", self.sweep_interval_ms)?;
        at_most(
            "sweep_interval_ms",
            self.sweep_interval_ms,
            HOUR_MS,
            "1 hour",
        )?;
        at_most("stale_after_ms", self.stale_after_ms, DAY_MS, "1 day")?;
        if self.stale_after_ms <= self.participant_call_timeout_ms {
            return Err(bad(
                "stale_after_ms",
                "must exceed participant_call_timeout_ms (or calls still running would look lost)",
            ));
        }
        if self.default_transaction_timeout_ms > self.max_transaction_timeout_ms {
            return Err(bad(
                "default_transaction_timeout_ms",
                "must not exceed max_transaction_timeout_ms",
            ));
        }
        if self.default_prepare_timeout_ms > self.max_prepare_timeout_ms {
            return Err(bad(
                "default_prepare_timeout_ms",
                "must not exceed max_prepare_timeout_ms",
            ));
        }
        if self.retry_backoff_initial_ms > self.retry_backoff_max_ms {
            return Err(bad(
                "retry_backoff_initial_ms",
                "must not exceed retry_backoff_max_ms",
            ));
        }
        if let Some(endpoint) = &self.advertise_endpoint {
            treaty_sdk::limits::check_endpoint("advertise_endpoint", endpoint)
                .map_err(|e| bad("advertise_endpoint", e.message))?;
        }
        self.endpoint_policy()?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty"));
        }
        self.security.validate(self.listen)
    }
}
