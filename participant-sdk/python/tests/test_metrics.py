"""Prometheus metrics at /metrics (``serve(metrics_address=...)``), named as the Rust
SDK's: every call by operation and answer (refused and failed calls too), GetOutcome
asks by answer, the branches in doubt as of the resolver's last pass, and the records
the collector deleted. Scraped over real HTTP from the server's own port."""

import re
import socket
import time
import urllib.request

import grpc

from treaty_participant._proto import coordinator_pb2
from treaty_participant._proto import participant_pb2 as pb

from .support import CALL_TIMEOUT_S, FakeCoordinator, InProcessParticipant, TempDirTest, uuid7, wait_until

SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of ``/metrics``: (name, labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CALL_TIMEOUT_S) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def operations(samples, operation: str, result: str) -> float:
    key = ("treaty_participant_operations_total", frozenset({("operation", operation), ("result", result)}))
    return samples.get(key, 0.0)


class MetricsTest(TempDirTest):
    def serve(self, **options) -> InProcessParticipant:
        server = InProcessParticipant(self.tmp / "participant.db", metrics_address="127.0.0.1:0", **options)
        self.addCleanup(server.stop)
        return server

    def test_every_call_is_counted_by_operation_and_answer(self):
        server = self.serve()
        client = server.client()
        self.addCleanup(client.close)
        txn = uuid7()
        client.prepare(txn, "a", b"vote=yes")
        client.commit(txn, "a", pb.COMMIT_MODE_TWO_PHASE)
        client.commit(uuid7(), "b", pb.COMMIT_MODE_ONE_PHASE, b"vote=yes")
        client.commit(uuid7(), "c", pb.COMMIT_MODE_SAGA_STEP, b"vote=no")
        client.abort(uuid7(), "d")
        client.compensate(uuid7(), "e")
        for call in (lambda: client.prepare("", "f"), lambda: client.prepare(uuid7(), "g", b"vote=yes;fail=1")):
            with self.assertRaises(grpc.RpcError):
                call()
        samples = scrape(server.handle.metrics_port)
        expected = {
            ("prepare", "yes"): 1,
            ("commit", "committed"): 1,
            ("one_phase_commit", "committed"): 1,
            ("saga_step", "rejected"): 1,
            ("abort", "aborted"): 1,
            ("compensate", "compensated"): 1,
            ("prepare", "refused"): 1,
            ("prepare", "error"): 1,
        }
        for (operation, result), count in expected.items():
            self.assertEqual(operations(samples, operation, result), count, (operation, result))
        durations = ("treaty_participant_operation_duration_seconds_count", frozenset({("operation", "prepare")}))
        self.assertEqual(samples[durations], 3)

    def test_in_doubt_branches_and_outcome_asks_are_counted(self):
        fake = FakeCoordinator()
        self.addCleanup(fake.stop)
        server = self.serve(trusted_coordinators=[fake.endpoint], in_doubt_interval_ms=100, in_doubt_ask_after_ms=0)
        client = server.client()
        self.addCleanup(client.close)
        held, decided = uuid7(), uuid7()
        fake.decisions[decided] = coordinator_pb2.DECISION_COMMIT
        client.prepare(held, "b", b"vote=yes", fake.endpoint)
        client.prepare(decided, "b", b"vote=yes", fake.endpoint)
        inquiries = lambda result: scrape(server.handle.metrics_port).get(  # noqa: E731
            ("treaty_participant_outcome_inquiries_total", frozenset({("result", result)})), 0.0)
        wait_until(lambda: inquiries("commit") >= 1 and inquiries("pending") >= 1, what="both asks counted")
        wait_until(
            lambda: scrape(server.handle.metrics_port).get(("treaty_participant_branches_in_doubt", frozenset())) == 1,
            what="one branch left in doubt after a pass",
        )
        samples = scrape(server.handle.metrics_port)
        self.assertGreaterEqual(samples[("treaty_participant_in_doubt_passes_total", frozenset())], 1)
        # The held branch voted YES moments ago: its age is small and grows.
        age = samples[("treaty_participant_in_doubt_oldest_age_seconds", frozenset())]
        self.assertGreaterEqual(age, 0.0)
        self.assertLess(age, 3_600)
        wait_until(
            lambda: scrape(server.handle.metrics_port)[("treaty_participant_in_doubt_oldest_age_seconds", frozenset())]
            > age,
            what="the oldest branch's age growing between scrapes",
        )

    def test_collected_records_are_counted(self):
        server = self.serve(gc_interval_ms=100)
        client = server.client()
        self.addCleanup(client.close)
        client.abort(uuid7(time.time_ns() // 1_000_000 - 60_000), "b")  # a null abort a minute old
        server.barrier.retention_ms = 30_000  # now past the retention: the collector takes it
        removed = ("treaty_participant_barrier_gc_removed_total", frozenset())
        wait_until(lambda: scrape(server.handle.metrics_port).get(removed, 0.0) == 1, what="the old record collected")

    def test_every_series_is_there_at_zero_from_the_start(self):
        server = self.serve()
        samples = scrape(server.handle.metrics_port)
        self.assertEqual(operations(samples, "saga_step", "already_aborted"), 0.0)
        self.assertIn(("treaty_participant_operations_total",
                       frozenset({("operation", "abort"), ("result", "cancelled")})), samples)
        self.assertIn(("treaty_participant_outcome_inquiries_total", frozenset({("result", "error")})), samples)

    def test_bad_metrics_addresses_are_refused_by_name(self):
        for address in ("no-port", "127.0.0.1:99999", "0.0.0.0:0"):
            with self.assertRaisesRegex(ValueError, "metrics_address"):
                InProcessParticipant(self.tmp / "participant.db", metrics_address=address)

    def test_a_metrics_port_in_use_leaves_nothing_listening(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = f"127.0.0.1:{taken.getsockname()[1]}"
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                address = f"127.0.0.1:{probe.getsockname()[1]}"
            with self.assertRaisesRegex(OSError, "metrics_address"):
                InProcessParticipant(self.tmp / "participant.db", address=address, metrics_address=busy)
        # The participant's address was not left bound: a server can have it now.
        server = InProcessParticipant(self.tmp / "participant.db", address=address)
        self.addCleanup(server.stop)

