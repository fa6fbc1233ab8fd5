"""Concurrent duplicates and races on one branch (PARTICIPANT-PROTOCOL.md §8): whatever
the order the threads get, user code runs at most once per operation and the answers
agree with the effects. ``delay_ms`` in the payload makes the calls overlap."""

import threading
import unittest

import grpc

from treaty_participant._proto import conformance_pb2 as cpb
from treaty_participant._proto import participant_pb2 as pb

from treaty_participant.keyed_locks import MAX_WAITING_PER_KEY

from .support import ParticipantTest, uuid7, wait_until

P, C, A, X = (cpb.EFFECT_KIND_PREPARE, cpb.EFFECT_KIND_COMMIT, cpb.EFFECT_KIND_ABORT,
              cpb.EFFECT_KIND_COMPENSATE)


def run_together(*calls):
    """Runs the calls on threads started together; returns their results (or errors)."""
    results = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(index, call):
        start.wait(timeout=30)
        try:
            results[index] = call()
        except grpc.RpcError as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        if thread.is_alive():
            raise AssertionError("a call did not return within 60 s")
    return results


class ConcurrencyTest(ParticipantTest):
    def test_concurrent_duplicate_one_phase_commits_run_once(self):
        txn, payload = uuid7(), b"delay_ms=300"
        results = run_together(*[lambda: self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload)] * 4)
        self.assertEqual([r.result for r in results], [pb.COMMIT_RESULT_COMMITTED] * 4)
        self.assertEqual(self.client.effects(txn, "b"), [(P, payload), (C, payload)])

    def test_concurrent_duplicate_prepares_vote_once(self):
        txn, payload = uuid7(), b"delay_ms=200"
        results = run_together(*[lambda: self.client.prepare(txn, "b", payload)] * 4)
        self.assertEqual([r.vote for r in results], [pb.VOTE_YES] * 4)
        self.assertEqual(self.client.effects(txn, "b"), [(P, payload)])

    def test_compensate_racing_the_step_leaves_no_effect_behind(self):
        for attempt in range(3):
            txn, step = uuid7(), b"delay_ms=200"
            commit, compensate = run_together(
                lambda: self.client.commit(txn, "s", pb.COMMIT_MODE_SAGA_STEP, step),
                lambda: self.client.compensate(txn, "s", b"undo"),
            )
            self.assertEqual(compensate.result, pb.COMPENSATE_RESULT_COMPENSATED)
            effects = self.client.effects(txn, "s")
            with self.subTest(attempt=attempt, commit=commit.result):
                if commit.result == pb.COMMIT_RESULT_COMMITTED:  # the step ran first
                    self.assertEqual(effects, [(P, step), (C, step), (X, b"undo")])
                else:  # the null compensation came first
                    self.assertEqual(commit.result, pb.COMMIT_RESULT_ALREADY_ABORTED)
                    self.assertEqual(effects, [])

    def test_abort_racing_a_one_phase_commit_agrees_with_it(self):
        for attempt in range(3):
            txn, payload = uuid7(), b"delay_ms=200"
            commit, abort = run_together(
                lambda: self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload),
                lambda: self.client.abort(txn, "b"),
            )
            effects = self.client.effects(txn, "b")
            with self.subTest(attempt=attempt, commit=commit.result):
                if commit.result == pb.COMMIT_RESULT_COMMITTED:
                    self.assertEqual(abort.result, pb.ABORT_RESULT_ALREADY_COMMITTED)
                    self.assertEqual(effects, [(P, payload), (C, payload)])
                else:
                    self.assertEqual(commit.result, pb.COMMIT_RESULT_ALREADY_ABORTED)
                    self.assertEqual(abort.result, pb.ABORT_RESULT_ABORTED)
                    self.assertEqual(effects, [])

    def test_a_caller_that_gives_up_does_not_cut_the_operation_short(self):
        txn, payload = uuid7(), b"delay_ms=500"
        with self.assertRaises(grpc.RpcError) as gave_up:
            self.client.participant.Commit(
                pb.CommitBranchRequest(transaction_id=txn, branch_id="b", mode=pb.COMMIT_MODE_ONE_PHASE,
                                       payload=payload), timeout=0.1)
        self.assertEqual(gave_up.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        # The retry waits for the first call's lock and answers from its record.
        again = self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload)
        self.assertEqual(again.result, pb.COMMIT_RESULT_COMMITTED)
        self.assertEqual(self.client.effects(txn, "b"), [(P, payload), (C, payload)])

    def test_calls_waiting_behind_one_that_does_not_end_are_bounded(self):
        # The first commit holds the branch for 10 s. Before, each call behind it held a
        # server thread until it ended, whether or not its caller was still there, and
        # without a bound.
        txn, payload = uuid7(), b"delay_ms=10000"
        key = f"{txn}/b"
        locks = self.server.barrier._locks
        first = run_in_thread(lambda: self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload))
        wait_until(lambda: locks.users(key) == 1, what="the first commit holding the branch")
        # A call whose caller gave up stops waiting at its deadline.
        with self.assertRaises(grpc.RpcError) as gave_up:
            self.client.participant.Commit(
                pb.CommitBranchRequest(transaction_id=txn, branch_id="b", mode=pb.COMMIT_MODE_ONE_PHASE,
                                       payload=payload), timeout=0.2)
        # (The server's wait ends with the deadline, and its UNAVAILABLE may come first.)
        self.assertIn(gave_up.exception.code(), (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE))
        wait_until(lambda: locks.users(key) == 1, timeout_s=5, what="the call given up no longer waiting")
        # So does one without a deadline whose caller cancels it, as the coordinator
        # cancels a call it stops waiting for (it sends no deadline).
        cancelled = self.client.participant.Commit.future(
            pb.CommitBranchRequest(transaction_id=txn, branch_id="b", mode=pb.COMMIT_MODE_ONE_PHASE,
                                   payload=payload))
        wait_until(lambda: locks.users(key) == 2, what="the call without a deadline waiting")
        cancelled.cancel()
        wait_until(lambda: locks.users(key) == 1, timeout_s=5, what="the cancelled call no longer waiting")
        # At most MAX_WAITING_PER_KEY wait; one more is answered UNAVAILABLE at once.
        waiting = [run_in_thread(lambda: self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload))
                   for _ in range(MAX_WAITING_PER_KEY)]
        wait_until(lambda: locks.users(key) == 1 + MAX_WAITING_PER_KEY, what="eight calls waiting")
        with self.assertRaises(grpc.RpcError) as refused:
            self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload)
        self.assertEqual(refused.exception.code(), grpc.StatusCode.UNAVAILABLE)
        # Once the first ends, the ones waiting answer from its record.
        for call in [first, *waiting]:
            self.assertEqual(call().result, pb.COMMIT_RESULT_COMMITTED)
        self.assertEqual(self.client.effects(txn, "b"), [(P, payload), (C, payload)])


def run_in_thread(call):
    """Starts ``call`` on a thread; returns a function that waits (at most 60 s) for its
    result."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()))
    thread.start()

    def wait():
        thread.join(60)
        if not result:
            raise AssertionError("the call did not return within 60 s")
        return result[0]

    return wait


if __name__ == "__main__":
    unittest.main()
