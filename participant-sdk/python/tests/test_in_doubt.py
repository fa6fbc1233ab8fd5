"""In-doubt resolution against a fake coordinator: a real gRPC server on 127.0.0.1
implementing GetOutcome (the counterpart; the code under test is the participant's
resolver, which must apply COMMIT and ABORT through the barrier, keep the branch on
PENDING and errors, never ask about saga steps, and ask only trusted coordinators)."""

import threading
import unittest

from treaty_participant._proto import conformance_pb2 as cpb
from treaty_participant._proto import coordinator_pb2
from treaty_participant._proto import participant_pb2 as pb

from treaty_participant.answer_table import Request

from .support import TOKEN, FakeCoordinator, InProcessParticipant, TempDirTest, uuid7, wait_until

P, C, A = cpb.EFFECT_KIND_PREPARE, cpb.EFFECT_KIND_COMMIT, cpb.EFFECT_KIND_ABORT
FAST = {"in_doubt_interval_ms": 50, "in_doubt_ask_after_ms": 0, "in_doubt_backoff_max_ms": 200}


class InDoubtTest(TempDirTest):
    def coordinator(self, **options) -> FakeCoordinator:
        fake = FakeCoordinator(**options)
        self.addCleanup(fake.stop)
        return fake

    def participant(self, **options) -> InProcessParticipant:
        server = InProcessParticipant(self.tmp / "participant.db", **{**FAST, **options})
        self.addCleanup(server.stop)
        return server

    def test_a_commit_that_does_not_end_holds_no_other_branch_in_doubt(self):
        # The resolver applied on its own thread: a commit that never returned held every
        # other branch in doubt (the Rust SDK's apply_wait_ms, which it now has too).
        fake = self.coordinator()
        server = self.participant(in_doubt_apply_wait_ms=200)
        client = server.client()
        self.addCleanup(client.close)
        stuck, other, pending = uuid7(), uuid7(), uuid7()
        fake.decisions[stuck] = coordinator_pb2.DECISION_COMMIT
        fake.decisions[other] = coordinator_pb2.DECISION_ABORT  # ``pending``: PENDING
        # The stuck branch's commit does not return until let go. It is held before the
        # barrier's lock and transaction, as in a database that locks rows: SQLite's one
        # writer would hold every other branch's write too, whatever the resolver does.
        let_go = threading.Event()
        self.addCleanup(let_go.set)
        apply = server.barrier.handle

        def held(participant, request, ctx, **options):
            if ctx.transaction_id == stuck and request == Request.COMMIT:
                let_go.wait(60)
            return apply(participant, request, ctx, **options)

        server.barrier.handle = held
        self.assertEqual(client.prepare(stuck, "b", b"vote=yes", fake.endpoint).vote, pb.VOTE_YES)
        wait_until(lambda: fake.asks_about(stuck) >= 1, what="the stuck branch asked about")
        self.assertEqual(client.prepare(other, "b", b"vote=yes", fake.endpoint).vote, pb.VOTE_YES)
        wait_until(lambda: server.barrier.record(other, "b").status.value == "aborted",
                   what="the other branch aborted while the first one's commit is held")
        self.assertEqual(server.barrier.record(stuck, "b").status.value, "prepared")
        # While its commit runs, the branch is not asked about again: rounds go on (a
        # branch left PENDING is asked in them) without it.
        asked = fake.asks_about(stuck)
        self.assertEqual(client.prepare(pending, "b", b"vote=yes", fake.endpoint).vote, pb.VOTE_YES)
        wait_until(lambda: fake.asks_about(pending) >= 3, what="three rounds asking about another branch")
        self.assertEqual(fake.asks_about(stuck), asked)
        let_go.set()
        wait_until(lambda: server.barrier.record(stuck, "b").status.value == "committed", what="the held commit")

    def test_commit_and_abort_are_applied_through_the_barrier(self):
        fake = self.coordinator()
        server = self.participant(coordinator_token=TOKEN, trusted_coordinators=[fake.endpoint])
        client = server.client()
        self.addCleanup(client.close)
        committed, aborted = uuid7(), uuid7()
        fake.decisions[committed] = coordinator_pb2.DECISION_COMMIT
        fake.decisions[aborted] = coordinator_pb2.DECISION_ABORT
        for txn in (committed, aborted):
            self.assertEqual(client.prepare(txn, "b", b"vote=yes", fake.endpoint).vote, pb.VOTE_YES)
        wait_until(lambda: len(client.effects(committed, "b")) == 2 and len(client.effects(aborted, "b")) == 2,
                   what="both outcomes applied")
        self.assertEqual(client.effects(committed, "b"), [(P, b"vote=yes"), (C, b"vote=yes")])
        self.assertEqual(client.effects(aborted, "b"), [(P, b"vote=yes"), (A, b"vote=yes")])
        # The coordinator's own delivery later is answered from the record.
        self.assertEqual(client.commit(committed, "b", pb.COMMIT_MODE_TWO_PHASE).result, pb.COMMIT_RESULT_COMMITTED)
        self.assertEqual(client.abort(aborted, "b").result, pb.ABORT_RESULT_ABORTED)
        self.assertEqual(fake.asked[0][2].get("authorization"), f"Bearer {TOKEN}")
        self.assertEqual({asked[1] for asked in fake.asked}, {"b"})

    def test_a_stop_waits_for_an_apply_still_running(self):
        # The apply outlasted its wait and runs on by itself; a stop ended without it, so
        # the barrier could be closed under it.
        fake = self.coordinator()
        server = self.participant(in_doubt_apply_wait_ms=100)
        client = server.client()
        self.addCleanup(client.close)
        txn = uuid7()
        fake.decisions[txn] = coordinator_pb2.DECISION_COMMIT
        let_go = threading.Event()
        self.addCleanup(let_go.set)
        apply = server.barrier.handle

        def held(participant, request, ctx, **options):
            if request == Request.COMMIT:
                let_go.wait(60)
            return apply(participant, request, ctx, **options)

        server.barrier.handle = held
        self.assertEqual(client.prepare(txn, "b", b"vote=yes", fake.endpoint).vote, pb.VOTE_YES)
        resolver = server.handle.resolver
        wait_until(lambda: txn in {key[0] for key in resolver._applying}, what="the apply running on by itself")
        threading.Timer(0.5, let_go.set).start()
        resolver.stop(timeout_s=30)
        self.assertEqual(server.barrier.record(txn, "b").status.value, "committed")

    def test_after_a_restart_the_rounds_of_a_pass_follow_one_another_while_they_resolve(self):
        fake = self.coordinator()
        slow = {"in_doubt_interval_ms": 600_000, "in_doubt_ask_after_ms": 0, "in_doubt_max_branches_per_round": 3}
        first = InProcessParticipant(self.tmp / "participant.db", **slow)
        client = first.client()
        txns = [uuid7() for _ in range(12)]
        for txn in txns:
            fake.decisions[txn] = coordinator_pb2.DECISION_ABORT
            self.assertEqual(client.prepare(txn, "b", b"vote=yes", fake.endpoint).vote, pb.VOTE_YES)
        client.close()
        first.stop()  # before its next round, ten minutes away: all twelve stay in doubt
        # Four rounds of three: before, one round per interval (40 minutes).
        server = self.participant(**slow)
        wait_until(lambda: all(server.barrier.record(txn, "b").status.value == "aborted" for txn in txns),
                   what="every branch in doubt aborted after the restart")

    def test_pending_and_errors_keep_the_branch_prepared_until_an_answer(self):
        fake = self.coordinator()
        server = self.participant()
        client = server.client()
        self.addCleanup(client.close)
        txn = uuid7()
        client.prepare(txn, "b", b"vote=yes", fake.endpoint)
        wait_until(lambda: fake.asks_about(txn) >= 3, what="three PENDING answers")
        self.assertEqual(server.barrier.record(txn, "b").status.value, "prepared")
        self.assertEqual(client.effects(txn, "b"), [(P, b"vote=yes")])
        fake.decisions[txn] = 99  # an unknown value is no answer either
        asked = fake.asks_about(txn)
        wait_until(lambda: fake.asks_about(txn) >= asked + 2, what="two more questions")
        self.assertEqual(server.barrier.record(txn, "b").status.value, "prepared")
        fake.decisions[txn] = coordinator_pb2.DECISION_COMMIT
        wait_until(lambda: server.barrier.record(txn, "b").status.value == "committed", what="the commit")

    def test_an_unreachable_coordinator_is_asked_again_without_aborting(self):
        fake = self.coordinator()
        server = self.participant()
        client = server.client()
        self.addCleanup(client.close)
        txn = uuid7()
        endpoint = fake.endpoint
        fake.stop()  # now nothing listens there
        client.prepare(txn, "b", b"vote=yes", endpoint)
        round_reports = [server.handle.resolver.round() for _ in range(3)]
        self.assertTrue(all(report.committed == report.aborted == 0 for report in round_reports))
        self.assertEqual(server.barrier.record(txn, "b").status.value, "prepared")

    def test_a_one_phase_commit_left_prepared_is_resolved(self):
        fake = self.coordinator()
        server = self.participant()
        client = server.client()
        self.addCleanup(client.close)
        txn, payload = uuid7(), b"vote=yes;fail=1"
        fake.decisions[txn] = coordinator_pb2.DECISION_COMMIT
        for _ in range(2):  # prepare fails once, then commit fails once: prepared, in doubt
            with self.assertRaises(Exception):
                client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload, fake.endpoint)
        wait_until(lambda: len(client.effects(txn, "b")) == 2, what="the commit applied")
        self.assertEqual(client.effects(txn, "b"), [(P, payload), (C, payload)])

    def test_saga_steps_are_never_asked_about(self):
        fake = self.coordinator()
        server = self.participant()
        client = server.client()
        self.addCleanup(client.close)
        step, marker = uuid7(), uuid7()
        for _ in range(2):  # left prepared: its commit failed once
            with self.assertRaises(Exception):
                client.commit(step, "s", pb.COMMIT_MODE_SAGA_STEP, b"fail=1", fake.endpoint)
        self.assertEqual(server.barrier.record(step, "s").status.value, "prepared")
        client.prepare(marker, "b", b"vote=yes", fake.endpoint)
        wait_until(lambda: fake.asks_about(marker) >= 2, what="questions about the two-phase branch")
        self.assertEqual(fake.asks_about(step), 0)

    def test_only_trusted_coordinators_are_asked(self):
        trusted, named = self.coordinator(), self.coordinator()
        untrusted_txn, trusted_txn = uuid7(), uuid7()
        # Recorded while no list was configured: the YES names `named`.
        first = self.participant(in_doubt_interval_ms=3_600_000)
        client = first.client()
        client.prepare(untrusted_txn, "b", b"vote=yes", named.endpoint)
        client.close()
        first.stop()
        named_asks_before = named.asks_about(untrusted_txn)

        server = self.participant(accepted_tokens=[TOKEN], trusted_coordinators=[trusted.endpoint])
        client = server.client(token=TOKEN)
        self.addCleanup(client.close)
        client.prepare(trusted_txn, "b", b"vote=yes", trusted.endpoint)
        wait_until(lambda: trusted.asks_about(trusted_txn) >= 3, what="questions to the trusted coordinator")
        self.assertEqual(named.asks_about(untrusted_txn), named_asks_before)
        self.assertEqual(trusted.asks_about(untrusted_txn), 0)
        self.assertEqual(server.barrier.record(untrusted_txn, "b").status.value, "prepared")

    def test_a_branch_whose_prepare_named_no_coordinator_waits_for_delivery(self):
        server = self.participant()
        client = server.client()
        self.addCleanup(client.close)
        txn = uuid7()
        client.prepare(txn, "b", b"vote=yes")
        report = server.handle.resolver.round()
        self.assertEqual((report.committed, report.aborted), (0, 0))
        self.assertEqual(server.barrier.record(txn, "b").status.value, "prepared")


if __name__ == "__main__":
    unittest.main()
