#!/usr/bin/env python3
"""Runs a real Treaty workload on loopback and scrapes the coordinator's /metrics.

What it starts, each a separate process with its own temporary data directory:
  - one `treaty serve --metrics-listen ...` (the coordinator under watch);
  - the shop: `payment`, `inventory`, `shipping` (with the demo's injected faults:
    10 % out of stock, 10 % no courier, 5 % transient errors, 2 ms latency);
  - two `bank` processes, bank-a and bank-b, for two-phase commits;
  - three `order-driver`s placing orders as sagas one after the other (restarted if one
    exits), and one two-phase transfer driver in this script (gRPC, from the proto) that
    moves 1 unit from bank-a to bank-b, and every 20th time more than the account holds
    (bank-a votes NO: an abort);
  - one burst of `treaty bench --endpoint` (its own in-process participants).
Events on the timeline (seconds from the start, see --help):
  - after the bench, `treaty txn pause`, then `treaty txn resolve`, on the branches it left
    unacknowledged (it stops its participants as soon as its last commit is decided);
  - payment is killed (SIGKILL) and restarted on the same port and data after 30 s;
  - later bank-b is killed and restarted the same way (two-phase commits decided while it
    is down wait in doubt).
/metrics is fetched every 2 s; each scrape is kept verbatim, with its time, as one JSON
line of an xz file (`{"t": unix_ms, "text": "..."}`), and the events go to a JSON file
beside it. Every process started is stopped at the end, also on Ctrl-C.

Needs: the binaries of a debug or release build (--bin-dir), Python 3.9+ with grpcio and
grpcio-tools (only for the two-phase driver: its stubs are generated from
proto/proto/treaty/v1/coordinator.proto into the work directory).
"""

import argparse
import json
import lzma
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CUSTOMERS = "alice,bob,carol,dave,erin,frank,grace,heidi"
SKUS = "widget,gadget,gizmo,doohickey"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose stdout and stderr go to files in the work directory."""

    def __init__(self, name, argv, work, ready=None):
        self.name, self.argv, self.work, self.ready = name, argv, work, ready
        self.popen = None
        self.starts = 0

    def start(self, patience=30.0):
        self.starts += 1
        out = self.work / f"{self.name}.{self.starts}.out"
        err = self.work / f"{self.name}.{self.starts}.err"
        self.out_path = out
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=open(out, "wb"),
            stderr=open(err, "wb"),
            env={**os.environ, "TREATY_LOG": "warn", "SHOP_LOG": "warn"},
        )
        if self.ready:
            until = time.time() + patience
            while time.time() < until:
                if self.ready.encode() in out.read_bytes():
                    return self
                if self.popen.poll() is not None:
                    break
                time.sleep(0.05)
            raise RuntimeError(f"{self.name} did not start: see {err}")
        return self

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig=signal.SIGTERM, patience=15.0):
        if not self.alive():
            return
        self.popen.send_signal(sig)
        try:
            self.popen.wait(patience)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def two_phase_driver(coordinator, bank_a, bank_b, stop, counts, work, threads=4):
    """Transfers from bank-a to bank-b as two-phase commits until `stop` is set."""
    pb_dir = work / "pb"
    pb_dir.mkdir(exist_ok=True)
    from grpc_tools import protoc  # noqa: imported here: only this driver needs it

    proto_root = REPO / "proto" / "proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{proto_root}",
            f"--python_out={pb_dir}",
            f"--grpc_python_out={pb_dir}",
            "treaty/v1/coordinator.proto",
        ]
    )
    if code != 0:
        raise RuntimeError("protoc failed")
    sys.path.insert(0, str(pb_dir))
    import grpc
    from treaty.v1 import coordinator_pb2 as pb
    from treaty.v1 import coordinator_pb2_grpc as rpc

    channel = grpc.insecure_channel(coordinator.removeprefix("http://"))
    stub = rpc.CoordinatorStub(channel)
    lock = threading.Lock()

    def worker(index):
        n = 0
        while not stop.is_set():
            n += 1
            amount = 10_000_000 if n % 20 == 0 else 1
            legs = [
                pb.BranchSpec(
                    branch_id="debit",
                    endpoint=bank_a,
                    payload=json.dumps({"account": "alice", "amount": -amount}).encode(),
                ),
                pb.BranchSpec(
                    branch_id="credit",
                    endpoint=bank_b,
                    payload=json.dumps({"account": "bob", "amount": amount}).encode(),
                ),
            ]
            try:
                begun = stub.Begin(pb.BeginRequest(branches=legs), timeout=30)
                done = stub.Commit(
                    pb.CommitRequest(transaction_id=begun.transaction_id), timeout=60
                )
                key = pb.Outcome.Name(done.outcome)
            except grpc.RpcError as e:
                key = f"rpc error {e.code().name}"
            with lock:
                counts[key] = counts.get(key, 0) + 1
            # Pace: a steady trickle, slower after an abort.
            time.sleep(0.2 if key != "OUTCOME_COMMITTED" else 0.02)

    workers = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    return workers


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin-dir", default=str(REPO / "target" / "debug"))
    parser.add_argument("--out", default="samples.jsonl.xz", help="scrapes, xz JSON lines")
    parser.add_argument("--events", default="events.json")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds in all")
    parser.add_argument("--scrape-interval", type=float, default=2.0)
    parser.add_argument("--bench-at", type=float, default=30.0)
    parser.add_argument("--resolve-at", type=float, default=65.0)
    parser.add_argument("--bench-seconds", type=int, default=20)
    parser.add_argument("--payment-down-at", type=float, default=100.0)
    parser.add_argument("--bank-b-down-at", type=float, default=180.0)
    parser.add_argument("--outage-seconds", type=float, default=30.0)
    parser.add_argument("--drivers-stop-at", type=float, default=270.0)
    args = parser.parse_args()
    bins = Path(args.bin_dir)
    for b in ["treaty", "payment", "inventory", "shipping", "bank", "order-driver"]:
        if not (bins / b).exists():
            sys.exit(f"missing binary {bins / b}: build the workspace first")

    work = Path(tempfile.mkdtemp(prefix="treaty-grafana-"))
    print(f"work directory {work}", flush=True)
    procs = []
    drivers = []
    events = []
    stop_2pc = threading.Event()
    scraping = threading.Event()  # set: stop scraping
    counts = {}
    t0 = time.time()

    def event(what):
        events.append({"t": int(time.time() * 1000), "at_s": round(time.time() - t0, 1), "event": what})
        print(f"[{time.time() - t0:6.1f} s] {what}", flush=True)

    def cleanup(*_):
        scraping.set()
        stop_2pc.set()
        for d in drivers:
            d.stop(signal.SIGTERM, 5)
        for p in reversed(procs):
            p.stop(signal.SIGTERM, 15)

    def interrupted(*_):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, interrupted)
    try:
        grpc_port, metrics_port = free_port(), free_port()
        coordinator = f"http://127.0.0.1:{grpc_port}"
        treaty = Proc(
            "treaty",
            [
                str(bins / "treaty"), "serve",
                "--listen", f"127.0.0.1:{grpc_port}",
                "--metrics-listen", f"127.0.0.1:{metrics_port}",
                "--data-dir", str(work / "coordinator"),
                "--retry-backoff-initial-ms", "50",
                "--retry-backoff-max-ms", "2000",
                "--compensation-stuck-after-attempts", "3",
            ],
            work,
            ready="treaty listening on",
        )
        procs.append(treaty.start())
        event(f"coordinator {coordinator}, metrics http://127.0.0.1:{metrics_port}/metrics")

        def service(name, binary, extra, seed):
            port = free_port()
            p = Proc(
                name,
                [
                    str(bins / binary),
                    "--listen", f"127.0.0.1:{port}",
                    "--data-dir", str(work / name),
                    "--seed", str(seed),
                    "--coordinator-endpoint", coordinator,
                    *extra,
                ],
                work,
                ready=f"{binary} listening on",
            )
            procs.append(p.start())
            event(f"{name} http://127.0.0.1:{port}")
            return p, f"http://127.0.0.1:{port}"

        faults = ["--transient-error-rate", "0.05", "--latency-ms", "2"]
        accounts = ",".join(f"{c}=100000000" for c in CUSTOMERS.split(","))
        payment, payment_ep = service("payment", "payment", [*faults, "--accounts", accounts], 8)
        inventory, inventory_ep = service(
            "inventory", "inventory",
            [*faults, "--stock", ",".join(f"{s}=1000000" for s in SKUS.split(",")),
             "--out-of-stock-rate", "0.1"], 9)
        shipping, shipping_ep = service("shipping", "shipping", [*faults, "--rejection-rate", "0.1"], 10)
        bank_a, bank_a_ep = service("bank-a", "bank", ["--name", "bank-a", "--accounts", "alice=1000000"], 11)
        bank_b, bank_b_ep = service("bank-b", "bank", ["--name", "bank-b", "--accounts", "bob=0"], 12)

        samples = lzma.open(args.out, "wt")

        def scraper():
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            next_at = time.time()
            while not scraping.is_set():
                try:
                    with urllib.request.urlopen(url, timeout=5) as r:
                        text = r.read().decode()
                    samples.write(json.dumps({"t": int(time.time() * 1000), "text": text}) + "\n")
                except OSError as e:
                    print(f"scrape failed: {e}", flush=True)
                next_at += args.scrape_interval
                time.sleep(max(0.0, next_at - time.time()))

        scrape_thread = threading.Thread(target=scraper, daemon=True)
        scrape_thread.start()
        event("scraping every %.0f s" % args.scrape_interval)

        def order_driver(seed):
            return Proc(
                f"order-driver-{seed}",
                [
                    str(bins / "order-driver"),
                    "--coordinator", coordinator,
                    "--payment", payment_ep, "--inventory", inventory_ep, "--shipping", shipping_ep,
                    "--orders", "100000", "--customers", CUSTOMERS, "--skus", SKUS,
                    "--seed", str(seed),
                ],
                work,
            )

        time.sleep(4)
        for seed in (1, 2, 3):
            drivers.append(order_driver(seed).start())
        event("3 order drivers placing sagas")
        two_phase_driver(coordinator, bank_a_ep, bank_b_ep, stop_2pc, counts, work)
        event("two-phase transfer driver, 4 threads")

        timeline = [
            (args.bench_at, "bench"),
            (args.resolve_at, "resolve"),
            (args.payment_down_at, "payment down"),
            (args.payment_down_at + args.outage_seconds, "payment up"),
            (args.bank_b_down_at, "bank-b down"),
            (args.bank_b_down_at + args.outage_seconds, "bank-b up"),
            (args.drivers_stop_at, "drivers stop"),
            (args.duration, "end"),
        ]
        bench = None
        restarts = 0
        for at, what in sorted(timeline):
            while time.time() - t0 < at:
                time.sleep(0.25)
                for i, d in enumerate(drivers):
                    # An order-driver exits on an order without outcome in 120 s: start
                    # another (a new run id), unless the drivers were stopped.
                    if not d.alive() and time.time() - t0 < args.drivers_stop_at:
                        restarts += 1
                        drivers[i] = order_driver(100 + restarts).start()
                        event(f"{d.name} exited ({d.popen.returncode}); started another")
            if what == "bench":
                bench = subprocess.Popen(
                    [str(bins / "treaty"), "bench", "--endpoint", coordinator,
                     "--workloads", "twopc",
                     "--participants", "2", "--concurrency", "8",
                     "--duration-s", str(args.bench_seconds)],
                    stdout=open(work / "bench.out", "wb"), stderr=subprocess.STDOUT,
                )
                event(f"treaty bench --endpoint, 2 participants, 8 in flight, {args.bench_seconds} s")
            elif what == "resolve":
                # The bench stops its participants as soon as its last commit is decided,
                # so branches it never acknowledged stay in doubt for good: the operator
                # states their outcome, as docs/decisions.md says to for a participant
                # that is gone.
                bench.wait()
                bench_eps = re.findall(
                    r"participant serving local_addr=(\S+)", (work / "bench.out").read_text()
                )
                for index, ep in enumerate(bench_eps):
                    event(f"bench participant p{index} http://{ep}")
                # Paused first: a statement is refused while a call for the branch is in
                # flight (its answer may settle it), and paused, nothing more is sent.
                for ep in bench_eps:
                    for state in ("committing", "aborting"):
                        subprocess.run(
                            [str(bins / "treaty"), "txn", "pause", "--coordinator", coordinator,
                             "--endpoint", f"http://{ep}", "--state", state, "--limit", "10000",
                             "--reason", "bench participant gone"],
                            capture_output=True, text=True,
                        )
                time.sleep(2)  # calls to a gone participant fail at once
                resolved = 0
                for index, ep in enumerate(bench_eps):
                    for state, verdict in (("committing", "--commit"), ("aborting", "--abort")):
                        r = subprocess.run(
                            [str(bins / "treaty"), "txn", "resolve", "--coordinator", coordinator,
                             "--endpoint", f"http://{ep}", "--state", state,
                             "--branch", f"p{index}", verdict, "--limit", "10000",
                             "--reason", "bench participant gone", "--json"],
                            capture_output=True, text=True,
                        )
                        (work / f"resolve-p{index}-{state}.json").write_text(r.stdout + r.stderr)
                        try:
                            resolved += sum(1 for x in json.loads(r.stdout) if x.get("applied"))
                        except (ValueError, AttributeError):
                            pass
                event(f"operator: treaty txn resolve on the bench's gone participants ({resolved} applied)")
            elif what == "payment down":
                payment.stop(signal.SIGKILL)
                event("payment killed (SIGKILL)")
            elif what == "payment up":
                payment.start()
                event("payment restarted")
            elif what == "bank-b down":
                bank_b.stop(signal.SIGKILL)
                event("bank-b killed (SIGKILL)")
            elif what == "bank-b up":
                bank_b.start()
                event("bank-b restarted")
            elif what == "drivers stop":
                stop_2pc.set()
                for d in drivers:
                    d.stop(signal.SIGTERM, 5)
                event("drivers stopped")
            elif what == "end":
                event("end")
        scraping.set()
        scrape_thread.join()
        samples.close()
        if bench is not None:
            bench.wait()
            print((work / "bench.out").read_text(), flush=True)
        print(f"two-phase driver: {counts}", flush=True)
        orders = {}
        for f in work.glob("order-driver-*.out"):
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2:
                    orders[parts[1]] = orders.get(parts[1], 0) + 1
        print(f"order drivers: {orders}", flush=True)
        summary = {"two_phase_driver": counts, "orders": orders}
        Path(args.events).write_text(
            json.dumps({"events": events, "summary": summary}, indent=1) + "\n"
        )
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        cleanup()
    print(f"logs in {work}", flush=True)


if __name__ == "__main__":
    main()
