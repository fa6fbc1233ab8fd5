//! `treaty bench`: the coordinator's resident memory (RSS, from `/proc`) sampled every
//! `--rss-sample-ms` through the whole run, and whether it stayed flat (docs/limits.md,
//! "Memory"; issue 11: flat within ±10 % over 1,000,000 transactions).
//!
//! The run starts with a warm-up: caches fill, the retained transactions reach their
//! bound, the log fills up to its retention or its limit of final transactions, and its
//! first purge (the bench's coordinator starts on a new log, which takes its compaction
//! base there instead of compacting) lifts the resident set once to about the level it
//! then keeps (docs/PERFORMANCE.md, "The warm-up waits for the log to fill", "No
//! compaction while the log only grows"). The
//! warm-up is the first tenth of the run (by time), or longer, until the log first
//! purges (the sign that it holds what it will hold), when that comes later but within
//! the first half of the run (a log still filling past half the run leaves the tenth,
//! and what grows with it counts). The rest is cut into four quarters of equal time;
//! each gets the min, max and mean of its samples, and the run's flatness is
//! (max − min) / mean of the four quarter means: 0.10 means the quarters' means lie
//! within 10 % of their average of each other. The report gives the flatness after the
//! first tenth too, as it was measured before the warm-up waited for the log.
//!
//! The samples also read the coordinator's `/metrics`, when the bench knows its
//! address: until one shows the log's first purge, and with `--rss-csv` every one, for
//! what the CSV writes beside the resident set (the log's compactions, size, final
//! transactions and purges, the final transactions kept in memory), so that a step in
//! the RSS can be told from the run's own file.
//!
//! Invariants: at most [`MAX_SAMPLES`] samples are kept (later ones are dropped, and the
//! report says how many were taken); sampling reads one `/proc` file, and at most one
//! scrape bounded by [`GAUGES_TIMEOUT`], and never blocks the load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::workload::Tally;

/// Most samples kept (a sample a second for more than a day).
pub const MAX_SAMPLES: usize = 100_000;
/// The share of the run, from its start, that is warm-up at least.
const WARMUP_FRACTION: f64 = 0.1;
/// The share of the run within which the log must first purge for the warm-up to wait
/// for it.
const LOG_FILL_MAX_FRACTION: f64 = 0.5;
/// Longest a sample waits for the coordinator's `/metrics`; a slower answer leaves
/// that sample's gauges empty.
pub const GAUGES_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RssSample {
    pub elapsed_s: f64,
    pub transactions: u64,
    pub rss_bytes: u64,
    /// `None` when they were not asked for or could not be read in time.
    pub gauges: Option<CoordinatorGauges>,
}

/// What the coordinator's `/metrics` said at a sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CoordinatorGauges {
    /// Compactions of the log that ended, switched or abandoned.
    pub log_compactions: f64,
    /// What the log's files take on disk, a compaction's copy included.
    pub log_disk_bytes: f64,
    /// Final transactions the log keeps.
    pub log_finished: f64,
    /// Final transactions the log purged so far, for its retention or its limit.
    pub log_purged: f64,
    /// Final transactions kept in memory, and what the coordinator estimates they hold.
    pub retained_transactions: f64,
    pub retained_estimated_bytes: f64,
}

impl CoordinatorGauges {
    /// Reads them from `address`, within [`GAUGES_TIMEOUT`].
    async fn read(address: SocketAddr) -> Option<Self> {
        let text = tokio::time::timeout(GAUGES_TIMEOUT, super::observe::scrape(address))
            .await
            .ok()?
            .ok()?;
        let gauge = |name: &str| super::observe::sum(&text, name);
        Some(Self {
            log_compactions: gauge("treaty_log_compactions_total"),
            log_disk_bytes: gauge("treaty_log_disk_bytes"),
            log_finished: gauge("treaty_log_finished_transactions"),
            log_purged: gauge("treaty_log_purged_total"),
            retained_transactions: gauge("treaty_retained_transactions"),
            retained_estimated_bytes: gauge("treaty_retained_transactions_estimated_bytes"),
        })
    }

    /// Whether the log had purged anything by then (the warm-up's end).
    fn show_a_purge(&self) -> bool {
        self.log_purged > 0.0
    }
}

/// One quarter of the run after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Quarter {
    pub from_s: f64,
    pub to_s: f64,
    pub samples: usize,
    pub min_bytes: u64,
    pub max_bytes: u64,
    pub mean_bytes: f64,
}

/// The coordinator's memory over the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MemoryReport {
    pub sample_every_ms: u64,
    pub samples: usize,
    pub warmup_s: f64,
    /// When the log first purged, from the start of the load (`None`: it did not, or
    /// its gauges were not read: see `log_purges_read`).
    pub log_first_purge_s: Option<f64>,
    pub log_purges_read: bool,
    /// The largest sample of the whole run, warm-up included.
    pub max_bytes: u64,
    /// The largest resident set the coordinator had: its `VmHWM` at the end (peaks
    /// between samples included) or the largest sample if larger (Linux updates the
    /// high-water mark lazily); `None` if it could not be read.
    pub peak_bytes: Option<u64>,
    /// The share of the run's transactions finished during the warm-up, which the
    /// quarters leave out.
    pub warmup_transactions_share: Option<f64>,
    /// Four, unless there were too few samples after the warm-up (then none).
    pub quarters: Vec<Quarter>,
    /// (max − min) / mean of the quarters' means; `None` without quarters.
    pub flatness: Option<f64>,
    /// The same after a warm-up of the first tenth, when the warm-up was longer.
    pub flatness_from_tenth: Option<f64>,
    /// The coordinator's `--memory-budget-bytes` (from its /metrics), and what it
    /// reported at the end about the final transactions it kept in memory.
    pub budget_bytes: Option<f64>,
    pub retained_transactions: Option<f64>,
    pub retained_estimated_bytes: Option<f64>,
    /// What the coordinator's memory governor allowed them at the end.
    pub retained_allowed_bytes: Option<f64>,
    /// Final transactions the coordinator's log kept at the end, the most the budget
    /// lets it keep, and how many it purged for that limit before their retention.
    pub log_finished: Option<f64>,
    pub log_finished_limit: Option<f64>,
    pub log_purged_for_limit: Option<f64>,
}

/// The CSV's header: what [`csv`] writes in each row.
pub const CSV_HEADER: &str = "elapsed_s,transactions,rss_bytes,log_compactions,log_disk_bytes,\
                              log_finished_transactions,log_purged_transactions,\
                              retained_transactions,retained_estimated_bytes";

/// The samples as CSV, one row each: seconds since the load began, transactions
/// finished by then, resident bytes, then the coordinator's gauges (empty fields when
/// the sample has none).
pub fn csv(samples: &[RssSample]) -> String {
    let mut out = format!("{CSV_HEADER}\n");
    for sample in samples {
        out.push_str(&format!(
            "{:.3},{},{},",
            sample.elapsed_s, sample.transactions, sample.rss_bytes
        ));
        out.push_str(&match sample.gauges {
            Some(g) => format!(
                "{},{},{},{},{},{}\n",
                g.log_compactions,
                g.log_disk_bytes,
                g.log_finished,
                g.log_purged,
                g.retained_transactions,
                g.retained_estimated_bytes
            ),
            None => ",,,,,\n".into(),
        });
    }
    out
}

/// Samples `pid`'s RSS (`None`: this process) every `every` until `stop` is set, and
/// once more then; with `metrics`, the coordinator's gauges beside each until one shows
/// the log's first purge (the warm-up's end), or beside every one if `gauges_throughout`
/// (for the CSV). A scrape costs the coordinator a health check and a look at its log's
/// files, so a plain run stops asking once it knows what it needs.
pub async fn sample(
    pid: Option<u32>,
    metrics: Option<SocketAddr>,
    gauges_throughout: bool,
    every: Duration,
    started: Instant,
    tally: Arc<Tally>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<RssSample>, usize) {
    let mut samples = Vec::new();
    let mut taken = 0;
    // Ticks `every` apart however long a sample (and its scrape) takes; one that comes
    // late delays the next rather than bunching them.
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut purge_seen = false;
    loop {
        if let Some(rss_bytes) = crate::runtime::memory::resident_bytes_of(pid) {
            taken += 1;
            if samples.len() < MAX_SAMPLES {
                let elapsed_s = started.elapsed().as_secs_f64();
                let transactions = tally.finished.load(Ordering::Relaxed);
                let gauges = match metrics {
                    Some(address) if gauges_throughout || !purge_seen => {
                        CoordinatorGauges::read(address).await
                    }
                    _ => None,
                };
                purge_seen |= gauges.is_some_and(|g| g.show_a_purge());
                samples.push(RssSample {
                    elapsed_s,
                    transactions,
                    rss_bytes,
                    gauges,
                });
            }
        }
        if *stop.borrow() {
            return (samples, taken);
        }
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.changed() => {}
        }
    }
}

/// The warm-up, quarters and flatness of `samples` (in time order).
pub fn summarize(samples: &[RssSample], sample_every_ms: u64, taken: usize) -> MemoryReport {
    let end_s = samples.last().map_or(0.0, |s| s.elapsed_s);
    let tenth_s = end_s * WARMUP_FRACTION;
    let log_purges_read = samples.iter().any(|s| s.gauges.is_some());
    let log_first_purge_s = samples
        .iter()
        .find(|s| s.gauges.is_some_and(|g| g.show_a_purge()))
        .map(|s| s.elapsed_s);
    let warmup_s = match log_first_purge_s {
        Some(at_s) if at_s > tenth_s && at_s <= end_s * LOG_FILL_MAX_FRACTION => at_s,
        _ => tenth_s,
    };
    let (quarters, flatness) = quarters_after(samples, warmup_s, end_s);
    let warmup_transactions_share = samples
        .iter()
        .find(|s| s.elapsed_s >= warmup_s)
        .zip(samples.last())
        .filter(|(_, last)| last.transactions > 0)
        .map(|(at_end_of_warmup, last)| {
            at_end_of_warmup.transactions as f64 / last.transactions as f64
        });
    let flatness_from_tenth = if warmup_s > tenth_s {
        quarters_after(samples, tenth_s, end_s).1
    } else {
        None
    };
    MemoryReport {
        sample_every_ms,
        samples: taken,
        warmup_s,
        log_first_purge_s,
        log_purges_read,
        max_bytes: samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0),
        peak_bytes: None,
        warmup_transactions_share,
        quarters,
        flatness,
        flatness_from_tenth,
        budget_bytes: None,
        retained_transactions: None,
        retained_estimated_bytes: None,
        retained_allowed_bytes: None,
        log_finished: None,
        log_finished_limit: None,
        log_purged_for_limit: None,
    }
}

/// Four quarters of equal time from `warmup_s` to `end_s` and their flatness; none if
/// a quarter has no sample.
fn quarters_after(samples: &[RssSample], warmup_s: f64, end_s: f64) -> (Vec<Quarter>, Option<f64>) {
    let quarter_s = (end_s - warmup_s) / 4.0;
    let mut quarters = Vec::new();
    for index in 0..4 {
        let from_s = warmup_s + quarter_s * index as f64;
        let to_s = from_s + quarter_s;
        let last = index == 3;
        let part: Vec<u64> = samples
            .iter()
            .filter(|s| s.elapsed_s >= from_s && (s.elapsed_s < to_s || last))
            .map(|s| s.rss_bytes)
            .collect();
        let (Some(&min_bytes), Some(&max_bytes)) = (part.iter().min(), part.iter().max()) else {
            return (Vec::new(), None);
        };
        quarters.push(Quarter {
            from_s,
            to_s,
            samples: part.len(),
            min_bytes,
            max_bytes,
            mean_bytes: part.iter().sum::<u64>() as f64 / part.len() as f64,
        });
    }
    let means: Vec<f64> = quarters.iter().map(|q| q.mean_bytes).collect();
    let low = means.iter().copied().fold(f64::INFINITY, f64::min);
    let high = means.iter().copied().fold(0.0, f64::max);
    let mean = means.iter().sum::<f64>() / means.len() as f64;
    (quarters, Some((high - low) / mean))
}

impl MemoryReport {
    /// Why the warm-up ends where it does.
    fn warmup_reason(&self) -> String {
        match self.log_first_purge_s {
            _ if !self.log_purges_read => "the first tenth; the log's purges not read".into(),
            None => "the first tenth; no sample read showed the log purging".into(),
            Some(at_s) if at_s == self.warmup_s => "until the log first purged".into(),
            Some(at_s) if at_s < self.warmup_s => {
                format!("the first tenth; the log first purged at {at_s:.0} s")
            }
            Some(at_s) => format!(
                "the first tenth; the log first purged at {at_s:.0} s, past half the run, so \
                 its filling counts"
            ),
        }
    }

    /// Lines for people.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "coordinator RSS: {} samples every {} ms; warm-up {:.0} s ({}{}); max {}{}",
            self.samples,
            self.sample_every_ms,
            self.warmup_s,
            self.warmup_reason(),
            self.warmup_transactions_share
                .map(|share| format!(", {:.0} % of the transactions", 100.0 * share))
                .unwrap_or_default(),
            mib(self.max_bytes as f64),
            self.peak_bytes
                .map(|peak| format!(", peak {} (VmHWM: between samples too)", mib(peak as f64)))
                .unwrap_or_default(),
        )];
        for (index, q) in self.quarters.iter().enumerate() {
            lines.push(format!(
                "  quarter {} ({:.0}-{:.0} s, {} samples): min {}, max {}, mean {}",
                index + 1,
                q.from_s,
                q.to_s,
                q.samples,
                mib(q.min_bytes as f64),
                mib(q.max_bytes as f64),
                mib(q.mean_bytes),
            ));
        }
        lines.push(match self.flatness {
            Some(flatness) => format!(
                "  flatness (max - min) / mean of the quarter means: {:.3} ({})",
                flatness,
                if flatness <= 0.1 {
                    "within 10 %"
                } else {
                    "NOT within 10 %"
                }
            ),
            None => "  too few samples after the warm-up for quarters".into(),
        });
        if let Some(flatness) = self.flatness_from_tenth {
            lines.push(format!(
                "  flatness after the first tenth instead, the log's filling included: {flatness:.3}"
            ));
        }
        if let Some(budget) = self.budget_bytes {
            // The peak, where it could be read, is the largest the set ever was.
            let largest = self
                .peak_bytes
                .unwrap_or(self.max_bytes)
                .max(self.max_bytes) as f64;
            lines.push(format!(
                "  budget {}: largest resident set {:.0} % of it ({}); at the end {} final transactions kept in memory, estimated {}, allowed {}",
                mib(budget),
                100.0 * largest / budget,
                if largest <= budget { "within" } else { "OVER" },
                self.retained_transactions.unwrap_or(f64::NAN),
                mib(self.retained_estimated_bytes.unwrap_or(f64::NAN)),
                mib(self.retained_allowed_bytes.unwrap_or(f64::NAN)),
            ));
        }
        if let Some(finished) = self.log_finished {
            lines.push(format!(
                "  the log kept {} final transactions at the end (limit {}; {} purged for the limit before their retention)",
                finished,
                self.log_finished_limit.unwrap_or(f64::NAN),
                self.log_purged_for_limit.unwrap_or(f64::NAN),
            ));
        }
        lines
    }
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests;
