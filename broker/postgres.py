"""PostgreSQL batches of the group commit in fewer round trips: BEGIN and statements nobody reads travel together.

On PostgreSQL a batch's time goes to waiting for the server more than to
the server's work: measured under W1 (PostgreSQL + Redis, two broker
processes, every process sharing two cores), one more round trip per batch
cost a fifth of the round trips per second. psycopg spends one on BEGIN
alone, even in its pipeline mode, and Django sends each statement on its own.

A batch whose operations need only the hand-written statements of
``broker.sql`` (``Operation.sql_only``, the same ones that run on the event
loop with SQLite) therefore runs here, on Django's connection of the database
thread while it is in autocommit mode, in a transaction of its own
(:class:`PipelinedConnection`): BEGIN is sent in one pipeline with the first
statement, and statements whose outcome nobody reads (inserting new tasks,
recording deliveries; :meth:`PipelinedCursor.execute_later`) wait to travel
with the next statement that is read, or with the COMMIT. Those last need no
round trip of their own: a batch of submissions costs two (its look-up of
idle workers and its COMMIT) where it cost five.

The guarantee is unchanged: COMMIT is answered before anything of the batch
is announced. An error in a statement sent ahead surfaces at the next one
read, in the wrong place, so a batch that fails here is rolled back whole and
run again operation by operation in Django's transactions, where each
statement answers at once (``dispatch.run_batch``). Inside a savepoint,
statements are never sent ahead: the savepoint must see its own errors.

Off while Django holds a transaction open on the connection (a test's, a
synchronous caller's: the batch then joins it through ``transaction.atomic``),
while Django logs queries (DEBUG), and with ``TURTLEMQ_PG_PIPELINE=0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.db.backends.base.base import BaseDatabaseWrapper

try:
    import psycopg
    from psycopg.pq import TransactionStatus
except ImportError:  # pragma: no cover - a requirement, but SQLite needs none of it
    psycopg = None

Statement = tuple[str, Sequence[Any], dict[str, Any]]


class TransactionAborted(DatabaseError):
    """A statement of the transaction failed and was not undone by a savepoint: COMMIT would roll back."""


class PipelinedCursor:
    """A psycopg cursor whose transaction begins with its first statement, and which can send statements ahead.

    Offers what ``broker.sql.Runner`` uses of a cursor: ``execute``,
    ``fetchall``, ``description``, ``rowcount``.
    """

    def __init__(self, connection: psycopg.Connection) -> None:
        self._connection = connection
        # Server-side binding, as broker.sql's statements run on Django's connection.
        self._cursor = psycopg.Cursor(connection)
        self._ahead: list[Statement] = []  # statements not sent yet, in order
        self.begin_pending = False  # BEGIN goes out with the first statement sent
        self.savepoints = 0

    def execute(self, query: str, params: Sequence[Any] = (), **options: Any) -> PipelinedCursor:
        """Run ``query`` now; whatever waits to be sent (BEGIN, statements sent ahead) goes with it."""
        if self.begin_pending or self._ahead:
            self._send_with((query, params, options))
        else:
            self._cursor.execute(query, params, **options)
        return self

    def execute_later(self, query: str, params: Sequence[Any] = (), **options: Any) -> None:
        """Run ``query`` with the next statement sent (or the COMMIT); nobody reads its outcome."""
        if self.savepoints:
            self.execute(query, params, **options)  # its error must surface inside the savepoint
        else:
            self._ahead.append((query, params, options))

    def commit(self) -> None:
        """COMMIT, with whatever waits to be sent; nothing at all if no statement ran."""
        if self.begin_pending and not self._ahead:
            self.begin_pending = False
            return  # the transaction never began
        if not self.begin_pending and self._connection.info.transaction_status != TransactionStatus.INTRANS:
            raise TransactionAborted("a statement of the batch failed: its transaction is aborted")
        self._send_with(("COMMIT", (), {}))

    def rollback(self) -> None:
        """Forget what waits to be sent and roll back what was."""
        self._ahead.clear()
        self.begin_pending = False
        self.savepoints = 0
        if self._connection.info.transaction_status != TransactionStatus.IDLE:
            self._connection.rollback()

    def _send_with(self, last: Statement) -> None:
        """One pipeline: BEGIN if pending, the statements sent ahead, then ``last``, whose results stay here."""
        ahead, self._ahead = self._ahead, []
        with self._connection.pipeline():
            if self.begin_pending:
                self.begin_pending = False
                psycopg.Cursor(self._connection).execute("BEGIN")
            for query, params, options in ahead:
                psycopg.Cursor(self._connection).execute(query, params, **options)
            query, params, options = last
            self._cursor.execute(query, params, **options)

    def fetchall(self) -> list[tuple]:
        return self._cursor.fetchall()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount


class PipelinedConnection:
    """Django's PostgreSQL connection of this thread, for one batch in a transaction of its own.

    Offers what ``broker.sql`` uses of a Django connection (as
    ``broker.embedded.LoopConnection`` does for SQLite): a cursor, Django's
    execute wrappers, error translation and datetime adaptation.
    """

    vendor = "postgresql"
    queries_logged = False

    def __init__(self, db: BaseDatabaseWrapper) -> None:
        self._db = db
        self.execute_wrappers = db.execute_wrappers
        self.wrap_database_errors = db.wrap_database_errors
        self.ops = db.ops
        self.cursor = PipelinedCursor(db.connection)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN (sent with the first statement) ... COMMIT; rolled back whole on any error."""
        self.cursor.begin_pending = True
        try:
            yield
            with self.wrap_database_errors:
                self.cursor.commit()
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        try:
            with self.wrap_database_errors:
                self.cursor.rollback()
        except DatabaseError:
            # The connection is broken (left mid-pipeline, say): closed now, so that
            # whatever runs next in this thread (the batch's operations one by one,
            # after dispatch.run_batch looked whether it committed) opens another.
            # The error that got us here is raised.
            self._db.close()

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: an error inside it undoes only what it did."""
        self._execute("SAVEPOINT turtlemq")
        self.cursor.savepoints += 1
        try:
            yield
        except BaseException:
            self.cursor.savepoints -= 1
            self._execute("ROLLBACK TO SAVEPOINT turtlemq")
            self._execute("RELEASE SAVEPOINT turtlemq")
            raise
        self.cursor.savepoints -= 1
        self._execute("RELEASE SAVEPOINT turtlemq")

    def _execute(self, sql: str) -> None:
        # As django.db's errors, as for every other statement: a connection lost
        # here is then seen by dispatch.run_batch like one lost anywhere else.
        with self.wrap_database_errors:
            self.cursor.execute(sql)


def pipelined(db: BaseDatabaseWrapper) -> PipelinedConnection | None:
    """``db`` for a batch of its own if it is PostgreSQL with no transaction of Django's open (see the module)."""
    if db.vendor != "postgresql" or psycopg is None or not settings.TURTLEMQ_PG_PIPELINE or db.queries_logged:
        return None
    if not db.get_autocommit() or db.in_atomic_block:  # get_autocommit() connects if need be
        return None
    return PipelinedConnection(db)
