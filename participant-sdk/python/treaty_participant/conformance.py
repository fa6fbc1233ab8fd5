"""The test participant the conformance kit (``treaty tck``) drives: it obeys the payload
scripts of ``proto/treaty/v1/conformance.proto`` and serves ``treaty.v1.Conformance``
beside ``treaty.v1.Participant`` on one port.

    python -m treaty_participant.conformance --listen 127.0.0.1:0 --db /tmp/p.db

prints ``participant listening on 127.0.0.1:PORT`` once it serves.

Scripts: ``vote=yes|no|read_only`` (default yes), ``fail=N`` (the user function fails its
first N runs for this branch since the process started; counted per user function),
``delay_ms=N`` (waits N ms, at most 10000, before it acts), separated by ``;``; unknown
names are ignored. Each time user code acts (a YES vote, a commit, an abort of a prepared
branch, a compensation) it records an effect in the same SQLite transaction as the
barrier's record, so after any crash both are there or neither is.
"""

from __future__ import annotations

import argparse
import os
import collections
import logging
import pathlib
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass

import grpc

from ._proto import conformance_pb2 as cpb
from ._proto import conformance_pb2_grpc
from .barrier import SqliteBarrier
from .participant import BranchContext, Participant, ParticipantError, Vote
from .server import ServerTls, serve

MAX_DELAY_MS = 10_000
EFFECTS_TABLE = "conformance_effects"


@dataclass(frozen=True)
class Script:
    vote: str = "yes"
    fail: int = 0
    delay_ms: int = 0


def parse_script(payload: bytes) -> Script:
    """Reads a payload script; raises ParticipantError for a value it cannot obey."""
    values = {}
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ParticipantError(f"payload: not UTF-8: {error}") from None
    for directive in text.split(";"):
        name, _, value = directive.strip().partition("=")
        values[name.strip()] = value.strip()
    vote = values.get("vote", "yes") or "yes"
    if vote not in ("yes", "no", "read_only"):
        raise ParticipantError(f"payload: vote={vote!r} is not yes, no or read_only")
    numbers = {}
    for name in ("fail", "delay_ms"):
        raw = values.get(name, "0") or "0"
        if not raw.isdigit():
            raise ParticipantError(f"payload: {name}={raw!r} is not a whole number")
        numbers[name] = int(raw)
    return Script(vote, numbers["fail"], min(numbers["delay_ms"], MAX_DELAY_MS))


class ConformanceParticipant(Participant):
    """User code that obeys payload scripts and records its effects."""

    def __init__(self) -> None:
        self._runs: collections.Counter = collections.Counter()
        self._runs_lock = threading.Lock()

    def _act(self, ctx: BranchContext, function: str, payload: bytes) -> Script:
        script = parse_script(payload)
        with self._runs_lock:
            self._runs[(ctx.transaction_id, ctx.branch_id, function)] += 1
            run = self._runs[(ctx.transaction_id, ctx.branch_id, function)]
        if script.delay_ms:
            time.sleep(script.delay_ms / 1000)
        if run <= script.fail:
            raise ParticipantError(f"{function} fails as scripted (run {run} of fail={script.fail})")
        return script

    @staticmethod
    def _record(ctx: BranchContext, kind: int, payload: bytes) -> None:
        ctx.cursor.execute(
            f"INSERT INTO {EFFECTS_TABLE} (transaction_id, branch_id, kind, payload) VALUES (?, ?, ?, ?)",
            (ctx.transaction_id, ctx.branch_id, kind, payload),
        )

    def prepare(self, ctx: BranchContext, payload: bytes) -> Vote:
        script = self._act(ctx, "prepare", payload)
        if script.vote == "no":
            return Vote.no("the script says vote=no")
        if script.vote == "read_only":
            return Vote.read_only()
        self._record(ctx, cpb.EFFECT_KIND_PREPARE, payload)
        return Vote.yes()

    def commit(self, ctx: BranchContext, payload: bytes) -> None:
        self._act(ctx, "commit", payload)
        self._record(ctx, cpb.EFFECT_KIND_COMMIT, payload)

    def abort(self, ctx: BranchContext, payload: bytes) -> None:
        self._act(ctx, "abort", payload)
        self._record(ctx, cpb.EFFECT_KIND_ABORT, payload)

    def compensate(self, ctx: BranchContext, payload: bytes) -> None:
        self._act(ctx, "compensate", payload)
        self._record(ctx, cpb.EFFECT_KIND_COMPENSATE, payload)


class EffectsServicer(conformance_pb2_grpc.ConformanceServicer):
    """``treaty.v1.Conformance``: the effects of one branch, oldest first."""

    def __init__(self, database: str) -> None:
        self._database = database

    def Effects(self, request: cpb.EffectsRequest, context: grpc.ServicerContext):
        connection = sqlite3.connect(self._database, timeout=60, check_same_thread=False)
        try:
            rows = connection.execute(
                f"SELECT kind, payload FROM {EFFECTS_TABLE} WHERE transaction_id = ? AND branch_id = ?"
                " ORDER BY seq",
                (request.transaction_id, request.branch_id),
            ).fetchall()
        finally:
            connection.close()
        return cpb.EffectsResponse(effects=[cpb.Effect(kind=kind, payload=bytes(payload)) for kind, payload in rows])


def create_effects_table(database: str) -> None:
    connection = sqlite3.connect(database, timeout=60)
    try:
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {EFFECTS_TABLE} (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " transaction_id TEXT NOT NULL, branch_id TEXT NOT NULL, kind INTEGER NOT NULL,"
            " payload BLOB NOT NULL)"
        )
        connection.commit()
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m treaty_participant.conformance", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 picks one)")
    parser.add_argument("--db", required=True, help="SQLite file for the barrier and the effects")
    parser.add_argument("--token", action="append", default=[], help="a bearer token the coordinator must present")
    parser.add_argument("--trusted-coordinator", action="append", default=[], help="a coordinator endpoint to serve and ask")
    parser.add_argument("--coordinator-token", help="the token to present to GetOutcome")
    parser.add_argument("--tls-cert", type=pathlib.Path, help="PEM certificate chain (serve TLS)")
    parser.add_argument("--tls-key", type=pathlib.Path, help="PEM private key (serve TLS)")
    parser.add_argument("--coordinator-ca", type=pathlib.Path, help="PEM CA to verify https:// coordinators")
    parser.add_argument("--barrier-retention-ms", type=int)
    parser.add_argument("--in-doubt-interval-ms", type=int, default=2_000)
    parser.add_argument("--in-doubt-ask-after-ms", type=int, default=2_000)
    parser.add_argument(
        "--supervise",
        type=pathlib.Path,
        metavar="PIDFILE",
        help="run the participant as a child, restart it on the same address whenever it dies "
        "(at most 100 times), and keep its pid in PIDFILE: the conformance kit's restart "
        "command is then kill -9 \"$(cat PIDFILE)\"",
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if arguments.supervise is not None:
        return supervise(arguments.supervise, arguments.listen, _without_supervise(argv))

    if (arguments.tls_cert is None) != (arguments.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = None
    if arguments.tls_cert is not None:
        tls = ServerTls(arguments.tls_cert.read_bytes(), arguments.tls_key.read_bytes())
    create_effects_table(arguments.db)
    barrier = SqliteBarrier(arguments.db)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    handle = serve(
        ConformanceParticipant(),
        barrier,
        arguments.listen,
        accepted_tokens=arguments.token,
        trusted_coordinators=arguments.trusted_coordinator,
        coordinator_token=arguments.coordinator_token,
        coordinator_ca_pem=arguments.coordinator_ca.read_bytes() if arguments.coordinator_ca else None,
        tls=tls,
        barrier_retention_ms=arguments.barrier_retention_ms,
        in_doubt_interval_ms=arguments.in_doubt_interval_ms,
        in_doubt_ask_after_ms=arguments.in_doubt_ask_after_ms,
        services=[lambda server: conformance_pb2_grpc.add_ConformanceServicer_to_server(EffectsServicer(arguments.db), server)],
    )
    host = arguments.listen.rpartition(":")[0]
    print(f"participant listening on {host}:{handle.port}", flush=True)
    barrier.on_failure(lambda _message: stop.set())
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    while not stop.wait(0.2):
        # A supervised child leaves with its supervisor.
        if supervisor is not None and os.getppid() != int(supervisor):
            break
    handle.stop()
    barrier.close()
    return 1 if barrier.failure else 0


SUPERVISOR_PID_ENV = "TREATY_CONFORMANCE_SUPERVISOR"
MAX_RESTARTS = 100
READY = "participant listening on "


def _without_supervise(argv: list[str] | None) -> list[str]:
    """The arguments for the child: ``--supervise PIDFILE`` and ``--listen`` removed."""
    given = list(sys.argv[1:] if argv is None else argv)
    kept: list[str] = []
    skip = False
    for argument in given:
        if skip:
            skip = False
            continue
        if argument in ("--supervise", "--listen"):
            skip = True
            continue
        if argument.startswith(("--supervise=", "--listen=")):
            continue
        kept.append(argument)
    return kept


def supervise(pid_file: pathlib.Path, listen: str, child_arguments: list[str]) -> int:
    """Runs the participant as a child and starts it again, on the address it first got,
    each time it dies; prints the ready line once. Ends (stopping the child) on SIGTERM."""
    import subprocess

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    environment = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
    announced = False
    for _ in range(MAX_RESTARTS + 1):
        child = subprocess.Popen(
            [sys.executable, "-m", "treaty_participant.conformance", "--listen", listen, *child_arguments],
            stdout=subprocess.PIPE,
            text=True,
            env=environment,
        )
        pid_file.write_text(f"{child.pid}\n")
        assert child.stdout is not None
        ready = child.stdout.readline()
        if ready.startswith(READY):
            listen = ready[len(READY):].strip()
            if not announced:
                print(ready, end="", flush=True)
                announced = True
        while child.poll() is None:
            if stop.wait(0.1):
                child.terminate()
                child.wait(timeout=10)
                return 0
        if stop.is_set():
            return 0
    print(f"conformance: the participant died {MAX_RESTARTS + 1} times; giving up", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
