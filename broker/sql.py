"""The statements every task runs, written in SQL by hand.

Building a query with the ORM cost more than running it: profiled under load,
Django's query construction and compilation were over half of a task's time
in the broker, the SQL itself a fraction. So the few statements on the path of
every task (insert, claim, complete, refill, delivery mark) are plain SQL here,
the same on SQLite and PostgreSQL but for two that each database does best its
own way (completing and claiming several tasks); everything else in ``broker.dispatch``
speaks the ORM. Each statement keeps the guarantee of the ORM code it
replaced: claims are compare-and-set on the row's state, and on PostgreSQL the
candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` so that concurrent
broker processes take different rows.

``UPDATE ... RETURNING`` (SQLite 3.35 or newer, any PostgreSQL) reads and
changes a row in one statement; a system check (``broker.checks``) reports a
database without it.

The statements are methods of :class:`Statements`, made for one transaction
(a batch of ``broker.dispatch``): it looks up the database connection, its
driver cursor and its instrumentation once, where a statement run through
Django's cursor would do so for every statement, at a cost as high as the
statement's own.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections, transaction

try:
    import psycopg
except ImportError:  # pragma: no cover - a requirement, but SQLite needs none of it
    psycopg = None

from .models import Connection, Task

if TYPE_CHECKING:
    from .embedded import LoopConnection
    from .postgres import PipelinedConnection

    OwnConnection = LoopConnection | PipelinedConnection

TASK = Task._meta.db_table
CONNECTION = Connection._meta.db_table
QUEUED, ASSIGNED, DONE = Task.State.QUEUED.value, Task.State.ASSIGNED.value, Task.State.DONE.value
UNFINISHED = tuple(state.value for state in Task.UNFINISHED_STATES)
WORKER = Connection.Role.WORKER.value

TaskRow = tuple[int, str, float | None]  # id, data, timeout
# message_id, client_id, reply_channel, data, timeout, max_attempts
NewTask = tuple[str, str | None, str, str, float | None, int]

SKIP_LOCKED = " FOR UPDATE SKIP LOCKED"
# Ids per ``IN (...)`` list, rows per VALUES list: far below any database's limit on parameters.
IDS_PER_STATEMENT = 500
ROWS_PER_STATEMENT = 100


@functools.lru_cache(maxsize=512)
def _sqlite_form(sql: str) -> str:
    """``sql`` in sqlite3's placeholder style (``?``; psycopg takes ``%s`` as written)."""
    return sql.replace("%s", "?")


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


class Runner:
    """Runs hand-written statements (``%s`` placeholders) on a connection's driver cursor.

    The connection is Django's default one, or one that runs transactions of
    its own: an event loop's SQLite connection (``broker.embedded``), Django's
    PostgreSQL connection in fewer round trips (``broker.postgres``). Made
    inside a transaction (which guarantees an open connection), used for that
    transaction only. It still honours what instruments Django's cursors:
    execute wrappers (such as the statement counter of
    ``tests/test_hot_path.py``) wrap each statement, and while queries are
    being logged (DEBUG, ``CaptureQueriesContext``) Django's own logging cursor
    runs them.
    """

    def __init__(self, own_connection: OwnConnection | None = None) -> None:
        db: Any = own_connection or connections[DEFAULT_DB_ALIAS]
        self._db = db
        self._own_connection = own_connection
        self.sqlite = db.vendor == "sqlite"
        self.on_loop = own_connection is not None and self.sqlite  # an event loop's SQLite connection
        # On PostgreSQL, rows that another broker process has locked are skipped, not waited for.
        self.skip_locked = "" if self.sqlite else SKIP_LOCKED
        self._wrappers = tuple(reversed(db.execute_wrappers))
        if own_connection is not None:
            self._cursor = own_connection.cursor
        elif db.queries_logged:
            self._cursor = None
        elif self.sqlite:
            self._cursor = db.connection.cursor()
        else:
            # Server-side binding (parameters apart from the statement) rather
            # than the client-side binding Django's cursors use: a quarter less
            # client CPU and a third less time per statement, measured.
            self._cursor = psycopg.Cursor(db.connection)
        self._errors = db.wrap_database_errors
        self._times: dict[datetime, Any] = {}

    def savepoint(self) -> contextlib.AbstractContextManager[None]:
        """A nested transaction: an error inside it undoes only what it did (on PostgreSQL, not the batch)."""
        if self._own_connection is not None:
            return self._own_connection.savepoint()
        return transaction.atomic()

    def time(self, value: datetime | None) -> Any:
        """A datetime as the database driver takes it (SQLite stores naive UTC text).

        Remembered: a batch passes the same few datetimes (its ``now``, the
        default lease) to most of its statements, and the conversion (time
        zone arithmetic, formatting) cost more than the SQL.
        """
        if value is None:
            return None
        adapted = self._times.get(value)
        if adapted is None:
            adapted = self._times[value] = self._db.ops.adapt_datetimefield_value(value)
        return adapted

    def _execute(self, sql: str, params: Sequence[Any], planned_each_time: bool = False, later: bool = False) -> Any:
        cursor = self._cursor
        if cursor is None:
            cursor = self._db.cursor()
            cursor.execute(sql, params)
            return cursor
        native = _sqlite_form(sql) if self.sqlite else sql
        options = _NEVER_PREPARED if planned_each_time and not self.sqlite else _AS_CONFIGURED
        # Only broker.postgres's cursor sends statements ahead; any other runs them now.
        run = getattr(cursor, "execute_later", cursor.execute) if later else cursor.execute
        with self._errors:
            if not self._wrappers:
                run(native, params, **options)
                return cursor

            def execute(sql: str, params: Sequence[Any], many: bool, context: dict[str, Any]) -> Any:
                return run(native, params, **options)

            for wrapper in self._wrappers:
                execute = functools.partial(wrapper, execute)
            execute(sql, params, False, {"connection": self._db, "cursor": cursor})
            return cursor

    def rows(self, sql: str, params: Sequence[Any], planned_each_time: bool = False) -> list[tuple]:
        """Run one statement; the rows it returned, if any.

        ``planned_each_time``: never a prepared statement on PostgreSQL (see ``_NEVER_PREPARED``).
        """
        cursor = self._execute(sql, params, planned_each_time)
        with self._errors:
            return cursor.fetchall() if cursor.description else []

    def count(self, sql: str, params: Sequence[Any]) -> int:
        """Run one statement; how many rows it changed."""
        return self._execute(sql, params).rowcount

    def run_later(self, sql: str, params: Sequence[Any]) -> None:
        """Run one statement whose outcome nobody reads: it may travel with the next one (``broker.postgres``)."""
        self._execute(sql, params, later=True)


# Prepared statements (TURTLEMQ_PG_PREPARE_THRESHOLD) end up with a generic
# plan, made once per connection without the parameters' values and with the
# table's size at that moment. For "the oldest queued tasks" that is a trap:
# made while the table was empty (a new deployment), the claim's plan read
# the whole queue for every task it took (measured: a burst of 5,000 tasks on
# PostgreSQL ran at 240 tasks/s instead of 600; with statistics of a full
# queue, it hash-joined a scan of the table instead). Those statements are
# planned each time, with their values and the table as it is; the parsing and
# planning cost PostgreSQL about 0.5 ms per batch (measured under W1).
_NEVER_PREPARED: dict[str, Any] = {"prepare": False}
_AS_CONFIGURED: dict[str, Any] = {}

# Statements for several rows at once have ``{rows}`` where the VALUES rows go
# (see _with_rows); VALUES lists name their columns column1, column2, ... on
# SQLite and PostgreSQL alike.
_INSERT_TASKS = (
    f"INSERT INTO {TASK} (message_id, client_id, reply_channel, data, state, attempts, failures, max_attempts,"
    " timeout, last_error, created_at) VALUES {rows}"
)
_INSERT_ROW = "(%s, %s, %s, %s, %s, 0, 0, %s, %s, '', %s)"
_CLIENT_TASK_COUNTS = (
    f"SELECT COALESCE(SUM(CASE WHEN message_id = %s THEN 1 ELSE 0 END), 0),"
    f" COALESCE(SUM(CASE WHEN state IN (%s, %s) THEN 1 ELSE 0 END), 0)"
    f" FROM {TASK} WHERE client_id = %s AND (message_id = %s OR state IN (%s, %s))"
)
_COMPLETE_HELD = (
    f"UPDATE {TASK} SET state = %s, result = held.column3, finished_at = %s, lease_expires_at = NULL"
    " FROM (VALUES {rows}) AS held"
    f" WHERE {TASK}.id = held.column1 AND {TASK}.worker_id = held.column2 AND {TASK}.state = %s"
    f" RETURNING {TASK}.id, {TASK}.worker_id, {TASK}.reply_channel, {TASK}.message_id"
)
_COMPLETE_ONE = (
    f"UPDATE {TASK} SET state = %s, result = %s, finished_at = %s, lease_expires_at = NULL"
    f" WHERE id = %s AND worker_id = %s AND state = %s RETURNING id, worker_id, reply_channel, message_id"
)
_FREE_WORKERS = (
    f"SELECT id, channel_name, concurrency, in_flight FROM {CONNECTION}"
    f" WHERE role = %s AND disconnected_at IS NULL AND in_flight < concurrency"
    f" ORDER BY ready_at, id LIMIT %s"
)
# The queue look-ups name the state as a literal, not a parameter, so that
# PostgreSQL can match the partial index of queued tasks (``task_queued_idx``,
# see ``Task.Meta``) in any plan, generic or not.
IS_QUEUED = f"state = '{QUEUED}'"
_DUE_TASKS = (
    f"SELECT id, data, timeout FROM {TASK} WHERE {IS_QUEUED} AND (not_before IS NULL OR not_before <= %s)"
    f" ORDER BY id LIMIT %s"
)
# The candidates in a MATERIALIZED CTE: computed once. As a plain subquery
# PostgreSQL may run it again for each row, and with SKIP LOCKED each run can
# find other rows, claiming more than asked for. PostgreSQL refuses FOR UPDATE
# beside a window function, hence the numbering in a CTE of its own. Each
# worker takes the tasks numbered within its slots (lo to hi).
_CLAIM_DUE_FOR = (
    f"WITH due AS MATERIALIZED (SELECT id FROM {TASK} WHERE {IS_QUEUED}"
    " AND (not_before IS NULL OR not_before <= %s) ORDER BY id LIMIT %s{skip_locked}),"
    " numbered AS (SELECT id, ROW_NUMBER() OVER (ORDER BY id) AS n FROM due),"
    " slots (worker_id, lo, hi) AS (VALUES {rows})"
    f" UPDATE {TASK} SET state = %s, worker_id = slots.worker_id, assigned_at = %s, attempts = attempts + 1,"
    " lease_expires_at = %s FROM numbered JOIN slots ON numbered.n BETWEEN slots.lo AND slots.hi"
    f" WHERE {TASK}.id = numbered.id AND {TASK}.state = %s"
    f" RETURNING {TASK}.id, {TASK}.worker_id, {TASK}.data, {TASK}.timeout"
)
_HELD = f"SELECT id, data FROM {TASK} WHERE worker_id = %s AND state = %s ORDER BY id"
_TASK_OF_CLIENT = f"SELECT id, state, result FROM {TASK} WHERE client_id = %s AND message_id = %s"
_SET_LEASE = f"UPDATE {TASK} SET lease_expires_at = %s WHERE id = %s"
_TAKE_SLOTS = (
    f"UPDATE {CONNECTION} SET in_flight = in_flight + %s, ready_at = %s"
    f" WHERE id = %s AND disconnected_at IS NULL AND in_flight + %s <= concurrency"
)
_GIVE_BACK_SLOTS = (
    f"UPDATE {CONNECTION} SET in_flight = CASE WHEN in_flight > %s THEN in_flight - %s ELSE 0 END, ready_at = %s"
    f" WHERE id = %s AND in_flight > 0"
)


# The statements that lock candidate rows, without and with SKIP LOCKED.
_LOCKING = {
    skip_locked: (
        _CLAIM_DUE_FOR.replace("{skip_locked}", skip_locked),
        _FREE_WORKERS + skip_locked,
        _DUE_TASKS + skip_locked,
    )
    for skip_locked in ("", SKIP_LOCKED)
}


@functools.lru_cache(maxsize=256)
def _with_rows(statement: str, row: str, count: int) -> str:
    """``statement`` with ``{rows}`` replaced by ``count`` copies of the placeholders of ``row``."""
    return statement.replace("{rows}", ", ".join([row] * count))


class Statements(Runner):
    """The statements of the task path, for one transaction."""

    def __init__(self, own_connection: OwnConnection | None = None) -> None:
        super().__init__(own_connection)
        self._claim_due_for, self._free_workers, self._due_tasks = _LOCKING[self.skip_locked]

    def insert_tasks(self, tasks: list[NewTask], now: datetime) -> None:
        """Store new QUEUED tasks (the columns and defaults of ``Task``), in order: one statement per hundred."""
        at = self.time(now)
        for start in range(0, len(tasks), ROWS_PER_STATEMENT):
            chunk = tasks[start : start + ROWS_PER_STATEMENT]
            params: list[Any] = []
            for message_id, client_id, reply_channel, data, timeout, max_attempts in chunk:
                params += (message_id, client_id, reply_channel, data, QUEUED, max_attempts, timeout, at)
            self.run_later(_with_rows(_INSERT_TASKS, _INSERT_ROW, len(chunk)), params)

    def client_task_counts(self, client_id: str, message_id: str) -> tuple[int, int]:
        """For one ``clientId``: tasks with this ``messageId`` (0 or 1), and unfinished tasks.

        One statement, read from the indexes on (client_id, message_id) and (client_id, state).
        """
        rows = self.rows(_CLIENT_TASK_COUNTS, (message_id, *UNFINISHED, client_id, message_id, *UNFINISHED))
        repeat, unfinished = rows[0]
        return int(repeat), int(unfinished)

    def complete_held_many(
        self, completions: list[tuple[int, int, str]], now: datetime
    ) -> dict[tuple[int, int], tuple[str, str]]:
        """Mark DONE each task (task id, worker id, result) that its worker holds: one statement per hundred.

        Compare-and-set: a task that is not ASSIGNED to that worker (finished,
        taken back, cancelled, someone else's) is left alone. Returns
        (reply_channel, message_id) by (task id, worker id) of those completed.
        """
        done: dict[tuple[int, int], tuple[str, str]] = {}
        at = self.time(now)
        if self.sqlite:
            # One statement per task: SQLite's UPDATE ... FROM builds and scans a
            # join of its own, which cost twice as much as a search by primary
            # key (measured), and no round trip is saved on a local file.
            for task_id, worker_id, result in completions:
                for pk, worker, reply_channel, message_id in self.rows(
                    _COMPLETE_ONE, (DONE, result, at, task_id, worker_id, ASSIGNED)
                ):
                    done[(pk, worker)] = (reply_channel, message_id)
            return done
        for start in range(0, len(completions), ROWS_PER_STATEMENT):
            chunk = completions[start : start + ROWS_PER_STATEMENT]
            params: list[Any] = [DONE, at]
            for completion in chunk:
                params += completion
            params.append(ASSIGNED)
            statement = _with_rows(_COMPLETE_HELD, "(%s, %s, %s)", len(chunk))
            for pk, worker_id, reply_channel, message_id in self.rows(statement, params):
                done[(pk, worker_id)] = (reply_channel, message_id)
        return done

    def held(self, worker_id: int) -> list[tuple[int, str]]:
        """(id, data) of the tasks a worker holds, oldest first."""
        return self.rows(_HELD, (worker_id, ASSIGNED))

    def task_of_client(self, client_id: str, message_id: str) -> tuple[int, str, str | None] | None:
        """(id, state, result) of the task a ``clientId`` submitted under ``messageId``, if any."""
        rows = self.rows(_TASK_OF_CLIENT, (client_id, message_id))
        return rows[0] if rows else None

    def free_workers(self, limit: int) -> list[tuple[int, str, int]]:
        """Live workers with a free slot, longest idle first: (id, channel_name, free slots)."""
        return [
            (pk, channel, concurrency - in_flight)
            for pk, channel, concurrency, in_flight in self.rows(self._free_workers, (WORKER, limit))
        ]

    def due_tasks(self, now: datetime, limit: int) -> list[TaskRow]:
        """The oldest QUEUED tasks whose retry backoff (if any) has passed: (id, data, timeout)."""
        return self.rows(self._due_tasks, (self.time(now), limit), planned_each_time=True)

    def claim_due_for(
        self, slots: list[tuple[int, int]], lease_expires_at: datetime | None, now: datetime
    ) -> dict[int, list[TaskRow]]:
        """Deal the oldest due tasks to workers whose slots are already counted: (worker id, slots), in order.

        One statement on PostgreSQL. Returns each worker's (id, data,
        timeout), oldest first; fewer than its slots means no other due task
        is free to take. Tasks with a timeout of their own need their lease
        set afterwards (:meth:`set_lease`).
        """
        if self.sqlite:
            return self._claim_due_one_writer(slots, lease_expires_at, now)
        at = self.time(now)
        ranges: list[Any] = []
        hi = 0
        for worker_id, count in slots:
            ranges += (worker_id, hi + 1, hi + count)
            hi += count
        statement = _with_rows(self._claim_due_for, "(%s, %s, %s)", len(slots))
        params = (at, hi, *ranges, ASSIGNED, at, self.time(lease_expires_at), QUEUED)
        rows = self.rows(statement, params, planned_each_time=True)
        claimed: dict[int, list[TaskRow]] = {}
        for pk, worker_id, data, timeout in sorted(rows):
            claimed.setdefault(worker_id, []).append((pk, data, timeout))
        return claimed

    def _claim_due_one_writer(
        self, slots: list[tuple[int, int]], lease_expires_at: datetime | None, now: datetime
    ) -> dict[int, list[TaskRow]]:
        """:meth:`claim_due_for` where one connection writes at a time (SQLite): read the due tasks, then take them.

        Nobody else can take them in between. Measured, the look-up and one
        update by primary key per worker cost half of the one statement, whose
        numbering SQLite sorts in a temporary B-tree.
        """
        due = self.due_tasks(now, sum(count for _, count in slots))
        claimed: dict[int, list[TaskRow]] = {}
        start = 0
        for worker_id, count in slots:
            dealt, start = due[start : start + count], start + count
            if dealt:
                taken = self.claim_tasks([pk for pk, _, _ in dealt], worker_id, lease_expires_at, now)
                claimed[worker_id] = [task for task in dealt if task[0] in taken]
        return claimed

    def set_lease(self, task_id: int, lease_expires_at: datetime | None) -> None:
        self.run_later(_SET_LEASE, (self.time(lease_expires_at), task_id))

    def take_slots(self, worker_id: int, count: int, now: datetime) -> bool:
        """Compare-and-set: count ``count`` more tasks on a live worker if its concurrency allows."""
        return bool(self.count(_TAKE_SLOTS, (count, self.time(now), worker_id, count)))

    def give_back_slots(self, worker_id: int, count: int, now: datetime) -> None:
        """The worker holds ``count`` fewer tasks (never below zero); it is idle from ``now``."""
        self.run_later(_GIVE_BACK_SLOTS, (count, count, self.time(now), worker_id))

    def claim_tasks(
        self, task_ids: list[int], worker_id: int, lease_expires_at: datetime | None, now: datetime
    ) -> set[int]:
        """Compare-and-set: hand those of ``task_ids`` still QUEUED to the worker; the ids it got."""
        at = self.time(now)
        rows = self.rows(
            f"UPDATE {TASK} SET state = %s, worker_id = %s, assigned_at = %s, attempts = attempts + 1,"
            f" lease_expires_at = %s WHERE id IN ({_placeholders(len(task_ids))}) AND state = %s RETURNING id",
            (ASSIGNED, worker_id, at, self.time(lease_expires_at), *task_ids, QUEUED),
        )
        return {pk for (pk,) in rows}

    def mark_delivered(self, task_ids: list[int], now: datetime) -> None:
        """Record that the outcomes of these tasks were sent to their clients (the first time counts)."""
        at = self.time(now)
        for start in range(0, len(task_ids), IDS_PER_STATEMENT):
            chunk = task_ids[start : start + IDS_PER_STATEMENT]
            self.run_later(
                f"UPDATE {TASK} SET delivered_at = %s"
                f" WHERE id IN ({_placeholders(len(chunk))}) AND delivered_at IS NULL",
                (at, *chunk),
            )
