"""The embedded database on the event loop: SQLite batches of the group commit without a thread hop.

With SQLite (the embedded default) a batch of task operations is a few
statements on a local file that take less time than handing them to another
thread and back. Worse, a batch run in Django's database thread competes for
the GIL with the event loop: every SQLite call releases the GIL and must win it
back from a busy loop. So each event loop keeps one SQLite connection of its
own (:class:`LoopConnection`) and runs the batches whose operations need
nothing but the hand-written statements of ``broker.sql`` right there, in one
``BEGIN IMMEDIATE`` ... ``COMMIT``. The guarantee is unchanged: the batch is
committed before anything of it is announced.

Django's connections (the database thread: registrations, housekeeping,
topics, the admin) write to the same file. The loop never waits for them:
its connection has no busy timeout, so when another connection holds the
write lock, ``BEGIN IMMEDIATE`` fails at once with :class:`Busy` and the batch
takes the database thread instead, which waits its turn. A batch that fails
for any other reason is rolled back whole and goes the same way, where
Django's error handling (each operation again on its own) applies.

Checkpoints (copying the write-ahead log back into the database file, with
two fsyncs) would stall the loop for milliseconds: its connection never makes
one itself. The group commit asks the database thread for one every
``CHECKPOINT_EVERY`` batches instead (:func:`checkpoint`); it runs beside the
loop with the GIL released, copying most of the log while the loop's batches
go on, and holding the write lock only for the rest (the loop's batches take
the thread for that moment).

Off for an in-memory database (tests), and with ``TURTLEMQ_SQLITE_ON_LOOP=0``.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.signals import connection_created
from django.db.utils import DatabaseErrorWrapper

logger = logging.getLogger("turtlemq.broker")


class Busy(Exception):
    """Another connection holds SQLite's write lock: the batch must wait for it elsewhere."""


class LoopConnection:
    """One event loop's own SQLite connection, in autocommit mode between batches.

    It offers what ``broker.sql`` uses of a Django connection: a driver
    cursor, execute wrappers (receivers of Django's ``connection_created``
    signal may add theirs, as for any connection), error translation into
    ``django.db`` exceptions, and datetime adaptation.
    """

    vendor = "sqlite"
    Database = sqlite3.dbapi2  # the PEP 249 module, for DatabaseErrorWrapper
    queries_logged = False

    def __init__(self, path: str) -> None:
        self.errors_occurred = False
        self.execute_wrappers: list[Callable[..., Any]] = []
        self.wrap_database_errors = DatabaseErrorWrapper(self)
        self.ops = connections[DEFAULT_DB_ALIAS].ops  # adapt_datetimefield_value: pure conversions
        # timeout=0: never wait for the write lock on the event loop (see Busy).
        self.connection = sqlite3.connect(path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            # The first connection to open a WAL database after the last one closed
            # recovers its log under an exclusive lock: Busy for anyone else meanwhile.
            with self._busy_or_database_error():
                self.connection.execute("PRAGMA journal_mode=WAL")
                self.connection.execute("PRAGMA synchronous=NORMAL")
                self.connection.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
        except BaseException:
            self.connection.close()
            raise
        self.cursor = self.connection.cursor()
        connection_created.send(sender=type(self), connection=self)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; :class:`Busy` (having changed nothing) when the file is locked."""
        with self._busy_or_database_error():
            self.cursor.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.rollback()
            raise
        with self.wrap_database_errors:
            try:
                self.cursor.execute("COMMIT")
            except BaseException:
                self.connection.rollback()
                raise

    @contextlib.contextmanager
    def _busy_or_database_error(self) -> Iterator[None]:
        """Translate SQLite's "locked" into :class:`Busy`, any other error into ``django.db``'s."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise Busy(str(exc)) from exc
            with self.wrap_database_errors:
                raise
        except sqlite3.Error:
            with self.wrap_database_errors:
                raise

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested transaction: an error inside it undoes only what it did."""
        self.cursor.execute("SAVEPOINT turtlemq")
        try:
            yield
        except BaseException:
            self.cursor.execute("ROLLBACK TO SAVEPOINT turtlemq")
            self.cursor.execute("RELEASE SAVEPOINT turtlemq")
            raise
        self.cursor.execute("RELEASE SAVEPOINT turtlemq")

    def close(self) -> None:
        self.connection.close()


# Batches on the loop between two checkpoints: a few thousand pages of log.
CHECKPOINT_EVERY = 500


def checkpoint() -> tuple[int, int, int]:
    """Copy the write-ahead log into the database file and start it afresh; for the database thread.

    In two steps. PASSIVE copies what the log holds without taking the write
    lock: the loop's batches go on committing meanwhile. RESTART then waits
    (with the connection's busy timeout) for the writer of the moment to
    finish and holds the write lock while it copies the little written since,
    so that the next transaction starts the log from the beginning: under a
    steady stream of batches a passive checkpoint alone would never catch up,
    and the log would grow without end. RESTART alone held the lock for the
    whole copy and both fsyncs, and every batch meanwhile waited for it
    (measured, W1: p99 17-20 ms with it alone, 8-10 ms in two steps). Returns
    SQLite's answer to RESTART: (busy, frames in the log, frames copied).
    """
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
        cursor.fetchone()
        cursor.execute("PRAGMA wal_checkpoint(RESTART)")
        busy, log_frames, copied = cursor.fetchone()
    if busy:
        logger.warning("could not checkpoint the database: another connection kept it busy")
    return busy, log_frames, copied


def wanted() -> bool:
    """Whether task batches should run on the event loop: a SQLite file, and the setting on."""
    if not settings.TURTLEMQ_SQLITE_ON_LOOP:
        return False
    db = connections[DEFAULT_DB_ALIAS]
    return db.vendor == "sqlite" and not db.is_in_memory_db()


def open_for_loop() -> LoopConnection:
    """A connection of the running event loop's own to the default database (see :func:`wanted`)."""
    return LoopConnection(str(connections[DEFAULT_DB_ALIAS].settings_dict["NAME"]))
