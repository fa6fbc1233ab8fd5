"""Shared test fixtures: real servers on 127.0.0.1 port 0, real SQLite files in temp
dirs, the conformance participant in-process or as a child process, a fake coordinator
(a real gRPC server implementing GetOutcome, the counterpart of the code under test),
and test certificates made with the openssl command line.

Every wait here is bounded in count and time; nothing asserts on timing.
"""

from __future__ import annotations

import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from concurrent import futures

import grpc

from treaty_participant import SqliteBarrier, serve
from treaty_participant._proto import conformance_pb2 as cpb
from treaty_participant._proto import conformance_pb2_grpc
from treaty_participant._proto import coordinator_pb2
from treaty_participant._proto import coordinator_pb2_grpc
from treaty_participant._proto import participant_pb2 as pb
from treaty_participant._proto import participant_pb2_grpc
from treaty_participant.conformance import ConformanceParticipant, EffectsServicer, create_effects_table

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parent.parent
CALL_TIMEOUT_S = 30.0
TOKEN = "coordinator-secret-token-0123456789"

DAY_MS = 24 * 3_600_000


def uuid7(unix_ms: int | None = None) -> str:
    """A canonical UUIDv7 created at ``unix_ms`` (now by default), random otherwise."""
    if unix_ms is None:
        unix_ms = time.time_ns() // 1_000_000
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= secrets.randbits(12) << 64
    value |= 0b10 << 62
    value |= secrets.randbits(62)
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def wait_until(predicate, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Polls ``predicate`` until it returns a truthy value; fails the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class Client:
    """Stubs for one participant endpoint, with optional token and TLS."""

    def __init__(self, target: str, *, token: str | None = None, ca_pem: bytes | None = None,
                 client_cert: tuple[bytes, bytes] | None = None, server_name: str | None = None) -> None:
        if ca_pem is None:
            self.channel = grpc.insecure_channel(target)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca_pem,
                private_key=client_cert[1] if client_cert else None,
                certificate_chain=client_cert[0] if client_cert else None,
            )
            options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.participant = participant_pb2_grpc.ParticipantStub(self.channel)
        self.conformance = conformance_pb2_grpc.ConformanceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def prepare(self, txn: str, branch: str, payload: bytes = b"", coordinator_endpoint: str = "", metadata=None):
        return self.participant.Prepare(
            pb.PrepareBranchRequest(transaction_id=txn, branch_id=branch, payload=payload,
                                    coordinator_endpoint=coordinator_endpoint),
            timeout=CALL_TIMEOUT_S, metadata=self.metadata if metadata is None else metadata)

    def commit(self, txn: str, branch: str, mode: int, payload: bytes = b"", coordinator_endpoint: str = "", metadata=None):
        return self.participant.Commit(
            pb.CommitBranchRequest(transaction_id=txn, branch_id=branch, mode=mode, payload=payload,
                                   coordinator_endpoint=coordinator_endpoint),
            timeout=CALL_TIMEOUT_S, metadata=self.metadata if metadata is None else metadata)

    def abort(self, txn: str, branch: str, metadata=None):
        return self.participant.Abort(
            pb.AbortBranchRequest(transaction_id=txn, branch_id=branch),
            timeout=CALL_TIMEOUT_S, metadata=self.metadata if metadata is None else metadata)

    def compensate(self, txn: str, branch: str, payload: bytes = b"", metadata=None):
        return self.participant.Compensate(
            pb.CompensateBranchRequest(transaction_id=txn, branch_id=branch, payload=payload),
            timeout=CALL_TIMEOUT_S, metadata=self.metadata if metadata is None else metadata)

    def effects(self, txn: str, branch: str) -> list[tuple[int, bytes]]:
        response = self.conformance.Effects(
            cpb.EffectsRequest(transaction_id=txn, branch_id=branch), timeout=CALL_TIMEOUT_S,
            metadata=self.metadata)
        return [(effect.kind, effect.payload) for effect in response.effects]


class TempDirTest(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="treaty-py-"))
        self.addCleanup(shutil.rmtree, self.tmp, ignore_errors=True)


class InProcessParticipant:
    """The conformance participant served in this process on a SQLite file."""

    def __init__(self, db: pathlib.Path, **serve_options) -> None:
        create_effects_table(str(db))
        self.db = db
        self.barrier = SqliteBarrier(str(db))
        self.participant = ConformanceParticipant()
        serve_options.setdefault("in_doubt_interval_ms", 60_000)
        self.handle = serve(
            self.participant,
            self.barrier,
            serve_options.pop("address", "127.0.0.1:0"),
            services=[lambda server: conformance_pb2_grpc.add_ConformanceServicer_to_server(
                EffectsServicer(str(db)), server)],
            **serve_options,
        )
        self.target = f"127.0.0.1:{self.handle.port}"

    def client(self, **options) -> Client:
        return Client(self.target, **options)

    def stop(self) -> None:
        self.handle.stop(grace_s=2)
        self.barrier.close()


class ParticipantTest(TempDirTest):
    """A test with one in-process conformance participant and a client of it."""

    serve_options: dict = {}

    def setUp(self) -> None:
        super().setUp()
        self.server = InProcessParticipant(self.tmp / "participant.db", **dict(self.serve_options))
        self.addCleanup(self.server.stop)
        self.client = self.server.client(token=self.serve_options.get("accepted_tokens", [None])[0])
        self.addCleanup(self.client.close)


class ConformanceProcess:
    """``python -m treaty_participant.conformance`` as a child process."""

    def __init__(self, db: pathlib.Path, *extra_args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "treaty_participant.conformance", "--listen", "127.0.0.1:0",
             "--db", str(db), *extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PACKAGE_ROOT,
        )
        line = self._read_line(timeout_s=30)
        prefix = "participant listening on "
        if not line.startswith(prefix):
            self.kill()
            raise AssertionError(f"unexpected first line {line!r}; stderr: {self.process.stderr.read()}")
        self.target = line[len(prefix):].strip()

    def _read_line(self, timeout_s: float) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not lines:
            self.kill()
            raise AssertionError(f"the participant did not announce itself within {timeout_s} s")
        return lines[0]

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.kill()


class FakeCoordinator(coordinator_pb2_grpc.CoordinatorServicer):
    """A real gRPC server answering GetOutcome from a table (default PENDING), recording
    every request with its metadata. The counterpart of in-doubt resolution in tests."""

    def __init__(self, tls: tuple[bytes, bytes] | None = None) -> None:
        self.decisions: dict[str, int] = {}
        self.asked: list[tuple[str, str, dict]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                                  options=[("grpc.so_reuseport", 0)])
        coordinator_pb2_grpc.add_CoordinatorServicer_to_server(self, self.server)
        if tls is None:
            self.port = self.server.add_insecure_port("127.0.0.1:0")
            self.endpoint = f"http://127.0.0.1:{self.port}"
        else:
            credentials = grpc.ssl_server_credentials([(tls[1], tls[0])])
            self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
            self.endpoint = f"https://127.0.0.1:{self.port}"
        self.server.start()

    def GetOutcome(self, request, context):
        with self._lock:
            self.asked.append((request.transaction_id, request.branch_id, dict(context.invocation_metadata())))
            decision = self.decisions.get(request.transaction_id, coordinator_pb2.DECISION_PENDING)
        return coordinator_pb2.GetOutcomeResponse(decision=decision)

    def asks_about(self, txn: str) -> int:
        with self._lock:
            return sum(1 for asked in self.asked if asked[0] == txn)

    def stop(self) -> None:
        self.server.stop(0).wait(5)


def make_certificates(directory: pathlib.Path) -> dict[str, bytes] | None:
    """A CA, a server certificate for 127.0.0.1/localhost, and client certificates named
    ``coordinator.test`` and ``stranger.test`` (and ``mailer.test``, whose email and IP
    SANs are ``coordinator.test`` and ``10.9.8.7``), made with the openssl command line;
    None when openssl is not installed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "2", "-subj", "/CN=treaty-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, san in (("server", "IP:127.0.0.1,DNS:localhost"),
                      ("coordinator", "DNS:coordinator.test"),
                      ("stranger", "DNS:stranger.test"),
                      # Named like the coordinator only in SANs that are not names of hosts.
                      ("mailer", "email:coordinator.test,IP:10.9.8.7")):
        cn = {"server": "localhost", "coordinator": "coordinator.test", "stranger": "stranger.test",
              "mailer": "mailer.test"}[name]
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={cn}")
        (directory / f"{name}.ext").write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
            "extendedKeyUsage=serverAuth,clientAuth\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.suffix in (".pem", ".key")}
