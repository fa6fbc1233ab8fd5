//! Checking and converting a SubmitSaga request. Every rule names the field (and so the
//! step) it is about; nothing reaches the runtime until the whole request passed.

use treaty_proto::v1 as pb;
use treaty_sdk::limits::{
    FieldError, MAX_BRANCHES, MAX_SAGA_PAYLOAD_BYTES, check_id, check_idempotency_key,
    check_payload,
};

use super::pb::ItemField;
use crate::endpoint_policy::EndpointPolicy;
use crate::engine::saga_graph::{GraphError, resolve_dependencies};
use crate::model::{RetryPolicy, SagaDefinition, StepDefinition, StepRequest};
use crate::runtime::SagaParams;

/// Longest a step's call may take.
pub const MAX_STEP_TIMEOUT_MS: u64 = 600_000;
/// Most forward attempts a step may ask for.
pub const MAX_STEP_ATTEMPTS: u32 = 100;
/// Longest retry delay a step may ask for.
pub const MAX_STEP_BACKOFF_MS: u64 = 3_600_000;
/// Shortest first retry delay a step may ask for: compensations retry without end, so
/// their pace must not be a busy loop.
pub const MIN_STEP_BACKOFF_MS: u64 = 10;

/// Server defaults for what a step leaves unset.
#[derive(Debug, Clone)]
pub struct SagaDefaults {
    pub step_timeout_ms: u64,
    pub step_attempts: u32,
    pub retry_backoff_initial_ms: u64,
    pub retry_backoff_max_ms: u64,
    pub stuck_after_attempts: u32,
}

/// The saga a request describes, its endpoints in canonical form and allowed by `policy`.
pub fn saga_params(
    request: pb::SubmitSagaRequest,
    defaults: &SagaDefaults,
    policy: &EndpointPolicy,
) -> Result<SagaParams, FieldError> {
    let idempotency_key = if request.idempotency_key.is_empty() {
        None
    } else {
        check_idempotency_key("idempotency_key", &request.idempotency_key)?;
        Some(request.idempotency_key)
    };
    if request.steps.is_empty() {
        return Err(FieldError::new("steps", "a saga needs at least one step"));
    }
    if request.steps.len() > MAX_BRANCHES {
        return Err(FieldError::new(
            "steps",
            format!("{} steps; the limit is {MAX_BRANCHES}", request.steps.len()),
        ));
    }
    let payload_bytes: usize = request
        .steps
        .iter()
        .map(|s| s.payload.len() + s.compensation_payload.len())
        .sum();
    if payload_bytes > MAX_SAGA_PAYLOAD_BYTES {
        return Err(FieldError::new(
            "steps",
            format!(
                "payloads and compensation payloads total {payload_bytes} bytes; the limit is {MAX_SAGA_PAYLOAD_BYTES}"
            ),
        ));
    }
    let mut steps = Vec::with_capacity(request.steps.len());
    let mut after_names = Vec::with_capacity(request.steps.len());
    for (index, step) in request.steps.into_iter().enumerate() {
        // Formatted only if a check fails.
        let field = |name: &'static str| ItemField::new("steps", index, name);
        check_id(field("step_id"), &step.step_id)?;
        if step.after.len() > MAX_BRANCHES {
            return Err(FieldError::new(
                field("after"),
                format!(
                    "{} dependencies; a saga has at most {MAX_BRANCHES} steps",
                    step.after.len()
                ),
            ));
        }
        for (position, name) in step.after.iter().enumerate() {
            let field = ItemField {
                position: Some(position),
                ..field("after")
            };
            check_id(field, name)?;
        }
        let endpoint = policy.check(field("endpoint"), &step.endpoint)?;
        check_payload(field("payload"), &step.payload)?;
        check_payload(field("compensation_payload"), &step.compensation_payload)?;
        let timeout_ms = match step.timeout_ms {
            0 => defaults.step_timeout_ms,
            ms if ms > MAX_STEP_TIMEOUT_MS => {
                return Err(FieldError::new(
                    field("timeout_ms"),
                    format!("{ms} exceeds the limit of {MAX_STEP_TIMEOUT_MS} ms"),
                ));
            }
            ms => ms,
        };
        let requested_retry = step.retry.unwrap_or_default();
        let requested = StepRequest {
            timeout_ms: step.timeout_ms,
            max_attempts: requested_retry.max_attempts,
            initial_backoff_ms: requested_retry.initial_backoff_ms,
            max_backoff_ms: requested_retry.max_backoff_ms,
        };
        let retry = retry_policy(field("retry"), step.retry, defaults)?;
        steps.push(StepDefinition {
            id: step.step_id,
            endpoint,
            payload: step.payload,
            compensation: step.compensation_payload,
            timeout_ms,
            retry,
            after: Vec::new(),
            requested,
        });
        after_names.push(step.after);
    }
    let ids: Vec<String> = steps.iter().map(|s| s.id.clone()).collect();
    let resolved = resolve_dependencies(&ids, &after_names).map_err(|error| {
        let (step, name) = match &error {
            GraphError::DuplicateStep { step, .. } => (*step, "step_id"),
            GraphError::UnknownStep { step, .. }
            | GraphError::SelfDependency { step }
            | GraphError::Cycle { step, .. } => (*step, "after"),
        };
        FieldError::new(format!("steps[{step}].{name}"), error.to_string())
    })?;
    for (step, after) in steps.iter_mut().zip(resolved) {
        step.after = after;
    }
    Ok(SagaParams {
        definition: SagaDefinition {
            steps,
            stuck_after_attempts: defaults.stuck_after_attempts,
        },
        idempotency_key,
        // The API sets the owner and scopes the key once the caller is known, and the
        // trace from the request's metadata.
        owner: None,
        trace: None,
        deadline_unix_ms: None,
        refused_if_new: None,
    })
}

fn retry_policy(
    field: impl std::fmt::Display,
    retry: Option<pb::RetryPolicy>,
    defaults: &SagaDefaults,
) -> Result<RetryPolicy, FieldError> {
    let retry = retry.unwrap_or_default();
    let max_attempts = match retry.max_attempts {
        0 => defaults.step_attempts,
        n if n > MAX_STEP_ATTEMPTS => {
            return Err(FieldError::new(
                format!("{field}.max_attempts"),
                format!("{n} exceeds the limit of {MAX_STEP_ATTEMPTS}"),
            ));
        }
        n => n,
    };
    // Each field given is checked by itself first, so that an error names a field the
    // caller set; a default then fits what was given (an initial backoff no longer than
    // the maximum given, a maximum no shorter than the initial given).
    for (name, ms) in [
        ("initial_backoff_ms", retry.initial_backoff_ms),
        ("max_backoff_ms", retry.max_backoff_ms),
    ] {
        if ms == 0 {
            continue;
        }
        if ms < MIN_STEP_BACKOFF_MS {
            return Err(FieldError::new(
                format!("{field}.{name}"),
                format!("{ms} is below the minimum of {MIN_STEP_BACKOFF_MS} ms"),
            ));
        }
        if ms > MAX_STEP_BACKOFF_MS {
            return Err(FieldError::new(
                format!("{field}.{name}"),
                format!("{ms} exceeds the limit of {MAX_STEP_BACKOFF_MS} ms"),
            ));
        }
    }
    let (initial_backoff_ms, max_backoff_ms) =
        match (retry.initial_backoff_ms, retry.max_backoff_ms) {
            (0, 0) => {
                let initial = defaults.retry_backoff_initial_ms;
                (initial, defaults.retry_backoff_max_ms.max(initial))
            }
            (0, max) => (defaults.retry_backoff_initial_ms.min(max), max),
            (initial, 0) => (initial, defaults.retry_backoff_max_ms.max(initial)),
            given => given,
        };
    if initial_backoff_ms > max_backoff_ms {
        return Err(FieldError::new(
            format!("{field}.initial_backoff_ms"),
            format!("{initial_backoff_ms} exceeds max_backoff_ms ({max_backoff_ms})"),
        ));
    }
    Ok(RetryPolicy {
        max_attempts,
        initial_backoff_ms,
        max_backoff_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: SagaDefaults = SagaDefaults {
        step_timeout_ms: 30_000,
        step_attempts: 5,
        retry_backoff_initial_ms: 100,
        retry_backoff_max_ms: 30_000,
        stuck_after_attempts: 10,
    };

    fn policy(initial_backoff_ms: u64, max_backoff_ms: u64) -> Result<RetryPolicy, FieldError> {
        let retry = pb::RetryPolicy {
            max_attempts: 0,
            initial_backoff_ms,
            max_backoff_ms,
        };
        retry_policy("steps[0].retry", Some(retry), &DEFAULTS)
    }

    /// An error names a field the caller set; a default gives way to what was set. Both
    /// cases below named the field left at its default before.
    #[test]
    fn backoffs_refused_name_the_field_given_and_defaults_fit_what_was_given() {
        let short_max = policy(0, 50).unwrap();
        assert_eq!(
            (short_max.initial_backoff_ms, short_max.max_backoff_ms),
            (50, 50)
        );
        let long_initial = policy(600_000, 0).unwrap();
        assert_eq!(
            (long_initial.initial_backoff_ms, long_initial.max_backoff_ms),
            (600_000, 600_000)
        );
        let defaults = policy(0, 0).unwrap();
        assert_eq!(
            (defaults.initial_backoff_ms, defaults.max_backoff_ms),
            (100, 30_000)
        );
        for (initial, max, field) in [
            (7_200_000, 0, "steps[0].retry.initial_backoff_ms"),
            (5, 0, "steps[0].retry.initial_backoff_ms"),
            (0, 7_200_000, "steps[0].retry.max_backoff_ms"),
            (0, 5, "steps[0].retry.max_backoff_ms"),
            (500, 200, "steps[0].retry.initial_backoff_ms"),
        ] {
            let error = policy(initial, max).unwrap_err();
            assert_eq!(error.field, field, "{initial} {max}: {}", error.message);
        }
    }
}
