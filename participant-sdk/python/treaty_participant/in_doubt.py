"""In-doubt resolution: a branch that voted YES may neither commit nor abort on its own,
so when its outcome is slow to come the participant asks the coordinator
(``Coordinator.GetOutcome``) and applies the answer through the barrier
(PARTICIPANT-PROTOCOL.md §9).

A round runs at start and then every ``poll_interval_ms``. It lists at most
``max_branches_per_round`` in-doubt branches, continuing after the last one the
previous round listed, and asks about those prepared at least ``ask_after_ms`` ago.
When a round resolved branches and the pass over them is not finished, the next round
follows at once (a restart with thousands in doubt is not paced at one page per
interval); a round that resolved nothing, and the end of a pass, wait the interval.
Invariants:

- only a trusted coordinator is asked: the endpoint recorded with the YES vote, and,
  when endpoints are configured, only if it is one of them. A branch whose Prepare named
  no coordinator is never asked about: it waits for the coordinator's delivery;
- DECISION_COMMIT is applied as a two-phase Commit, DECISION_ABORT as an Abort, through
  the barrier, exactly as if the coordinator had delivered it;
- PENDING, UNSPECIFIED, an unknown value, an error or a timeout leave the branch prepared;
  it is asked again after a per-branch back-off that doubles from ``poll_interval_ms`` up
  to ``backoff_max_ms``, for as long as it is in doubt (and again after every restart);
- every call is bounded by ``call_timeout_ms``; channels are cached, at most 64;
- an outcome is applied on a thread of its own, waited for at most ``apply_wait_ms``:
  user ``commit`` or ``abort`` code that does not end holds that thread, not the
  resolver. Its branch is not asked about until the apply ends, and at most
  ``MAX_APPLYING`` applies run on by themselves (a round asks nothing more meanwhile).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import grpc

from . import endpoint as endpoints
from ._proto import coordinator_pb2, coordinator_pb2_grpc
from .answer_table import Mode, Request
from .barrier import BarrierError, DbApiBarrier, InDoubtBranch, now_unix_ms
from .participant import BranchContext, Participant
from .metrics import ParticipantMetrics
from .trust import CoordinatorTrust

log = logging.getLogger("treaty_participant.in_doubt")

#: Channels kept to coordinators; past this the cache starts over.
MAX_CACHED_COORDINATORS = 64
#: Branches whose back-off is remembered; past this the memory starts over.
MAX_REMEMBERED_BRANCHES = 100_000
#: Applies that outlasted ``apply_wait_ms`` and still run, at most.
MAX_APPLYING = 64
# The metrics' names of GetOutcome's answers: anything else (UNSPECIFIED, a value this
# SDK does not know) is no answer, counted as an error as the Rust SDK does.
_INQUIRY_RESULTS = {
    coordinator_pb2.DECISION_COMMIT: "commit",
    coordinator_pb2.DECISION_ABORT: "abort",
    coordinator_pb2.DECISION_PENDING: "pending",
}
#: How often a wait for an apply looks for a stop.
STOP_CHECK_S = 0.1


@dataclass
class RoundReport:
    committed: int = 0
    aborted: int = 0
    still_in_doubt: int = 0
    # When the oldest branch still in doubt voted YES (Unix ms); None if none is.
    oldest_in_doubt_unix_ms: int | None = None

    def still(self, branch: InDoubtBranch) -> None:
        """Counts ``branch`` as still in doubt after this round."""
        self.still_in_doubt += 1
        if self.oldest_in_doubt_unix_ms is None or branch.prepared_unix_ms < self.oldest_in_doubt_unix_ms:
            self.oldest_in_doubt_unix_ms = branch.prepared_unix_ms


class InDoubtResolver:
    def __init__(
        self,
        participant: Participant,
        barrier: DbApiBarrier,
        trust: CoordinatorTrust | None = None,
        *,
        poll_interval_ms: int = 2_000,
        ask_after_ms: int = 2_000,
        call_timeout_ms: int = 2_000,
        max_branches_per_round: int = 256,
        backoff_max_ms: int = 60_000,
        apply_wait_ms: int = 10_000,
        coordinator_token: str | None = None,
        coordinator_ca_pem: bytes | None = None,
        metrics: ParticipantMetrics | None = None,
    ) -> None:
        for name, value in (
            ("in_doubt_interval_ms", poll_interval_ms),
            ("call_timeout_ms", call_timeout_ms),
            ("max_branches_per_round", max_branches_per_round),
            ("backoff_max_ms", backoff_max_ms),
            ("apply_wait_ms", apply_wait_ms),
        ):
            if value < 1:
                raise ValueError(f"{name}: must be at least 1, not {value}")
        self._participant = participant
        self._barrier = barrier
        self._trust = trust or CoordinatorTrust()
        self._poll_interval_ms = poll_interval_ms
        self._ask_after_ms = max(0, ask_after_ms)
        self._call_timeout_s = call_timeout_ms / 1000
        self._max_branches = max_branches_per_round
        self._backoff_max_ms = max(backoff_max_ms, poll_interval_ms)
        self._apply_wait_s = apply_wait_ms / 1000
        # Branches whose apply outlasted the wait and still runs on its own thread.
        self._applying: set[tuple[str, str]] = set()
        # Every apply thread not yet known to have ended, for stop() to wait for.
        self._apply_threads: list[threading.Thread] = []
        self._applying_lock = threading.Lock()
        self._channels_lock = threading.Lock()
        self._metadata = (("authorization", f"Bearer {coordinator_token}"),) if coordinator_token else ()
        self._ca_pem = coordinator_ca_pem
        self._channels: dict[str, tuple[grpc.Channel, coordinator_pb2_grpc.CoordinatorStub]] = {}
        self._cursor: tuple[str, str] | None = None
        # (transaction_id, branch_id) -> (failed asks in a row, monotonic time of the next ask)
        self._backoff: dict[tuple[str, str], tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One round at a time (the thread's, or a caller's such as a test or an operator).
        self._round_lock = threading.Lock()
        self._metrics = metrics
        # Branches still in doubt in the pages of the pass under way.
        self._pass = RoundReport()

    # ----- running -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="treaty-in-doubt", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the rounds, then waits for applies still running, all within
        ``timeout_s``: what an apply left when the barrier closes is rolled back, and the
        branch stays in doubt for the next start."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        with self._applying_lock:
            threads = list(self._apply_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(thread.is_alive() for thread in threads)
        if left:
            log.warning("%d outcome applies still running at stop; their branches stay in doubt", left)
        with self._channels_lock:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                report = self.round()
                if report.committed or report.aborted:
                    log.info("in-doubt resolution round: %s", report)
                if (report.committed or report.aborted) and self._cursor is not None:
                    continue
            except Exception:  # noqa: BLE001 - a round's failure must not end resolution
                log.exception("in-doubt resolution round failed")
                self._cursor = None
            self._stop.wait(self._poll_interval_ms / 1000)

    def round(self) -> RoundReport:
        """Asks about the in-doubt branches due (at most ``max_branches_per_round``,
        continuing where the last round stopped) and applies the answers."""
        with self._round_lock:
            if self._cursor is None:  # a pass over the branches in doubt begins
                self._pass = RoundReport()
            report = self._round()
            self._pass.still_in_doubt += report.still_in_doubt
            oldest = [
                prepared
                for prepared in (report.oldest_in_doubt_unix_ms, self._pass.oldest_in_doubt_unix_ms)
                if prepared is not None
            ]
            self._pass.oldest_in_doubt_unix_ms = min(oldest, default=None)
            # A round cut short by stop() has not seen the whole page: nothing to report.
            if self._cursor is None and self._metrics is not None and not self._stop.is_set():
                self._metrics.in_doubt_pass_ended(
                    self._pass.still_in_doubt, self._pass.oldest_in_doubt_unix_ms
                )
            return report

    def _round(self) -> RoundReport:
        report = RoundReport()
        branches, self._cursor = self._barrier.in_doubt_after(self._cursor, self._max_branches)
        now_ms = now_unix_ms()
        for branch in branches:
            if self._stop.is_set():
                break
            key = (branch.transaction_id, branch.branch_id)
            failures, next_ask = self._backoff.get(key, (0, 0.0))
            with self._applying_lock:
                applying = key in self._applying
                crowded = len(self._applying) >= MAX_APPLYING
            if (
                applying
                or crowded
                or now_ms - branch.prepared_unix_ms < self._ask_after_ms
                or time.monotonic() < next_ask
            ):
                report.still(branch)
                continue
            decision = self._ask(branch)
            resolved = self._apply(branch, decision) if decision is not None else None
            if resolved == coordinator_pb2.DECISION_COMMIT:
                report.committed += 1
                self._backoff.pop(key, None)
            elif resolved == coordinator_pb2.DECISION_ABORT:
                report.aborted += 1
                self._backoff.pop(key, None)
            else:
                report.still(branch)
                if len(self._backoff) >= MAX_REMEMBERED_BRANCHES:
                    self._backoff.clear()
                delay_ms = min(self._backoff_max_ms, self._poll_interval_ms * 2 ** min(failures, 30))
                self._backoff[key] = (failures + 1, time.monotonic() + delay_ms / 1000)
        return report

    # ----- asking and applying -------------------------------------------------------

    def _ask(self, branch: InDoubtBranch) -> int | None:
        where = f"txn_id={branch.transaction_id} branch_id={branch.branch_id}"
        if not branch.coordinator_endpoint:
            log.warning("in doubt, but the prepare named no coordinator to ask: %s", where)
            return None
        if not self._trust.may_ask(branch.coordinator_endpoint):
            log.warning(
                "in doubt, but coordinator %s is not one this participant trusts; waiting "
                "for a trusted one to deliver the outcome: %s",
                branch.coordinator_endpoint,
                where,
            )
            return None
        try:
            stub = self._stub(branch.coordinator_endpoint)
        except (endpoints.EndpointError, ValueError) as error:
            log.warning("cannot ask coordinator %s: %s", branch.coordinator_endpoint, error)
            return None
        request = coordinator_pb2.GetOutcomeRequest(
            transaction_id=branch.transaction_id, branch_id=branch.branch_id
        )
        try:
            response = stub.GetOutcome(
                request, timeout=self._call_timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as error:
            log.debug("GetOutcome failed: %s %s", where, error)
            self._count_inquiry("error")
            return None
        self._count_inquiry(_INQUIRY_RESULTS.get(response.decision, "error"))
        return response.decision

    def _count_inquiry(self, result: str) -> None:
        if self._metrics is not None:
            self._metrics.outcome_asked(result)

    def _stub(self, coordinator_endpoint: str) -> coordinator_pb2_grpc.CoordinatorStub:
        with self._channels_lock:
            return self._stub_locked(coordinator_endpoint)

    def _stub_locked(self, coordinator_endpoint: str) -> coordinator_pb2_grpc.CoordinatorStub:
        cached = self._channels.get(coordinator_endpoint)
        if cached is not None:
            return cached[1]
        if len(self._channels) >= MAX_CACHED_COORDINATORS:
            for channel, _ in self._channels.values():
                channel.close()
            self._channels.clear()
        parsed = endpoints.parse(coordinator_endpoint)
        if parsed.uses_tls:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._ca_pem)
            channel = grpc.secure_channel(parsed.target, credentials)
        else:
            channel = grpc.insecure_channel(parsed.target)
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        self._channels[coordinator_endpoint] = (channel, stub)
        return stub

    def _apply(self, branch: InDoubtBranch, decision: int) -> int | None:
        """Applies the coordinator's answer through the barrier on a thread of its own,
        waiting at most ``apply_wait_ms``; the decision applied, or None if there is
        none to apply (PENDING, unknown), it failed for now, or it still runs."""
        if decision not in (coordinator_pb2.DECISION_COMMIT, coordinator_pb2.DECISION_ABORT):
            return None
        key = (branch.transaction_id, branch.branch_id)
        applied: list[int | None] = [None]
        done = threading.Event()

        def run() -> None:
            try:
                applied[0] = self._apply_now(branch, decision)
            except Exception:  # noqa: BLE001 - the branch stays in doubt for a later round
                log.exception(
                    "applying an outcome failed: txn_id=%s branch_id=%s", branch.transaction_id, branch.branch_id
                )
            finally:
                with self._applying_lock:
                    done.set()
                    self._applying.discard(key)
                    self._apply_threads.remove(threading.current_thread())

        thread = threading.Thread(target=run, name="treaty-in-doubt-apply", daemon=True)
        with self._applying_lock:
            self._apply_threads.append(thread)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had: this round asks no more
            with self._applying_lock:
                self._apply_threads.remove(thread)
            raise
        # In slices, so that a stop is not held up by the wait.
        deadline = time.monotonic() + self._apply_wait_s
        while not done.wait(min(STOP_CHECK_S, max(0.0, deadline - time.monotonic()))):
            if self._stop.is_set() or time.monotonic() >= deadline:
                break
        with self._applying_lock:
            if not done.is_set():
                self._applying.add(key)
                log.warning(
                    "applying an outcome has not ended (waited at most %d ms); going on "
                    "without it: txn_id=%s branch_id=%s",
                    self._apply_wait_s * 1000,
                    branch.transaction_id,
                    branch.branch_id,
                )
                return None
        return applied[0]

    def _apply_now(self, branch: InDoubtBranch, decision: int) -> int | None:
        ctx = BranchContext(branch.transaction_id, branch.branch_id)
        try:
            if decision == coordinator_pb2.DECISION_COMMIT:
                reply = self._barrier.handle(
                    self._participant,
                    Request.COMMIT,
                    ctx,
                    mode=Mode.TWO_PHASE,
                    coordinator_endpoint=branch.coordinator_endpoint,
                )
            elif decision == coordinator_pb2.DECISION_ABORT:
                reply = self._barrier.handle(self._participant, Request.ABORT, ctx)
            else:
                return None
        except BarrierError as error:
            log.warning(
                "cannot apply the outcome yet: txn_id=%s branch_id=%s error=%s",
                branch.transaction_id,
                branch.branch_id,
                error,
            )
            return None
        log.info(
            "in-doubt branch resolved: txn_id=%s branch_id=%s decision=%s answer=%s",
            branch.transaction_id,
            branch.branch_id,
            coordinator_pb2.Decision.Name(decision),
            reply.answer.value,
        )
        return decision
