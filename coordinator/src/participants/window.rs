//! An endpoint's recent calls, for operators (`treaty endpoints`): how many went out and
//! how many got no good answer in about the last minute, and the last failure.
//!
//! Six buckets of ten seconds; a bucket older than the window is reused, so memory is
//! fixed per endpoint and the counts never include calls older than a minute.

use std::time::Instant;

use crate::model::UnixMs;

const BUCKET_SECONDS: u64 = 10;
const BUCKETS: usize = 6;

/// Longest failure text kept.
const MAX_FAILURE_BYTES: usize = 256;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which ten seconds since `CallWindow::origin` it counts.
    index: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
pub struct CallWindow {
    origin: Instant,
    buckets: [Bucket; BUCKETS],
    last_failure: Option<(UnixMs, String)>,
}

impl Default for CallWindow {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            buckets: [Bucket::default(); BUCKETS],
            last_failure: None,
        }
    }
}

/// What the window shows now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecentCalls {
    pub calls: u32,
    pub failures: u32,
    /// The last failure and when it happened, however long ago.
    pub last_failure: Option<(UnixMs, String)>,
}

impl CallWindow {
    fn index(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / BUCKET_SECONDS
    }

    /// One call that went out; `failure` says what went wrong, if anything did.
    pub fn record(&mut self, now: Instant, now_unix_ms: UnixMs, failure: Option<&str>) {
        let index = self.index(now);
        let bucket = &mut self.buckets[(index % BUCKETS as u64) as usize];
        if bucket.index != index {
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        bucket.calls = bucket.calls.saturating_add(1);
        if let Some(failure) = failure {
            bucket.failures = bucket.failures.saturating_add(1);
            let mut text = failure.to_string();
            if text.len() > MAX_FAILURE_BYTES {
                let mut end = MAX_FAILURE_BYTES;
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
            self.last_failure = Some((now_unix_ms, text));
        }
    }

    /// Calls and failures of the buckets still inside the window.
    pub fn recent(&self, now: Instant) -> RecentCalls {
        let current = self.index(now);
        let live = self
            .buckets
            .iter()
            .filter(|b| b.calls > 0 && current.saturating_sub(b.index) < BUCKETS as u64);
        let (calls, failures) = live.fold((0u32, 0u32), |(c, f), b| {
            (c.saturating_add(b.calls), f.saturating_add(b.failures))
        });
        RecentCalls {
            calls,
            failures,
            last_failure: self.last_failure.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_the_last_minute_only() {
        let mut window = CallWindow::default();
        let start = window.origin;
        window.record(start, 1, None);
        window.record(start, 2, Some("participant unreachable"));
        let recent = window.recent(start);
        assert_eq!((recent.calls, recent.failures), (2, 1));
        assert_eq!(
            recent.last_failure,
            Some((2, "participant unreachable".to_string()))
        );
        // 35 s later both still count; one more call lands in another bucket.
        let later = start + Duration::from_secs(35);
        window.record(later, 3, None);
        assert_eq!(window.recent(later).calls, 3);
        // 65 s after the start the first bucket has left the window.
        let past = start + Duration::from_secs(65);
        let recent = window.recent(past);
        assert_eq!((recent.calls, recent.failures), (1, 0));
        // The last failure is kept however old, with a bounded text.
        assert!(recent.last_failure.is_some());
        window.record(past, 4, Some(&"é".repeat(1000)));
        let kept = window.recent(past).last_failure.unwrap().1;
        assert!(kept.len() <= MAX_FAILURE_BYTES);
        // A bucket reused after a full turn starts over.
        let turn = start + Duration::from_secs(BUCKET_SECONDS * BUCKETS as u64 * 2);
        window.record(turn, 5, None);
        assert_eq!(window.recent(turn).calls, 1);
    }
}
