//! In-doubt resolution: a branch that voted YES may neither commit nor abort on its own,
//! so when its outcome is slow to arrive the participant asks the coordinator
//! (`GetOutcome`) and applies the answer through the barrier.
//!
//! It runs at start and then every `poll_interval_ms`, looking at branches prepared at
//! least `ask_after_ms` ago (the coordinator's own delivery usually comes first), at most
//! `max_branches_per_round` per round. PENDING and unreachable coordinators leave the
//! branch prepared for the next round: nothing here ever aborts a YES vote without the
//! coordinator's ABORT.
//!
//! A pass over every branch in doubt takes one round, or several when more than
//! `max_branches_per_round` are in doubt; at its end the number still in doubt and the
//! oldest one's prepare time go to the metrics ([`crate::metrics`]), so they cost no
//! reads of their own. The rounds of a pass follow one another without the interval
//! while they resolve branches (after a restart with thousands in doubt, the pass takes
//! the time its questions take, not thousands ÷ `max_branches_per_round` intervals); a
//! round that resolved nothing, and the end of a pass, wait the interval.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use treaty_proto::v1 as pb;
use treaty_proto::v1::coordinator_client::CoordinatorClient;

use crate::auth::Credentials;
use crate::barrier::{
    Barrier, BarrierError, BranchMode, InDoubtBranch, PhaseTwoWrite, now_unix_ms,
};
use crate::barrier_store::{BarrierStore, BranchKey};
use crate::client::{ClientOptions, credentials, endpoint_with};
use crate::durable::{DurableStore, StoreError};
use crate::metrics::InquiryResult;
use crate::participant::Participant;
use crate::trust::CoordinatorTrust;

/// Channels kept to coordinators; past this the cache starts over.
const MAX_CACHED_COORDINATORS: usize = 64;

#[derive(Debug, Clone)]
pub struct InDoubtOptions {
    pub poll_interval_ms: u64,
    pub ask_after_ms: u64,
    pub call_timeout_ms: u64,
    pub max_branches_per_round: usize,
    /// How to reach coordinators: TLS for `https://` ones, and the token to present.
    pub coordinator_client: ClientOptions,
}

impl Default for InDoubtOptions {
    fn default() -> Self {
        Self {
            poll_interval_ms: 2_000,
            ask_after_ms: 2_000,
            call_timeout_ms: 2_000,
            max_branches_per_round: 256,
            coordinator_client: ClientOptions::default(),
        }
    }
}

#[derive(Debug)]
pub struct InDoubtResolver<P, S: BarrierStore = DurableStore> {
    participant: Arc<P>,
    barrier: Arc<Barrier<S>>,
    options: InDoubtOptions,
    trust: CoordinatorTrust,
    coordinators: HashMap<String, CoordinatorClient<InterceptedService<Channel, Credentials>>>,
    /// Where the next round continues, so that branches which cannot be resolved do not
    /// keep the ones after them from being asked about.
    cursor: Option<BranchKey>,
    /// Branches seen still in doubt by the pass under way, and the oldest prepare time.
    pass_in_doubt: u64,
    pass_oldest_unix_ms: Option<u64>,
}

/// What one round did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundReport {
    pub committed: usize,
    pub aborted: usize,
    pub still_in_doubt: usize,
}

impl<P: Participant, S: BarrierStore> InDoubtResolver<P, S> {
    pub fn new(participant: Arc<P>, barrier: Arc<Barrier<S>>, options: InDoubtOptions) -> Self {
        Self {
            participant,
            barrier,
            options,
            trust: CoordinatorTrust::default(),
            coordinators: HashMap::new(),
            cursor: None,
            pass_in_doubt: 0,
            pass_oldest_unix_ms: None,
        }
    }

    /// Asks only the coordinators `trust` allows.
    pub fn with_trust(mut self, trust: CoordinatorTrust) -> Self {
        self.trust = trust;
        self
    }

    /// Runs rounds until `stop` becomes true (or its sender is dropped).
    pub async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let interval = Duration::from_millis(self.options.poll_interval_ms.max(10));
        loop {
            let report = self.round(&mut stop).await;
            if report != RoundReport::default() {
                tracing::info!(?report, "in-doubt resolution round");
            }
            if *stop.borrow() {
                return;
            }
            let pass_goes_on = self.cursor.is_some();
            if pass_goes_on && report.committed + report.aborted > 0 {
                // Rounds ask one question at a time: going on at once is bounded by the
                // coordinators' answers, and only lasts while they resolve branches.
                tokio::task::yield_now().await;
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Asks about the branches in doubt for long enough (at most
    /// `max_branches_per_round`, continuing where the last round stopped) and applies
    /// the answers. Returns early once `stop` is set.
    pub async fn round(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> RoundReport {
        let mut report = RoundReport::default();
        // On a blocking thread: a store may read a lot to list (the SDK's own reads
        // every record at its first listing after an open), or ask another database.
        let (barrier, cursor) = (self.barrier.clone(), self.cursor.clone());
        let limit = self.options.max_branches_per_round;
        let page =
            tokio::task::spawn_blocking(move || barrier.in_doubt_after(cursor.as_ref(), limit))
                .await
                .unwrap_or_else(|error| {
                    Err(BarrierError::Store(StoreError::Read(format!(
                        "the listing's thread: {error}"
                    ))))
                });
        let (branches, pass_done) = match page {
            Ok((branches, next)) => {
                let pass_done = next.is_none();
                self.cursor = next;
                (branches, pass_done)
            }
            Err(error) => {
                tracing::error!(%error, "cannot list in-doubt branches");
                self.start_pass();
                return report;
            }
        };
        let now = now_unix_ms();
        for in_doubt in branches {
            if *stop.borrow() {
                return report;
            }
            if now.saturating_sub(in_doubt.prepared_unix_ms) < self.options.ask_after_ms {
                self.still_in_doubt(&in_doubt);
                continue;
            }
            // Asking may be abandoned at a stop; applying the answer runs to the end.
            let decision = tokio::select! {
                decision = self.ask(&in_doubt) => decision,
                _ = stop.changed() => return report,
            };
            let resolved = match decision {
                Some(decision) => self.apply(&in_doubt, decision).await,
                None => None,
            };
            match resolved {
                Some(pb::Decision::Commit) => report.committed += 1,
                Some(pb::Decision::Abort) => report.aborted += 1,
                _ => {
                    report.still_in_doubt += 1;
                    self.still_in_doubt(&in_doubt);
                }
            }
        }
        if pass_done {
            self.barrier
                .metrics()
                .in_doubt_pass(self.pass_in_doubt, self.pass_oldest_unix_ms);
            self.start_pass();
        }
        report
    }

    fn still_in_doubt(&mut self, in_doubt: &InDoubtBranch) {
        self.pass_in_doubt += 1;
        let prepared = in_doubt.prepared_unix_ms;
        self.pass_oldest_unix_ms = Some(
            self.pass_oldest_unix_ms
                .map_or(prepared, |t| t.min(prepared)),
        );
    }

    /// Forgets what the pass under way has seen: the next round starts a new one.
    fn start_pass(&mut self) {
        self.cursor = None;
        self.pass_in_doubt = 0;
        self.pass_oldest_unix_ms = None;
    }

    /// Applies the coordinator's answer through the barrier; `None` if it could not be
    /// applied yet.
    async fn apply(
        &self,
        in_doubt: &InDoubtBranch,
        decision: pb::Decision,
    ) -> Option<pb::Decision> {
        let branch = &in_doubt.branch;
        let applied = match decision {
            // Forced, not patient: branches are settled one at a time, and a patient
            // record would wait out its full wait with nothing following it.
            pb::Decision::Commit => self
                .barrier
                .commit_with(
                    self.participant.as_ref(),
                    branch,
                    BranchMode::TwoPhase,
                    &[],
                    &in_doubt.coordinator_endpoint,
                    PhaseTwoWrite::Forced,
                )
                .await
                .map(|answer| format!("{answer:?}")),
            pb::Decision::Abort => self
                .barrier
                .abort_with(self.participant.as_ref(), branch, PhaseTwoWrite::Forced)
                .await
                .map(|answer| format!("{answer:?}")),
            _ => return Some(decision),
        };
        match applied {
            Ok(answer) => {
                tracing::info!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?decision, %answer, "in-doubt branch resolved");
                Some(decision)
            }
            Err(error) => {
                tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, %error, "cannot apply the outcome yet");
                None
            }
        }
    }

    async fn ask(&mut self, in_doubt: &InDoubtBranch) -> Option<pb::Decision> {
        let branch = &in_doubt.branch;
        if in_doubt.coordinator_endpoint.is_empty() {
            tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, "in doubt, but the prepare named no coordinator to ask");
            return None;
        }
        if !self.trust.may_ask(&in_doubt.coordinator_endpoint) {
            tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, coordinator = %in_doubt.coordinator_endpoint, "in doubt, but its coordinator is not one this participant trusts; waiting for a trusted one to deliver the outcome");
            return None;
        }
        let timeout = Duration::from_millis(self.options.call_timeout_ms);
        let client = match self.coordinators.get(&in_doubt.coordinator_endpoint) {
            Some(client) => client.clone(),
            None => {
                if self.coordinators.len() >= MAX_CACHED_COORDINATORS {
                    self.coordinators.clear();
                }
                let options = &self.options.coordinator_client;
                let endpoint = match endpoint_with(&in_doubt.coordinator_endpoint, options) {
                    Ok(endpoint) => endpoint.connect_timeout(timeout).timeout(timeout),
                    Err(error) => {
                        tracing::warn!(%error, "cannot ask the coordinator");
                        return None;
                    }
                };
                let credentials = match credentials(options) {
                    Ok(credentials) => credentials,
                    Err(error) => {
                        tracing::warn!(%error, "cannot ask the coordinator: its token is unusable");
                        return None;
                    }
                };
                let client =
                    CoordinatorClient::with_interceptor(endpoint.connect_lazy(), credentials);
                self.coordinators
                    .insert(in_doubt.coordinator_endpoint.clone(), client.clone());
                client
            }
        };
        let request = pb::GetOutcomeRequest {
            transaction_id: branch.transaction_id.clone(),
            branch_id: branch.branch_id.clone(),
        };
        let decision =
            match tokio::time::timeout(timeout, client.clone().get_outcome(request)).await {
                Ok(Ok(response)) => pb::Decision::try_from(response.into_inner().decision).ok(),
                Ok(Err(status)) => {
                    tracing::debug!(txn_id = %branch.transaction_id, %status, "GetOutcome failed");
                    None
                }
                Err(_) => None,
            };
        let result = match decision {
            Some(pb::Decision::Commit) => InquiryResult::commit,
            Some(pb::Decision::Abort) => InquiryResult::abort,
            Some(pb::Decision::Pending) => InquiryResult::pending,
            Some(pb::Decision::Unspecified) | None => InquiryResult::error,
        };
        self.barrier.metrics().outcome_inquiry(result);
        decision
    }
}
