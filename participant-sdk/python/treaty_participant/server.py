"""Serves a :class:`Participant` over gRPC (``treaty.v1.Participant``), through the barrier.

This is the edge of the SDK: protobuf requests are checked and converted here, protocol
outcomes go back as response fields, and only failures to answer become error statuses
(PARTICIPANT-PROTOCOL.md §10). Order of checks, as in the Rust SDK: the caller's
credentials first; then the fields (INVALID_ARGUMENT naming the field); then whether the
named coordinator is trusted (PERMISSION_DENIED); only then the barrier and user code.

| barrier outcome                         | status              |
|-----------------------------------------|---------------------|
| user code raised; concurrent change     | UNAVAILABLE         |
| branch busy (too many wait, or deadline)| UNAVAILABLE         |
| every database connection in use        | UNAVAILABLE         |
| no record, past the barrier retention   | FAILED_PRECONDITION |
| the barrier's database failed           | INTERNAL            |

Each call runs on a thread of a bounded pool (``max_workers``), with at most
``max_concurrent_rpcs`` accepted at once (RESOURCE_EXHAUSTED beyond). A call whose
client gives up still runs to its end: user code and its record are never cut half-way.
A call waiting for another operation on its branch to end waits only while its caller
is there (not past its deadline, not cancelled: the coordinator cancels a call it gives
up on), and at most eight wait for one branch (UNAVAILABLE beyond), so that user code
that does not end holds one thread, not every retry's.

Beside it, the standard health service (``grpc.health.v1.Health``, unauthenticated, as
in the Rust SDK): SERVING for ``treaty.v1.Participant`` and for the server as a whole
(service ``""``, which generic probes ask), NOT_SERVING for both from the moment the
server stops, gracefully or because its barrier failed; and server reflection
(``grpc.reflection.v1alpha``; the Rust SDK serves ``v1`` too) of those services, so
that ``grpcurl`` needs no proto files.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import pathlib
import re
import ssl
import tempfile
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from . import endpoint as endpoints
from ._proto import participant_pb2 as pb
from ._proto import participant_pb2_grpc
from .answer_table import AbortAnswer, CommitAnswer, Mode, Request
from .barrier import (
    BarrierError,
    BranchBusy,
    ConcurrentChange,
    DbApiBarrier,
    PastRetention,
    StoreBusy,
    StoreError,
    UserCodeFailed,
)
from .in_doubt import InDoubtResolver
from .metrics import MetricsServer, ParticipantMetrics, check_metrics_address
from .limits import MAX_MESSAGE_BYTES, FieldError, check_id, check_payload
from .participant import BranchContext, Participant, VoteKind
from .trust import CoordinatorTrust, TrustRefusal, check_token_value

log = logging.getLogger("treaty_participant.server")

# Reflection streams open at once, at most (each holds a worker thread while open).
MAX_REFLECTION_STREAMS = 2
# How much longer than its grace a stop may take: in-doubt applies (10 s at most) and
# the collector's end; a second caller of stop() waits that long for the first.
STOP_TAIL_S = 20.0

# The name the health service reports the participant service under, as the Rust SDK.
PARTICIPANT_SERVICE = pb.DESCRIPTOR.services_by_name["Participant"].full_name

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_MAX_TRACESTATE_BYTES = 512

_VOTES = {VoteKind.YES: pb.VOTE_YES, VoteKind.NO: pb.VOTE_NO, VoteKind.READ_ONLY: pb.VOTE_READ_ONLY}
_COMMIT_RESULTS = {
    CommitAnswer.COMMITTED: pb.COMMIT_RESULT_COMMITTED,
    CommitAnswer.REJECTED: pb.COMMIT_RESULT_REJECTED,
    CommitAnswer.NOT_PREPARED: pb.COMMIT_RESULT_NOT_PREPARED,
    CommitAnswer.ALREADY_ABORTED: pb.COMMIT_RESULT_ALREADY_ABORTED,
}
_ABORT_RESULTS = {
    AbortAnswer.ABORTED: pb.ABORT_RESULT_ABORTED,
    AbortAnswer.ALREADY_COMMITTED: pb.ABORT_RESULT_ALREADY_COMMITTED,
}
_MODES = {
    pb.COMMIT_MODE_TWO_PHASE: Mode.TWO_PHASE,
    pb.COMMIT_MODE_ONE_PHASE: Mode.ONE_PHASE,
    pb.COMMIT_MODE_SAGA_STEP: Mode.SAGA_STEP,
}
# The metrics' names of a Commit's operation, by mode (a bad mode counts as "commit").
_COMMIT_OPERATIONS = {
    pb.COMMIT_MODE_TWO_PHASE: "commit",
    pb.COMMIT_MODE_ONE_PHASE: "one_phase_commit",
    pb.COMMIT_MODE_SAGA_STEP: "saga_step",
}
# What the metrics count as a caller refused rather than an operation that failed.
_REFUSALS = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)
# The metrics' name of an answer: its enum value's name without the enum's prefix.
_ANSWER_ENUMS = {
    pb.PrepareBranchResponse: (pb.Vote, "vote", "VOTE_"),
    pb.CommitBranchResponse: (pb.CommitResult, "result", "COMMIT_RESULT_"),
    pb.AbortBranchResponse: (pb.AbortResult, "result", "ABORT_RESULT_"),
    pb.CompensateBranchResponse: (pb.CompensateResult, "result", "COMPENSATE_RESULT_"),
}


def _result_name(response: object) -> str:
    enum, field, prefix = _ANSWER_ENUMS[type(response)]
    return enum.Name(getattr(response, field)).removeprefix(prefix).lower()


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _trace(metadata: Sequence[tuple[str, object]]) -> tuple[str | None, str | None]:
    """The W3C trace context of a call; an invalid or missing one is none (never fails)."""
    traceparent = tracestate = None
    for key, value in metadata:
        if key == "traceparent" and isinstance(value, str) and _TRACEPARENT.match(value):
            if not value.startswith("ff"):
                traceparent = value
        elif key == "tracestate" and isinstance(value, str) and len(value) <= _MAX_TRACESTATE_BYTES:
            tracestate = value
    return traceparent, (tracestate if traceparent else None)


def _peer_names(context: grpc.ServicerContext) -> list[str]:
    """The verified client certificate's names, as the Rust SDK reads them: its DNS and
    URI subject alternative names, then its common name (empty without a verified client
    certificate). Email and IP SANs name no peer: grpc's ``x509_subject_alternative_name``
    holds them too, so it is not read."""
    auth = context.auth_context() or {}
    names: list[str] = []
    for key in ("peer_dns", "peer_uri", "x509_common_name"):
        for value in auth.get(key, ()):
            name = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
            if name not in names:
                names.append(name)
    return names


class ParticipantServicer(participant_pb2_grpc.ParticipantServicer):
    """The ``treaty.v1.Participant`` service for one participant and its barrier. Mount it
    on a grpc.Server of your own with ``add_ParticipantServicer_to_server``, or let
    :func:`serve` do everything."""

    def __init__(
        self,
        participant: Participant,
        barrier: DbApiBarrier,
        trust: CoordinatorTrust | None = None,
        metrics: ParticipantMetrics | None = None,
    ) -> None:
        self._participant = participant
        self._barrier = barrier
        self._trust = trust or CoordinatorTrust()
        self._metrics = metrics

    def Prepare(self, request: pb.PrepareBranchRequest, context: grpc.ServicerContext):
        def answer(ctx: BranchContext) -> pb.PrepareBranchResponse:
            check_payload("payload", request.payload)
            self._check_coordinator(request.coordinator_endpoint)
            reply = self._barrier.handle(
                self._participant,
                Request.PREPARE,
                ctx,
                payload=request.payload,
                coordinator_endpoint=request.coordinator_endpoint,
                wait_s=context.time_remaining(),
                still_wanted=context.is_active,
            )
            return pb.PrepareBranchResponse(vote=_VOTES[reply.answer], reason=reply.reason)

        return self._serve(context, "prepare", request.transaction_id, request.branch_id, answer)

    def Commit(self, request: pb.CommitBranchRequest, context: grpc.ServicerContext):
        def answer(ctx: BranchContext) -> pb.CommitBranchResponse:
            mode = _MODES.get(request.mode)
            if mode is None:
                raise FieldError("mode", f"{request.mode} is not a commit mode")
            check_payload("payload", request.payload)
            self._check_coordinator(request.coordinator_endpoint)
            reply = self._barrier.handle(
                self._participant,
                Request.COMMIT,
                ctx,
                mode=mode,
                payload=request.payload,
                coordinator_endpoint=request.coordinator_endpoint,
                wait_s=context.time_remaining(),
                still_wanted=context.is_active,
            )
            return pb.CommitBranchResponse(result=_COMMIT_RESULTS[reply.answer], reason=reply.reason)

        operation = _COMMIT_OPERATIONS.get(request.mode, "commit")
        return self._serve(context, operation, request.transaction_id, request.branch_id, answer)

    def Abort(self, request: pb.AbortBranchRequest, context: grpc.ServicerContext):
        def answer(ctx: BranchContext) -> pb.AbortBranchResponse:
            reply = self._barrier.handle(
                self._participant,
                Request.ABORT,
                ctx,
                wait_s=context.time_remaining(),
                still_wanted=context.is_active,
            )
            return pb.AbortBranchResponse(result=_ABORT_RESULTS[reply.answer])

        return self._serve(context, "abort", request.transaction_id, request.branch_id, answer)

    def Compensate(self, request: pb.CompensateBranchRequest, context: grpc.ServicerContext):
        def answer(ctx: BranchContext) -> pb.CompensateBranchResponse:
            check_payload("payload", request.payload)
            self._barrier.handle(
                self._participant,
                Request.COMPENSATE,
                ctx,
                payload=request.payload,
                wait_s=context.time_remaining(),
                still_wanted=context.is_active,
            )
            return pb.CompensateBranchResponse(result=pb.COMPENSATE_RESULT_COMPENSATED)

        return self._serve(context, "compensate", request.transaction_id, request.branch_id, answer)

    # ----- the common path -----------------------------------------------------------

    def _check_coordinator(self, coordinator_endpoint: str) -> None:
        if coordinator_endpoint:
            endpoints.parse_field("coordinator_endpoint", coordinator_endpoint)
        try:
            self._trust.check_endpoint(coordinator_endpoint)
        except TrustRefusal as refusal:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, str(refusal)) from None

    def _serve(
        self,
        context: grpc.ServicerContext,
        operation: str,
        transaction_id: str,
        branch_id: str,
        answer: Callable[[BranchContext], object],
    ):
        started = time.monotonic()
        code, message = self._answer(context, transaction_id, branch_id, answer)
        if self._metrics is not None:
            try:
                if code is None:
                    result = _result_name(message)
                elif code in _REFUSALS:
                    result = "refused"
                else:
                    result = "error"
                if not context.is_active():
                    result = "cancelled"
                self._metrics.operation_ended(operation, result, time.monotonic() - started)
            except Exception:  # noqa: BLE001 - counting must never change the answer
                log.exception("counting a call in the metrics failed")
        if code is None:
            return message
        context.abort(code, message)

    def _answer(
        self,
        context: grpc.ServicerContext,
        transaction_id: str,
        branch_id: str,
        answer: Callable[[BranchContext], object],
    ) -> tuple[grpc.StatusCode | None, object]:
        """The response (with no code), or the status to end the call with."""
        metadata = context.invocation_metadata() or ()
        try:
            try:
                self._trust.check_caller(metadata, _peer_names(context))
            except TrustRefusal as refusal:
                raise _Refused(getattr(grpc.StatusCode, refusal.code), str(refusal)) from None
            check_id("transaction_id", transaction_id)
            check_id("branch_id", branch_id)
            traceparent, tracestate = _trace(metadata)
            ctx = BranchContext(transaction_id, branch_id, traceparent, tracestate)
            return None, answer(ctx)
        except FieldError as error:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except _Refused as refusal:
            code, message = refusal.code, str(refusal)
        except (UserCodeFailed, ConcurrentChange, BranchBusy, StoreBusy) as error:
            code, message = grpc.StatusCode.UNAVAILABLE, str(error)
        except PastRetention as error:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(error)
        except (StoreError, BarrierError) as error:
            log.error("barrier failed: txn_id=%s branch_id=%s error=%s", transaction_id, branch_id, error)
            code, message = grpc.StatusCode.INTERNAL, str(error)
        except Exception as error:  # noqa: BLE001 - a bug must still answer, not hang
            log.exception("unexpected error: txn_id=%s branch_id=%s", transaction_id, branch_id)
            code, message = grpc.StatusCode.INTERNAL, f"unexpected error: {error}"
        return code, message


class _BoundedReflection(reflection.ReflectionServicer):
    """grpcio-reflection's servicer, with at most ``streams`` reflection streams open at
    once (RESOURCE_EXHAUSTED beyond): each holds one of the server's worker threads until
    its client closes it, and anyone may open one, so without a bound a few idle
    clients would leave no thread for the participant's calls."""

    def __init__(self, service_names, streams: int) -> None:
        super().__init__(service_names)
        self._slots = threading.BoundedSemaphore(streams) if streams > 0 else None

    def ServerReflectionInfo(self, request_iterator, context):
        if self._slots is None or not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "reflection: every stream is taken; try again later")
        try:
            yield from super().ServerReflectionInfo(request_iterator, context)
        finally:
            self._slots.release()


@dataclass(frozen=True)
class ServerTls:
    """TLS for the participant's server (its endpoint is then ``https://``). With
    ``client_ca_pem``, every connection must present a client certificate chaining to it
    (mutual TLS), whose names can be ``accepted_identities``. grpcio offers no
    "optional but verified" client certificate, so unlike the Rust SDK a connection
    without one is refused at the handshake."""

    certificate_chain_pem: bytes
    private_key_pem: bytes
    client_ca_pem: bytes | None = None


def _refuse_pass_phrase() -> bytes:
    raise ValueError("an encrypted private key (grpcio serves unencrypted keys only)")


def _check_key_pair(tls: ServerTls) -> None:
    """Raises ``ValueError`` unless the certificate chain and key load together (grpcio
    would only fail at the next handshake). Only the pairing is checked: OpenSSL's
    security level is lowered to 0 so that a certificate grpcio serves is not refused
    for its key size. The PEM goes to memory files (``memfd``) where the system has
    them, else to a private temporary directory; where neither can be made, the check is
    skipped with a warning rather than refusing a configuration that works."""
    try:
        _load_key_pair(tls)
    except OSError as error:
        log.warning("tls: cannot check the certificate and key before use (%s); grpcio will", error)


def _load_key_pair(tls: ServerTls) -> None:
    with _pem_files(tls.certificate_chain_pem, tls.private_key_pem, tls.client_ca_pem or b"") as (chain, key, ca):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        try:
            context.load_cert_chain(chain, key, password=_refuse_pass_phrase)
        except (ssl.SSLError, ValueError) as error:
            raise ValueError(f"tls: the certificate chain and key do not load together: {error}") from error
        if tls.client_ca_pem is not None:
            try:
                context.load_verify_locations(cafile=ca)
            except (ssl.SSLError, ValueError) as error:
                raise ValueError(f"tls.client_ca_pem: not PEM certificates: {error}") from error


@contextlib.contextmanager
def _pem_files(*contents: bytes):
    """Paths to files holding ``contents``, gone afterwards."""
    if hasattr(os, "memfd_create") and pathlib.Path("/proc/self/fd").is_dir():
        descriptors = []
        try:
            for content in contents:
                descriptor = os.memfd_create("treaty-tls")
                descriptors.append(descriptor)
                os.write(descriptor, content)
            yield [f"/proc/self/fd/{descriptor}" for descriptor in descriptors]
        finally:
            for descriptor in descriptors:
                os.close(descriptor)
        return
    with tempfile.TemporaryDirectory(prefix="treaty-tls-") as scratch:
        paths = []
        for index, content in enumerate(contents):
            path = pathlib.Path(scratch, f"{index}.pem")
            path.touch(mode=0o600)
            path.write_bytes(content)
            paths.append(str(path))
        yield paths


class _ReloadableTls:
    """The server's TLS, which grpcio asks at each new handshake whether to replace."""

    def __init__(self, tls: ServerTls) -> None:
        self._client_ca_required = tls.client_ca_pem is not None
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.initial = self._configuration(tls)

    @staticmethod
    def _configuration(tls: ServerTls) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(tls.private_key_pem, tls.certificate_chain_pem)], root_certificates=tls.client_ca_pem
        )

    def replace(self, tls: ServerTls) -> None:
        if (tls.client_ca_pem is not None) != self._client_ca_required:
            raise ValueError(
                "tls.client_ca_pem: client certificates were "
                f"{'required' if self._client_ca_required else 'not required'} at start, and a "
                "reload cannot change that (grpcio fixes it when the server starts)"
            )
        _check_key_pair(tls)
        configuration = self._configuration(tls)
        with self._lock:
            self._pending = configuration
        log.info("TLS reloaded: new connections get the new certificate")

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The configuration to switch to, once; None while nothing changed."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial, self.fetch, require_client_authentication=self._client_ca_required
        )


class ServerHandle:
    """A running participant server: its ``port``, and :meth:`stop`."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        address: str,
        barrier: DbApiBarrier,
        resolver: InDoubtResolver,
        gc_interval_ms: int,
        health_servicer: health.HealthServicer,
        tls: "_ReloadableTls | None",
        metrics: ParticipantMetrics,
        metrics_server: MetricsServer | None,
    ) -> None:
        self.server = server
        self.port = port
        self.address = address
        self.barrier = barrier
        self.resolver = resolver
        self._health = health_servicer
        self._tls = tls
        self.metrics = metrics
        self._metrics_server = metrics_server
        # Where /metrics is served (None: not served).
        self.metrics_port = metrics_server.port if metrics_server is not None else None
        self._stopped = threading.Event()
        self._finished = threading.Event()
        self._stopping = threading.Lock()
        self._gc_interval_ms = gc_interval_ms
        self._gc_thread = threading.Thread(target=self._collect, name="treaty-barrier-gc", daemon=True)

    def _start_background(self) -> None:
        self.resolver.start()
        self._gc_thread.start()

    def _collect(self) -> None:
        """Deletes old final barrier records: bounded rounds while a pass has more to do,
        then a pause of ``gc_interval_ms``."""
        per_round = 1000
        while not self._stopped.is_set():
            try:
                for _ in range(100):
                    removed = self.barrier.collect(per_round)
                    self.metrics.records_collected(removed)
                    if removed < per_round or self._stopped.is_set():
                        break
            except BarrierError as error:
                log.warning("barrier garbage collection failed; trying again later: %s", error)
            self._stopped.wait(self._gc_interval_ms / 1000)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops accepting calls, gives those in flight ``grace_s`` to finish, then stops
        in-doubt resolution and collection. Safe to call more than once, from any thread."""
        with self._stopping:
            stopping_already = self._stopped.is_set()
            self._stopped.set()
        if stopping_already:
            # Another caller (a barrier failure, say) is stopping it: wait for its end.
            self._finished.wait(grace_s + STOP_TAIL_S)
            return
        try:
            # NOT_SERVING for every service, and for the server as a whole, first, so
            # that load balancers drain it while the calls in flight finish.
            self._health.enter_graceful_shutdown()
            self.server.stop(grace_s).wait(grace_s + 1)
            self.resolver.stop()
            if self._metrics_server is not None:
                self._metrics_server.stop()
            if self._gc_thread.is_alive():
                self._gc_thread.join(5)
        finally:
            self._finished.set()

    def reload_tls(self, tls: ServerTls) -> None:
        """Serves new connections with ``tls`` from now on (a renewed certificate, say;
        connections already open keep theirs), as the Rust SDK's reload on SIGHUP. The
        certificate and key are checked first: a pair that does not load raises
        ``ValueError`` and the old one stays. Client certificates stay required or not
        as at start, so ``client_ca_pem`` must be given exactly when it was then."""
        if self._tls is None:
            raise ValueError("tls: this server serves cleartext; it has no TLS to reload")
        self._tls.replace(tls)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Blocks until :meth:`stop` has ended (or ``timeout_s``); True once stopped."""
        return self._finished.wait(timeout_s)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    participant: Participant,
    barrier: DbApiBarrier,
    address: str = "127.0.0.1:0",
    *,
    accepted_tokens: Iterable[str] = (),
    accepted_identities: Iterable[str] = (),
    trusted_coordinators: Iterable[str] = (),
    tls: ServerTls | None = None,
    coordinator_token: str | None = None,
    coordinator_ca_pem: bytes | None = None,
    allow_unauthenticated: bool = False,
    in_doubt_interval_ms: int = 2_000,
    in_doubt_ask_after_ms: int = 2_000,
    in_doubt_call_timeout_ms: int = 2_000,
    in_doubt_backoff_max_ms: int = 60_000,
    in_doubt_max_branches_per_round: int = 256,
    in_doubt_apply_wait_ms: int = 10_000,
    barrier_retention_ms: int | None = None,
    gc_interval_ms: int = 10_000,
    max_workers: int = 16,
    max_concurrent_rpcs: int = 256,
    services: Iterable[Callable[[grpc.Server], None]] = (),
    metrics_address: str | None = None,
) -> ServerHandle:
    """Serves ``participant`` on ``address`` (``host:port``; port 0 picks one, see
    ``handle.port``) with its records in ``barrier``; starts in-doubt resolution and the
    barrier's garbage collection. Returns once the server is listening.

    - ``accepted_tokens`` / ``accepted_identities``: the coordinator must present one of
      these bearer tokens, or (with ``tls.client_ca_pem``) a client certificate of one of
      these names. Authenticating callers requires ``trusted_coordinators``: the
      endpoints asked about branches in doubt (a request naming another is refused).
    - Listening beyond loopback without authentication needs ``allow_unauthenticated``.
    - ``coordinator_token`` / ``coordinator_ca_pem``: what in-doubt resolution presents
      to ``GetOutcome`` and the CA it verifies ``https://`` coordinators with (None: the
      system's roots).
    - ``services``: callables adding more services to the same grpc.Server.
    - ``metrics_address``: serve Prometheus metrics at ``http://ADDRESS/metrics``
      (``host:port``, port 0 picks one: ``handle.metrics_port``); cleartext and without
      credentials, so bind it where only your scraper reaches. See :mod:`.metrics`.
    """
    trust = CoordinatorTrust(
        tokens=tuple(accepted_tokens),
        identities=tuple(accepted_identities),
        endpoints=tuple(trusted_coordinators),
    )
    if trust.authenticates and not trust.endpoints:
        raise ValueError(
            "trusted_coordinators: required when callers are authenticated; an address "
            "named in a request is data, not a credential, so in-doubt branches are only "
            "asked about at configured coordinators"
        )
    if accepted_identities and (tls is None or tls.client_ca_pem is None):
        raise ValueError("accepted_identities: needs tls with client_ca_pem to verify client certificates")
    if coordinator_token is not None:
        check_token_value(coordinator_token, "coordinator_token")
        if not trust.endpoints:
            raise ValueError(
                "coordinator_token: only sent to trusted_coordinators; without the list it "
                "would go to whatever address a Prepare named"
            )
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit():
        raise ValueError(f"address: {address!r} is not host:port")
    if not _is_loopback(host) and not trust.authenticates and not allow_unauthenticated:
        raise ValueError(
            f"refusing to serve on {address} without authenticating the coordinator: "
            "configure accepted_tokens or accepted_identities, or pass allow_unauthenticated=True"
        )
    if barrier_retention_ms is not None:
        if barrier_retention_ms < 1:
            raise ValueError("barrier_retention_ms: must be at least 1")
        barrier.retention_ms = barrier_retention_ms
    if max_workers < 1 or max_concurrent_rpcs < 1:
        raise ValueError("max_workers and max_concurrent_rpcs: must be at least 1")
    if metrics_address is not None:
        metrics_host = check_metrics_address(metrics_address)
        if not _is_loopback(metrics_host) and not allow_unauthenticated:
            raise ValueError(
                f"metrics_address: refusing to serve /metrics on {metrics_address}, beyond "
                "loopback, without credentials; pass allow_unauthenticated=True to allow it"
            )
    metrics = ParticipantMetrics()
    resolver = InDoubtResolver(
        participant,
        barrier,
        trust,
        poll_interval_ms=in_doubt_interval_ms,
        ask_after_ms=in_doubt_ask_after_ms,
        call_timeout_ms=in_doubt_call_timeout_ms,
        backoff_max_ms=in_doubt_backoff_max_ms,
        max_branches_per_round=in_doubt_max_branches_per_round,
        apply_wait_ms=in_doubt_apply_wait_ms,
        coordinator_token=coordinator_token,
        coordinator_ca_pem=coordinator_ca_pem,
        metrics=metrics,
    )
    reloadable = None
    if tls is not None:
        _check_key_pair(tls)
        reloadable = _ReloadableTls(tls)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="treaty-participant"),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    participant_pb2_grpc.add_ParticipantServicer_to_server(
        ParticipantServicer(participant, barrier, trust, metrics), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _BoundedReflection(
            (PARTICIPANT_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME),
            streams=min(MAX_REFLECTION_STREAMS, max_workers - 1),
        ),
        server,
    )
    for add in services:
        add(server)
    # /metrics first: if either port cannot be had, nothing is left listening.
    metrics_server = MetricsServer(metrics, metrics_address) if metrics_address is not None else None
    try:
        try:
            if reloadable is None:
                port = server.add_insecure_port(address)
            else:
                port = server.add_secure_port(address, reloadable.credentials())
        except RuntimeError as error:
            raise OSError(f"cannot listen on {address}: {error}") from error
        if port == 0:
            raise OSError(f"cannot listen on {address}")
    except BaseException:
        if metrics_server is not None:
            metrics_server.stop()
        raise
    server.start()
    for service in ("", PARTICIPANT_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    handle = ServerHandle(
        server,
        port,
        f"{host}:{port}",
        barrier,
        resolver,
        gc_interval_ms,
        health_servicer,
        reloadable,
        metrics,
        metrics_server,
    )
    handle._start_background()
    # A barrier that can no longer promise durability stops the server.
    barrier.on_failure(lambda _message: threading.Thread(target=handle.stop, daemon=True).start())
    log.info("participant serving on %s (tls=%s)", handle.address, tls is not None)
    return handle
