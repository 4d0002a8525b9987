"""Group commit: the task operations of all of this process's connections, one transaction per batch.

Every frame that changes a task (REQUEST_TASK, RESPONSE_TASK, FAIL_TASK,
TOUCH_TASK), every delivery mark and every disconnection becomes an
operation of ``broker.dispatch``. Operations queue up here while the database
thread is busy with the previous batch; as soon as it is free, everything that
queued runs as the next batch: one thread hop, one transaction and one commit
instead of one of each per frame. Batches grow with the load by themselves, and
an operation that finds the database idle runs at once, so a quiet broker
waits for nothing.

Nothing is announced before it is committed: a batch's effects (REQUEST_TASK
to workers, outcomes to clients) are rung after its commit, batch after batch
in order, and then each caller learns how its own operation went.

Delivery marks (an outcome was sent to its client) need no caller to wait for
them: :meth:`GroupCommit.note_delivered` only remembers the task, and the next batch,
whatever else it holds, records every delivery noted before it started. An
operation run later (a disconnection, say) therefore commits after them. Marks
alone start no batch for ``MARK_DELAY`` seconds: under load another batch
comes sooner and takes them along, where a batch of its own would cost a
commit (a third of all batches, measured). A mark is a record that an outcome
was sent, written after the send in any case: one lost with the process only
means that outcome is offered again (on resume, or by the reaper).

With SQLite, a batch of operations that need only hand-written statements
runs right here on the event loop, on a connection of the loop's own, with no
hop at all (``broker.embedded``). With PostgreSQL, a batch that can be written
out whole before it runs (``dispatch.BatchScript``: submissions without a
``clientId``, completions, delivery marks) goes from the event loop in one
round trip, on a connection of the loop's own (``broker.pgloop``). Any other
batch goes to the database thread; there, on PostgreSQL, a batch of
hand-written statements runs in a transaction that saves round trips
(``broker.postgres``). A batch that fails on the loop is run again in the
thread, where each operation's error reaches that operation; on PostgreSQL,
only once it is sure the batch did not commit after all (its answer lost with
the connection: ``pgloop.LoopConnection.settle``; in the thread,
``dispatch.run_batch`` does the same).

The hop to the database thread is made here rather than through
``database_sync_to_async``: a batch needs none of what that wrapper carries
(context variables, a sync caller's thread), only the same thread and database
connection as every other database call of the process, and the wrapper's
bookkeeping cost more than a small batch's SQL (see :func:`run_batch`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref
from collections.abc import Callable, Sequence

from asgiref.sync import AsyncToSync, SyncToAsync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections

from . import dispatch, embedded, events, pgloop, postgres
from .protocol import ProtocolError

logger = logging.getLogger("turtlemq.broker")

Error = ProtocolError | DatabaseError
Outcomes = tuple[list[Error | None], dispatch.Effects]
# How a caller hears how its operation went: a future (done with None or the error),
# or a callback called with None or the error (CancelledError: the batch never ran).
Settled = asyncio.Future[None] | Callable[[BaseException | None], None]
Waiting = tuple[dispatch.Operation, Settled]

# Seconds noted deliveries wait for a batch to ride along with before they start one.
MARK_DELAY = 0.05

# Rounds of the event loop a batch on the loop lets go by before it starts. A
# frame takes about three to become an operation (the server reads it, wakes
# the connection's task, which handles it), and each batch costs a commit:
# measured (W1, W2 of turtlemq bench), one round gave batches of 1-2
# operations, three gave 3-6 and about 25% more tasks per second.
GATHER_ROUNDS = 3


def _run_batch_in_thread(operations: Sequence[dispatch.Operation]) -> Outcomes:
    db = connections[DEFAULT_DB_ALIAS]
    # What database_sync_to_async does around every call, for the one connection batches use.
    db.close_if_unusable_or_obsolete()
    try:
        if all(operation.sql_only for operation in operations):
            return dispatch.run_batch(operations, postgres.pipelined(db))
        return dispatch.run_batch(operations)
    finally:
        db.close_if_unusable_or_obsolete()


_run_batch_compatibly = database_sync_to_async(dispatch.run_batch)


async def run_batch(operations: Sequence[dispatch.Operation]) -> Outcomes:
    """Run a batch in the database thread: the thread (and connection) that ``database_sync_to_async`` uses.

    That is asgiref's one thread for thread-sensitive calls, unless this event
    loop serves a synchronous caller (``async_to_sync``, as in tests): then the
    batch must run where that caller's database calls run, and the wrapper
    knows where.
    """
    loop = asyncio.get_running_loop()
    if _serves_sync_caller(loop):
        return await _run_batch_compatibly(operations)
    return await loop.run_in_executor(SyncToAsync.single_thread_executor, _run_batch_in_thread, operations)


def _serves_sync_caller(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this event loop runs for a synchronous caller (``async_to_sync``), whose database calls are its own."""
    return loop in AsyncToSync.loop_thread_executors or getattr(AsyncToSync.executors, "current", None) is not None


class GroupCommit:
    """The queue of operations of one event loop (one broker process) and the task that drains it."""

    def __init__(self) -> None:
        self._queue: list[Waiting] = []
        self._delivered: list[int] = []
        self._drainer: asyncio.Task[None] | None = None
        self._marks_due: asyncio.TimerHandle | None = None  # starts a batch for marks that found none
        self._on_loop: bool | None = None  # whether batches may run on the loop; known at the first batch
        self._loop_connection: embedded.LoopConnection | None = None
        self._pg_on_loop: bool | None = None  # whether written-out batches may run on the loop (PostgreSQL)
        self._pg_connection: pgloop.LoopConnection | None = None
        self._since_checkpoint = 0  # batches committed on the loop since the last checkpoint began
        self._checkpoint: asyncio.Future[tuple[int, int, int]] | None = None

    def submit(self, operation: dispatch.Operation) -> asyncio.Future[None]:
        """Queue ``operation`` for the next batch; the future is done once its effects were announced.

        It holds the operation's error, if any. Operations commit in the order they were submitted.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.enqueue(operation, future)
        return future

    def enqueue(self, operation: dispatch.Operation, settled: Settled) -> None:
        """Queue ``operation``; ``settled`` hears how it went once its batch's effects were announced."""
        self._queue.append((operation, settled))
        if self._drainer is None:
            self._start_draining()

    def note_delivered(self, task_id: int) -> None:
        """The outcome of ``task_id`` was sent to its client: the next batch records it (see ``MARK_DELAY``)."""
        self._delivered.append(task_id)
        if self._marks_due is None:
            self._marks_due = asyncio.get_running_loop().call_later(MARK_DELAY, self._record_marks)

    def _record_marks(self) -> None:
        self._marks_due = None
        if self._delivered and self._drainer is None:
            self._start_draining()

    def _start_draining(self) -> None:
        # A context of its own: the drainer serves every connection and must not
        # inherit the context of the one that started it (asgiref keeps its
        # "a database call is under way here" guard in a context variable).
        self._drainer = asyncio.get_running_loop().create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        try:
            await self._drain_batches()
        finally:
            self._drainer = None

    async def _drain_batches(self) -> None:
        # While one batch's effects are announced here, the next batch already
        # runs in the database thread: announcing never holds up a commit.
        committed: tuple[list[Waiting], Outcomes] | None = None
        if self._on_loop is None:
            self._on_loop = embedded.wanted()
            self._pg_on_loop = pgloop.wanted()
        while True:
            if self._on_loop:
                # A batch on the loop runs as soon as it starts: first let the
                # frames that arrived meanwhile join it (see GATHER_ROUNDS).
                for _ in range(GATHER_ROUNDS):
                    await asyncio.sleep(0)
            running = self._start_batch()
            if committed is not None:
                await self._announce(*committed)
                committed = None
            if running is None:
                if self._queue:
                    continue  # queued while the last batch was announced
                return
            batch, result = running
            try:
                committed = (batch, await result)
            except BaseException as exc:
                # The database is unreachable, or the loop is closing: nothing was committed.
                for _, settled in batch:
                    _settle(settled, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    def _start_batch(self) -> tuple[list[Waiting], asyncio.Future[Outcomes]] | None:
        """Send everything queued to the database thread as one batch (None: nothing is queued)."""
        if not self._queue and not (self._delivered and self._marks_due is None):
            return None  # nothing, or only marks still waiting for company
        batch, self._queue = self._queue, []
        operations = [operation for operation, _ in batch]
        if self._delivered:
            operations.append(dispatch.MarkDelivered(self._delivered))
            self._delivered = []
        if self._on_loop and all(operation.sql_only for operation in operations):
            done = self._run_on_loop(operations)
            if done is not None:
                return batch, done
        if self._pg_on_loop and not _serves_sync_caller(asyncio.get_running_loop()):
            script = dispatch.script_batch(operations)
            if script is not None:
                return batch, asyncio.ensure_future(self._run_script(operations, script))
        return batch, asyncio.ensure_future(run_batch(operations))

    async def _run_script(self, operations: list[dispatch.Operation], script: dispatch.BatchScript) -> Outcomes:
        """Run a written-out batch on the loop's own PostgreSQL connection, else in the database thread."""
        count = len(operations)
        ran_on: pgloop.LoopConnection | None = None
        try:
            ran_on = await self._usable_pg_connection()
            return await ran_on.run(script, count)
        except Exception:
            logger.warning("a batch of %s operations failed on the event loop", count, exc_info=True)
        if ran_on is not None:
            # Rolled back whole, unless the connection was lost with the answer of a
            # commit: then running it again would store its tasks twice. Look first.
            outcomes = await self._settle(ran_on, script, count)
            if outcomes is not None:
                logger.warning("a batch of %s operations committed, but its answer was lost with the connection", count)
                return outcomes
        # The loop is only the fast path: in the thread each operation is tried
        # again on its own, with Django's error handling.
        return await run_batch(operations)

    async def _settle(self, ran_on: pgloop.LoopConnection, script: dispatch.BatchScript, count: int) -> Outcomes | None:
        """``pgloop.LoopConnection.settle``, tried ``dispatch.SETTLE_ATTEMPTS`` times; DatabaseError if never."""
        attempts_left = dispatch.SETTLE_ATTEMPTS
        while True:
            attempts_left -= 1
            try:
                return await (await self._usable_pg_connection()).settle(ran_on, script, count)
            except Exception as exc:
                if not attempts_left:
                    logger.error("could not learn whether a batch of %s operations committed", count, exc_info=True)
                    raise DatabaseError("lost the database connection: a batch may or may not have committed") from exc
                logger.warning("could not learn yet whether a batch of %s operations committed: %r", count, exc)
            await asyncio.sleep(dispatch.SETTLE_RETRY_SECONDS)

    async def _usable_pg_connection(self) -> pgloop.LoopConnection:
        """The loop's own PostgreSQL connection, opened anew if it is closed or broken."""
        if self._pg_connection is None or not self._pg_connection.usable:
            if self._pg_connection is not None:
                await self._pg_connection.close()  # broken: lost, or left mid-transaction
                self._pg_connection = None
            self._pg_connection = await pgloop.LoopConnection.open()  # tried again at the next batch if this fails
        return self._pg_connection

    async def close(self) -> None:
        """Close the loop's own database connections, if any (a later batch opens others)."""
        pg_connection, self._pg_connection = self._pg_connection, None
        if pg_connection is not None:
            await pg_connection.close()
        loop_connection, self._loop_connection = self._loop_connection, None
        if loop_connection is not None:
            loop_connection.close()

    def _run_on_loop(self, operations: list[dispatch.Operation]) -> asyncio.Future[Outcomes] | None:
        """Run a batch on the loop's own SQLite connection; None if it must take the database thread after all."""
        try:
            if self._loop_connection is None:
                self._loop_connection = embedded.open_for_loop()  # tried again at the next batch if this fails
            outcomes = dispatch.run_batch_on_loop(operations, self._loop_connection)
        except embedded.Busy:
            return None  # another connection is writing: the thread waits for it
        except Exception:
            # Rolled back whole; in the thread each operation is tried again on its
            # own, with Django's error handling. The loop is only the fast path: no
            # failure of it may stop the queue from draining.
            logger.warning("a batch of %s operations failed on the event loop", len(operations), exc_info=True)
            return None
        self._since_checkpoint += 1
        if self._since_checkpoint >= embedded.CHECKPOINT_EVERY and self._checkpoint is None:
            self._start_checkpoint()
        done: asyncio.Future[Outcomes] = asyncio.get_running_loop().create_future()
        done.set_result(outcomes)
        return done

    def _start_checkpoint(self) -> None:
        """Have the database thread checkpoint the log the loop's batches write (see ``broker.embedded``)."""
        self._since_checkpoint = 0
        loop = asyncio.get_running_loop()
        self._checkpoint = loop.run_in_executor(SyncToAsync.single_thread_executor, embedded.checkpoint)
        self._checkpoint.add_done_callback(self._checkpointed)

    def _checkpointed(self, checkpoint: asyncio.Future[tuple[int, int, int]]) -> None:
        self._checkpoint = None
        if not checkpoint.cancelled() and checkpoint.exception() is not None:
            logger.warning("could not checkpoint the database: %r", checkpoint.exception())

    async def _announce(self, batch: list[Waiting], outcomes: Outcomes) -> None:
        """Ring a committed batch's effects, then tell each caller how its operation went."""
        errors, effects = outcomes
        try:
            await events.ring(effects, get_channel_layer())
        except Exception:
            # A doorbell, not the truth: the database still says what is owed to whom.
            logger.exception("could not announce the effects of a batch of %s operations", len(batch))
        if len(errors) > len(batch) and errors[-1] is not None:
            # Only a repeat on resume: the database still counts these outcomes as owed.
            logger.error("could not record the delivery of outcomes: %s", errors[-1])
        for (_, settled), error in zip(batch, errors[: len(batch)], strict=True):
            _settle(settled, error)


def _settle(settled: Settled, error: BaseException | None) -> None:
    """Tell a caller how its operation went (a cancelled batch cancels its future)."""
    if not isinstance(settled, asyncio.Future):
        settled(error)
    elif settled.done():
        pass  # its caller went away (its connection closed); the work is done all the same
    elif isinstance(error, asyncio.CancelledError):
        settled.cancel()
    elif error is None:
        settled.set_result(None)
    else:
        settled.set_exception(error)


_group_commits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommit] = weakref.WeakKeyDictionary()


def group_commit() -> GroupCommit:
    """The group commit of the running event loop (one per broker process)."""
    loop = asyncio.get_running_loop()
    group = _group_commits.get(loop)
    if group is None:
        group = _group_commits[loop] = GroupCommit()
    return group


async def close_group_commit() -> None:
    """Close what the running event loop's group commit holds open (the broker process stops)."""
    group = _group_commits.get(asyncio.get_running_loop())
    if group is not None:
        await group.close()
