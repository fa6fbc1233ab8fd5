//! The calls made for one branch and what came of each: the attempt log a branch's
//! record keeps. Invariants: at most [`MAX_ATTEMPTS_KEPT`] attempts, oldest first, a call
//! in flight never dropped for room; an answer closes the call it names and no other;
//! the log's encoding is the attempts alone (call numbers live in memory only).

use serde::{Deserialize, Serialize};

use super::UnixMs;

/// What one call to a participant was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operation {
    Prepare,
    Commit,
    OnePhaseCommit,
    Abort,
    Step,
    Compensate,
}

/// Which of a branch's calls an answer is to: its calls are numbered from 1 as they are
/// sent. Not in the log's encoding: attempts decoded after a restart are numbered 0 and
/// closed (their answers cannot come), and numbering starts again. (The in-memory log
/// keeps records whole, numbers included.) Compared by `PartialEq`, like the record's
/// other fields kept in memory only.
pub type CallNumber = u32;

/// One call to a participant and what came of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 0 for an attempt decoded from the log.
    #[serde(skip)]
    pub call: CallNumber,
    pub operation: Operation,
    pub started_unix_ms: UnixMs,
    /// `None` while the call is in flight.
    pub finished_unix_ms: Option<UnixMs>,
    /// "committed", "voted NO: …", "error: …".
    pub result: Option<String>,
}

/// Most attempts kept per branch; older finished ones are dropped, a call in flight is
/// kept (the counts stay exact).
pub const MAX_ATTEMPTS_KEPT: usize = 16;

/// The attempts of one branch, oldest first, at most [`MAX_ATTEMPTS_KEPT`]. An answer
/// closes the attempt of the call it answers, found by its number: never another call
/// of the same kind that is still in flight (the sweeper's resend after a call it gave
/// up, or a one-phase commit's probe beside the commit).
///
/// Encoded as its attempts alone (a struct with one field is its field in postcard), as
/// before the calls were numbered: the log's format is unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLog {
    attempts: Vec<Attempt>,
    /// Calls numbered so far in this process.
    #[serde(skip)]
    calls_numbered: CallNumber,
}

impl AttemptLog {
    /// Records a call sent now, and returns its number for its answer to name. At the
    /// limit the oldest finished attempt makes room: a call in flight is kept however
    /// many follow it (the sweeper, `txn show` and an operator's resolve look for it).
    pub fn start(&mut self, operation: Operation, now: UnixMs) -> CallNumber {
        if self.attempts.len() >= MAX_ATTEMPTS_KEPT {
            self.drop_oldest();
        }
        self.calls_numbered += 1;
        self.attempts.push(Attempt {
            call: self.calls_numbered,
            operation,
            started_unix_ms: now,
            finished_unix_ms: None,
            result: None,
        });
        self.calls_numbered
    }

    /// Records `result` for call `call` if it is still in flight and is one of `answers`
    /// (the operations the answer can be to); whether it was. A call given up (taken as
    /// lost, or closed by a restart or an operator) keeps what was recorded then.
    pub fn finish(
        &mut self,
        call: CallNumber,
        answers: &[Operation],
        result: impl Into<String>,
        now: UnixMs,
    ) -> bool {
        // 0 names no call: attempts decoded from the log carry it.
        let numbered = self
            .attempts
            .iter_mut()
            .find(|a| a.call == call && call != 0);
        let Some(attempt) = numbered else {
            return false;
        };
        debug_assert!(
            answers.contains(&attempt.operation),
            "call {call} was a {:?}, answered as one of {answers:?}: an answer names the call \
             it answers",
            attempt.operation
        );
        if attempt.finished_unix_ms.is_some() || !answers.contains(&attempt.operation) {
            return false;
        }
        attempt.finished_unix_ms = Some(now);
        attempt.result = Some(result.into());
        true
    }

    /// The number of the latest call sent (0 if none): what engine tests answer.
    #[cfg(test)]
    pub fn latest_call(&self) -> CallNumber {
        self.attempts.last().map_or(0, |a| a.call)
    }

    /// The number of the latest call of `operation` sent (0 if none).
    #[cfg(test)]
    pub fn latest_call_to(&self, operation: Operation) -> CallNumber {
        let latest = self
            .attempts
            .iter()
            .rev()
            .find(|a| a.operation == operation);
        latest.map_or(0, |a| a.call)
    }

    /// Each attempt's result, oldest first (`None` while in flight): what engine tests
    /// compare.
    #[cfg(test)]
    pub fn results(&self) -> Vec<Option<String>> {
        self.attempts.iter().map(|a| a.result.clone()).collect()
    }

    /// Whether a call is in flight (sent, unanswered, not given up).
    pub fn in_flight(&self) -> bool {
        self.attempts.iter().any(|a| a.finished_unix_ms.is_none())
    }

    /// Whether a call has been in flight (unanswered) for at least `ms`.
    pub fn open_for_at_least(&self, ms: u64, now: UnixMs) -> bool {
        self.attempts
            .iter()
            .any(|a| a.finished_unix_ms.is_none() && now.saturating_sub(a.started_unix_ms) >= ms)
    }

    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// Attempts the log has room for without growing (for memory estimates).
    pub fn capacity(&self) -> usize {
        self.attempts.capacity()
    }

    /// Closes every attempt still in flight with `result`: their answers will never come
    /// (the coordinator restarted), or are no longer waited for (the sweeper took them as
    /// lost, an operator stated the vote); one that still comes finds none open.
    pub fn abandon_open(&mut self, result: &str, now: UnixMs) {
        for attempt in self
            .attempts
            .iter_mut()
            .filter(|a| a.finished_unix_ms.is_none())
        {
            attempt.finished_unix_ms = Some(now);
            attempt.result = Some(result.to_string());
        }
    }

    /// Forgets the oldest finished attempt, or the oldest if every one is in flight;
    /// false if there was none.
    pub fn drop_oldest(&mut self) -> bool {
        if self.attempts.is_empty() {
            return false;
        }
        let oldest_finished = self
            .attempts
            .iter()
            .position(|a| a.finished_unix_ms.is_some());
        self.attempts.remove(oldest_finished.unwrap_or(0));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_log_keeps_the_latest_and_closes_the_call_answered() {
        let mut log = AttemptLog::default();
        for i in 0..(MAX_ATTEMPTS_KEPT as u64 + 3) {
            let call = log.start(Operation::Commit, i);
            assert!(log.finish(call, &[Operation::Commit], format!("error {i}"), i + 1));
        }
        assert_eq!(log.attempts().len(), MAX_ATTEMPTS_KEPT);
        assert_eq!(log.attempts()[0].started_unix_ms, 3);
        // An answer closes the call it answers, even if another one started later.
        let prepare = log.start(Operation::Prepare, 100);
        let abort = log.start(Operation::Abort, 101);
        assert!(log.finish(prepare, &[Operation::Prepare], "voted YES", 102));
        assert!(log.finish(abort, &[Operation::Abort], "aborted", 105));
        let results: Vec<_> = log.attempts()[MAX_ATTEMPTS_KEPT - 2..]
            .iter()
            .map(|a| (a.operation, a.result.as_deref()))
            .collect();
        assert_eq!(
            results,
            [
                (Operation::Prepare, Some("voted YES")),
                (Operation::Abort, Some("aborted"))
            ]
        );
        assert!(
            !log.finish(abort, &[Operation::Abort], "aborted again", 106),
            "answered already"
        );
    }

    /// The log's format is unchanged by the call numbers: the attempts alone are
    /// encoded, as the tuple struct around them once was.
    #[test]
    fn an_attempt_log_is_encoded_as_its_attempts_alone() {
        let mut log = AttemptLog::default();
        let call = log.start(Operation::Commit, 1);
        log.finish(call, &[Operation::Commit], "committed", 2);
        log.start(Operation::Abort, 3);
        let encoded = postcard::to_allocvec(&log).unwrap();
        assert_eq!(encoded, postcard::to_allocvec(log.attempts()).unwrap());
        let decoded: AttemptLog = postcard::from_bytes(&encoded).unwrap();
        assert_eq!(decoded.attempts().len(), 2);
        assert_eq!(decoded.attempts()[0].result.as_deref(), Some("committed"));
        assert!(decoded.attempts().iter().all(|a| a.call == 0), "not stored");
        // The bytes, by postcard's rules: the attempts' count, then each attempt's
        // operation (Commit is variant 1), start, finish (Some: 1, then the value) and
        // result (Some: 1, the length, the bytes); all integers as varints.
        let mut pinned = AttemptLog::default();
        let call = pinned.start(Operation::Commit, 1);
        pinned.finish(call, &[Operation::Commit], "ok", 2);
        assert_eq!(
            postcard::to_allocvec(&pinned).unwrap(),
            [1, 1, 1, 1, 2, 1, 2, b'o', b'k']
        );
    }

    /// The sweeper gives up call A and sends B: A's late answer leaves B in flight (it
    /// once closed B, the newest call of its kind, and B's own answer then found none).
    #[test]
    fn a_late_answer_to_a_call_given_up_leaves_the_resend_in_flight() {
        let mut log = AttemptLog::default();
        let given_up = log.start(Operation::Commit, 1);
        log.abandon_open("no answer; sent again", 60_001);
        let resend = log.start(Operation::Commit, 60_001);
        assert!(!log.finish(given_up, &[Operation::Commit], "committed", 70_000));
        assert!(log.in_flight(), "{log:?}");
        assert_eq!(
            log.attempts()[0].result.as_deref(),
            Some("no answer; sent again")
        );
        assert!(log.finish(resend, &[Operation::Commit], "committed", 70_001));
        assert!(!log.in_flight(), "{log:?}");
    }

    /// A call still in flight is what the sweeper, `txn show` and an operator's resolve
    /// look for: calls that fail fast after it push out finished attempts, not it.
    #[test]
    fn attempt_log_keeps_a_call_in_flight_however_many_follow() {
        let mut log = AttemptLog::default();
        log.start(Operation::Step, 1);
        for i in 0..(MAX_ATTEMPTS_KEPT as u64 * 2) {
            let call = log.start(Operation::Compensate, 10 + i);
            log.finish(call, &[Operation::Compensate], "error: unreachable", 10 + i);
        }
        assert_eq!(log.attempts().len(), MAX_ATTEMPTS_KEPT);
        assert!(log.open_for_at_least(0, 100), "{log:?}");
        assert_eq!(log.attempts()[0].operation, Operation::Step);
        // The oldest finished attempts went; the latest stay, in order.
        let latest = MAX_ATTEMPTS_KEPT as u64 * 2 - (MAX_ATTEMPTS_KEPT as u64 - 1);
        let kept: Vec<_> = log.attempts()[1..]
            .iter()
            .map(|a| a.started_unix_ms)
            .collect();
        assert_eq!(
            kept,
            (10 + latest..10 + MAX_ATTEMPTS_KEPT as u64 * 2).collect::<Vec<_>>()
        );
        // So does trimming a record to fit the log.
        assert!(log.drop_oldest());
        assert!(log.open_for_at_least(0, 100), "{log:?}");
        assert_eq!(log.attempts()[1].started_unix_ms, 11 + latest);
    }
}
