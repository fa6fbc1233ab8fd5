"""Durability across a crash: the conformance participant runs as a child process and is
killed with SIGKILL (no shutdown code runs), then restarted on the same SQLite file."""

import time
import unittest

import grpc

from treaty_participant._proto import conformance_pb2 as cpb
from treaty_participant._proto import participant_pb2 as pb

from .support import Client, ConformanceProcess, TempDirTest, uuid7, wait_until

P, C = cpb.EFFECT_KIND_PREPARE, cpb.EFFECT_KIND_COMMIT


class RestartTest(TempDirTest):
    def start(self):
        process = ConformanceProcess(self.tmp / "participant.db")
        self.addCleanup(process.stop)
        client = Client(process.target)
        self.addCleanup(client.close)
        return process, client

    def test_a_yes_vote_survives_sigkill_and_commits_once(self):
        txn, payload = uuid7(), b"vote=yes;order-7"
        process, client = self.start()
        self.assertEqual(client.prepare(txn, "b", payload).vote, pb.VOTE_YES)
        process.kill()

        _, client = self.start()
        self.assertEqual(client.effects(txn, "b"), [(P, payload)])
        self.assertEqual(client.prepare(txn, "b", payload).vote, pb.VOTE_YES)  # from the record
        for _ in range(2):
            self.assertEqual(client.commit(txn, "b", pb.COMMIT_MODE_TWO_PHASE).result, pb.COMMIT_RESULT_COMMITTED)
        self.assertEqual(client.effects(txn, "b"), [(P, payload), (C, payload)])

    def test_a_kill_during_the_commit_leaves_neither_effect_nor_record(self):
        txn, payload = uuid7(), b"vote=yes;delay_ms=2000"
        process, client = self.start()
        self.assertEqual(client.prepare(txn, "b", payload).vote, pb.VOTE_YES)
        # The commit's user code sleeps inside the barrier's transaction; kill it there.
        pending = client.participant.Commit.future(
            pb.CommitBranchRequest(transaction_id=txn, branch_id="b", mode=pb.COMMIT_MODE_TWO_PHASE), timeout=30)
        time.sleep(0.5)  # lets the call reach the user code; the outcome holds either way
        process.kill()
        with self.assertRaises(grpc.RpcError):
            pending.result(timeout=30)

        _, client = self.start()
        self.assertEqual(client.effects(txn, "b"), [(P, payload)])
        self.assertEqual(client.commit(txn, "b", pb.COMMIT_MODE_TWO_PHASE).result, pb.COMMIT_RESULT_COMMITTED)
        self.assertEqual(client.effects(txn, "b"), [(P, payload), (C, payload)])

    def test_a_null_abort_survives_sigkill(self):
        txn = uuid7()
        process, client = self.start()
        self.assertEqual(client.abort(txn, "b").result, pb.ABORT_RESULT_ABORTED)
        process.kill()
        _, client = self.start()
        self.assertEqual(client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, b"vote=yes").result,
                         pb.COMMIT_RESULT_ALREADY_ABORTED)
        self.assertEqual(client.effects(txn, "b"), [])

    def test_sigterm_stops_it_gracefully(self):
        process, client = self.start()
        self.assertEqual(client.prepare(uuid7(), "b", b"vote=read_only").vote, pb.VOTE_READ_ONLY)
        process.process.terminate()
        self.assertEqual(wait_until(lambda: process.process.poll() is not None, what="exit") and
                         process.process.returncode, 0)


if __name__ == "__main__":
    unittest.main()
