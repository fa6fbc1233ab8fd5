"""The participant server's Prometheus metrics, named as the Rust SDK's
(``participant-sdk/src/metrics.rs``), served at ``/metrics`` when :func:`serve` is given
``metrics_address``.

- ``treaty_participant_operations_total{operation,result}`` and
  ``treaty_participant_operation_duration_seconds{operation}``: every call the servicer
  answers, by the protocol answer it gave (``yes``, ``committed``, ``aborted``, ...), or
  ``refused`` (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED), ``error`` (any
  other status) or ``cancelled`` (its caller was gone when it answered; the operation
  behind it still ran to its end).
- ``treaty_participant_branches_in_doubt``: branches that voted YES with no outcome yet,
  as of the in-doubt resolver's last complete pass over them; absent until the first
  ends (a 0 would look healthy while a first pass over many branches still runs); and
  ``treaty_participant_in_doubt_oldest_age_seconds``, the time since the oldest of them
  voted YES (0 if none), computed at the scrape.
  ``treaty_participant_in_doubt_passes_total`` counts the passes ended.
- ``treaty_participant_outcome_inquiries_total{result}``: ``GetOutcome`` asks for
  branches in doubt: commit, abort, pending, error (no answer).
- ``treaty_participant_barrier_gc_removed_total``: records the collector deleted.

Every label takes its value from a fixed set, never from a request, and every series is
created at 0 when the server starts, as the Rust SDK's are; a scrape reads only the
counters (no barrier access), so it costs the same however large the barrier. The
registry is the server's own, not the process-wide default. Unlike the Rust SDK's,
prometheus-client adds a ``*_created`` series (the creation time) beside each counter
and histogram.
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

# Each operation's protocol answers, as the Rust SDK's table (`ANSWERS`).
ANSWERS = {
    "prepare": ("yes", "no", "read_only"),
    "commit": ("committed", "not_prepared", "already_aborted"),
    "one_phase_commit": ("committed", "rejected", "already_aborted"),
    "saga_step": ("committed", "rejected", "already_aborted"),
    "abort": ("aborted", "already_committed"),
    "compensate": ("compensated",),
}
# What else any call can end in.
ALWAYS = ("refused", "error", "cancelled")
INQUIRY_RESULTS = ("commit", "abort", "pending", "error")
# 100 µs doubling to about 6.5 s, as the Rust SDK's histogram.
DURATION_BUCKETS = tuple(0.0001 * 2**k for k in range(17))


class ParticipantMetrics:
    """The metrics of one participant server, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._operations = Counter(
            "treaty_participant_operations",
            "Participant calls that ended, by operation and by the answer given",
            ("operation", "result"),
            registry=self.registry,
        )
        self._durations = Histogram(
            "treaty_participant_operation_duration_seconds",
            "Time from a participant call's arrival to its answer",
            ("operation",),
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        # Registered at the first pass's end.
        self._in_doubt: Gauge | None = None
        self._oldest_age: Gauge | None = None
        self._oldest_in_doubt_unix_ms: int | None = None
        self._passes = Counter(
            "treaty_participant_in_doubt_passes",
            "Passes of the in-doubt resolver over the branches in doubt that ended",
            registry=self.registry,
        )
        self._inquiries = Counter(
            "treaty_participant_outcome_inquiries",
            "GetOutcome asks for branches in doubt, by answer",
            ("result",),
            registry=self.registry,
        )
        self._gc_removed = Counter(
            "treaty_participant_barrier_gc_removed",
            "Barrier records deleted by the collector",
            registry=self.registry,
        )
        self._in_doubt_lock = threading.Lock()
        # Scraped at 0 before the first call, as the Rust SDK's.
        for operation, answers in ANSWERS.items():
            self._durations.labels(operation)
            for result in answers + ALWAYS:
                self._operations.labels(operation, result)
        for result in INQUIRY_RESULTS:
            self._inquiries.labels(result)

    def operation_ended(self, operation: str, result: str, seconds: float) -> None:
        if result not in ANSWERS.get(operation, ()) + ALWAYS:
            raise ValueError(f"metrics: unknown operation or result: {operation}/{result}")
        self._operations.labels(operation, result).inc()
        self._durations.labels(operation).observe(max(0.0, seconds))

    def outcome_asked(self, result: str) -> None:
        if result not in INQUIRY_RESULTS:
            raise ValueError(f"metrics: unknown inquiry result: {result}")
        self._inquiries.labels(result).inc()

    def in_doubt_pass_ended(self, branches: int, oldest_prepared_unix_ms: int | None) -> None:
        """A pass over the branches in doubt ended with ``branches`` still in doubt, the
        oldest of them prepared at ``oldest_prepared_unix_ms`` (None if none is)."""
        with self._in_doubt_lock:
            self._oldest_in_doubt_unix_ms = oldest_prepared_unix_ms
            if self._in_doubt is None:
                self._in_doubt = Gauge(
                    "treaty_participant_branches_in_doubt",
                    "Branches that voted YES with no outcome yet, as of the in-doubt resolver's last complete pass",
                    registry=self.registry,
                )
                self._oldest_age = Gauge(
                    "treaty_participant_in_doubt_oldest_age_seconds",
                    "Time since the oldest branch in doubt voted YES (0 if none)",
                    registry=self.registry,
                )
                self._oldest_age.set_function(self._oldest_age_seconds)
            self._in_doubt.set(branches)
        self._passes.inc()

    def _oldest_age_seconds(self) -> float:
        """Computed at each scrape, from the last pass's oldest branch."""
        with self._in_doubt_lock:
            oldest = self._oldest_in_doubt_unix_ms
        if oldest is None:
            return 0.0
        return max(0, time.time_ns() // 1_000_000 - oldest) / 1000

    def records_collected(self, removed: int) -> None:
        if removed > 0:
            self._gc_removed.inc(removed)

    def render(self) -> bytes:
        """The exposition text, as ``/metrics`` serves it."""
        return generate_latest(self.registry)


def check_metrics_address(address: str) -> str:
    """The host of ``address`` (``host:port``), or ``ValueError`` naming the field."""
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"metrics_address: {address!r} is not host:port")
    return host


class MetricsServer:
    """``/metrics`` over HTTP on ``address`` (``host:port``; port 0 picks one)."""

    def __init__(self, metrics: ParticipantMetrics, address: str) -> None:
        host = check_metrics_address(address)
        port_text = address.rpartition(":")[2]
        try:
            self._server, self._thread = start_http_server(
                int(port_text), addr=host.strip("[]"), registry=metrics.registry
            )
        except OSError as error:
            raise OSError(f"metrics_address: cannot listen on {address}: {error}") from error
        self.port = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
