"""The answer table over real gRPC: the conformance participant on 127.0.0.1 with a real
SQLite file. Each cell gets a fresh branch, is brought to its state by real calls, then
receives the request; the test checks the answer and exactly which user code ran (the
effects recorded in the barrier's transaction). Repeats and reordering (abort before
prepare, compensate before the step, commit after abort) are rows of the table."""

import unittest

from treaty_participant._proto import conformance_pb2 as cpb
from treaty_participant._proto import participant_pb2 as pb
from treaty_participant.participant import Vote

from .support import ParticipantTest, uuid7

P, C, A, X = (cpb.EFFECT_KIND_PREPARE, cpb.EFFECT_KIND_COMMIT, cpb.EFFECT_KIND_ABORT,
              cpb.EFFECT_KIND_COMPENSATE)
YES = b"vote=yes;prepared"
STEP = b"vote=yes;step"
REQUEST_PAYLOAD = b"vote=yes;request"
COMPENSATION = b"undo"

# How each state is reached from a fresh branch, and the effects that leaves.
STATES = {
    "no record": ([], []),
    "prepared": ([("prepare", YES)], [(P, YES)]),
    "voted no": ([("prepare", b"vote=no")], []),
    "read-only": ([("prepare", b"vote=read_only")], []),
    "committed": ([("prepare", YES), ("commit2", b"")], [(P, YES), (C, YES)]),
    "aborted after yes": ([("prepare", YES), ("abort", b"")], [(P, YES), (A, YES)]),
    "null aborted": ([("abort", b"")], []),
    "compensated after commit": ([("saga", STEP), ("compensate", COMPENSATION)], [(P, STEP), (C, STEP), (X, COMPENSATION)]),
    "null compensated": ([("compensate", COMPENSATION)], []),
    # A saga step whose prepare voted YES and whose commit failed: prepared, not in doubt.
    "prepared saga step": ([("saga", b"fail=1;step"), ("saga", b"fail=1;step")], [(P, b"fail=1;step")]),
}

ABORTED_BEFORE = "the branch was aborted before this prepare arrived"
V, R, AB, CO = pb.Vote, pb.CommitResult, pb.AbortResult, pb.CompensateResult

# state -> {request: (answer, reason or None, effects the request adds)}
EXPECTED = {
    "no record": {
        "prepare": (V.Value("VOTE_YES"), "", [(P, REQUEST_PAYLOAD)]),
        "commit2": (R.Value("COMMIT_RESULT_NOT_PREPARED"), "", []),
        "commit1": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(P, REQUEST_PAYLOAD), (C, REQUEST_PAYLOAD)]),
        "saga": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(P, REQUEST_PAYLOAD), (C, REQUEST_PAYLOAD)]),
        "abort": (AB.Value("ABORT_RESULT_ABORTED"), None, []),
        "compensate": (CO.Value("COMPENSATE_RESULT_COMPENSATED"), None, []),
    },
    "prepared": {
        "prepare": (V.Value("VOTE_YES"), "", []),
        "commit2": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(C, YES)]),
        "commit1": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(C, YES)]),
        "saga": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(C, YES)]),
        "abort": (AB.Value("ABORT_RESULT_ABORTED"), None, [(A, YES)]),
        "compensate": (CO.Value("COMPENSATE_RESULT_COMPENSATED"), None, [(A, YES)]),
    },
    "voted no": {
        "prepare": (V.Value("VOTE_NO"), "the script says vote=no", []),
        "commit2": (R.Value("COMMIT_RESULT_ALREADY_ABORTED"), "", []),
        "commit1": (R.Value("COMMIT_RESULT_REJECTED"), "the script says vote=no", []),
        "saga": (R.Value("COMMIT_RESULT_REJECTED"), "the script says vote=no", []),
        "abort": (AB.Value("ABORT_RESULT_ABORTED"), None, []),
        "compensate": (CO.Value("COMPENSATE_RESULT_COMPENSATED"), None, []),
    },
    "read-only": {
        "prepare": (V.Value("VOTE_READ_ONLY"), "", []),
        "commit2": (R.Value("COMMIT_RESULT_COMMITTED"), "", []),
        "commit1": (R.Value("COMMIT_RESULT_COMMITTED"), "", []),
        "saga": (R.Value("COMMIT_RESULT_COMMITTED"), "", []),
        "abort": (AB.Value("ABORT_RESULT_ABORTED"), None, []),
        "compensate": (CO.Value("COMPENSATE_RESULT_COMPENSATED"), None, []),
    },
    "committed": {
        "prepare": (V.Value("VOTE_YES"), "", []),
        "commit2": (R.Value("COMMIT_RESULT_COMMITTED"), "", []),
        "commit1": (R.Value("COMMIT_RESULT_COMMITTED"), "", []),
        "saga": (R.Value("COMMIT_RESULT_COMMITTED"), "", []),
        "abort": (AB.Value("ABORT_RESULT_ALREADY_COMMITTED"), None, []),
        "compensate": (CO.Value("COMPENSATE_RESULT_COMPENSATED"), None, [(X, COMPENSATION)]),
    },
}
_FINAL_ABORTED = {
    "prepare": (V.Value("VOTE_NO"), ABORTED_BEFORE, []),
    "commit2": (R.Value("COMMIT_RESULT_ALREADY_ABORTED"), "", []),
    "commit1": (R.Value("COMMIT_RESULT_ALREADY_ABORTED"), "", []),
    "saga": (R.Value("COMMIT_RESULT_ALREADY_ABORTED"), "", []),
    "abort": (AB.Value("ABORT_RESULT_ABORTED"), None, []),
    "compensate": (CO.Value("COMPENSATE_RESULT_COMPENSATED"), None, []),
}
for _state in ("aborted after yes", "null aborted", "compensated after commit", "null compensated"):
    EXPECTED[_state] = _FINAL_ABORTED
_PREPARED_STEP = b"fail=1;step"
# Its script fails each user function's first run: abort is retried once in this row.
EXPECTED["prepared saga step"] = {
    "prepare": (V.Value("VOTE_YES"), "", []),
    # The step's commit failed its first run already: this run succeeds.
    "commit2": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(C, _PREPARED_STEP)]),
    "commit1": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(C, _PREPARED_STEP)]),
    "saga": (R.Value("COMMIT_RESULT_COMMITTED"), "", [(C, _PREPARED_STEP)]),
    "abort": (AB.Value("ABORT_RESULT_ABORTED"), None, [(A, _PREPARED_STEP)]),
    "compensate": (CO.Value("COMPENSATE_RESULT_COMPENSATED"), None, [(A, _PREPARED_STEP)]),
}


class WireAnswerTableTest(ParticipantTest):
    def call(self, txn, branch, request, payload):
        c = self.client
        if request == "prepare":
            response = c.prepare(txn, branch, payload)
            return response.vote, response.reason
        if request in ("commit2", "commit1", "saga"):
            mode = {"commit2": pb.COMMIT_MODE_TWO_PHASE, "commit1": pb.COMMIT_MODE_ONE_PHASE,
                    "saga": pb.COMMIT_MODE_SAGA_STEP}[request]
            response = c.commit(txn, branch, mode, payload)
            return response.result, response.reason
        if request == "abort":
            return c.abort(txn, branch).result, None
        return c.compensate(txn, branch, payload).result, None

    def call_retrying_scripted_failures(self, txn, branch, request, payload):
        for attempt in range(2):
            try:
                return self.call(txn, branch, request, payload)
            except Exception as error:  # noqa: BLE001 - only the scripted failure is retried
                if "fails as scripted" not in str(error) or attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def bring_to(self, txn, branch, state):
        steps, effects = STATES[state]
        for request, payload in steps:
            try:
                self.call(txn, branch, request, payload)
            except Exception as error:  # noqa: BLE001 - scripted failures (fail=N) are expected
                if "fails as scripted" not in str(error):
                    raise
        self.assertEqual(self.client.effects(txn, branch), effects, f"setting up {state}")
        return effects

    def test_every_state_and_request_over_grpc(self):
        payloads = {"prepare": REQUEST_PAYLOAD, "commit2": b"", "commit1": REQUEST_PAYLOAD,
                    "saga": REQUEST_PAYLOAD, "abort": b"", "compensate": COMPENSATION}
        cells = 0
        for state, answers in EXPECTED.items():
            for request, (answer, reason, added) in answers.items():
                with self.subTest(state=state, request=request):
                    txn, branch = uuid7(), f"{request}-{cells}"
                    before = self.bring_to(txn, branch, state)
                    got = self.call_retrying_scripted_failures(txn, branch, request, payloads[request])
                    self.assertEqual(got, (answer, reason))
                    self.assertEqual(self.client.effects(txn, branch), before + added)
                    # A repeat is answered from the record and runs nothing.
                    if request != "compensate" or state != "committed":
                        again = self.call(txn, branch, request, payloads[request])
                        self.assertEqual(again, got)
                    self.assertEqual(self.client.effects(txn, branch), before + added)
                cells += 1
        self.assertEqual(cells, 10 * 6)

    def test_duplicates_run_user_code_once(self):
        txn = uuid7()
        for _ in range(3):
            self.assertEqual(self.client.prepare(txn, "b", YES).vote, pb.VOTE_YES)
        for _ in range(3):
            self.assertEqual(self.client.commit(txn, "b", pb.COMMIT_MODE_TWO_PHASE).result,
                             pb.COMMIT_RESULT_COMMITTED)
        self.assertEqual(self.client.effects(txn, "b"), [(P, YES), (C, YES)])

    def test_abort_before_prepare_refuses_the_late_prepare(self):
        txn = uuid7()
        self.assertEqual(self.client.abort(txn, "b").result, pb.ABORT_RESULT_ABORTED)
        late = self.client.prepare(txn, "b", YES)
        self.assertEqual((late.vote, late.reason), (pb.VOTE_NO, ABORTED_BEFORE))
        self.assertEqual(self.client.effects(txn, "b"), [])

    def test_compensate_before_the_step_refuses_the_late_step(self):
        txn = uuid7()
        self.client.compensate(txn, "s", COMPENSATION)
        late = self.client.commit(txn, "s", pb.COMMIT_MODE_SAGA_STEP, STEP)
        self.assertEqual(late.result, pb.COMMIT_RESULT_ALREADY_ABORTED)
        self.assertEqual(self.client.effects(txn, "s"), [])

    def test_commit_after_abort_is_already_aborted(self):
        txn = uuid7()
        self.client.prepare(txn, "b", YES)
        self.client.abort(txn, "b")
        self.assertEqual(self.client.commit(txn, "b", pb.COMMIT_MODE_TWO_PHASE).result,
                         pb.COMMIT_RESULT_ALREADY_ABORTED)
        self.assertEqual(self.client.effects(txn, "b"), [(P, YES), (A, YES)])

    def test_a_failing_one_phase_commit_stays_prepared_and_in_doubt(self):
        txn = uuid7()
        payload = b"vote=yes;fail=1"
        with self.assertRaises(Exception) as failed:  # prepare's first run fails
            self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload)
        self.assertIn("UNAVAILABLE", str(failed.exception.code()))
        with self.assertRaises(Exception):  # prepare succeeds, commit's first run fails
            self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload)
        record = self.server.barrier.record(txn, "b")
        self.assertEqual((record.status.value, record.in_doubt), ("prepared", True))
        self.assertEqual(self.client.effects(txn, "b"), [(P, payload)])
        self.assertEqual(self.client.commit(txn, "b", pb.COMMIT_MODE_ONE_PHASE, payload).result,
                         pb.COMMIT_RESULT_COMMITTED)
        self.assertEqual(self.client.effects(txn, "b"), [(P, payload), (C, payload)])

    def test_reasons_sent_are_at_most_one_kib(self):
        # User code that gives a 6 KiB reason: it is recorded and sent cut to 1 KiB.
        self.server.participant.prepare = lambda ctx, payload: Vote.no("é" * 3_000)
        txn = uuid7()
        for _ in range(2):  # the first answer, then the recorded one
            vote = self.client.prepare(txn, "b", YES)
            self.assertEqual(vote.vote, pb.VOTE_NO)
            self.assertLessEqual(len(vote.reason.encode()), 1024)
            self.assertTrue(vote.reason.startswith("é" * 100), vote.reason[:20])


if __name__ == "__main__":
    unittest.main()
