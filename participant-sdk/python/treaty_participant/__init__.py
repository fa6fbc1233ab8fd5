"""Treaty participant SDK for Python: take part in Treaty's two-phase commits and sagas.

Implement :class:`Participant` (prepare / commit / abort / compensate), keep the barrier
in your database (:class:`SqliteBarrier`, or :class:`DbApiBarrier` for any DB-API 2.0
connection) and :func:`serve` it. The contract it keeps is docs/PARTICIPANT-PROTOCOL.md.

    class Payments(Participant):
        def prepare(self, ctx, payload):
            ctx.connection.execute("INSERT INTO holds ...")   # same transaction as the barrier
            return Vote.yes()
        ...

    handle = serve(Payments(), SqliteBarrier("payments.db"), "127.0.0.1:7001")
"""

import logging as _logging

from .answer_table import AbortAnswer, CommitAnswer, CompensateAnswer, Mode, Request, Status
from .barrier import (
    DEFAULT_RETENTION_MS,
    BarrierError,
    BranchRecord,
    DbApiBarrier,
    InDoubtBranch,
    SqliteBarrier,
)
from .in_doubt import InDoubtResolver
from .participant import BranchContext, Participant, ParticipantError, Vote, VoteKind
from .server import ParticipantServicer, ServerHandle, ServerTls, serve
from .trust import CoordinatorTrust

# A library logs to its own logger and leaves configuring output to the application.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "AbortAnswer",
    "BarrierError",
    "BranchContext",
    "BranchRecord",
    "CommitAnswer",
    "CompensateAnswer",
    "CoordinatorTrust",
    "DEFAULT_RETENTION_MS",
    "DbApiBarrier",
    "InDoubtBranch",
    "InDoubtResolver",
    "Mode",
    "Participant",
    "ParticipantError",
    "ParticipantServicer",
    "Request",
    "ServerHandle",
    "ServerTls",
    "SqliteBarrier",
    "Status",
    "Vote",
    "VoteKind",
    "serve",
]
