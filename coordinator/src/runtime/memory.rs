//! Keeps the coordinator's resident memory under `memory_budget_bytes`.
//!
//! Of the budget's parts, one can give way at once without changing any answer: the
//! final transactions kept in memory, a cache of what the log holds (lookups that miss
//! memory read the log). The governor reads the process's resident set every
//! [`SAMPLE_INTERVAL`] and moves the bytes those transactions may hold (the allowance) so
//! that the resident set stays under a ceiling a little below the budget:
//! - above the ceiling (15/16 of the budget), the allowance falls by the excess, from
//!   what the kept transactions hold if that is less. The next [`SETTLE_SAMPLES`]
//!   readings after a fall cannot make it fall again: memory freed and not yet handed
//!   back by the allocator must not be taken out twice.
//! - below the floor (7/8 of the budget), it rises by half the room under the ceiling.
//!
//! Invariants: the allowance is never above the configured share (`max_retained_bytes`);
//! at zero, each shard still keeps what ended in the last second, and whatever the log
//! has not yet applied the last writes of (`retained.rs`: what leaves memory is read
//! from the log, which must then hold its end). A
//! shard applies a lower allowance at its next housekeeping (every second) or when its
//! next transaction ends, whichever comes first. Where the resident set cannot be read
//! (no `/proc`), the allowance stays at the share. The governor ends when the daemon
//! stops (or its stop signal is dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;

use super::Runtime;
use crate::metrics::Metrics;

/// How often the resident set is read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Readings after a fall before the allowance may fall again.
pub const SETTLE_SAMPLES: u32 = 3;

/// The bytes final transactions may hold in memory now, all shards together: shared
/// between the governor, which moves it, and the shards, which apply it. Without a
/// governor it never restricts (the configured share alone applies).
#[derive(Debug, Clone)]
pub struct RetainedAllowance(Arc<AtomicUsize>);

impl Default for RetainedAllowance {
    fn default() -> Self {
        Self(Arc::new(AtomicUsize::new(usize::MAX)))
    }
}

impl RetainedAllowance {
    /// What finished transactions may hold now, all shards together.
    pub fn bytes(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, bytes: usize) {
        self.0.store(bytes, Ordering::Relaxed);
    }
}

/// Moves the allowance from readings of the resident set (see the module docs).
#[derive(Debug)]
pub struct Governor {
    ceiling_bytes: u64,
    floor_bytes: u64,
    share_bytes: usize,
    allowance: RetainedAllowance,
    /// Readings still to come before the allowance may fall again.
    settling: u32,
}

impl Governor {
    /// A governor for `budget_bytes` whose transactions' share is `share_bytes`; the
    /// allowance starts at the share.
    pub fn new(budget_bytes: u64, share_bytes: usize, allowance: RetainedAllowance) -> Self {
        allowance.set(share_bytes);
        Self {
            ceiling_bytes: budget_bytes / 16 * 15,
            floor_bytes: budget_bytes / 8 * 7,
            share_bytes,
            allowance,
            settling: 0,
        }
    }

    /// Whether a reading of `resident_bytes` would lower the allowance, so that what
    /// the kept transactions hold is worth asking for.
    pub fn would_fall(&self, resident_bytes: u64) -> bool {
        resident_bytes > self.ceiling_bytes && self.settling == 0
    }

    /// Takes one reading of the resident set, with what the kept transactions hold now
    /// (`None` if not asked: see `would_fall`), and returns the allowance from now on.
    pub fn observe(&mut self, resident_bytes: u64, held_bytes: Option<usize>) -> usize {
        let current = self.allowance.bytes().min(self.share_bytes);
        let next = if resident_bytes > self.ceiling_bytes {
            if self.settling > 0 {
                self.settling -= 1;
                current
            } else {
                self.settling = SETTLE_SAMPLES;
                let excess =
                    usize::try_from(resident_bytes - self.ceiling_bytes).unwrap_or(usize::MAX);
                current
                    .min(held_bytes.unwrap_or(current))
                    .saturating_sub(excess)
            }
        } else {
            self.settling = self.settling.saturating_sub(1);
            if resident_bytes < self.floor_bytes {
                let room = usize::try_from((self.ceiling_bytes - resident_bytes) / 2)
                    .unwrap_or(usize::MAX);
                current.saturating_add(room).min(self.share_bytes)
            } else {
                current
            }
        };
        self.allowance.set(next);
        next
    }
}

/// The resident set of this process in bytes (`VmRSS` of `/proc/self/status`), if the
/// system has one to read.
pub fn resident_bytes() -> Option<u64> {
    resident_bytes_of(None)
}

/// The resident set of process `pid` (this one if `None`), as [`resident_bytes`] reads it.
pub fn resident_bytes_of(pid: Option<u32>) -> Option<u64> {
    status_bytes(pid, "VmRSS:")
}

/// The largest resident set process `pid` (this one if `None`) has had since it started,
/// as the kernel tracks it (`VmHWM`): peaks between two samples of [`resident_bytes_of`]
/// included, but updated lazily (memory given back with `madvise` does not update it
/// first), so it may read below an earlier sample.
pub fn peak_resident_bytes_of(pid: Option<u32>) -> Option<u64> {
    status_bytes(pid, "VmHWM:")
}

/// A `/proc/PID/status` field given in kB, in bytes.
fn status_bytes(pid: Option<u32>, field: &str) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Runs `governor` until `stopping` says so (or its sender is gone), reading the resident
/// set every [`SAMPLE_INTERVAL`] and showing it and the allowance on `/metrics`.
pub async fn govern(
    mut governor: Governor,
    runtime: Runtime,
    metrics: Arc<Metrics>,
    mut stopping: watch::Receiver<bool>,
) {
    metrics.set_retained_allowance(governor.allowance.bytes());
    if resident_bytes().is_none() {
        tracing::info!(
            "the resident set cannot be read here: final transactions kept in memory are bounded by their share of the budget alone"
        );
        return;
    }
    let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping.wait_for(|stopping| *stopping) => return,
        }
        let Some(resident) = resident_bytes() else {
            continue;
        };
        let held = if governor.would_fall(resident) {
            match runtime.health().await {
                Ok(health) => {
                    Some(usize::try_from(health.retained_estimated_bytes).unwrap_or(usize::MAX))
                }
                Err(_) => return,
            }
        } else {
            None
        };
        let before = governor.allowance.bytes();
        let allowance = governor.observe(resident, held);
        if allowance < before {
            tracing::info!(
                resident_bytes = resident,
                allowance_bytes = allowance,
                "resident memory over the budget's ceiling: keeping fewer final transactions in memory"
            );
        }
        metrics.set_retained_allowance(allowance);
        metrics.set_resident_memory(resident);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;
    const BUDGET: u64 = 256 * MIB;
    const SHARE: usize = 64 * MIB as usize;
    /// 15/16 and 7/8 of the budget.
    const CEILING: u64 = 240 * MIB;
    const FLOOR: u64 = 224 * MIB;

    fn governor() -> (Governor, RetainedAllowance) {
        let allowance = RetainedAllowance::default();
        (Governor::new(BUDGET, SHARE, allowance.clone()), allowance)
    }

    #[test]
    fn without_a_governor_the_allowance_restricts_nothing() {
        assert_eq!(RetainedAllowance::default().bytes(), usize::MAX);
    }

    #[test]
    fn the_allowance_starts_at_the_share_and_stays_put_between_floor_and_ceiling() {
        let (mut governor, allowance) = governor();
        assert_eq!(allowance.bytes(), SHARE);
        for resident in [FLOOR, FLOOR + MIB, CEILING] {
            assert_eq!(governor.observe(resident, None), SHARE);
        }
        // Lowered, it neither falls nor rises while the reading stays in the band.
        let fallen = governor.observe(CEILING + 16 * MIB, Some(SHARE));
        assert_eq!(fallen, SHARE - 16 * MIB as usize);
        for _ in 0..10 {
            for resident in [FLOOR, FLOOR + MIB, CEILING] {
                assert_eq!(governor.observe(resident, None), fallen);
            }
        }
    }

    #[test]
    fn a_dip_under_the_ceiling_does_not_cut_the_settling_short() {
        let (mut governor, _) = governor();
        let over = CEILING + 4 * MIB;
        let fallen = governor.observe(over, Some(SHARE));
        // Under, over, over: still within the three readings after the fall.
        assert_eq!(governor.observe(CEILING, None), fallen);
        assert!(!governor.would_fall(over));
        assert_eq!(governor.observe(over, None), fallen);
        assert_eq!(governor.observe(over, None), fallen);
        assert!(governor.would_fall(over));
        assert_eq!(
            governor.observe(over, Some(fallen)),
            fallen - 4 * MIB as usize
        );
    }

    #[test]
    fn over_the_ceiling_it_falls_by_the_excess_then_settles_before_falling_again() {
        let (mut governor, allowance) = governor();
        let resident = CEILING + 10 * MIB;
        assert!(governor.would_fall(resident));
        let fallen = governor.observe(resident, Some(SHARE));
        assert_eq!(fallen, SHARE - 10 * MIB as usize);
        assert_eq!(
            allowance.bytes(),
            fallen,
            "the shards see what the governor set"
        );
        for _ in 0..SETTLE_SAMPLES {
            assert!(!governor.would_fall(resident));
            assert_eq!(governor.observe(resident, None), fallen, "settling");
        }
        assert!(governor.would_fall(resident));
        assert_eq!(
            governor.observe(resident, Some(fallen)),
            fallen - 10 * MIB as usize
        );
    }

    #[test]
    fn a_fall_starts_from_what_is_held_when_that_is_less_than_the_allowance() {
        let (mut governor, _) = governor();
        let held = 12 * MIB as usize;
        assert_eq!(
            governor.observe(CEILING + 5 * MIB, Some(held)),
            7 * MIB as usize
        );
    }

    #[test]
    fn an_excess_beyond_what_is_held_takes_the_allowance_to_zero_not_below() {
        let (mut governor, _) = governor();
        assert_eq!(governor.observe(BUDGET * 4, Some(SHARE)), 0);
        for _ in 0..SETTLE_SAMPLES {
            assert_eq!(governor.observe(BUDGET * 4, None), 0);
        }
        assert_eq!(governor.observe(BUDGET * 4, Some(0)), 0);
    }

    #[test]
    fn below_the_floor_it_rises_by_half_the_room_up_to_the_share() {
        let (mut governor, _) = governor();
        assert_eq!(governor.observe(BUDGET * 2, Some(SHARE)), 0);
        // Under the floor it rises (the settling only holds back falls).
        let resident = CEILING - 20 * MIB;
        assert_eq!(governor.observe(resident, None), 10 * MIB as usize);
        assert_eq!(governor.observe(resident, None), 20 * MIB as usize);
        for _ in 0..10 {
            governor.observe(0, None);
        }
        assert_eq!(governor.observe(0, None), SHARE, "never above the share");
        // Between the floor and the ceiling it stays where it is.
        let (mut governor, _) = self::governor();
        governor.observe(CEILING + 30 * MIB, Some(SHARE));
        assert_eq!(
            governor.observe(FLOOR + MIB, None),
            SHARE - 30 * MIB as usize
        );
    }

    #[test]
    fn this_process_has_a_resident_set_where_proc_exists() {
        if std::path::Path::new("/proc/self/status").exists() {
            let resident = resident_bytes().expect("VmRSS in /proc/self/status");
            assert!(resident > 0);
        }
    }
}
