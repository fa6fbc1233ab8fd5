"""The answer table of PARTICIPANT-PROTOCOL.md §5, cell by cell, against the pure core
(no I/O): each (state, request) pair plans exactly the step the document names."""

import unittest

from treaty_participant.answer_table import (
    ABORTED_BEFORE_PREPARE,
    AbortAnswer,
    CommitAnswer,
    CompensateAnswer,
    Mode,
    PastRetention,
    PayloadFrom,
    RecordNull,
    Reply,
    Request,
    RunPrepare,
    RunUser,
    Status,
    plan,
)
from treaty_participant.participant import VoteKind

PREPARE = (Request.PREPARE, None)
COMMIT_2PC = (Request.COMMIT, Mode.TWO_PHASE)
COMMIT_1PC = (Request.COMMIT, Mode.ONE_PHASE)
COMMIT_SAGA = (Request.COMMIT, Mode.SAGA_STEP)
ABORT = (Request.ABORT, None)
COMPENSATE = (Request.COMPENSATE, None)
COLUMNS = (PREPARE, COMMIT_2PC, COMMIT_1PC, COMMIT_SAGA, ABORT, COMPENSATE)

COMMITTED = Reply(CommitAnswer.COMMITTED)
ALREADY_ABORTED = Reply(CommitAnswer.ALREADY_ABORTED)
ABORTED = Reply(AbortAnswer.ABORTED)
COMPENSATED = Reply(CompensateAnswer.COMPENSATED)
RUN_COMMIT = RunUser("commit", PayloadFrom.PREPARE, Status.COMMITTED, COMMITTED)
REASON = "out of stock"

# state -> the six cells, in COLUMNS order.
TABLE = {
    None: (
        RunPrepare(Mode.TWO_PHASE),
        Reply(CommitAnswer.NOT_PREPARED),
        RunPrepare(Mode.ONE_PHASE),
        RunPrepare(Mode.SAGA_STEP),
        RecordNull(Status.ABORTED, ABORTED),
        RecordNull(Status.COMPENSATED, COMPENSATED),
    ),
    "past retention": (
        PastRetention(),
        PastRetention(),
        PastRetention(),
        PastRetention(),
        PastRetention(),
        PastRetention(),
    ),
    Status.PREPARED: (
        Reply(VoteKind.YES),
        RUN_COMMIT,
        RUN_COMMIT,
        RUN_COMMIT,
        RunUser("abort", PayloadFrom.PREPARE, Status.ABORTED, ABORTED),
        RunUser("abort", PayloadFrom.PREPARE, Status.COMPENSATED, COMPENSATED),
    ),
    Status.VOTED_NO: (
        Reply(VoteKind.NO, REASON),
        ALREADY_ABORTED,
        Reply(CommitAnswer.REJECTED, REASON),
        Reply(CommitAnswer.REJECTED, REASON),
        ABORTED,
        COMPENSATED,
    ),
    Status.READ_ONLY: (Reply(VoteKind.READ_ONLY), COMMITTED, COMMITTED, COMMITTED, ABORTED, COMPENSATED),
    Status.COMMITTED: (
        Reply(VoteKind.YES),
        COMMITTED,
        COMMITTED,
        COMMITTED,
        Reply(AbortAnswer.ALREADY_COMMITTED),
        RunUser("compensate", PayloadFrom.REQUEST, Status.COMPENSATED, COMPENSATED),
    ),
    Status.ABORTED: (
        Reply(VoteKind.NO, ABORTED_BEFORE_PREPARE),
        ALREADY_ABORTED,
        ALREADY_ABORTED,
        ALREADY_ABORTED,
        ABORTED,
        COMPENSATED,
    ),
    Status.COMPENSATED: (
        Reply(VoteKind.NO, ABORTED_BEFORE_PREPARE),
        ALREADY_ABORTED,
        ALREADY_ABORTED,
        ALREADY_ABORTED,
        ABORTED,
        COMPENSATED,
    ),
}


class AnswerTableTest(unittest.TestCase):
    def test_every_cell_plans_the_documented_step(self):
        self.assertEqual(len(TABLE), 8)
        for state, row in TABLE.items():
            for (request, mode), expected in zip(COLUMNS, row):
                with self.subTest(state=state, request=request, mode=mode):
                    if state == "past retention":
                        step = plan(request, mode, None, past_retention=True)
                    else:
                        reason = REASON if state is Status.VOTED_NO else ""
                        step = plan(request, mode, state, reason)
                    self.assertEqual(step, expected)

    def test_a_record_is_answered_from_whatever_the_retention(self):
        # The retention only matters without a record: an old branch with one answers as usual.
        for state in Status:
            for request, mode in COLUMNS:
                with self.subTest(state=state, request=request, mode=mode):
                    self.assertEqual(
                        plan(request, mode, state, "", past_retention=True),
                        plan(request, mode, state, "", past_retention=False),
                    )

    def test_only_prepared_and_committed_branches_change_state(self):
        for state in Status:
            for request, mode in COLUMNS:
                step = plan(request, mode, state, "")
                changes = isinstance(step, (RunUser, RecordNull, RunPrepare))
                with self.subTest(state=state, request=request, mode=mode):
                    if state is Status.COMMITTED:
                        self.assertEqual(changes, request is Request.COMPENSATE)
                    elif state is not Status.PREPARED:
                        self.assertFalse(changes)

    def test_only_prepared_is_not_final(self):
        self.assertEqual([s for s in Status if not s.is_final], [Status.PREPARED])

    def test_a_commit_needs_its_mode(self):
        with self.assertRaises(ValueError):
            plan(Request.COMMIT, None, Status.PREPARED)


if __name__ == "__main__":
    unittest.main()
