//! What operators see of participant endpoints (`treaty endpoints`), and the one thing
//! they may do to them: end an open circuit's cool-down so that a retry asked for now is
//! not refused by it.

use std::sync::Arc;

use super::circuit::{Circuit, CircuitState};
use super::health::PeerHealth;
use super::window::RecentCalls;
use super::{Participants, Peer, Transport};

/// One participant endpoint as operators see it (`treaty endpoints`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    pub endpoint: String,
    pub circuit: CircuitState,
    pub calls_in_flight: usize,
    /// Calls in a row that got no answer.
    pub failures_in_a_row: u32,
    pub recent: RecentCalls,
    pub transport: Transport,
}

impl Peer {
    /// How calls to it travel now.
    pub(super) fn transport(&self) -> Transport {
        self.stream
            .as_ref()
            .map_or(Transport::Unary, |stream| stream.transport())
    }
}

impl Participants {
    /// Every endpoint called lately (the cache forgets idle ones past its bound), in
    /// name order.
    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        let peers: Vec<(String, Arc<PeerHealth>, Transport)> = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(endpoint, peer)| (endpoint.clone(), peer.health.clone(), peer.transport()))
            .collect();
        let now = std::time::Instant::now();
        let mut statuses: Vec<EndpointStatus> = peers
            .into_iter()
            .map(|(endpoint, health, transport)| {
                let ((failures_in_a_row, circuit), _, _) =
                    health.change_circuit(|c, now| (c.failures_in_a_row(), c.state(now)));
                EndpointStatus {
                    endpoint,
                    circuit,
                    calls_in_flight: health
                        .max_permits
                        .saturating_sub(health.permits.available_permits()),
                    failures_in_a_row,
                    recent: health
                        .recent
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .recent(now),
                    transport,
                }
            })
            .collect();
        statuses.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
        statuses
    }

    /// An operator asked for retries now: an open circuit of `endpoint` lets the next
    /// call through as its probe.
    pub fn probe_now(&self, endpoint: &str) {
        let health = self
            .peers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(endpoint)
            .map(|peer| peer.health.clone());
        if let Some(health) = health {
            health.change_circuit(Circuit::probe_now);
        }
    }
}
