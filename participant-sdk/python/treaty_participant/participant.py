"""What a service implements to take part in Treaty transactions.

The SDK calls a :class:`Participant` through its barrier, which guarantees:

- each method runs at most once per (transaction, branch, operation) once its result is
  recorded: duplicates are answered from the record;
- ``commit`` and ``abort`` of a two-phase branch run only after ``prepare`` voted YES;
- ``abort`` / ``compensate`` for a branch whose ``prepare`` / ``commit`` never ran are
  answered without calling you, and a ``prepare`` / ``commit`` arriving after them is
  refused (anti-hanging);
- your method runs inside the barrier's local database transaction: write your effect
  through ``ctx.connection`` (or ``ctx.cursor``) and the barrier's record of the
  operation commits with it, atomically and durably, after you return. Never commit or
  roll back that connection yourself.

What you must guarantee:

- after voting YES, ``commit`` and ``abort`` can both succeed: keep what ``prepare``
  reserved until one of them is called. The SDK never aborts a YES vote on its own.
- raising means "no answer now": the SDK rolls the transaction back, records nothing and
  answers UNAVAILABLE; the coordinator asks again (phase 2, compensation) or gives up
  (prepare). Raise for transient trouble only; business refusals are ``Vote.no(reason)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class VoteKind(enum.Enum):
    YES = "yes"
    NO = "no"
    READ_ONLY = "read_only"


@dataclass(frozen=True)
class Vote:
    """A participant's answer to ``prepare``. Build it with :meth:`yes`, :meth:`no` or
    :meth:`read_only`."""

    kind: VoteKind
    reason: str = ""

    @classmethod
    def yes(cls) -> "Vote":
        """Ready to commit; will neither commit nor abort until told."""
        return cls(VoteKind.YES)

    @classmethod
    def no(cls, reason: str) -> "Vote":
        """Refuses the work (a business failure); the transaction aborts."""
        return cls(VoteKind.NO, reason)

    @classmethod
    def read_only(cls) -> "Vote":
        """Nothing to commit or abort: the branch drops out of phase 2."""
        return cls(VoteKind.READ_ONLY)

    @property
    def is_yes(self) -> bool:
        return self.kind is VoteKind.YES


class ParticipantError(Exception):
    """A transient failure of participant code (any exception is taken as one)."""


@dataclass
class BranchContext:
    """Which transaction and branch an operation is for, and the local transaction to
    write its effect in.

    ``connection`` is the barrier's DB-API connection, inside the transaction that will
    also hold the barrier's record (``None`` outside the SDK); ``cursor`` a cursor of it.
    ``traceparent`` / ``tracestate`` are the W3C trace context the coordinator sent
    (``None`` when it sent none, or for outcomes applied by in-doubt resolution).
    """

    transaction_id: str
    branch_id: str
    traceparent: str | None = None
    tracestate: str | None = None
    connection: Any = field(default=None, repr=False, compare=False)
    cursor: Any = field(default=None, repr=False, compare=False)


class Participant:
    """The four operations. ``payload`` is the bytes the initiator attached to the branch
    (for ``compensate``, the saga step's compensation payload; for ``commit`` and
    ``abort`` after a YES vote, the payload of the ``prepare``).

    A one-phase commit and a saga step arrive as ``prepare`` followed at once by
    ``commit``; a NO vote then means "rejected". Subclass and override what you need.
    """

    def prepare(self, ctx: BranchContext, payload: bytes) -> Vote:
        raise NotImplementedError("Participant.prepare is not implemented")

    def commit(self, ctx: BranchContext, payload: bytes) -> None:
        raise NotImplementedError("Participant.commit is not implemented")

    def abort(self, ctx: BranchContext, payload: bytes) -> None:
        raise NotImplementedError("Participant.abort is not implemented")

    def compensate(self, ctx: BranchContext, payload: bytes) -> None:
        """Undoes a committed saga step. Two-phase-only participants need not override it."""
        raise ParticipantError("this participant does not support compensation")
