"""The durable barrier: one record per (transaction, branch) in a database table, written
in the same local transaction as the user's effect.

It carries out the steps of :mod:`.answer_table` and keeps these invariants
(PARTICIPANT-PROTOCOL.md §4, §7, §8, §11):

- **Effect and record commit together.** Every operation runs in one DB transaction:
  read the record, run user code on ``ctx.connection``, write the new record, commit.
  User code that raises rolls everything back and nothing is recorded (UNAVAILABLE).
  A one-phase commit or saga step is two transactions: the YES vote (prepared) is
  committed before the user's ``commit`` runs, so a failing commit leaves it prepared.
- **Durable before the reply.** The operation returns only after the commit returned;
  :class:`SqliteBarrier` runs SQLite with ``synchronous=FULL``. A failed COMMIT marks
  the barrier failed: every later call is INTERNAL and :func:`serve` stops.
- **Serialised per branch.** An in-process lock per branch covers every operation,
  in-doubt resolution and collection. Across processes sharing one database, SQLite's
  ``BEGIN IMMEDIATE`` serialises writers; with another database, records are inserted
  under the primary key and changed by compare-and-set on the status, so a racing
  writer's transaction (its effect included) fails and rolls back instead of
  overwriting.
- **Retention.** A call for a branch without a record, whose transaction (by its UUIDv7
  id) is older than ``retention_ms`` or below the highest cutoff collected so far, runs
  nothing and writes nothing: every call, Prepare too, gets :class:`PastRetention`
  (FAILED_PRECONDITION). :meth:`DbApiBarrier.collect` deletes only
  final records of such transactions; a prepared record is never deleted.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from .answer_table import (
    Mode,
    PastRetention as PastRetentionStep,
    PayloadFrom,
    RecordNull,
    Reply,
    Request,
    RunPrepare,
    RunUser,
    Status,
    plan,
    status_after_vote,
)
from .keyed_locks import Busy, KeyedLocks
from .limits import truncate_reason
from .participant import BranchContext, Participant, Vote, VoteKind
from .transaction_age import first_transaction_id_at, transaction_created_unix_ms

log = logging.getLogger("treaty_participant.barrier")

#: How long records of final branches are kept by default: 8 days, the coordinator's
#: default delivery horizon (7 days) and a day of margin for clock skew.
DEFAULT_RETENTION_MS = 8 * 24 * 3_600_000


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000


class BarrierError(Exception):
    """An operation that has no answer now. Subclasses say which gRPC status it is."""


class UserCodeFailed(BarrierError):
    """User code raised (UNAVAILABLE); nothing was recorded."""


class ConcurrentChange(BarrierError):
    """Another process changed the branch's record meanwhile (UNAVAILABLE); rolled back."""


class BranchBusy(BarrierError):
    """The branch's lock was not taken (UNAVAILABLE): too many operations already wait
    for one on it that has not ended, or the caller's deadline passed while waiting.
    Nothing ran."""


class StoreBusy(BarrierError):
    """Every barrier database connection stayed in use for the whole wait (UNAVAILABLE).
    Nothing ran."""


class StoreError(BarrierError):
    """The barrier's database failed (INTERNAL); nothing new was recorded."""


class PastRetention(BarrierError):
    """A call without a record about a transaction older than the retention
    (FAILED_PRECONDITION)."""


@dataclass(frozen=True)
class BranchRecord:
    mode: Mode
    status: Status
    #: The reason of a NO vote.
    reason: str
    #: The prepare payload, kept while the branch is prepared (commit and abort get it).
    payload: bytes
    coordinator_endpoint: str
    updated_unix_ms: int
    #: A null abort or null compensation: no user code ran.
    null: bool = False

    @property
    def in_doubt(self) -> bool:
        """A YES vote waiting for its outcome; saga steps are never in doubt."""
        return self.status is Status.PREPARED and self.mode is not Mode.SAGA_STEP


@dataclass(frozen=True)
class InDoubtBranch:
    transaction_id: str
    branch_id: str
    coordinator_endpoint: str
    prepared_unix_ms: int


_PLACEHOLDER = "?"


def _convert_placeholders(sql: str, params: Sequence[Any], paramstyle: str):
    """Rewrites ``?`` placeholders (the SQL below never has ``?`` or ``%`` elsewhere)."""
    if paramstyle == "qmark":
        return sql, tuple(params)
    parts = sql.split(_PLACEHOLDER)
    if paramstyle in ("format", "pyformat"):
        return "%s".join(parts), tuple(params)
    if paramstyle == "numeric":
        out = parts[0] + "".join(f":{i + 1}{part}" for i, part in enumerate(parts[1:]))
        return out, tuple(params)
    if paramstyle == "named":
        out = parts[0] + "".join(f":p{i + 1}{part}" for i, part in enumerate(parts[1:]))
        return out, {f"p{i + 1}": value for i, value in enumerate(params)}
    raise ValueError(f"paramstyle: {paramstyle!r} is not a DB-API 2.0 paramstyle")


#: Put in the pool's queue when a connection is discarded: a slot to open one in.
_VACANCY = object()


class _ConnectionPool:
    """At most ``max_connections`` connections; a caller waits for a free one."""

    def __init__(self, connect: Callable[[], Any], max_connections: int) -> None:
        self._connect = connect
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._mutex = threading.Lock()
        self._created = 0
        self._max = max_connections
        self._all: list = []
        #: Whether the connections are the barrier's to close (not a connection of yours).
        self.owns_connections = True

    def acquire(self, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        try:
            item = self._idle.get_nowait()
        except queue.Empty:
            item = _VACANCY
        while True:
            if item is not _VACANCY:
                return item
            with self._mutex:
                if self._created < self._max:
                    self._created += 1
                    try:
                        connection = self._connect()
                    except BaseException:
                        self._created -= 1
                        raise
                    self._all.append(connection)
                    return connection
            # Wait for a connection given back, or for a slot a discard freed.
            try:
                item = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise StoreBusy(
                    f"no barrier database connection became free within {timeout_s:.0f} s"
                ) from None

    def release(self, connection: Any) -> None:
        self._idle.put(connection)

    def discard(self, connection: Any) -> None:
        if not self.owns_connections:
            self.release(connection)
            return
        with self._mutex:
            self._created -= 1
            if connection in self._all:
                self._all.remove(connection)
        try:
            connection.close()
        except Exception:  # noqa: BLE001 - closing a broken connection may fail too
            pass
        # Wakes one caller waiting for a connection: it may open one in the slot freed.
        self._idle.put(_VACANCY)

    def close_all(self) -> None:
        if not self.owns_connections:
            return
        with self._mutex:
            connections, self._all = self._all, []
            self._created = 0
        for connection in connections:
            try:
                connection.close()
            except Exception as error:  # noqa: BLE001 - report, keep closing the others
                log.warning("closing a barrier connection failed: %s", error)


class DbApiBarrier:
    """A barrier in any DB-API 2.0 database.

    ``connect`` opens a connection; the barrier keeps up to ``max_connections`` of them.
    ``paramstyle`` is the driver module's (``qmark``, ``format``, ``pyformat``,
    ``numeric`` or ``named``). ``begin_sql`` is run to open each operation's transaction
    (``None``: the driver opens one implicitly). ``blob_type`` names the column type for
    bytes (``BYTEA`` in PostgreSQL). The database must commit durably (e.g. PostgreSQL's
    ``synchronous_commit = on``).
    """

    def __init__(
        self,
        connect: Callable[[], Any],
        *,
        paramstyle: str = "qmark",
        begin_sql: str | None = None,
        blob_type: str = "BLOB",
        table: str = "treaty_barrier",
        max_connections: int = 16,
        connection_wait_s: float = 60.0,
        retention_ms: int = DEFAULT_RETENTION_MS,
        create_table: bool = True,
    ) -> None:
        if not table.replace("_", "").isalnum() or not table.isascii():
            raise ValueError(f"table: {table!r} must be letters, digits and _")
        if retention_ms < 1:
            raise ValueError("retention_ms: must be at least 1")
        if max_connections < 1:
            raise ValueError("max_connections: must be at least 1")
        _convert_placeholders("", (), paramstyle)  # refuses an unknown style now
        self._pool = _ConnectionPool(connect, max_connections)
        self._paramstyle = paramstyle
        self._begin_sql = begin_sql
        self._table = table
        self._connection_wait_s = connection_wait_s
        self.retention_ms = retention_ms
        self._collected_below_unix_ms = 0
        # Where the collector's next round goes on from (None: the start).
        self._collect_after: tuple[str, str] | None = None
        self._locks = KeyedLocks()
        self._failure: str | None = None
        self._failure_listeners: list[Callable[[str], None]] = []
        if create_table:
            self._create_table(blob_type)

    # ----- schema and plumbing -------------------------------------------------------

    def _create_table(self, blob_type: str) -> None:
        t = self._table
        statements = [
            f"CREATE TABLE IF NOT EXISTS {t} ("
            " transaction_id VARCHAR(64) NOT NULL,"
            " branch_id VARCHAR(64) NOT NULL,"
            " mode VARCHAR(16) NOT NULL,"
            " status VARCHAR(16) NOT NULL,"
            " reason TEXT NOT NULL,"
            f" payload {blob_type} NOT NULL,"
            " coordinator_endpoint VARCHAR(256) NOT NULL,"
            " in_doubt INTEGER NOT NULL,"
            " null_operation INTEGER NOT NULL,"
            " updated_unix_ms BIGINT NOT NULL,"
            " PRIMARY KEY (transaction_id, branch_id))",
            f"CREATE INDEX IF NOT EXISTS {t}_in_doubt ON {t} (in_doubt, transaction_id, branch_id)",
        ]
        connection = self._acquire()
        try:
            for statement in statements:
                connection.cursor().execute(statement)
            connection.commit()
        finally:
            self._pool.release(connection)

    def _acquire(self) -> Any:
        try:
            connection = self._pool.acquire(self._connection_wait_s)
        except BarrierError:
            raise
        except Exception as error:  # noqa: BLE001 - any driver error opening a connection
            raise StoreError(f"opening a barrier database connection: {error}") from error
        if _autocommits(connection):
            self._pool.release(connection)
            raise StoreError(
                "the barrier's database connection is in autocommit mode: each statement "
                "would commit by itself, and an effect could be durable without its record; "
                "open connections with autocommit off"
            )
        return connection

    def _execute(self, cursor: Any, sql: str, params: Sequence[Any] = ()) -> Any:
        sql, converted = _convert_placeholders(sql, params, self._paramstyle)
        cursor.execute(sql, converted)
        return cursor

    def _begin(self, connection: Any) -> None:
        if self._begin_sql:
            connection.cursor().execute(self._begin_sql)

    def _load(self, cursor: Any, transaction_id: str, branch_id: str) -> BranchRecord | None:
        self._execute(
            cursor,
            f"SELECT mode, status, reason, payload, coordinator_endpoint, updated_unix_ms,"
            f" null_operation FROM {self._table} WHERE transaction_id = ? AND branch_id = ?",
            (transaction_id, branch_id),
        )
        row = cursor.fetchone()
        if row is None:
            return None
        try:
            return BranchRecord(
                mode=Mode(row[0]),
                status=Status(row[1]),
                reason=row[2],
                payload=bytes(row[3]),
                coordinator_endpoint=row[4],
                updated_unix_ms=int(row[5]),
                null=bool(row[6]),
            )
        except (ValueError, TypeError) as error:
            raise StoreError(
                f"barrier record for {transaction_id}/{branch_id} is unreadable: {error}"
            ) from error

    def _insert(self, cursor: Any, ctx: BranchContext, record: BranchRecord) -> None:
        try:
            self._execute(
                cursor,
                f"INSERT INTO {self._table} (transaction_id, branch_id, mode, status, reason,"
                " payload, coordinator_endpoint, in_doubt, null_operation, updated_unix_ms)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ctx.transaction_id,
                    ctx.branch_id,
                    record.mode.value,
                    record.status.value,
                    record.reason,
                    record.payload,
                    record.coordinator_endpoint,
                    int(record.in_doubt),
                    int(record.null),
                    record.updated_unix_ms,
                ),
            )
        except Exception as error:  # noqa: BLE001 - drivers name integrity errors differently
            if "unique" in str(error).lower() or "primary" in str(error).lower() or "duplicate" in str(error).lower():
                raise ConcurrentChange(
                    f"another process recorded {ctx.transaction_id}/{ctx.branch_id} meanwhile"
                ) from error
            raise

    def _update(self, cursor: Any, ctx: BranchContext, old: Status, record: BranchRecord) -> None:
        self._execute(
            cursor,
            f"UPDATE {self._table} SET status = ?, reason = ?, payload = ?, in_doubt = ?,"
            " null_operation = ?, updated_unix_ms = ?"
            " WHERE transaction_id = ? AND branch_id = ? AND status = ?",
            (
                record.status.value,
                record.reason,
                record.payload,
                int(record.in_doubt),
                int(record.null),
                record.updated_unix_ms,
                ctx.transaction_id,
                ctx.branch_id,
                old.value,
            ),
        )
        if cursor.rowcount != 1:
            raise ConcurrentChange(
                f"another process changed {ctx.transaction_id}/{ctx.branch_id} meanwhile"
            )

    def _commit(self, connection: Any) -> None:
        """Commits durably. A failure whose outcome is unknown is fatal (nothing may be
        answered from records that may not be on disk); one where the database refused
        the transaction, so that none of it is committed, is not: the operation's
        rollback ends it, and the call is answered UNAVAILABLE."""
        try:
            connection.commit()
        except Exception as error:  # noqa: BLE001 - any driver error at COMMIT
            refused = _refused_at_commit(connection, error)
            if refused is not None:
                raise refused from error
            self._fail(f"committing a barrier record failed: {error}")
            raise StoreError(self._failure) from error
        # A connection whose commit() does nothing (sqlite3 with autocommit=True) would
        # leave the record uncommitted while its YES vote goes out.
        if getattr(connection, "in_transaction", False):
            self._fail("the connection is still in a transaction after commit()")
            raise StoreError(self._failure)

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message
            log.error("the barrier store failed; stopping: %s", message)
            for listener in list(self._failure_listeners):
                try:
                    listener(message)
                except Exception:  # noqa: BLE001 - a listener must not hide the failure
                    log.exception("a barrier failure listener raised")

    @property
    def failure(self) -> str | None:
        """Why the barrier can no longer promise durability, if it cannot."""
        return self._failure

    def on_failure(self, listener: Callable[[str], None]) -> None:
        self._failure_listeners.append(listener)
        if self._failure is not None:
            listener(self._failure)

    def close(self) -> None:
        self._pool.close_all()

    # ----- retention -----------------------------------------------------------------

    def retention_cutoff_unix_ms(self) -> int:
        """Transactions created before this instant are past the retention."""
        return max(now_unix_ms() - self.retention_ms, self._collected_below_unix_ms)

    def _past_retention(self, transaction_id: str) -> bool:
        created = transaction_created_unix_ms(transaction_id)
        return created is not None and created < self.retention_cutoff_unix_ms()

    def _past_retention_message(self, ctx: BranchContext) -> str:
        return (
            f"transaction {ctx.transaction_id} was created at "
            f"{transaction_created_unix_ms(ctx.transaction_id)} (Unix ms), longer ago than this "
            f"participant's barrier retention of {self.retention_ms} ms, and branch "
            f"{ctx.branch_id} has no record: it may have been collected, so no answer would "
            "be true. Coordinators make no call past their delivery horizon; check the clocks "
            "and resolve the transaction by hand (`treaty txn resolve`)"
        )

    # ----- the operations ------------------------------------------------------------

    def handle(
        self,
        participant: Participant,
        request: Request,
        ctx: BranchContext,
        *,
        mode: Mode | None = None,
        payload: bytes = b"",
        coordinator_endpoint: str = "",
        wait_s: float | None = None,
        still_wanted: Callable[[], bool] | None = None,
    ) -> Reply:
        """Answers one request for one branch through the barrier (see the module docs).
        Raises a :class:`BarrierError` when there is no answer now. Waits for another
        operation on the branch to end at most ``wait_s`` (None, or a day or more: as
        long as it takes),
        and only while ``still_wanted`` (if given) says True; raises
        :class:`BranchBusy` beyond, or at once when ``MAX_WAITING_PER_KEY`` already
        wait."""
        key = f"{ctx.transaction_id}/{ctx.branch_id}"
        try:
            with self._locks.hold(key, timeout_s=wait_s, still_wanted=still_wanted):
                # At most two rounds: a one-phase commit or saga step records its vote,
                # then is planned again as a commit of that state.
                for _ in range(2):
                    outcome = self._one_transaction(participant, request, ctx, mode, payload, coordinator_endpoint)
                    if outcome is not None:
                        return outcome
                raise AssertionError("a commit was planned as a prepare twice")
        except Busy as busy:
            raise BranchBusy(str(busy)) from None

    def _one_transaction(
        self,
        participant: Participant,
        request: Request,
        ctx: BranchContext,
        mode: Mode | None,
        payload: bytes,
        coordinator_endpoint: str,
    ) -> Reply | None:
        """Reads, plans and carries out one step in one DB transaction. Returns the reply,
        or None when the step was a one-phase/saga prepare (plan again)."""
        if self._failure is not None:
            raise StoreError(f"barrier store failed earlier: {self._failure}")
        connection = self._acquire()
        healthy = True
        try:
            try:
                self._begin(connection)
                cursor = connection.cursor()
                record = self._load(cursor, ctx.transaction_id, ctx.branch_id)
            except BarrierError:
                raise
            except sqlite3.OperationalError as error:
                if _is_lock_contention(error):
                    # Another writer held the lock past busy_timeout: transient.
                    raise ConcurrentChange(f"the database is busy: {error}") from error
                raise StoreError(f"reading the barrier record: {error}") from error
            except Exception as error:  # noqa: BLE001 - any driver error
                raise StoreError(f"reading the barrier record: {error}") from error
            step = plan(
                request,
                mode,
                record.status if record else None,
                record.reason if record else "",
                past_retention=record is None and self._past_retention(ctx.transaction_id),
            )
            if isinstance(step, Reply):
                return step
            if isinstance(step, PastRetentionStep):
                log.warning(
                    "call past the barrier retention: txn_id=%s branch_id=%s",
                    ctx.transaction_id,
                    ctx.branch_id,
                )
                raise PastRetention(self._past_retention_message(ctx))
            user_ctx = replace(ctx, connection=connection, cursor=cursor)
            if isinstance(step, RecordNull):
                new = BranchRecord(
                    mode=Mode.TWO_PHASE if step.status is Status.ABORTED else Mode.SAGA_STEP,
                    status=step.status,
                    reason="",
                    payload=b"",
                    coordinator_endpoint="",
                    updated_unix_ms=now_unix_ms(),
                    null=True,
                )
                self._write(cursor, ctx, None, new)
                self._commit(connection)
                return step.reply
            if isinstance(step, RunPrepare):
                vote = self._run_user(participant.prepare, user_ctx, payload, "prepare")
                _check_vote(vote)
                reason = truncate_reason(vote.reason) if vote.kind is VoteKind.NO else ""
                new = BranchRecord(
                    mode=step.mode,
                    status=status_after_vote(vote.kind),
                    reason=reason,
                    payload=payload if vote.is_yes else b"",
                    coordinator_endpoint=coordinator_endpoint,
                    updated_unix_ms=now_unix_ms(),
                )
                self._write(cursor, ctx, None, new)
                self._commit(connection)
                if request is Request.PREPARE:
                    return Reply(vote.kind, reason)
                return None
            assert isinstance(step, RunUser) and record is not None
            function = getattr(participant, step.function)
            given = record.payload if step.payload_from is PayloadFrom.PREPARE else payload
            self._run_user(function, user_ctx, given, step.function)
            new = replace(
                record,
                status=step.status,
                reason="",
                payload=b"",
                updated_unix_ms=now_unix_ms(),
                null=False,
            )
            self._write(cursor, ctx, record.status, new)
            self._commit(connection)
            return step.reply
        except BaseException:
            healthy = self._rollback(connection)
            raise
        finally:
            if healthy:
                try:
                    # Ends the read transaction of a step that wrote nothing.
                    connection.rollback()
                except Exception:  # noqa: BLE001 - a broken connection is discarded below
                    healthy = False
            if healthy:
                self._pool.release(connection)
            else:
                self._pool.discard(connection)

    def _write(self, cursor: Any, ctx: BranchContext, old: Status | None, new: BranchRecord) -> None:
        try:
            if old is None:
                self._insert(cursor, ctx, new)
            else:
                self._update(cursor, ctx, old, new)
        except BarrierError:
            raise
        except Exception as error:  # noqa: BLE001 - any driver error
            if _rolled_back_for_contention(error):
                raise ConcurrentChange(f"the database rolled the write back: {error}") from error
            raise StoreError(f"writing the barrier record: {error}") from error

    def _run_user(self, function: Callable, ctx: BranchContext, payload: bytes, name: str) -> Any:
        try:
            result = function(ctx, payload)
        except KeyboardInterrupt:
            raise
        except BaseException as error:  # noqa: BLE001 - user code may raise anything, SystemExit too
            log.warning(
                "participant code failed: txn_id=%s branch_id=%s operation=%s error=%s",
                ctx.transaction_id,
                ctx.branch_id,
                name,
                error,
            )
            raise UserCodeFailed(f"participant {name} failed: {error}") from error
        # Only an explicit BEGIN makes "no transaction open" mean the user ended it.
        if self._begin_sql and getattr(ctx.connection, "in_transaction", True) is False:
            raise UserCodeFailed(
                f"participant {name} ended the barrier's transaction (commit or rollback): "
                "leave that to the SDK, or its effect and record are no longer atomic"
            )
        return result

    def _give_back(self, connection: Any) -> None:
        """Returns a connection to the pool with no transaction open (or discards it)."""
        if self._rollback(connection):
            self._pool.release(connection)
        else:
            self._pool.discard(connection)

    def _rollback(self, connection: Any) -> bool:
        try:
            connection.rollback()
            return True
        except Exception as error:  # noqa: BLE001 - the connection is then discarded
            log.warning("rolling back a barrier transaction failed: %s", error)
            return False

    # ----- reading for in-doubt resolution and collection ----------------------------

    def _read(self, sql: str, params: Sequence[Any]) -> list:
        if self._failure is not None:
            raise StoreError(f"barrier store failed earlier: {self._failure}")
        connection = self._acquire()
        try:
            cursor = self._execute(connection.cursor(), sql, params)
            rows = cursor.fetchall()
        except Exception as error:  # noqa: BLE001 - any driver error
            self._give_back(connection)
            raise StoreError(f"reading barrier records: {error}") from error
        self._give_back(connection)
        return rows

    def record(self, transaction_id: str, branch_id: str) -> BranchRecord | None:
        """What the barrier has recorded for a branch (for tests and operators)."""
        rows = self._read(
            f"SELECT mode, status, reason, payload, coordinator_endpoint, updated_unix_ms,"
            f" null_operation FROM {self._table} WHERE transaction_id = ? AND branch_id = ?",
            (transaction_id, branch_id),
        )
        if not rows:
            return None
        row = rows[0]
        return BranchRecord(Mode(row[0]), Status(row[1]), row[2], bytes(row[3]), row[4], int(row[5]), bool(row[6]))

    def in_doubt_after(
        self, cursor: tuple[str, str] | None, limit: int
    ) -> tuple[list[InDoubtBranch], tuple[str, str] | None]:
        """Up to ``limit`` in-doubt branches after ``cursor`` (None: from the start), in key
        order, and the cursor to continue from (None once the end was reached)."""
        after = "" if cursor is None else " AND (transaction_id > ? OR (transaction_id = ? AND branch_id > ?))"
        params: tuple = (Status.PREPARED.value,)
        if cursor is not None:
            params += (cursor[0], cursor[0], cursor[1])
        rows = self._read(
            f"SELECT transaction_id, branch_id, coordinator_endpoint, updated_unix_ms"
            f" FROM {self._table} WHERE in_doubt = 1 AND status = ?{after}"
            f" ORDER BY transaction_id, branch_id LIMIT {int(limit)}",
            params,
        )
        branches = [InDoubtBranch(row[0], row[1], row[2], int(row[3])) for row in rows]
        next_cursor = (rows[-1][0], rows[-1][1]) if len(rows) == limit and rows else None
        return branches, next_cursor

    def collect(self, max_records: int = 1000) -> int:
        """Deletes up to ``max_records`` final records of transactions older than the
        retention (canonical UUIDv7 ids only); returns how many. The cutoff is published
        before anything below it is deleted; each record is read again and deleted under
        its branch's lock (a busy branch is left for the next round)."""
        cutoff = self.retention_cutoff_unix_ms()
        self._collected_below_unix_ms = max(self._collected_below_unix_ms, cutoff)
        # Pages on from where the last round stopped: records kept below the bound (ids
        # that are not canonical UUIDv7s, busy branches) must not hide the ones after.
        after_id, after_branch = self._collect_after or ("", "")
        rows = self._read(
            f"SELECT transaction_id, branch_id FROM {self._table}"
            f" WHERE transaction_id < ? AND status <> ?"
            f" AND (transaction_id > ? OR (transaction_id = ? AND branch_id > ?))"
            f" ORDER BY transaction_id, branch_id LIMIT {int(max_records)}",
            (
                first_transaction_id_at(cutoff),
                Status.PREPARED.value,
                after_id,
                after_id,
                after_branch,
            ),
        )
        # A short page ends the pass: the next round starts from the beginning again.
        self._collect_after = (rows[-1][0], rows[-1][1]) if len(rows) == max_records else None
        collected = 0
        for transaction_id, branch_id in rows:
            created = transaction_created_unix_ms(transaction_id)
            if created is None or created >= cutoff:
                continue
            with self._locks.hold(f"{transaction_id}/{branch_id}", blocking=False) as taken:
                if taken:
                    collected += self._delete_final(transaction_id, branch_id)
        return collected

    def _delete_final(self, transaction_id: str, branch_id: str) -> int:
        connection = self._acquire()
        try:
            self._begin(connection)
            cursor = self._execute(
                connection.cursor(),
                f"DELETE FROM {self._table} WHERE transaction_id = ? AND branch_id = ? AND status <> ?",
                (transaction_id, branch_id, Status.PREPARED.value),
            )
            deleted = max(cursor.rowcount, 0)
            connection.commit()
        except Exception as error:  # noqa: BLE001 - a deletion lost is simply done again
            self._give_back(connection)
            raise StoreError(f"deleting an old barrier record: {error}") from error
        self._give_back(connection)
        return deleted


class SqliteBarrier(DbApiBarrier):
    """A barrier in SQLite: a database file (``database`` a path; the barrier opens up to
    ``max_connections`` connections, in WAL mode) or one ``sqlite3.Connection`` of yours
    (opened with ``check_same_thread=False``; every operation then takes turns on it).
    Such a connection must be the barrier's alone: anything else written or committed on
    it would land inside, or commit, a barrier operation's transaction. Not with
    ``autocommit=True`` (Python 3.12+), whose ``commit()`` does nothing.

    Every connection runs with ``synchronous=FULL``, so a commit is on disk when it
    returns. Each operation's transaction starts with ``BEGIN IMMEDIATE``: writers, in
    this process and others sharing the file, take turns, and user code may wait up to
    ``busy_timeout_ms`` for the write lock.
    """

    def __init__(
        self,
        database: "str | bytes | sqlite3.Connection | Any",
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
        busy_timeout_ms: int = 60_000,
        max_connections: int = 8,
        table: str = "treaty_barrier",
    ) -> None:
        if isinstance(database, sqlite3.Connection):
            connection = database
            if getattr(connection, "autocommit", None) is True:
                raise ValueError(
                    "database: a sqlite3 connection with autocommit=True commits nothing on "
                    "commit(); open it with the default autocommit setting"
                )
            _check_shareable(connection)
            connection.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            connection.execute("PRAGMA synchronous = FULL")
            connect: Callable[[], Any] = lambda: connection  # noqa: E731
            max_connections = 1
            self.path = None
        else:
            path = database
            self.path = path

            def connect() -> sqlite3.Connection:
                opened = sqlite3.connect(
                    path,
                    timeout=busy_timeout_ms / 1000,
                    isolation_level=None,
                    check_same_thread=False,
                )
                opened.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
                opened.execute("PRAGMA journal_mode = WAL")
                opened.execute("PRAGMA synchronous = FULL")
                return opened

        super().__init__(
            connect,
            paramstyle="qmark",
            begin_sql="BEGIN IMMEDIATE",
            table=table,
            max_connections=max_connections,
            connection_wait_s=busy_timeout_ms / 1000,
            retention_ms=retention_ms,
        )
        if isinstance(database, sqlite3.Connection):
            self._pool.owns_connections = False


def _autocommits(connection: Any) -> bool:
    """Whether a DB-API connection commits each statement by itself: an ``autocommit``
    attribute that is True (psycopg, sqlite3 3.12+), or ``get_autocommit()`` True
    (PyMySQL, mysqlclient)."""
    if getattr(connection, "autocommit", None) is True:
        return True
    get_autocommit = getattr(connection, "get_autocommit", None)
    if callable(get_autocommit):
        try:
            return get_autocommit() is True
        except Exception:  # noqa: BLE001 - a driver that cannot say is taken at its word
            return False
    return False


def _check_vote(vote: Any) -> None:
    """Refuses what ``prepare`` returned unless it is a vote that can be recorded and sent,
    as a failure of user code (UNAVAILABLE), not of the SDK."""
    if not isinstance(vote, Vote) or not isinstance(vote.kind, VoteKind):
        raise UserCodeFailed(
            f"prepare returned {type(vote).__name__}, not a Vote "
            "(use Vote.yes(), Vote.no(reason) or Vote.read_only())"
        )
    if not isinstance(vote.reason, str):
        raise UserCodeFailed(f"prepare's Vote.no reason is a {type(vote.reason).__name__}, not a str")
    try:
        vote.reason.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UserCodeFailed(f"prepare's Vote.no reason is not valid text: {error}") from None


#: SQLSTATEs of a transaction the database rolled back for contention: a serialization
#: failure, a deadlock.
_CONTENTION_SQLSTATES = ("40001", "40P01")


def _refused_at_commit(connection: Any, error: Exception) -> BarrierError | None:
    """What a failed COMMIT means when the database refused the transaction (none of it
    committed), or None when the outcome is unknown (the connection lost, an I/O error).

    - An integrity error: a constraint of the user's, checked at commit (deferred), failed.
    - A serialization failure or deadlock (SQLSTATE 40001, 40P01; psycopg's ``pgcode``
      or ``sqlstate``).
    - SQLite busy or locked with the transaction still open: nothing was committed.
    """
    if any(kind.__name__ == "IntegrityError" for kind in type(error).__mro__):
        return UserCodeFailed(f"the database refused the transaction at commit: {error}")
    if _rolled_back_for_contention(error):
        return ConcurrentChange(f"the database rolled the transaction back at commit: {error}")
    if (
        isinstance(error, sqlite3.OperationalError)
        and _is_lock_contention(error)
        and getattr(connection, "in_transaction", False)
    ):
        return ConcurrentChange(f"the database is busy: {error}")
    return None


def _rolled_back_for_contention(error: Exception) -> bool:
    """A serialization failure or deadlock, by its SQLSTATE (psycopg's ``pgcode`` or
    ``sqlstate``): the database rolled the transaction back, and a retry may succeed."""
    sqlstate = getattr(error, "pgcode", None) or getattr(error, "sqlstate", None)
    return sqlstate in _CONTENTION_SQLSTATES


def _is_lock_contention(error: sqlite3.OperationalError) -> bool:
    text = str(error).lower()
    return "locked" in text or "busy" in text


def _check_shareable(connection: sqlite3.Connection) -> None:
    """The server's threads use the connection: refuse one tied to its creating thread."""
    problem: list[Exception] = []

    def probe() -> None:
        try:
            connection.execute("SELECT 1").fetchall()
        except sqlite3.ProgrammingError as error:
            problem.append(error)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    if problem:
        raise ValueError(
            "database: the sqlite3 connection must be opened with check_same_thread=False "
            f"(the server uses it from its threads): {problem[0]}"
        )
