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
//!
//! Applying an answer runs the participant's own commit or abort, which may panic or
//! hang. A panic is caught and leaves the branch in doubt for a later round, as a
//! failure does. A round waits `apply_wait_ms` for one branch, then goes on to the
//! next: the operation runs on to its end by itself (user code is never cancelled
//! half-way), and its branch is not asked about again until it has ended. So one
//! branch can hold neither the others nor a shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
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
use crate::limits::canonical_endpoint;
use crate::metrics::InquiryResult;
use crate::participant::Participant;
use crate::run_to_end::RunToEnd;
use crate::trust::CoordinatorTrust;

/// Channels kept to coordinators; past this the cache starts over.
const MAX_CACHED_COORDINATORS: usize = 64;

/// The most `max_branches_per_round` may be.
pub const MAX_BRANCHES_PER_ROUND: usize = 65_536;

/// The longest any of the options' durations may be: a day.
const MAX_OPTION_MS: u64 = 86_400_000;

#[derive(Debug, Clone)]
pub struct InDoubtOptions {
    pub poll_interval_ms: u64,
    pub ask_after_ms: u64,
    /// How long a question to a coordinator may take, connecting included.
    pub call_timeout_ms: u64,
    /// How long a round waits for the participant's commit or abort of one branch
    /// before it goes on with the next; the operation runs on to its end by itself.
    pub apply_wait_ms: u64,
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
            apply_wait_ms: 10_000,
            max_branches_per_round: 256,
            coordinator_client: ClientOptions::default(),
        }
    }
}

impl InDoubtOptions {
    /// Refuses options with which branches in doubt would never be resolved (none asked
    /// about per round, every question timed out at once) or would wait for ever; the
    /// error names the field. The coordinator client's settings are checked too (a
    /// token that cannot be sent, keepalive out of range): with them no coordinator
    /// could be asked.
    pub fn validate(&self) -> Result<(), String> {
        self.coordinator_client
            .validate()
            .map_err(|e| format!("in_doubt.coordinator_client.{e}"))?;
        let durations = [
            ("poll_interval_ms", self.poll_interval_ms, 1),
            ("ask_after_ms", self.ask_after_ms, 0),
            ("call_timeout_ms", self.call_timeout_ms, 1),
            ("apply_wait_ms", self.apply_wait_ms, 1),
        ];
        for (field, value, least) in durations {
            if !(least..=MAX_OPTION_MS).contains(&value) {
                return Err(format!(
                    "in_doubt.{field}: {value} is not in {least}..={MAX_OPTION_MS}"
                ));
            }
        }
        if !(1..=MAX_BRANCHES_PER_ROUND).contains(&self.max_branches_per_round) {
            return Err(format!(
                "in_doubt.max_branches_per_round: {} is not in 1..={MAX_BRANCHES_PER_ROUND}",
                self.max_branches_per_round
            ));
        }
        Ok(())
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
    /// Branches whose commit or abort outlasted `apply_wait_ms` and runs on by itself;
    /// each leaves the set when it ends, and is not asked about meanwhile.
    applying: Arc<Mutex<HashSet<BranchKey>>>,
    /// Per coordinator (in canonical form), the questions of the round under way that
    /// got no answer in time. One that could not be reached, or timed out
    /// [`TIMEOUTS_BEFORE_SKIPPING`] times (on different transactions: one slow outcome is
    /// that transaction's), is not asked again in the round, so that a coordinator whose
    /// host has gone does not hold up the questions to the others by a timeout per
    /// branch.
    unanswered: HashMap<String, u32>,
}

/// Questions to one coordinator in one round that may time out before its other
/// branches of the round are skipped.
const TIMEOUTS_BEFORE_SKIPPING: u32 = 2;

/// What one round did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RoundReport {
    pub committed: usize,
    pub aborted: usize,
    pub still_in_doubt: usize,
}

impl<P: Participant, S: BarrierStore> InDoubtResolver<P, S> {
    /// Refuses `options` that [`InDoubtOptions::validate`] refuses, with its message
    /// (some would never resolve a branch, and nothing would say so).
    pub fn new(
        participant: Arc<P>,
        barrier: Arc<Barrier<S>>,
        options: InDoubtOptions,
    ) -> Result<Self, String> {
        options.validate()?;
        Ok(Self {
            participant,
            barrier,
            options,
            trust: CoordinatorTrust::default(),
            coordinators: HashMap::new(),
            cursor: None,
            pass_in_doubt: 0,
            pass_oldest_unix_ms: None,
            applying: Arc::default(),
            unanswered: HashMap::new(),
        })
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
    /// the answers. A coordinator that could not be reached, or did not answer in time
    /// twice, is not asked again in the round: its other branches listed in the round wait
    /// until the pass comes back to them. Returns early once `stop` is set.
    pub async fn round(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> RoundReport {
        let mut report = RoundReport::default();
        self.unanswered.clear();
        // On a blocking thread: a store may read a lot to list (the SDK's own reads
        // every record at its first listing after an open), or ask another database.
        let (barrier, cursor) = (self.barrier.clone(), self.cursor.clone());
        let limit = self.options.max_branches_per_round;
        let page =
            tokio::task::spawn_blocking(move || barrier.in_doubt_page(cursor.as_ref(), limit))
                .await
                .unwrap_or_else(|error| {
                    Err(BarrierError::Store(StoreError::Read(format!(
                        "the listing's thread: {error}"
                    ))))
                });
        let (branches, pass_done) = match page {
            Ok(page) => {
                // Whom to ask about such a branch is unknown: it is counted in doubt
                // (the gauge must not read 0 past it) and named in every pass, and the
                // others are resolved.
                for (branch, error) in &page.unreadable {
                    tracing::error!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id,
                        %error, "a branch listed in doubt has a record that cannot be read: it cannot be resolved by asking");
                    // Its prepare time is in the record; the transaction's creation (its
                    // UUIDv7), no later, stands in for it in the oldest-age gauge.
                    self.count_in_doubt(crate::transaction_age::transaction_created_unix_ms(
                        &branch.transaction_id,
                    ));
                }
                let pass_done = page.next.is_none();
                self.cursor = page.next;
                (page.branches, pass_done)
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
            if now.saturating_sub(in_doubt.prepared_unix_ms) < self.options.ask_after_ms
                || self.is_applying(&in_doubt)
            {
                self.still_in_doubt(&in_doubt);
                continue;
            }
            // Asking may be abandoned at a stop; applying the answer runs to the end,
            // by itself if the round stops waiting for it.
            let decision = tokio::select! {
                decision = self.ask(&in_doubt) => decision,
                _ = stop.changed() => return report,
            };
            let resolved = match decision {
                Some(decision) => self.apply(&in_doubt, decision, stop).await,
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
        self.count_in_doubt(Some(in_doubt.prepared_unix_ms));
    }

    /// Counts a branch in doubt in the pass under way, prepared at `prepared_unix_ms` if
    /// known.
    fn count_in_doubt(&mut self, prepared_unix_ms: Option<u64>) {
        self.pass_in_doubt += 1;
        if let Some(prepared) = prepared_unix_ms {
            self.pass_oldest_unix_ms = Some(
                self.pass_oldest_unix_ms
                    .map_or(prepared, |t| t.min(prepared)),
            );
        }
    }

    /// Forgets what the pass under way has seen: the next round starts a new one.
    fn start_pass(&mut self) {
        self.cursor = None;
        self.pass_in_doubt = 0;
        self.pass_oldest_unix_ms = None;
    }

    /// Whether `in_doubt`'s commit or abort still runs from an earlier round.
    fn is_applying(&self, in_doubt: &InDoubtBranch) -> bool {
        let applying = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        applying.contains(&branch_key(in_doubt))
    }

    /// Applies the coordinator's answer through the barrier; `None` if it could not be
    /// applied yet: it failed, the participant's code panicked, it outlasted
    /// `apply_wait_ms` (it runs on by itself), or `stop` was set meanwhile.
    async fn apply(
        &self,
        in_doubt: &InDoubtBranch,
        decision: pb::Decision,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Option<pb::Decision> {
        if !matches!(decision, pb::Decision::Commit | pb::Decision::Abort) {
            return Some(decision);
        }
        let marked = ApplyingMark::new(self.applying.clone(), branch_key(in_doubt));
        let (participant, barrier) = (self.participant.clone(), self.barrier.clone());
        let (branch, coordinator) = (
            in_doubt.branch.clone(),
            in_doubt.coordinator_endpoint.clone(),
        );
        let started = self.barrier.unfinished.start();
        let applying = RunToEnd::new(async move {
            let (_marked, _started) = (marked, started);
            // Forced, not patient: branches are settled one at a time, and a patient
            // record would wait out its full wait with nothing following it.
            if decision == pb::Decision::Commit {
                barrier
                    .commit_with(
                        participant.as_ref(),
                        &branch,
                        BranchMode::TwoPhase,
                        &[],
                        &coordinator,
                        PhaseTwoWrite::Forced,
                    )
                    .await
                    .map(|answer| format!("{answer:?}"))
            } else {
                barrier
                    .abort_with(participant.as_ref(), &branch, PhaseTwoWrite::Forced)
                    .await
                    .map(|answer| format!("{answer:?}"))
            }
        });
        let branch = &in_doubt.branch;
        let wait = Duration::from_millis(self.options.apply_wait_ms);
        // A dropped `RunToEnd` goes on in a task of its own.
        let applied = tokio::select! {
            applied = applying => applied,
            _ = tokio::time::sleep(wait) => {
                tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?decision, apply_wait_ms = self.options.apply_wait_ms, "the participant's code has not ended yet; it runs on, and other branches are resolved meanwhile");
                return None;
            }
            _ = stop.changed() => return None,
        };
        match applied {
            Ok(Ok(answer)) => {
                tracing::info!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?decision, %answer, "in-doubt branch resolved");
                Some(decision)
            }
            Ok(Err(error)) => {
                tracing::warn!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, %error, "cannot apply the outcome yet");
                None
            }
            Err(panic) => {
                tracing::error!(txn_id = %branch.transaction_id, branch_id = %branch.branch_id, ?decision, %panic, "participant code panicked applying the outcome; the branch stays in doubt and is asked about again");
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
        // Spellings of one coordinator are one coordinator.
        let coordinator =
            canonical_endpoint("coordinator_endpoint", &in_doubt.coordinator_endpoint)
                .unwrap_or_else(|_| in_doubt.coordinator_endpoint.clone());
        if self
            .unanswered
            .get(&coordinator)
            .is_some_and(|&times| times >= TIMEOUTS_BEFORE_SKIPPING)
        {
            return None;
        }
        let timeout = Duration::from_millis(self.options.call_timeout_ms);
        let client = match self.coordinators.get(&coordinator) {
            Some(client) => client.clone(),
            None => {
                if self.coordinators.len() >= MAX_CACHED_COORDINATORS {
                    self.coordinators.clear();
                }
                let options = &self.options.coordinator_client;
                let endpoint = match endpoint_with(&coordinator, options) {
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
                    .insert(coordinator.clone(), client.clone());
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
                    match status.code() {
                        // Not reached: the next question would not be either.
                        tonic::Code::Unavailable => {
                            self.unanswered
                                .insert(coordinator, TIMEOUTS_BEFORE_SKIPPING);
                        }
                        // No answer within the channel's timeout (which tonic reports
                        // as CANCELLED).
                        tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                            *self.unanswered.entry(coordinator).or_default() += 1;
                        }
                        _ => {}
                    }
                    None
                }
                Err(_) => {
                    *self.unanswered.entry(coordinator).or_default() += 1;
                    None
                }
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

fn branch_key(in_doubt: &InDoubtBranch) -> BranchKey {
    BranchKey {
        transaction_id: in_doubt.branch.transaction_id.clone(),
        branch_id: in_doubt.branch.branch_id.clone(),
    }
}

/// A branch's place in [`InDoubtResolver`]'s `applying` set, from the start of its
/// commit or abort until that ends (a panic too).
struct ApplyingMark {
    applying: Arc<Mutex<HashSet<BranchKey>>>,
    key: BranchKey,
}

impl ApplyingMark {
    fn new(applying: Arc<Mutex<HashSet<BranchKey>>>, key: BranchKey) -> Self {
        applying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        Self { applying, key }
    }
}

impl Drop for ApplyingMark {
    fn drop(&mut self) {
        self.applying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

    use super::*;
    use crate::barrier::tests::Yes;
    use crate::participant::{BranchContext, Vote};

    #[test]
    fn options_that_would_never_resolve_a_branch_are_refused_by_name() {
        assert_eq!(InDoubtOptions::default().validate(), Ok(()));
        let refused = |change: fn(&mut InDoubtOptions), field: &str| {
            let mut options = InDoubtOptions::default();
            change(&mut options);
            let error = options.validate().unwrap_err();
            assert!(error.starts_with(&format!("in_doubt.{field}: ")), "{error}");
        };
        refused(|o| o.max_branches_per_round = 0, "max_branches_per_round");
        refused(
            |o| o.max_branches_per_round = MAX_BRANCHES_PER_ROUND + 1,
            "max_branches_per_round",
        );
        refused(|o| o.call_timeout_ms = 0, "call_timeout_ms");
        refused(|o| o.apply_wait_ms = 0, "apply_wait_ms");
        refused(|o| o.poll_interval_ms = 0, "poll_interval_ms");
        refused(|o| o.ask_after_ms = u64::MAX, "ask_after_ms");
        let asks_at_once = InDoubtOptions {
            ask_after_ms: 0,
            ..InDoubtOptions::default()
        };
        assert_eq!(asks_at_once.validate(), Ok(()));
    }

    #[tokio::test]
    async fn a_resolver_is_not_made_with_options_that_would_resolve_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), Default::default()).unwrap();
        let barrier = Arc::new(Barrier::new(Arc::new(store)));
        let options = InDoubtOptions {
            call_timeout_ms: 0,
            ..InDoubtOptions::default()
        };
        let refused = InDoubtResolver::new(Arc::new(Yes), barrier.clone(), options).unwrap_err();
        assert!(
            refused.starts_with("in_doubt.call_timeout_ms: "),
            "{refused}"
        );
        // Nor with a client that could never ask a coordinator.
        let mut options = InDoubtOptions::default();
        options.coordinator_client.keepalive_interval_ms = 0;
        let refused = InDoubtResolver::new(Arc::new(Yes), barrier.clone(), options).unwrap_err();
        assert!(
            refused.starts_with("in_doubt.coordinator_client.keepalive_interval_ms "),
            "{refused}"
        );
        assert!(InDoubtResolver::new(Arc::new(Yes), barrier, InDoubtOptions::default()).is_ok());
    }

    /// The `GetOutcome` calls asked so far that got no answer.
    fn unanswered_inquiries(barrier: &Barrier<DurableStore>) -> String {
        let text = barrier.metrics().encode().unwrap();
        text.lines()
            .find_map(|line| {
                line.strip_prefix("treaty_participant_outcome_inquiries_total{result=\"error\"} ")
            })
            .unwrap_or("0")
            .to_string()
    }

    #[tokio::test]
    async fn a_coordinator_that_cannot_be_reached_is_not_asked_about_every_branch() {
        // On loopback: one that accepts connections and never answers (a host gone
        // without a reset), and one where nothing listens.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_endpoint = format!("http://{}", silent.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut connections = Vec::new();
            while let Ok((connection, _)) = silent.accept().await {
                connections.push(connection);
            }
        });
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_endpoint = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let dir = tempfile::tempdir().unwrap();
        let store = DurableStore::open(dir.path(), Default::default()).unwrap();
        let barrier = Arc::new(Barrier::new(Arc::new(store)));
        for (i, endpoint) in [&silent_endpoint; 3]
            .into_iter()
            .chain([&closed_endpoint; 2])
            .enumerate()
        {
            let branch = BranchContext::new("t-1", format!("b{i}"));
            let vote = barrier.prepare(&Yes, &branch, b"", endpoint).await.unwrap();
            assert_eq!(vote, Vote::Yes);
        }
        // Long enough that the closed port's refusal, not the timeout, answers on a
        // loaded machine.
        let options = InDoubtOptions {
            ask_after_ms: 0,
            call_timeout_ms: 1_000,
            ..InDoubtOptions::default()
        };
        let mut resolver = InDoubtResolver::new(Arc::new(Yes), barrier.clone(), options).unwrap();
        let (_stop, mut stopped) = tokio::sync::watch::channel(false);
        for round in 1..=2 {
            let report = resolver.round(&mut stopped).await;
            assert_eq!(report.still_in_doubt, 5, "round {round}: {report:?}");
            // A round asks the silent coordinator twice (one slow outcome may be one
            // transaction's) and the closed one once; their other branches wait.
            assert_eq!(
                unanswered_inquiries(&barrier),
                (3 * round).to_string(),
                "round {round}"
            );
        }
        held.abort();
    }
}
