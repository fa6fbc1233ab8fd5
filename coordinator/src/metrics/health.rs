//! The shards' summary of the transactions in memory, which every scrape asks for and
//! sets the gauges from.

/// The shards' summary of the transactions in memory, taken at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Health {
    pub two_phase_in_progress: u64,
    pub sagas_in_progress: u64,
    /// Two-phase commits decided whose phase 2 has not reached every participant, and
    /// those recovered with an intent whose votes are being asked again.
    pub in_doubt: u64,
    /// When the oldest of those was decided (a recovered intent: when it began).
    pub oldest_in_doubt_unix_ms: Option<u64>,
    /// Sagas flagged stuck: a compensation keeps failing, or a step stated committed
    /// waits for an operator to undo it.
    pub stuck_sagas: u64,
    /// Two-phase commits flagged stuck: a delivery, or a prepare asked again after a
    /// restart, keeps failing or cannot succeed.
    pub stuck_two_phase_commits: u64,
    /// Aborted two-phase commits some participant has not acknowledged.
    pub undelivered_aborts: u64,
    /// When the oldest call still waiting to be retried first failed.
    pub oldest_retry_unix_ms: Option<u64>,
    /// Final transactions kept in memory, and their estimated bytes.
    pub retained_transactions: u64,
    pub retained_estimated_bytes: u64,
}

impl Health {
    /// Both summaries together.
    pub fn merge(self, other: Health) -> Health {
        let older = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Health {
            two_phase_in_progress: self.two_phase_in_progress + other.two_phase_in_progress,
            sagas_in_progress: self.sagas_in_progress + other.sagas_in_progress,
            in_doubt: self.in_doubt + other.in_doubt,
            oldest_in_doubt_unix_ms: older(
                self.oldest_in_doubt_unix_ms,
                other.oldest_in_doubt_unix_ms,
            ),
            stuck_sagas: self.stuck_sagas + other.stuck_sagas,
            stuck_two_phase_commits: self.stuck_two_phase_commits + other.stuck_two_phase_commits,
            undelivered_aborts: self.undelivered_aborts + other.undelivered_aborts,
            oldest_retry_unix_ms: older(self.oldest_retry_unix_ms, other.oldest_retry_unix_ms),
            retained_transactions: self.retained_transactions + other.retained_transactions,
            retained_estimated_bytes: self.retained_estimated_bytes
                + other.retained_estimated_bytes,
        }
    }
}
