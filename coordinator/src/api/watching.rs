//! WatchTransaction's stream: the current state, then one message per transition.

use super::*;

pub(super) fn update_message(
    record: &TxnRecord,
    transition: usize,
) -> proto::WatchTransactionResponse {
    proto::WatchTransactionResponse {
        found: true,
        transaction: Some(pb::transaction_to_pb(record)),
        transition: record.transitions.get(transition).map(pb::transition_to_pb),
    }
}

/// The current state first, then one message per transition, never skipping one; ends
/// after a final state, or when the transaction leaves memory or the daemon stops.
pub(super) fn watch_stream(
    mut updates: watch::Receiver<Arc<TxnRecord>>,
    stopping: watch::Receiver<bool>,
) -> WatchStream {
    let current = updates.borrow_and_update().clone();
    let first = update_message(&current, current.transitions.len().saturating_sub(1));
    struct State {
        updates: watch::Receiver<Arc<TxnRecord>>,
        stopping: watch::Receiver<bool>,
        queue: VecDeque<proto::WatchTransactionResponse>,
        sent: usize,
        finished: bool,
    }
    let state = State {
        finished: current.state.is_final(),
        sent: current.transitions.len(),
        queue: VecDeque::from([first]),
        updates,
        stopping,
    };
    Box::pin(futures::stream::unfold(state, |mut state| async move {
        loop {
            if let Some(message) = state.queue.pop_front() {
                return Some((Ok(message), state));
            }
            if state.finished || *state.stopping.borrow() {
                return None;
            }
            tokio::select! {
                changed = state.updates.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                _ = state.stopping.changed() => return None,
            }
            let record = state.updates.borrow_and_update().clone();
            for index in state.sent..record.transitions.len() {
                state.queue.push_back(update_message(&record, index));
            }
            state.sent = record.transitions.len();
            state.finished = record.state.is_final();
        }
    }))
}
