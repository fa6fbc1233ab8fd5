"""The barrier in a database of the user's: its record and the user's effect commit in
one transaction or not at all; any DB-API paramstyle; a concurrent writer from another
process is caught by the compare-and-set instead of being overwritten."""

import sqlite3
import threading
import time
import unittest

from treaty_participant import DbApiBarrier, Mode, Participant, Request, SqliteBarrier, Vote
from treaty_participant.answer_table import AbortAnswer, CommitAnswer
from treaty_participant.barrier import (
    ConcurrentChange,
    StoreBusy,
    StoreError,
    UserCodeFailed,
    _ConnectionPool,
    _convert_placeholders,
)
from treaty_participant.participant import BranchContext, VoteKind

from .support import TempDirTest, uuid7


class Orders(Participant):
    """Writes its effects into an `orders` table through ctx.connection."""

    def __init__(self):
        self.fail_commit = False
        self.commit_itself = False
        self.meddle = None

    def prepare(self, ctx, payload):
        ctx.cursor.execute("INSERT INTO orders (txn, state) VALUES (?, 'held')", (ctx.transaction_id,))
        return Vote.yes()

    def commit(self, ctx, payload):
        if self.meddle:
            self.meddle(ctx)
            return
        ctx.cursor.execute("UPDATE orders SET state = 'applied' WHERE txn = ?", (ctx.transaction_id,))
        if self.commit_itself:
            ctx.connection.commit()
        if self.fail_commit:
            raise RuntimeError("the payment service is down")

    def abort(self, ctx, payload):
        ctx.cursor.execute("DELETE FROM orders WHERE txn = ?", (ctx.transaction_id,))


class UserConnectionTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.db = str(self.tmp / "app.db")
        self.connection = sqlite3.connect(self.db, check_same_thread=False)
        self.addCleanup(self.connection.close)
        self.connection.execute("CREATE TABLE orders (txn TEXT PRIMARY KEY, state TEXT)")
        self.connection.commit()
        self.barrier = SqliteBarrier(self.connection)
        self.orders = Orders()

    def state(self, txn):
        row = self.connection.execute("SELECT state FROM orders WHERE txn = ?", (txn,)).fetchone()
        return row[0] if row else None

    def handle(self, request, txn, **options):
        return self.barrier.handle(self.orders, request, BranchContext(txn, "b"), **options)

    def test_effect_and_record_commit_together(self):
        txn = uuid7()
        self.assertEqual(self.handle(Request.PREPARE, txn).answer, VoteKind.YES)
        self.assertEqual(self.state(txn), "held")
        self.assertEqual(self.handle(Request.COMMIT, txn, mode=Mode.TWO_PHASE).answer, CommitAnswer.COMMITTED)
        self.assertEqual((self.state(txn), self.barrier.record(txn, "b").status.value), ("applied", "committed"))

    def test_failing_user_code_rolls_back_its_effect_and_records_nothing(self):
        txn = uuid7()
        self.handle(Request.PREPARE, txn)
        self.orders.fail_commit = True
        with self.assertRaisesRegex(UserCodeFailed, "payment service is down"):
            self.handle(Request.COMMIT, txn, mode=Mode.TWO_PHASE)
        self.assertEqual((self.state(txn), self.barrier.record(txn, "b").status.value), ("held", "prepared"))
        self.orders.fail_commit = False
        self.handle(Request.COMMIT, txn, mode=Mode.TWO_PHASE)
        self.assertEqual(self.state(txn), "applied")

    def test_user_code_may_not_end_the_transaction(self):
        txn = uuid7()
        self.handle(Request.PREPARE, txn)
        self.orders.commit_itself = True
        with self.assertRaisesRegex(UserCodeFailed, "ended the barrier's transaction"):
            self.handle(Request.COMMIT, txn, mode=Mode.TWO_PHASE)
        self.assertEqual(self.barrier.record(txn, "b").status.value, "prepared")

    def test_a_constraint_refused_at_commit_fails_the_call_not_the_barrier(self):
        # A deferred foreign key of the user's, checked at COMMIT: the database refuses
        # the transaction and commits none of it. That failed the whole barrier (every
        # later call INTERNAL, the server stopped) as if durability were lost.
        self.connection.execute("PRAGMA foreign_keys = ON")
        self.connection.executescript(
            "CREATE TABLE parents (id TEXT PRIMARY KEY);"
            "CREATE TABLE children (parent TEXT REFERENCES parents (id) DEFERRABLE INITIALLY DEFERRED);"
        )
        txn = uuid7()
        self.handle(Request.PREPARE, txn)
        self.orders.meddle = lambda ctx: ctx.cursor.execute("INSERT INTO children (parent) VALUES ('none')")
        with self.assertRaisesRegex(UserCodeFailed, "refused the transaction at commit"):
            self.handle(Request.COMMIT, txn, mode=Mode.TWO_PHASE)
        self.assertIsNone(self.barrier.failure)
        self.assertEqual((self.state(txn), self.barrier.record(txn, "b").status.value), ("held", "prepared"))
        self.assertEqual(self.connection.execute("SELECT COUNT(*) FROM children").fetchone()[0], 0)
        # Once the user's code is mended, the coordinator's next delivery commits.
        self.orders.meddle = None
        self.assertEqual(self.handle(Request.COMMIT, txn, mode=Mode.TWO_PHASE).answer, CommitAnswer.COMMITTED)
        self.assertEqual(self.state(txn), "applied")

    def test_a_prepare_that_returns_what_cannot_be_sent_is_a_failure_of_user_code(self):
        # Each was answered INTERNAL ("unexpected error") or, for SystemExit, not at all.
        class Returns(Participant):
            def __init__(self, make):
                self.make = make

            def prepare(self, ctx, payload):
                ctx.cursor.execute("INSERT INTO orders (txn, state) VALUES (?, 'held')", (ctx.transaction_id,))
                return self.make()

            def commit(self, ctx, payload):
                pass

            def abort(self, ctx, payload):
                pass

        def exits():
            raise SystemExit(3)

        for make in (lambda: Vote.no(RuntimeError("out of stock")), lambda: Vote("yes"),
                     lambda: Vote.no("broken \ud800 text"), exits):
            txn = uuid7()
            with self.assertRaises(UserCodeFailed):
                self.barrier.handle(Returns(make), Request.PREPARE, BranchContext(txn, "b"))
            self.assertIsNone(self.barrier.record(txn, "b"))
            self.assertIsNone(self.state(txn))
        self.assertIsNone(self.barrier.failure)

    def test_a_connection_tied_to_its_thread_is_refused(self):
        tied = sqlite3.connect(str(self.tmp / "other.db"))
        self.addCleanup(tied.close)
        with self.assertRaisesRegex(ValueError, "check_same_thread=False"):
            SqliteBarrier(tied)


class GenericDbApiTest(TempDirTest):
    def make(self, paramstyle):
        db = str(self.tmp / f"{paramstyle}.db")
        setup = sqlite3.connect(db)
        setup.execute("CREATE TABLE orders (txn TEXT PRIMARY KEY, state TEXT)")
        setup.commit()
        setup.close()
        # sqlite3 in its default (implicit-transaction) mode, as a generic DB-API driver.
        barrier = DbApiBarrier(lambda: sqlite3.connect(db, timeout=30, check_same_thread=False),
                               paramstyle=paramstyle, max_connections=2)
        self.addCleanup(barrier.close)
        return db, barrier

    def test_named_paramstyle(self):
        db, barrier = self.make("named")
        orders, txn = Orders(), uuid7()
        reply = barrier.handle(orders, Request.COMMIT, BranchContext(txn, "b"), mode=Mode.ONE_PHASE, payload=b"x")
        self.assertEqual(reply.answer, CommitAnswer.COMMITTED)
        self.assertEqual(barrier.handle(orders, Request.ABORT, BranchContext(txn, "b")).answer,
                         AbortAnswer.ALREADY_COMMITTED)
        self.assertEqual(barrier.in_doubt_after(None, 10), ([], None))

    def test_a_concurrent_writer_is_caught_by_the_compare_and_set(self):
        db, barrier = self.make("qmark")
        orders, txn = Orders(), uuid7()
        barrier.handle(orders, Request.PREPARE, BranchContext(txn, "b"))

        def another_process_aborts_it(ctx):
            other = sqlite3.connect(db, timeout=30)
            other.execute("UPDATE treaty_barrier SET status = 'aborted', in_doubt = 0 WHERE transaction_id = ?", (txn,))
            other.commit()
            other.close()

        orders.meddle = another_process_aborts_it
        with self.assertRaises(ConcurrentChange):
            barrier.handle(orders, Request.COMMIT, BranchContext(txn, "b"), mode=Mode.TWO_PHASE)
        self.assertEqual(barrier.record(txn, "b").status.value, "aborted")

    def test_a_connection_in_autocommit_mode_is_refused(self):
        # Each statement would commit by itself: the user's effect could be durable
        # without its record. Only SQLite's autocommit was refused.
        db = str(self.tmp / "autocommit.db")

        class Autocommitting:
            """A DB-API connection that says it is in autocommit mode (as psycopg's)."""

            autocommit = True

            def __init__(self):
                self._inner = sqlite3.connect(db, timeout=30, check_same_thread=False)

            def __getattr__(self, name):
                return getattr(self._inner, name)

        with self.assertRaisesRegex(StoreError, "autocommit mode"):
            DbApiBarrier(Autocommitting, paramstyle="qmark")
        # A table made beforehand: refused at the first operation, with nothing written.
        barrier = DbApiBarrier(lambda: sqlite3.connect(db, timeout=30, check_same_thread=False),
                               paramstyle="qmark")
        barrier.close()
        barrier = DbApiBarrier(Autocommitting, paramstyle="qmark", create_table=False)
        self.addCleanup(barrier.close)
        with self.assertRaisesRegex(StoreError, "autocommit mode"):
            barrier.handle(Orders(), Request.PREPARE, BranchContext(uuid7(), "b"))
        count = sqlite3.connect(db).execute("SELECT COUNT(*) FROM treaty_barrier").fetchone()[0]
        self.assertEqual(count, 0)

    def test_contention_on_the_barriers_own_write_is_no_answer_now(self):
        # A serialization failure or deadlock (PostgreSQL's 40001, 40P01) on the
        # barrier's INSERT was answered INTERNAL, as if the database were broken.
        db = str(self.tmp / "contended.db")
        setup = sqlite3.connect(db)
        setup.execute("CREATE TABLE orders (txn TEXT PRIMARY KEY, state TEXT)")
        setup.commit()
        setup.close()

        class SerializationFailure(Exception):
            pgcode = "40001"

        contended = [True]

        class Cursor:
            def __init__(self, inner):
                self._inner = inner

            def execute(self, sql, params=()):
                if contended[0] and sql.startswith("INSERT INTO treaty_barrier"):
                    raise SerializationFailure("could not serialize access")
                return self._inner.execute(sql, params)

            def __getattr__(self, name):
                return getattr(self._inner, name)

        class Connection:
            def __init__(self):
                self._inner = sqlite3.connect(db, timeout=30, check_same_thread=False)

            def cursor(self):
                return Cursor(self._inner.cursor())

            def __getattr__(self, name):
                return getattr(self._inner, name)

        barrier = DbApiBarrier(Connection, paramstyle="qmark")
        self.addCleanup(barrier.close)
        txn = uuid7()
        with self.assertRaises(ConcurrentChange):
            barrier.handle(Orders(), Request.PREPARE, BranchContext(txn, "b"))
        self.assertIsNone(barrier.failure)
        self.assertIsNone(barrier.record(txn, "b"))
        contended[0] = False
        self.assertEqual(barrier.handle(Orders(), Request.PREPARE, BranchContext(txn, "b")).answer, VoteKind.YES)

    def test_placeholders_for_every_paramstyle(self):
        sql = "SELECT a FROM t WHERE b = ? AND c = ?"
        self.assertEqual(_convert_placeholders(sql, (1, 2), "qmark"), (sql, (1, 2)))
        self.assertEqual(_convert_placeholders(sql, (1, 2), "format")[0], "SELECT a FROM t WHERE b = %s AND c = %s")
        self.assertEqual(_convert_placeholders(sql, (1, 2), "numeric")[0], "SELECT a FROM t WHERE b = :1 AND c = :2")
        self.assertEqual(_convert_placeholders(sql, (1, 2), "named"),
                         ("SELECT a FROM t WHERE b = :p1 AND c = :p2", {"p1": 1, "p2": 2}))
        with self.assertRaisesRegex(ValueError, "paramstyle"):
            DbApiBarrier(lambda: None, paramstyle="dollar", create_table=False)


class ConnectionPoolTest(unittest.TestCase):
    def test_a_wait_that_runs_out_is_busy_not_broken(self):
        # Every connection in use for the whole wait: no answer now (UNAVAILABLE), not a
        # failure of the database (INTERNAL).
        pool = _ConnectionPool(lambda: sqlite3.connect(":memory:", check_same_thread=False), 1)
        held = pool.acquire(1)
        with self.assertRaises(StoreBusy):
            pool.acquire(0.05)
        pool.release(held)
        self.assertIs(pool.acquire(1), held)
        pool.close_all()

    def test_a_discarded_connection_lets_a_waiting_caller_open_another(self):
        # A waiter slept until a connection was given back; one discarded (broken) freed a
        # slot but woke no one, so the waiter sat out its whole wait and failed.
        pool = _ConnectionPool(lambda: sqlite3.connect(":memory:", check_same_thread=False), 1)
        held = pool.acquire(1)
        got = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(30)))
        waiter.start()
        time.sleep(0.2)  # the waiter is (most likely) waiting by now; either way it must get one
        pool.discard(held)
        waiter.join(10)
        self.assertFalse(waiter.is_alive(), "the waiter got a connection within 10 s of the discard")
        self.assertEqual(len(got), 1)
        self.assertIsNot(got[0], held)
        pool.close_all()


if __name__ == "__main__":
    unittest.main()
