"""The statements every task runs, written in SQL by hand.

Building a query with the ORM cost more than running it: profiled under load,
Django's query construction and compilation were over half of a task's time
in the broker, the SQL itself a fraction. So the few statements on the path of
every task (insert, claim, complete, refill, delivery mark) are plain SQL here,
the same on SQLite and PostgreSQL; everything else in ``broker.dispatch``
speaks the ORM. Each statement keeps the guarantee of the ORM code it
replaced: claims are compare-and-set on the row's state, and on PostgreSQL the
candidate rows are locked with ``FOR UPDATE SKIP LOCKED`` so that concurrent
broker processes take different rows.

``UPDATE ... RETURNING`` (SQLite 3.35 or newer, any PostgreSQL) reads and
changes a row in one statement; a system check (``broker.checks``) reports a
database without it. All functions run inside the caller's transaction.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

from .models import Connection, Task

TASK = Task._meta.db_table
CONNECTION = Connection._meta.db_table
QUEUED, ASSIGNED, DONE = Task.State.QUEUED.value, Task.State.ASSIGNED.value, Task.State.DONE.value
UNFINISHED = tuple(state.value for state in Task.UNFINISHED_STATES)
WORKER = Connection.Role.WORKER.value

TaskRow = tuple[int, str, float | None]  # id, data, timeout


def _vendor() -> str:
    """The database's vendor ("sqlite", "postgresql"), known from its engine without a thread-local look-up."""
    return _vendor_of(settings.DATABASES[DEFAULT_DB_ALIAS]["ENGINE"])


@functools.cache
def _vendor_of(engine: str) -> str:
    return connections[DEFAULT_DB_ALIAS].vendor


@functools.lru_cache(maxsize=64)
def _adapted(value: datetime) -> Any:
    return connections[DEFAULT_DB_ALIAS].ops.adapt_datetimefield_value(value)


def db_time(value: datetime | None) -> Any:
    """A datetime as the database driver takes it (SQLite stores naive UTC text).

    Cached: a batch passes the same ``now`` to most of its statements, and the
    conversion (time zone arithmetic, formatting) cost more than the SQL.
    """
    return None if value is None else _adapted(value)


def _skip_locked() -> str:
    return " FOR UPDATE SKIP LOCKED" if _vendor() == "postgresql" else ""


def _placeholders(count: int) -> str:
    return ", ".join(["%s"] * count)


@functools.lru_cache(maxsize=256)
def _native(vendor: str, sql: str) -> str:
    """``sql`` in the driver's own placeholder style: sqlite3 takes ``?``, psycopg ``%s``."""
    return sql.replace("%s", "?") if vendor == "sqlite" else sql


def _run(sql: str, params: Sequence[Any]) -> Any:
    """Execute on the driver's own cursor; return the cursor.

    Django's cursor wrapper (and, on SQLite, its rewriting of every statement's
    placeholders) cost as much as the statement, so the hot path skips it. It
    still honours what instruments Django's cursors: execute wrappers (such as
    the statement counter of ``tests/test_hot_path.py``) wrap this call too,
    and while queries are being logged (DEBUG, ``CaptureQueriesContext``)
    Django's own logging cursor runs the statement. Must run in a transaction,
    which guarantees an open connection.
    """
    db = connections[DEFAULT_DB_ALIAS]  # once: each use of django.db.connection looks it up again
    if db.queries_logged:
        cursor = db.cursor()
        cursor.execute(sql, params)
        return cursor
    native = _native(db.vendor, sql)

    def execute(sql: str, params: Sequence[Any], many: bool, context: dict[str, Any]) -> Any:
        return context["cursor"].execute(native, params)

    for wrapper in reversed(db.execute_wrappers):
        execute = functools.partial(wrapper, execute)
    cursor = db.connection.cursor()
    with db.wrap_database_errors:
        execute(sql, params, False, {"connection": db, "cursor": cursor})
    return cursor


def fetch_rows(sql: str, params: Sequence[Any]) -> list[tuple]:
    """Run one hand-written statement (``%s`` placeholders); the rows it returned, if any."""
    cursor = _run(sql, params)
    with connections[DEFAULT_DB_ALIAS].wrap_database_errors:
        return cursor.fetchall() if cursor.description else []


def rowcount(sql: str, params: Sequence[Any]) -> int:
    """Run one hand-written statement; how many rows it changed."""
    return _run(sql, params).rowcount


def insert_task(
    message_id: str, client_id: str | None, reply_channel: str, data: str, timeout: float | None, max_attempts: int,
    now: datetime,
) -> None:  # fmt: skip
    """Store a new QUEUED task (the columns and defaults of ``Task``)."""
    rowcount(
        f"INSERT INTO {TASK} (message_id, client_id, reply_channel, data, state, attempts, failures, max_attempts,"
        " timeout, last_error, created_at) VALUES (%s, %s, %s, %s, %s, 0, 0, %s, %s, '', %s)",
        (message_id, client_id, reply_channel, data, QUEUED, max_attempts, timeout, db_time(now)),
    )


def client_task_counts(client_id: str, message_id: str) -> tuple[int, int]:
    """For one ``clientId``: tasks with this ``messageId`` (0 or 1), and unfinished tasks.

    One statement, read from the indexes on (client_id, message_id) and (client_id, state).
    """
    rows = fetch_rows(
        f"SELECT COALESCE(SUM(CASE WHEN message_id = %s THEN 1 ELSE 0 END), 0),"
        f" COALESCE(SUM(CASE WHEN state IN (%s, %s) THEN 1 ELSE 0 END), 0)"
        f" FROM {TASK} WHERE client_id = %s AND (message_id = %s OR state IN (%s, %s))",
        (message_id, *UNFINISHED, client_id, message_id, *UNFINISHED),
    )
    repeat, unfinished = rows[0]
    return int(repeat), int(unfinished)


def complete_held(worker_id: int, task_id: int, result: str, now: datetime) -> tuple[str, str] | None:
    """Mark DONE the task ``worker_id`` holds under ``task_id``; its (reply_channel, message_id), or None.

    Compare-and-set: a task that is not ASSIGNED to this worker (finished,
    taken back, cancelled, someone else's) is left alone.
    """
    rows = fetch_rows(
        f"UPDATE {TASK} SET state = %s, result = %s, finished_at = %s, lease_expires_at = NULL"
        f" WHERE id = %s AND worker_id = %s AND state = %s RETURNING reply_channel, message_id",
        (DONE, result, db_time(now), task_id, worker_id, ASSIGNED),
    )
    return rows[0] if rows else None


def free_workers(limit: int) -> list[tuple[int, str, int]]:
    """Live workers with a free slot, longest idle first: (id, channel_name, free slots)."""
    return [
        (pk, channel, concurrency - in_flight)
        for pk, channel, concurrency, in_flight in fetch_rows(
            f"SELECT id, channel_name, concurrency, in_flight FROM {CONNECTION}"
            f" WHERE role = %s AND disconnected_at IS NULL AND in_flight < concurrency"
            f" ORDER BY ready_at, id LIMIT %s{_skip_locked()}",
            (WORKER, limit),
        )
    ]


def due_tasks(now: datetime, limit: int) -> list[TaskRow]:
    """The oldest QUEUED tasks whose retry backoff (if any) has passed: (id, data, timeout)."""
    return fetch_rows(
        f"SELECT id, data, timeout FROM {TASK} WHERE state = %s AND (not_before IS NULL OR not_before <= %s)"
        f" ORDER BY id LIMIT %s{_skip_locked()}",
        (QUEUED, db_time(now), limit),
    )


def claim_due(worker_id: int, count: int, lease_expires_at: datetime | None, now: datetime) -> list[TaskRow]:
    """Hand a worker whose slots are already counted the ``count`` oldest due tasks, in one statement.

    Returns (id, data, timeout) of those it got, oldest first; fewer than
    ``count`` means no other due task is free to take. Tasks with a timeout
    of their own need their lease set afterwards (:func:`set_lease`).
    """
    # The candidates in a MATERIALIZED CTE: computed once. As a plain subquery
    # PostgreSQL may run it again for each row, and with SKIP LOCKED each run
    # can find other rows, claiming more than ``count`` tasks.
    rows = fetch_rows(
        f"WITH due AS MATERIALIZED (SELECT id FROM {TASK} WHERE state = %s"
        f" AND (not_before IS NULL OR not_before <= %s) ORDER BY id LIMIT %s"
        f"{_skip_locked()})"
        f" UPDATE {TASK} SET state = %s, worker_id = %s, assigned_at = %s, attempts = attempts + 1,"
        f" lease_expires_at = %s WHERE state = %s AND id IN (SELECT id FROM due) RETURNING id, data, timeout",
        (QUEUED, db_time(now), count, ASSIGNED, worker_id, db_time(now), db_time(lease_expires_at), QUEUED),
    )
    return sorted(rows)


def set_lease(task_id: int, lease_expires_at: datetime | None) -> None:
    rowcount(f"UPDATE {TASK} SET lease_expires_at = %s WHERE id = %s", (db_time(lease_expires_at), task_id))


def take_slots(worker_id: int, count: int, now: datetime) -> bool:
    """Compare-and-set: count ``count`` more tasks on a live worker if its concurrency allows."""
    return bool(
        rowcount(
            f"UPDATE {CONNECTION} SET in_flight = in_flight + %s, ready_at = %s"
            f" WHERE id = %s AND disconnected_at IS NULL AND in_flight + %s <= concurrency",
            (count, db_time(now), worker_id, count),
        )
    )


def give_back_slots(worker_id: int, count: int, now: datetime) -> None:
    """The worker holds ``count`` fewer tasks (never below zero); it is idle from ``now``."""
    rowcount(
        f"UPDATE {CONNECTION} SET in_flight = CASE WHEN in_flight > %s THEN in_flight - %s ELSE 0 END, ready_at = %s"
        f" WHERE id = %s AND in_flight > 0",
        (count, count, db_time(now), worker_id),
    )


def claim_tasks(task_ids: list[int], worker_id: int, lease_expires_at: datetime | None, now: datetime) -> set[int]:
    """Compare-and-set: hand those of ``task_ids`` still QUEUED to the worker; the ids it got."""
    rows = fetch_rows(
        f"UPDATE {TASK} SET state = %s, worker_id = %s, assigned_at = %s, attempts = attempts + 1,"
        f" lease_expires_at = %s WHERE id IN ({_placeholders(len(task_ids))}) AND state = %s RETURNING id",
        (ASSIGNED, worker_id, db_time(now), db_time(lease_expires_at), *task_ids, QUEUED),
    )
    return {pk for (pk,) in rows}


def mark_delivered(task_ids: list[int], now: datetime) -> None:
    """Record that the outcomes of these tasks were sent to their clients (the first time counts)."""
    rowcount(
        f"UPDATE {TASK} SET delivered_at = %s WHERE id IN ({_placeholders(len(task_ids))}) AND delivered_at IS NULL",
        (db_time(now), *task_ids),
    )
