"""The shop's shipping service in Python, on the Python participant SDK: the same
behaviour as the Rust one (``examples/src/shop/shipping.rs``), so that ``demo
--python-shipping`` can run it in its place.

- step ``schedule``: prepare refuses with ``--rejection-rate`` ("no courier available"),
  and refuses an order another branch already shipped; commit records
  ``shipment/<order>`` with the branch that scheduled it (an order ships at most once).
- compensation ``cancel``: records ``cancel/<order>`` for a shipment this branch
  scheduled. An abort does the same, in case the commit ran before a crash.

The records are rows of ``shipping_records`` (key, JSON value as the Rust service's) in
the SQLite file of the barrier, ``<data-dir>/shipping.sqlite3``, written in the same
transaction as the barrier's record: after any crash both are there or neither is. The
barrier begins every operation with ``BEGIN IMMEDIATE``, so operations take turns and
a read-then-write needs no lock of its own.

    python shipping.py --listen 127.0.0.1:0 --data-dir /tmp/shipping

prints ``shipping listening on 127.0.0.1:PORT`` once it serves. Runs until SIGTERM or
SIGINT; SIGHUP reads ``--tls-cert`` and ``--tls-key`` again (a renewed certificate serves
new connections; one that does not load is logged and the old one kept). Faults: ``--transient-error-rate`` (a call fails without an answer and is
retried), ``--latency-ms`` (added to every call), ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import random
import signal
import sys
import threading
import time

from treaty_participant import BranchContext, Participant, ParticipantError, ServerTls, SqliteBarrier, Vote, serve

TABLE = "shipping_records"
DATABASE_FILE = "shipping.sqlite3"
SHIPMENTS = "shipment/"
CANCELS = "cancel/"
COORDINATOR_TOKEN_ENV = "TREATY_COORDINATOR_TOKEN"


class Faults:
    """Injected latency and transient failures (the shop's ``--transient-error-rate``)."""

    def __init__(self, transient_error_rate: float, latency_ms: int, seed: int | None) -> None:
        self._transient_error_rate = transient_error_rate
        self._latency_s = latency_ms / 1000
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def chance(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            return self._random.random() < rate

    def enter(self) -> None:
        if self._latency_s:
            time.sleep(self._latency_s)
        if self.chance(self._transient_error_rate):
            raise ParticipantError("injected transient error")


def parse_shipment(payload: bytes) -> dict:
    """``{"order": ..., "address": ...}``; raises ValueError with the reason."""
    try:
        shipment = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"malformed payload: {error}") from None
    if (
        not isinstance(shipment, dict)
        or not isinstance(shipment.get("order"), str)
        or not isinstance(shipment.get("address"), str)
    ):
        raise ValueError("malformed payload: expected {\"order\": string, \"address\": string}")
    return {"order": shipment["order"], "address": shipment["address"]}


def read(ctx: BranchContext, key: str) -> dict | None:
    row = ctx.cursor.execute(f"SELECT value FROM {TABLE} WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def write(ctx: BranchContext, key: str, value: dict) -> None:
    ctx.cursor.execute(
        f"INSERT OR REPLACE INTO {TABLE} (key, value) VALUES (?, ?)", (key, json.dumps(value))
    )


def by(applied: dict, ctx: BranchContext) -> bool:
    """Whether this branch applied the work (an undo only undoes its own branch's)."""
    return applied["transaction_id"] == ctx.transaction_id and applied["branch_id"] == ctx.branch_id


class Shipping(Participant):
    def __init__(self, faults: Faults, rejection_rate: float) -> None:
        self._faults = faults
        self._rejection_rate = rejection_rate

    def prepare(self, ctx: BranchContext, payload: bytes) -> Vote:
        self._faults.enter()
        try:
            shipment = parse_shipment(payload)
        except ValueError as reason:
            return Vote.no(str(reason))
        shipped = read(ctx, SHIPMENTS + shipment["order"])
        if shipped is not None and not by(shipped, ctx):
            return Vote.no(f"order {shipment['order']} was already shipped")
        if self._faults.chance(self._rejection_rate):
            return Vote.no(f"no courier available for {shipment['address']}")
        return Vote.yes()

    def commit(self, ctx: BranchContext, payload: bytes) -> None:
        self._faults.enter()
        shipment = self._parse(payload)
        key = SHIPMENTS + shipment["order"]
        existing = read(ctx, key)
        if existing is not None:
            if by(existing, ctx):
                return
            raise ParticipantError(f"order {shipment['order']} is already shipped by another transaction")
        write(ctx, key, {"transaction_id": ctx.transaction_id, "branch_id": ctx.branch_id, "work": shipment})

    def abort(self, ctx: BranchContext, payload: bytes) -> None:
        self._faults.enter()
        self._undo(ctx, payload)

    def compensate(self, ctx: BranchContext, payload: bytes) -> None:
        self._faults.enter()
        self._undo(ctx, payload)

    @staticmethod
    def _parse(payload: bytes) -> dict:
        try:
            return parse_shipment(payload)
        except ValueError as reason:
            raise ParticipantError(str(reason)) from None

    def _undo(self, ctx: BranchContext, payload: bytes) -> None:
        """Cancels the shipment this branch scheduled for the order, once."""
        order = self._parse(payload)["order"]
        shipment = read(ctx, SHIPMENTS + order)
        if shipment is None or not by(shipment, ctx) or read(ctx, CANCELS + order) is not None:
            return
        write(ctx, CANCELS + order, shipment["work"])


def rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def create_table(database: pathlib.Path) -> None:
    import sqlite3

    connection = sqlite3.connect(database, timeout=60)
    try:
        connection.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        connection.commit()
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The shop's shipping service (Python)")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port (port 0 picks one)")
    parser.add_argument("--data-dir", type=pathlib.Path, required=True, help=f"holds {DATABASE_FILE}")
    parser.add_argument("--rejection-rate", type=rate, default=0.0, help="chance (0..1) of no courier")
    parser.add_argument("--transient-error-rate", type=rate, default=0.0)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--coordinator-endpoint",
        action="append",
        default=[],
        help="a coordinator to ask about branches in doubt (repeatable); requests naming another are refused",
    )
    parser.add_argument("--tls-cert", type=pathlib.Path, help="PEM certificate chain (serve TLS)")
    parser.add_argument("--tls-key", type=pathlib.Path, help="PEM private key")
    parser.add_argument("--coordinator-ca", type=pathlib.Path, help="PEM CA to verify https:// coordinators")
    arguments = parser.parse_args(argv)
    if (arguments.tls_cert is None) != (arguments.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    if arguments.latency_ms < 0:
        parser.error("--latency-ms must not be negative")
    level = os.environ.get("SHOP_LOG", "warning").upper()
    logging.basicConfig(level=getattr(logging, level, logging.WARNING), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tls = None
    if arguments.tls_cert is not None:
        tls = ServerTls(arguments.tls_cert.read_bytes(), arguments.tls_key.read_bytes())
    token = os.environ.get(COORDINATOR_TOKEN_ENV)
    arguments.data_dir.mkdir(parents=True, exist_ok=True)
    database = arguments.data_dir / DATABASE_FILE
    create_table(database)
    barrier = SqliteBarrier(str(database))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    faults = Faults(arguments.transient_error_rate, arguments.latency_ms, arguments.seed)
    handle = serve(
        Shipping(faults, arguments.rejection_rate),
        barrier,
        arguments.listen,
        accepted_tokens=[token] if token else [],
        trusted_coordinators=arguments.coordinator_endpoint,
        coordinator_ca_pem=arguments.coordinator_ca.read_bytes() if arguments.coordinator_ca else None,
        tls=tls,
    )
    # The handler only notes a SIGHUP; the loop below reloads (files, OpenSSL and locks
    # have no place in a signal handler).
    hangup = threading.Event()
    if tls is not None:
        signal.signal(signal.SIGHUP, lambda *_: hangup.set())
    host = arguments.listen.rpartition(":")[0]
    print(f"shipping listening on {host}:{handle.port}", flush=True)
    barrier.on_failure(lambda _message: stop.set())
    while not stop.wait(0.2):
        if hangup.is_set():
            hangup.clear()
            try:
                renewed = ServerTls(arguments.tls_cert.read_bytes(), arguments.tls_key.read_bytes())
                handle.reload_tls(renewed)
            except (OSError, ValueError) as error:
                logging.getLogger("shipping").error("SIGHUP: TLS not reloaded, the old certificate stays: %s", error)
    handle.stop()
    barrier.close()
    return 1 if barrier.failure else 0


if __name__ == "__main__":
    sys.exit(main())
