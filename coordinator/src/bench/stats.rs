//! The two summaries every part of the bench computes the same way: a quantile of sorted
//! durations, and a mean time in milliseconds.

use std::time::Duration;

/// The `p` quantile of `sorted` in milliseconds (0 when it is empty).
pub fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let Some(last) = sorted.len().checked_sub(1) else {
        return 0.0;
    };
    let index = (last as f64 * p).round() as usize;
    sorted[index.min(last)].as_secs_f64() * 1_000.0
}

/// `seconds` over `count` events, in milliseconds each; `None` without an event.
pub fn mean_ms(seconds: f64, count: f64) -> Option<f64> {
    (count > 0.0).then(|| seconds * 1000.0 / count)
}
