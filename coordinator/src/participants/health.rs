//! What the coordinator keeps per endpoint beyond its channel: the endpoint's share of the
//! permits, its circuit and its recent calls. A TLS reload makes a new channel but keeps
//! this, so that a reload neither frees permits held by calls in flight nor forgets a
//! circuit that is open.
//!
//! Invariants:
//! - `treaty_circuit_state` for the endpoint is written under the circuit's lock, so the
//!   last value written is the circuit's last state.
//! - A call the circuit let out (an [`Admitted`]) reports back exactly once: its result,
//!   or, when it is dropped before it had one, that it was abandoned (which frees a probe).

use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::circuit::{Admission, Circuit, CircuitState};
use super::window::CallWindow;

/// What outlives a peer's channel (a TLS reload makes a new one): its share of the
/// permits and its circuit.
#[derive(Debug)]
pub(super) struct PeerHealth {
    /// Calls to this endpoint in flight.
    pub(super) permits: Semaphore,
    pub(super) max_permits: usize,
    circuit: Mutex<Circuit>,
    /// `treaty_circuit_state` for this endpoint, set under the circuit's lock so that
    /// the last value written is the circuit's last state (set after the lock, a call
    /// that saw it open could overwrite the close a probe had just reported).
    circuit_gauge: prometheus_client::metrics::gauge::Gauge,
    /// Calls and failures of about the last minute.
    pub(super) recent: Mutex<CallWindow>,
}

impl PeerHealth {
    /// A closed circuit, `max_permits` free permits, and the gauge showing it (from the
    /// first call, so that dashboards list every endpoint).
    pub(super) fn new(
        max_permits: usize,
        circuit_gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        circuit_gauge.set(CircuitState::Closed.gauge());
        Self {
            permits: Semaphore::new(max_permits),
            max_permits,
            circuit: Mutex::default(),
            circuit_gauge,
            recent: Mutex::default(),
        }
    }

    /// No call in flight and the circuit closed: nothing is lost by forgetting it.
    pub(super) fn is_idle(&self) -> bool {
        self.permits.available_permits() == self.max_permits
            && self.circuit_state() == CircuitState::Closed
    }

    fn circuit_state(&self) -> CircuitState {
        self.change_circuit(|_, _| ()).2
    }

    /// Runs `change` on the circuit; returns its result and the circuit's state before
    /// and after. The gauge shows the state after; open turns half-open with time
    /// alone, so it is written whenever the circuit is not closed (the slow path), and
    /// at any change.
    pub(super) fn change_circuit<R>(
        &self,
        change: impl FnOnce(&mut Circuit, Instant) -> R,
    ) -> (R, CircuitState, CircuitState) {
        let mut circuit = self.circuit.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let before = circuit.state(now);
        let result = change(&mut circuit, now);
        let after = circuit.state(now);
        if before != after || after != CircuitState::Closed {
            self.circuit_gauge.set(after.gauge());
        }
        (result, before, after)
    }

    /// Asks the circuit whether a call to `endpoint` may go out; `None`: fail at once.
    pub(super) fn admit<'a>(&'a self, endpoint: &'a str) -> Option<Admitted<'a>> {
        let (admission, _, _) = self.change_circuit(Circuit::admit);
        (admission != Admission::Refuse).then_some(Admitted {
            endpoint,
            health: self,
            admission,
            finished: false,
        })
    }
}

/// A call the circuit let out; its result goes back to the circuit, and a call dropped
/// before it had one frees the probe.
pub(super) struct Admitted<'a> {
    endpoint: &'a str,
    health: &'a PeerHealth,
    pub(super) admission: Admission,
    finished: bool,
}

impl Admitted<'_> {
    pub(super) fn circuit_closed(&self) -> bool {
        self.health.circuit_state() == CircuitState::Closed
    }

    pub(super) fn finish(mut self, answered: bool) {
        self.finished = true;
        let admission = self.admission;
        let ((), before, after) = self
            .health
            .change_circuit(|circuit, now| circuit.record(admission, answered, now));
        if before != after {
            if after == CircuitState::Open {
                tracing::warn!(endpoint = %self.endpoint, "participant not answering; its circuit is open");
            } else if after == CircuitState::Closed {
                tracing::info!(endpoint = %self.endpoint, "participant answers again; its circuit is closed");
            }
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let admission = self.admission;
            self.health
                .change_circuit(|circuit, _| circuit.abandon(admission));
        }
    }
}
