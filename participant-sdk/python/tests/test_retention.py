"""Late calls past the barrier retention (PARTICIPANT-PROTOCOL.md §11), with transaction
ids that are UUIDv7s of old timestamps, and the collection of old final records."""

import time
import unittest

import grpc

from treaty_participant._proto import participant_pb2 as pb
from treaty_participant.barrier import DEFAULT_RETENTION_MS

from .support import DAY_MS, ParticipantTest, uuid7


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class PastRetentionTest(ParticipantTest):
    # Collection is driven by hand here: a background round must not race the tests that
    # shrink the retention for a moment.
    serve_options = {"gc_interval_ms": 3_600_000}
    def assert_refused(self, call):
        with self.assertRaises(grpc.RpcError) as refused:
            call()
        self.assertEqual(refused.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("barrier retention", refused.exception.details())

    def test_a_call_without_record_past_the_retention_runs_nothing(self):
        old = uuid7(now_ms() - DEFAULT_RETENTION_MS - DAY_MS)
        # Not even NO: the branch may have voted YES and committed.
        self.assert_refused(lambda: self.client.prepare(old, "b", b"vote=yes"))
        for mode in (pb.COMMIT_MODE_TWO_PHASE, pb.COMMIT_MODE_ONE_PHASE, pb.COMMIT_MODE_SAGA_STEP):
            self.assert_refused(lambda: self.client.commit(old, "b", mode, b"vote=yes"))
        self.assert_refused(lambda: self.client.abort(old, "b"))
        self.assert_refused(lambda: self.client.compensate(old, "b", b"undo"))
        self.assertIsNone(self.server.barrier.record(old, "b"))
        self.assertEqual(self.client.effects(old, "b"), [])

    def test_ids_that_are_not_uuidv7_have_no_age(self):
        for txn in ("t-1", "01900000-0000-4abc-9def-0123456789ab", "01900000-0000-7ABC-9DEF-0123456789AB"):
            with self.subTest(txn=txn):
                self.assertEqual(self.client.prepare(txn, "b", b"vote=yes").vote, pb.VOTE_YES)
                self.assertEqual(self.client.abort(txn, "b").result, pb.ABORT_RESULT_ABORTED)

    def test_a_branch_with_a_record_is_answered_from_it_however_old(self):
        txn = uuid7(now_ms() - 10_000)
        self.client.prepare(txn, "b", b"vote=yes")
        self.server.barrier.retention_ms = 1_000
        try:
            self.assertEqual(self.client.commit(txn, "b", pb.COMMIT_MODE_TWO_PHASE).result,
                             pb.COMMIT_RESULT_COMMITTED)
            self.assertEqual(self.client.prepare(txn, "b").vote, pb.VOTE_YES)
        finally:
            self.server.barrier.retention_ms = DEFAULT_RETENTION_MS


class CollectionTest(ParticipantTest):
    serve_options = {"gc_interval_ms": 3_600_000}

    def test_old_final_records_are_collected_and_prepared_ones_kept(self):
        barrier = self.server.barrier
        created = now_ms() - 60_000
        final, prepared, young = uuid7(created), uuid7(created), uuid7()
        self.client.commit(final, "s", pb.COMMIT_MODE_SAGA_STEP, b"vote=yes")
        self.client.abort(final, "null")
        self.client.prepare(prepared, "b", b"vote=yes")
        self.client.prepare(young, "b", b"vote=no")
        self.client.prepare("t-not-a-uuid", "b", b"vote=no")
        barrier.retention_ms = 30_000
        collected = barrier.collect(max_records=100)
        self.assertEqual(collected, 2)
        self.assertIsNone(barrier.record(final, "s"))
        self.assertIsNone(barrier.record(final, "null"))
        self.assertEqual(barrier.record(prepared, "b").status.value, "prepared")
        self.assertIsNotNone(barrier.record(young, "b"))
        self.assertIsNotNone(barrier.record("t-not-a-uuid", "b"))
        # A collected branch can no longer be told from one that never ran: no answer.
        with self.assertRaises(grpc.RpcError) as refused:
            self.client.compensate(final, "s", b"undo")
        self.assertEqual(refused.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)
        # The prepared branch still commits.
        self.assertEqual(self.client.commit(prepared, "b", pb.COMMIT_MODE_TWO_PHASE).result,
                         pb.COMMIT_RESULT_COMMITTED)
        # The cutoff never moves back, even if the retention (or the clock) does.
        barrier.retention_ms = DEFAULT_RETENTION_MS
        with self.assertRaises(grpc.RpcError) as still_refused:
            self.client.abort(final, "null")
        self.assertEqual(still_refused.exception.code(), grpc.StatusCode.FAILED_PRECONDITION)

    def test_records_kept_below_the_bound_do_not_hide_the_ones_after(self):
        barrier = self.server.barrier
        # Ids that sort below every UUIDv7 but have no age: never collected.
        kept = [f"000{i}" for i in range(5)]
        for txn in kept:
            self.client.prepare(txn, "b", b"vote=no")
        old = uuid7(now_ms() - 60_000)
        self.client.prepare(old, "b", b"vote=no")
        barrier.retention_ms = 30_000
        try:
            collected = 0
            for _ in range(10):  # pages of 2: the old record is on the third
                collected += barrier.collect(max_records=2)
                if barrier.record(old, "b") is None:
                    break
            self.assertIsNone(barrier.record(old, "b"))
            self.assertEqual(collected, 1)
            for txn in kept:
                self.assertIsNotNone(barrier.record(txn, "b"))
        finally:
            barrier.retention_ms = DEFAULT_RETENTION_MS


if __name__ == "__main__":
    unittest.main()
