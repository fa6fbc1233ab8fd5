"""The answer table (PARTICIPANT-PROTOCOL.md §5) as a pure function: no I/O, no clock.

:func:`plan` takes a request and the branch's recorded state and returns the one step
the barrier must carry out: answer from the record, record a null abort/compensation,
run the user's ``prepare`` (then plan again with the vote recorded), or run one user
function and record the new state. The barrier (``barrier.py``) does the I/O.

Invariants kept here, each checked by ``tests/test_answer_table.py`` cell by cell:

- user code runs only where the table says so, and the state it leads to is written
  with its effect;
- a state other than PREPARED is changed only by Compensate of a COMMITTED branch;
- a call that finds no record for a transaction past the retention runs nothing,
  writes nothing and gets FAILED_PRECONDITION, a Prepare too;
- the request's mode matters only without a record and in VOTED_NO (a two-phase Commit
  gets ALREADY_ABORTED, a one-phase one or a saga step REJECTED with the reason).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union

from .participant import VoteKind


class Status(enum.Enum):
    """The state a branch's barrier record holds (no record is ``None``)."""

    PREPARED = "prepared"
    VOTED_NO = "voted_no"
    READ_ONLY = "read_only"
    COMMITTED = "committed"
    ABORTED = "aborted"
    COMPENSATED = "compensated"

    @property
    def is_final(self) -> bool:
        """Nothing can make the branch in doubt again; the record may be collected once
        it is past the retention."""
        return self is not Status.PREPARED


class Mode(enum.Enum):
    TWO_PHASE = "two_phase"
    ONE_PHASE = "one_phase"
    SAGA_STEP = "saga_step"


class Request(enum.Enum):
    PREPARE = "prepare"
    COMMIT = "commit"
    ABORT = "abort"
    COMPENSATE = "compensate"


class CommitAnswer(enum.Enum):
    COMMITTED = "committed"
    REJECTED = "rejected"
    NOT_PREPARED = "not_prepared"
    ALREADY_ABORTED = "already_aborted"


class AbortAnswer(enum.Enum):
    ABORTED = "aborted"
    ALREADY_COMMITTED = "already_committed"


class CompensateAnswer(enum.Enum):
    COMPENSATED = "compensated"


AnswerValue = Union[VoteKind, CommitAnswer, AbortAnswer, CompensateAnswer]

#: The reason of a Prepare answered NO because the branch was aborted or compensated first.
ABORTED_BEFORE_PREPARE = "the branch was aborted before this prepare arrived"


@dataclass(frozen=True)
class Reply:
    """Answer from the record: no user code, no write."""

    answer: AnswerValue
    reason: str = ""


@dataclass(frozen=True)
class RecordNull:
    """Write a record of ``status`` without running user code (null abort / compensation)."""

    status: Status
    reply: Reply


@dataclass(frozen=True)
class RunPrepare:
    """Run the user's ``prepare`` with the request's payload and record its vote. For a
    one-phase commit or a saga step, plan again as a Commit in the state now recorded."""

    mode: Mode


class PayloadFrom(enum.Enum):
    PREPARE = "prepare"  # the payload kept with the YES vote
    REQUEST = "request"


@dataclass(frozen=True)
class RunUser:
    """Run one user function; on success record ``status`` with its effect and reply."""

    function: str  # "commit", "abort" or "compensate"
    payload_from: PayloadFrom
    status: Status
    reply: Reply


@dataclass(frozen=True)
class PastRetention:
    """No record, and the transaction is older than the retention: no answer would be
    true, so none is given (FAILED_PRECONDITION), to a Prepare too: a NO would be false
    for a branch that voted YES and committed."""


Step = Union[Reply, RecordNull, RunPrepare, RunUser, PastRetention]


def plan(
    request: Request,
    mode: Mode | None,
    status: Status | None,
    recorded_reason: str = "",
    past_retention: bool = False,
) -> Step:
    """What to do with ``request`` (``mode`` for a Commit) for a branch in ``status``
    (``None``: no record; ``past_retention`` says whether its transaction is older than
    the retention)."""
    if status is None:
        return _without_record(request, mode, past_retention)
    if request is Request.PREPARE:
        return _prepare(status, recorded_reason)
    if request is Request.COMMIT:
        if mode is None:
            raise ValueError("a Commit needs its mode")
        return _commit(mode, status, recorded_reason)
    if request is Request.ABORT:
        return _abort(status)
    return _compensate(status)


def _without_record(request: Request, mode: Mode | None, past_retention: bool) -> Step:
    if past_retention:
        return PastRetention()
    if request is Request.PREPARE:
        return RunPrepare(Mode.TWO_PHASE)
    if request is Request.COMMIT:
        if mode is Mode.TWO_PHASE:
            return Reply(CommitAnswer.NOT_PREPARED)
        if mode is None:
            raise ValueError("a Commit needs its mode")
        return RunPrepare(mode)
    if request is Request.ABORT:
        return RecordNull(Status.ABORTED, Reply(AbortAnswer.ABORTED))
    return RecordNull(Status.COMPENSATED, Reply(CompensateAnswer.COMPENSATED))


def _prepare(status: Status, recorded_reason: str) -> Step:
    if status in (Status.PREPARED, Status.COMMITTED):
        return Reply(VoteKind.YES)
    if status is Status.VOTED_NO:
        return Reply(VoteKind.NO, recorded_reason)
    if status is Status.READ_ONLY:
        return Reply(VoteKind.READ_ONLY)
    return Reply(VoteKind.NO, ABORTED_BEFORE_PREPARE)


def _commit(mode: Mode, status: Status, recorded_reason: str) -> Step:
    if status is Status.PREPARED:
        # TWO_PHASE carries no payload; ONE_PHASE / SAGA_STEP ran prepare with the request's
        # payload, kept with the YES: commit always gets the prepare's.
        return RunUser(
            "commit", PayloadFrom.PREPARE, Status.COMMITTED, Reply(CommitAnswer.COMMITTED)
        )
    if status in (Status.COMMITTED, Status.READ_ONLY):
        return Reply(CommitAnswer.COMMITTED)
    if status is Status.VOTED_NO and mode is not Mode.TWO_PHASE:
        return Reply(CommitAnswer.REJECTED, recorded_reason)
    return Reply(CommitAnswer.ALREADY_ABORTED)


def _abort(status: Status) -> Step:
    if status is Status.PREPARED:
        return RunUser("abort", PayloadFrom.PREPARE, Status.ABORTED, Reply(AbortAnswer.ABORTED))
    if status is Status.COMMITTED:
        return Reply(AbortAnswer.ALREADY_COMMITTED)
    return Reply(AbortAnswer.ABORTED)


def _compensate(status: Status) -> Step:
    compensated = Reply(CompensateAnswer.COMPENSATED)
    if status is Status.COMMITTED:
        return RunUser("compensate", PayloadFrom.REQUEST, Status.COMPENSATED, compensated)
    if status is Status.PREPARED:
        # A prepared, uncommitted step has a reservation to release, not an effect to undo.
        return RunUser("abort", PayloadFrom.PREPARE, Status.COMPENSATED, compensated)
    return compensated


def status_after_vote(vote: VoteKind) -> Status:
    return {
        VoteKind.YES: Status.PREPARED,
        VoteKind.NO: Status.VOTED_NO,
        VoteKind.READ_ONLY: Status.READ_ONLY,
    }[vote]
