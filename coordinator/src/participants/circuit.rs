//! The circuit breaker of one participant endpoint.
//!
//! Closed: calls go through. After [`FAILURES_TO_OPEN`] calls in a row got no answer
//! (unreachable or timed out) it opens: calls fail at once, without a connection attempt
//! or a permit, for a cool-down that starts at [`FIRST_COOL_DOWN`] and doubles each time
//! the circuit opens again, up to [`MAX_COOL_DOWN`]. After the cool-down it is half-open:
//! one call (the probe) goes through, the others still fail at once; an answer closes the
//! circuit, no answer opens it again.
//!
//! An answer of any kind counts as success, an error status included: the participant is
//! there, and the engine's own retries with back-off deal with what it said.
//!
//! Invariant: at most one probe is out at a time, and a probe that ends without a
//! result (its call was dropped) lets the next call probe.

use std::time::{Duration, Instant};

/// Calls in a row without an answer that open the circuit.
pub const FAILURES_TO_OPEN: u32 = 5;
pub const FIRST_COOL_DOWN: Duration = Duration::from_millis(500);
pub const MAX_COOL_DOWN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    Closed,
    HalfOpen,
    Open,
}

impl CircuitState {
    /// The value of the `treaty_circuit_state` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::HalfOpen => 1,
            CircuitState::Open => 2,
        }
    }
}

/// Whether a call may go out now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Call,
    /// The one call of a half-open circuit.
    Probe,
    /// Fail at once: the circuit is open (or half-open with its probe out).
    Refuse,
}

#[derive(Debug, Default)]
pub struct Circuit {
    failures_in_a_row: u32,
    /// Times it opened since it was last closed (sets the cool-down).
    opened_in_a_row: u32,
    open_until: Option<Instant>,
    probe_out: bool,
}

impl Circuit {
    pub fn state(&self, now: Instant) -> CircuitState {
        match self.open_until {
            None => CircuitState::Closed,
            Some(until) if now < until => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state(now) {
            CircuitState::Closed => Admission::Call,
            CircuitState::Open => Admission::Refuse,
            CircuitState::HalfOpen if self.probe_out => Admission::Refuse,
            CircuitState::HalfOpen => {
                self.probe_out = true;
                Admission::Probe
            }
        }
    }

    /// The result of an admitted call: `answered` unless it was unreachable or timed out.
    pub fn record(&mut self, admission: Admission, answered: bool, now: Instant) {
        if admission == Admission::Probe {
            self.probe_out = false;
        }
        if answered {
            self.failures_in_a_row = 0;
            // A late answer to a call made before the circuit opened does not close it:
            // only the probe speaks for a half-open circuit.
            if self.open_until.is_none() || admission == Admission::Probe {
                self.open_until = None;
                self.opened_in_a_row = 0;
            }
            return;
        }
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let reopen = admission == Admission::Probe;
        let trip = self.open_until.is_none() && self.failures_in_a_row >= FAILURES_TO_OPEN;
        if reopen || trip {
            let doublings = self.opened_in_a_row.min(16);
            let cool_down = FIRST_COOL_DOWN
                .saturating_mul(1u32 << doublings)
                .min(MAX_COOL_DOWN);
            self.opened_in_a_row = self.opened_in_a_row.saturating_add(1);
            self.open_until = Some(now + cool_down);
        }
    }

    /// An operator asked for a retry now: an open circuit's cool-down ends, so that the
    /// next call probes (a closed or half-open circuit is left as it is).
    pub fn probe_now(&mut self, now: Instant) {
        if self.state(now) == CircuitState::Open {
            self.open_until = Some(now);
        }
    }

    /// Calls in a row that got no answer.
    pub fn failures_in_a_row(&self) -> u32 {
        self.failures_in_a_row
    }

    /// A probe that ended without a result: the next call may probe.
    pub fn abandon(&mut self, admission: Admission) {
        if admission == Admission::Probe {
            self.probe_out = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_now_ends_the_cool_down_of_an_open_circuit_only() {
        let now = Instant::now();
        let mut circuit = Circuit::default();
        circuit.probe_now(now);
        assert_eq!(circuit.state(now), CircuitState::Closed);
        fail_calls(&mut circuit, FAILURES_TO_OPEN, now);
        assert_eq!(circuit.state(now), CircuitState::Open);
        assert_eq!(circuit.failures_in_a_row(), FAILURES_TO_OPEN);
        circuit.probe_now(now);
        assert_eq!(circuit.admit(now), Admission::Probe);
        assert_eq!(circuit.admit(now), Admission::Refuse);
    }

    fn fail_calls(circuit: &mut Circuit, count: u32, now: Instant) {
        for _ in 0..count {
            let admission = circuit.admit(now);
            assert_eq!(admission, Admission::Call);
            circuit.record(admission, false, now);
        }
    }

    #[test]
    fn failures_in_a_row_open_it_and_a_probe_closes_it() {
        let start = Instant::now();
        let mut circuit = Circuit::default();
        fail_calls(&mut circuit, FAILURES_TO_OPEN - 1, start);
        assert_eq!(circuit.state(start), CircuitState::Closed);
        // An answer in between starts the count again.
        let admission = circuit.admit(start);
        circuit.record(admission, true, start);
        fail_calls(&mut circuit, FAILURES_TO_OPEN, start);
        assert_eq!(circuit.state(start), CircuitState::Open);
        assert_eq!(circuit.admit(start), Admission::Refuse);

        let later = start + FIRST_COOL_DOWN;
        assert_eq!(circuit.state(later), CircuitState::HalfOpen);
        let probe = circuit.admit(later);
        assert_eq!(probe, Admission::Probe);
        assert_eq!(
            circuit.admit(later),
            Admission::Refuse,
            "one probe at a time"
        );
        circuit.record(probe, true, later);
        assert_eq!(circuit.state(later), CircuitState::Closed);
        assert_eq!(circuit.admit(later), Admission::Call);
    }

    #[test]
    fn a_failed_probe_opens_it_again_for_longer_up_to_the_cap() {
        let mut now = Instant::now();
        let mut circuit = Circuit::default();
        fail_calls(&mut circuit, FAILURES_TO_OPEN, now);
        let mut cool_down = FIRST_COOL_DOWN;
        for _ in 0..12 {
            assert!(
                circuit.state(now + cool_down - Duration::from_millis(1)) == CircuitState::Open
            );
            now += cool_down;
            let probe = circuit.admit(now);
            assert_eq!(probe, Admission::Probe);
            circuit.record(probe, false, now);
            cool_down = (cool_down * 2).min(MAX_COOL_DOWN);
        }
        assert_eq!(cool_down, MAX_COOL_DOWN);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let now = Instant::now();
        let mut circuit = Circuit::default();
        fail_calls(&mut circuit, FAILURES_TO_OPEN, now);
        let later = now + FIRST_COOL_DOWN;
        let probe = circuit.admit(later);
        circuit.abandon(probe);
        assert_eq!(circuit.admit(later), Admission::Probe);
    }

    #[test]
    fn a_late_answer_does_not_close_an_open_circuit() {
        let now = Instant::now();
        let mut circuit = Circuit::default();
        fail_calls(&mut circuit, FAILURES_TO_OPEN, now);
        circuit.record(Admission::Call, true, now);
        assert_eq!(circuit.state(now), CircuitState::Open);
    }
}
