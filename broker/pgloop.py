"""PostgreSQL batches on the event loop: the common batch in one round trip, with no thread hop.

Measured under W1 (PostgreSQL + Redis, two broker processes, every process
sharing two cores), a batch in the database thread cost the broker about
0.3 ms of CPU and PostgreSQL as much again, whatever it held: the hop to the
thread and back, two to three round trips (each one a wake-up of the thread
and of a server process), and the planning of statements that had to be
planned each time (about 0.5 ms for the claim). Batches of one or two
operations made that the price of a task.

So each event loop keeps a psycopg connection of its own
(:class:`LoopConnection`, in autocommit mode), and a batch that
``dispatch.script_batch`` could write out whole (submissions without a
``clientId``, completions, delivery marks: nearly every batch under load)
goes there as one transaction of the statements below, sent at once
(:meth:`LoopConnection._transaction`): one round trip, whose answer comes
once the transaction is committed; nothing is announced before, as ever. What
``dispatch.Batch`` decides between its reads, these statements decide
themselves, in the same order:

* :data:`NEW_TASKS` stores the new tasks, from arrays, ids in order.
* :data:`DISPATCH` stores the results of the tasks their workers hold (a
  compare-and-set, as ``Batch._complete``), then deals the oldest due tasks:
  first to the live workers with a free slot (if tasks were submitted),
  longest idle first, one slot per worker at a time, as ``dispatch._assign``;
  then to the workers that just freed slots, in the order they freed up, as
  ``Batch._refill``. Rows another broker process has locked are skipped,
  each claim is a compare-and-set on the task's state, and each worker's
  count of slots changes once: what the round filled is taken, what a
  completion freed and nothing filled is given back. It also records the
  outcomes sent since the last batch.

A completion that did not take (the worker does not hold that task) costs a
second round trip, after the commit: the tasks that worker holds, for its
error (rule 4). A statement refused or a deadlock with another process rolls
the whole batch back; the group commit then runs it in the database thread
like any other batch, where each operation's error reaches that operation.

A connection lost with the batch's answer is another matter: PostgreSQL may
have committed the batch all the same, and running it again would store its
tasks twice and refuse its completions as already taken (their outcomes never
sent). So :meth:`LoopConnection.settle` first makes sure the lost
connection's server process has ended (a batch it had not committed is then
rolled back), then looks for what the batch wrote, at its timestamp: its new
tasks, its completions, the tasks it handed out. Found, the batch committed,
and its outcomes come from those rows; not found, it did not, and it runs
again. Should that look fail too, the batch's operations fail (their
connections close) rather than risk running twice.

Plans. Each statement touches a few rows found by key: the tasks a batch
names (primary key), the oldest queued ones (the partial index of the
queue), the workers' rows. Planned each time, the one that dispatches cost
PostgreSQL 0.6 ms per batch, several times what running it costs; as a server-side
prepared statement it is planned once per connection. But a generic plan is
made once, with the statistics and the table's size of that moment, and
kept, so two things make sure it is the plan above whatever they say:

* This connection runs nothing else, and PostgreSQL is told to plan it
  through indexes and nested loops only (:data:`PLANNER_SETTINGS`: no
  sequential or bitmap scans, no hash or merge joins), and the conditions
  besides the key are written so that no index can start from them (``(...)
  IS TRUE``). Otherwise, with statistics that said few tasks were assigned or
  queued (taken before a burst), plans read every assigned or queued task for
  each task of the batch: 17-47 ms per batch once 10,000 tasks were assigned
  and 50,000 queued, against 0.2-0.3 ms (measured).
* Statements are prepared only while the task table has at least
  :data:`PREPARED_FROM_PAGES` pages; below that they are planned each time.
  Plans made on a table of a page or two scanned a whole index rather than
  look keys up in it, and kept doing so as it grew (measured: 150-270 ms per
  statement once 250,000 tasks had run; plans made at 7 pages and more were
  right). The size is read along with a batch (no round trip of its own)
  every :data:`SIZE_CHECK_EVERY` seconds; should the table shrink below
  (vacuumed after a purge of nearly everything), the prepared statements are
  dropped, so that none keeps a plan made on the small table.

Off with ``TURTLEMQ_PG_ON_LOOP=0`` (every batch in the database thread);
never prepared with ``TURTLEMQ_PG_PREPARE_THRESHOLD=off`` (poolers that
cannot keep prepared statements).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.signals import connection_created

try:
    import psycopg
    from psycopg.pq import TransactionStatus
except ImportError:  # pragma: no cover - a requirement, but SQLite needs none of it
    psycopg = None

from . import dispatch
from .models import Connection, Task

Outcomes = tuple[list[Any], dispatch.Effects]

TASK = Task._meta.db_table
CONNECTION = Connection._meta.db_table

# Statements are prepared while the task table has at least this many pages (see "Plans").
PREPARED_FROM_PAGES = 32
# How this connection's statements are planned (see "Plans"): through indexes, joined by nested
# loops, and a prepared statement once (PostgreSQL would otherwise plan it afresh whenever its
# estimates favour that, at several times the cost of running it).
PLANNER_SETTINGS = (
    "-c enable_seqscan=off -c enable_bitmapscan=off -c enable_hashjoin=off -c enable_mergejoin=off"
    " -c plan_cache_mode=force_generic_plan"
)
# Seconds between two looks at the task table's size: often while it is small (a new
# deployment soon outgrows it), seldom once its statements are prepared.
SIZE_CHECK_EVERY = {False: 1.0, True: 30.0}

# $1 now; $2.. the new tasks' columns as arrays, in submission order.
NEW_TASKS = (
    f"INSERT INTO {TASK} (message_id, client_id, reply_channel, data, state, attempts, failures, max_attempts,"
    " timeout, last_error, created_at)"
    " SELECT message_id, NULL, reply_channel, data, 'queued', 0, 0, max_attempts, timeout, '', $1"
    " FROM unnest($2::text[], $3::text[], $4::text[], $5::integer[], $6::float8[]) WITH ORDINALITY"
    " AS new (message_id, reply_channel, data, max_attempts, timeout, position) ORDER BY position"
)

# $1 now, $2 default lease, $3 $4 $5 (task id, worker id, result) of the completions, first of each task
# first, $6 whether idle workers get tasks (new tasks were stored), $7 the tasks whose outcomes were sent.
# One statement, so that every part of it sees the database as the batch found it: a completion of a task
# that the assignment round hands out here is refused, as in dispatch.Batch, where completions are written
# first. Rows:
# ('done', task id, worker id, reply_channel, message_id) of each completion that took, and
# ('assigned', task id, worker id, data, worker channel or NULL) of each task handed out.
DISPATCH = (
    # Compare-and-set: only a task ASSIGNED to that worker. Worker and state are tested so that no
    # index can start from them (see "Plans"): each task is found by its primary key.
    f"WITH done AS (UPDATE {TASK} AS task SET state = 'done', result = held.result, finished_at = $1,"
    "  lease_expires_at = NULL"
    "  FROM unnest($3::bigint[], $4::bigint[], $5::text[]) WITH ORDINALITY AS held (id, worker_id, result, position)"
    "  WHERE task.id = held.id AND (task.worker_id = held.worker_id AND task.state = 'assigned') IS TRUE"
    "  RETURNING task.id, task.worker_id, task.reply_channel, task.message_id, held.position),"
    # Slots freed per worker, and the place of its first completion.
    " freed AS (SELECT worker_id, count(*) AS slots, min(position) AS first FROM done GROUP BY worker_id),"
    # Live workers with a free slot, longest idle first, locked.
    " idle AS MATERIALIZED ("
    "  SELECT id, channel_name, concurrency - in_flight AS free, row_number() OVER (ORDER BY ready_at, id) AS rank"
    f"  FROM (SELECT id, channel_name, concurrency, in_flight, ready_at FROM {CONNECTION}"
    "   WHERE $6 AND role = 'worker' AND disconnected_at IS NULL AND in_flight < concurrency"
    f"   ORDER BY ready_at, id LIMIT {dispatch.WORKERS_PER_ROUND} FOR UPDATE SKIP LOCKED) AS worker),"
    # Every slot to fill, in the order it is dealt a task: first the idle workers' (the assignment
    # round: one slot per worker at a time, in their order), then those freed (the refill: worker
    # after worker, in the order they freed up).
    " slot AS (SELECT worker_id, channel_name, round, row_number() OVER (ORDER BY round DESC, a, b) AS n FROM ("
    "  SELECT idle.id AS worker_id, idle.channel_name, true AS round, turn AS a, idle.rank AS b"
    "   FROM idle CROSS JOIN LATERAL generate_series(1, idle.free) AS turn"
    "  UNION ALL SELECT freed.worker_id, NULL, false, freed.first, turn"
    "   FROM freed CROSS JOIN LATERAL generate_series(1, freed.slots) AS turn) AS slots),"
    # The oldest due tasks (retry backoff passed), locked; the state is written literally so that
    # any plan can use the partial index of queued tasks (task_queued_idx).
    " due AS MATERIALIZED ("
    f"  SELECT id FROM {TASK} WHERE state = 'queued' AND (not_before IS NULL OR not_before <= $1)"
    "  ORDER BY id LIMIT (SELECT count(*) FROM slot) FOR UPDATE SKIP LOCKED),"
    " dealt AS (SELECT due.id, slot.worker_id, slot.channel_name, slot.round"
    "  FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM due) AS due JOIN slot USING (n)),"
    # Compare-and-set on the state (the row is locked already), by primary key; the lease as
    # dispatch.lease_until ($2: the default, or NULL).
    f" claimed AS (UPDATE {TASK} AS task SET state = 'assigned', worker_id = dealt.worker_id, assigned_at = $1,"
    "  attempts = task.attempts + 1, lease_expires_at = CASE WHEN task.timeout IS NULL THEN $2::timestamptz"
    "   WHEN task.timeout <> 0 THEN $1 + task.timeout * interval '1 second' END"
    "  FROM dealt WHERE task.id = dealt.id AND (task.state = 'queued') IS TRUE"
    "  RETURNING task.id, task.worker_id, task.data, dealt.channel_name, dealt.round),"
    # One change per worker row: the idle slots filled are taken; the freed slots not filled are
    # given back (the worker is idle from now on); the others stay taken.
    " slots AS (SELECT worker_id, sum(taken) AS taken, sum(freed) AS given_back FROM ("
    "  SELECT worker_id, 0 AS taken, slots AS freed FROM freed"
    "  UNION ALL SELECT worker_id, CASE WHEN round THEN 1 ELSE 0 END, CASE WHEN round THEN 0 ELSE -1 END"
    "   FROM claimed) AS change GROUP BY worker_id),"
    f" counted AS (UPDATE {CONNECTION} AS worker"
    "  SET in_flight = greatest(worker.in_flight + slots.taken - slots.given_back, 0), ready_at = $1"
    "  FROM slots WHERE worker.id = slots.worker_id AND (slots.taken > 0 OR slots.given_back > 0)),"
    # The outcomes sent: the first delivery counts. (Finished tasks: none of the rows above.)
    f" delivered AS (UPDATE {TASK} AS task SET delivered_at = $1 FROM unnest($7::bigint[]) AS sent (id)"
    "  WHERE task.id = sent.id AND task.delivered_at IS NULL)"
    " SELECT 'done', id, worker_id, reply_channel, message_id FROM done"
    " UNION ALL SELECT 'assigned', id, worker_id, data, channel_name FROM claimed"
)

# $1 worker ids: (worker id, task id, data) of what they hold, oldest first.
HELD = f"SELECT worker_id, id, data FROM {TASK} WHERE worker_id = ANY($1::bigint[]) AND state = 'assigned' ORDER BY id"

TABLE_PAGES = "SELECT pg_relation_size($1::regclass) / current_setting('block_size')::bigint"

# The server process of this connection: (pid, when it started), which tells it apart from a later one.
BACKEND = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
# $1 $2 the server process of a lost connection, $3 milliseconds to wait: whether it has ended (no
# row: already gone), terminated if it is still there (rolling back what it had not committed).
ENDED = "SELECT pg_terminate_backend(pid, $3) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2"

# What a batch wrote, found by its timestamp ($1) once nobody can commit it any more (see settle).
# $2 message ids, $3 reply channels of its new tasks: how many of them are stored.
STORED = (
    f"SELECT count(*) FROM {TASK}"
    " WHERE message_id = ANY($2::text[]) AND reply_channel = ANY($3::text[]) AND created_at = $1"
)
# $2 the task ids it completed: (task id, worker id, reply_channel, message_id) of those it did complete.
COMPLETED = (
    f"SELECT id, worker_id, reply_channel, message_id FROM {TASK}"
    " WHERE id = ANY($2::bigint[]) AND state = 'done' AND finished_at = $1"
)
# (task id, worker id, data, worker channel) of the tasks it handed out that live workers still hold.
HANDED_OUT = (
    f"SELECT task.id, task.worker_id, task.data, worker.channel_name FROM {CONNECTION} AS worker"
    f" JOIN {TASK} AS task ON task.worker_id = worker.id AND task.state = 'assigned'"
    " WHERE worker.role = 'worker' AND worker.disconnected_at IS NULL AND task.assigned_at = $1"
)


class LoopConnection:
    """One event loop's own PostgreSQL connection, for batches written out whole.

    Receivers of Django's ``connection_created`` signal may add execute
    wrappers, as for any connection: each sees every statement (``context``
    has no cursor) before it is sent, not its execution, which happens in the
    pipeline after.
    """

    def __init__(self, connection: psycopg.AsyncConnection, prepare: bool, backend: tuple[int, Any]) -> None:
        self._connection = connection
        self.backend = backend  # its server process: (pid, start), see settle()
        self._may_prepare = prepare
        self._prepared = False  # whether statements run prepared now (see "Plans")
        self._size_checked_at = -float("inf")
        self.execute_wrappers: list[Any] = []
        connection_created.send(sender=type(self), connection=self)

    @classmethod
    async def open(cls) -> LoopConnection:
        """A new connection to Django's default database, with its settings (the test database in tests)."""
        params = connection_params()
        params["options"] = f"{params.get('options', '')} {PLANNER_SETTINGS}".strip()
        # Statements are prepared when asked (prepare=True), never by count.
        connection = await psycopg.AsyncConnection.connect(**params, autocommit=True, prepare_threshold=2**31 - 1)
        try:
            backend = await (await connection.execute(BACKEND, prepare=False)).fetchone()
        except BaseException:
            await connection.close()
            raise
        # TURTLEMQ_PG_PREPARE_THRESHOLD=off: never.
        prepare = connections[DEFAULT_DB_ALIAS].settings_dict["OPTIONS"].get("prepare_threshold") is not None
        return cls(connection, prepare, backend)

    @property
    def usable(self) -> bool:
        """Open, and between transactions."""
        return not self._connection.closed and self._connection.info.transaction_status == TransactionStatus.IDLE

    async def close(self) -> None:
        await self._connection.close()

    async def run(self, script: dispatch.BatchScript, count: int) -> Outcomes:
        """Run a batch of ``count`` operations written out as ``script`` in one transaction: errors, effects.

        Raises any database error, the whole batch rolled back.
        """
        now, lease = script.now, script.default_lease
        statements: dict[str, tuple[str, Sequence[Any]]] = {}
        if script.new_tasks:
            message_ids, _, reply_channels, data, timeouts, max_attempts = _columns(script.new_tasks, 6)
            statements["new"] = (NEW_TASKS, (now, message_ids, reply_channels, data, max_attempts, timeouts))
        completions = _columns(script.completions, 3)  # task ids, worker ids, results
        statements["dispatched"] = (DISPATCH, (now, lease, *completions, script.assign_round, script.delivered))
        if time.monotonic() - self._size_checked_at >= SIZE_CHECK_EVERY[self._prepared]:
            statements["pages"] = (TABLE_PAGES, (TASK,))
        answers = await self._transaction(statements)

        done: dispatch.Done = {}
        handed_out: list[tuple[int, int, str, str | None]] = []
        for kind, task_id, worker_id, text, extra in answers.get("dispatched", ()):
            if kind == "done":
                done[(task_id, worker_id)] = (text, extra)
            else:
                handed_out.append((task_id, worker_id, text, extra))
        held: dict[int, list[tuple[int, str]]] = {}
        refused = script.refused_workers(done)
        if refused:  # rare: the tasks they hold, for their errors
            # What they held before this batch, as dispatch.Batch reads it: those
            # handed out just now are sent to them anyway.
            new = {task_id for task_id, _, _, _ in handed_out}
            for worker_id, task_id, data in await (await self._send(HELD, (list(refused),), prepare=False)).fetchall():
                if task_id not in new:
                    held.setdefault(worker_id, []).append((task_id, data))
        if "pages" in answers:
            await self._size_seen(answers["pages"][0][0])
        return script.effects(count, done, handed_out, held)

    async def settle(self, lost: LoopConnection, script: dispatch.BatchScript, count: int) -> Outcomes | None:
        """The outcome of a batch that ``lost`` ran without an answer: as :meth:`run` returns it if the
        batch committed, None if it did not (it may run again).

        Run on a usable connection: ``lost`` itself if it still is one (the
        server answered, with an error), else a new one. The server process of
        ``lost`` is ended first, so that nothing of the batch commits after the
        look. Raises if that cannot be made sure of: then nobody knows.
        """
        if lost is not self:
            await self._end(lost.backend)
        now = script.now
        new_tasks = 0
        if script.new_tasks:
            message_ids, _, reply_channels, *_ = _columns(script.new_tasks, 6)
            ((new_tasks,),) = await self._rows(STORED, (now, message_ids, reply_channels))
        task_ids = [task_id for task_id, _, _ in script.completions]
        done: dispatch.Done = {
            (task_id, worker_id): (reply_channel, message_id)
            for task_id, worker_id, reply_channel, message_id in await self._rows(COMPLETED, (now, task_ids))
        }
        if not new_tasks and not done:
            # Not committed; or committed with nothing but refused completions and
            # delivery marks, which running it again repeats to the same effect.
            return None
        handed_out = [tuple(row) for row in await self._rows(HANDED_OUT, (now,))]
        held: dict[int, list[tuple[int, str]]] = {}
        refused = script.refused_workers(done)
        if refused:
            new = {task_id for task_id, _, _, _ in handed_out}
            for worker_id, task_id, data in await self._rows(HELD, (list(refused),)):
                if task_id not in new:
                    held.setdefault(worker_id, []).append((task_id, data))
        return script.effects(count, done, handed_out, held)

    async def _end(self, backend: tuple[int, Any]) -> None:
        """Make sure the server process ``backend`` has ended; raise if it is still there after a while.

        The while: ``dispatch.LOST_PROCESS_TIMEOUT``.
        """
        pid, started = backend
        for (ended,) in await self._rows(ENDED, (pid, started, int(dispatch.LOST_PROCESS_TIMEOUT * 1000))):
            if not ended:
                raise psycopg.OperationalError(f"the server process {pid} of a lost connection did not end")

    async def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple]:
        """One statement, planned for its values (this connection's planner settings apply): its rows."""
        return await (await self._send(sql, params, prepare=False)).fetchall()

    async def _transaction(self, statements: dict[str, tuple[str, Sequence[Any]]]) -> dict[str, list[tuple]]:
        """Run ``statements`` in one transaction and one round trip: the rows of each, by name.

        One statement alone is a transaction of its own (autocommit). Several go
        in one pipeline: PostgreSQL runs what comes before a pipeline's Sync
        (psycopg sends one, when the pipeline ends) as one transaction,
        committed when it reaches the Sync, rolled back whole on an error.
        Either way the commit is done when the answer arrives. Explicit BEGIN
        and COMMIT would cost a third of the client's time per batch (measured).
        """
        try:
            if len(statements) == 1:
                ((name, (sql, params)),) = statements.items()
                cursors = {name: await self._send(sql, params)}
            else:
                async with self._connection.pipeline():
                    cursors = {name: await self._send(sql, params) for name, (sql, params) in statements.items()}
            return {name: await cursor.fetchall() if cursor.description else [] for name, cursor in cursors.items()}
        except BaseException:
            await self._roll_back()
            raise

    async def _send(
        self, sql: str, params: Sequence[Any] = (), prepare: bool | None = None
    ) -> psycopg.AsyncRawCursor[Any]:
        """Queue one statement in the pipeline (or run it, outside one); its cursor holds the rows once answered."""
        if self.execute_wrappers:
            _observe(self, self.execute_wrappers, sql, params)
        if prepare is None:
            prepare = self._prepared
        cursor: psycopg.AsyncRawCursor[Any] = psycopg.AsyncRawCursor(self._connection)
        await cursor.execute(sql, params, prepare=prepare)
        return cursor

    async def _roll_back(self) -> None:
        """Leave no transaction open after a failed batch (there is none, unless the connection broke mid-way)."""
        try:
            if not self._connection.closed and self._connection.info.transaction_status != TransactionStatus.IDLE:
                await self._connection.execute("ROLLBACK", prepare=False)
        except Exception:
            await self._connection.close()

    async def _size_seen(self, pages: int) -> None:
        """Prepare statements from now on if the task table is large enough, or drop them if it no longer is."""
        self._size_checked_at = time.monotonic()
        prepared = self._may_prepare and pages >= PREPARED_FROM_PAGES
        if self._prepared and not prepared:
            # Plans made on the larger table are fine, but PostgreSQL replans
            # after an ANALYZE: with the statements gone, none keeps a plan of the small one.
            await self._connection.execute("DEALLOCATE ALL", prepare=False)
        self._prepared = prepared


def connection_params() -> dict[str, Any]:
    """psycopg's arguments for a connection to Django's default database, without Django's own."""
    params = connections[DEFAULT_DB_ALIAS].get_connection_params()
    for django_only in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(django_only, None)
    return params


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Rows as columns, each a list (an array parameter), ``width`` of them even with no rows."""
    return [[row[i] for row in rows] for i in range(width)]


def _observe(connection: LoopConnection, wrappers: Sequence[Any], sql: str, params: Sequence[Any]) -> None:
    """Show a statement to Django-style execute wrappers (instrumentation) before it is sent."""

    def sent(sql: str, params: Sequence[Any], many: bool, context: dict[str, Any]) -> None:
        return None

    execute = sent
    for wrapper in reversed(wrappers):
        execute = functools.partial(wrapper, execute)
    execute(sql, params, False, {"connection": connection, "cursor": None})


def wanted() -> bool:
    """Whether batches written out whole should run on the event loop: PostgreSQL, and the setting on."""
    return psycopg is not None and connections[DEFAULT_DB_ALIAS].vendor == "postgresql" and settings.TURTLEMQ_PG_ON_LOOP
