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
operation run later (a disconnection, say) therefore commits after them.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import weakref

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.db import DatabaseError

from . import dispatch, events, local
from .protocol import ProtocolError

logger = logging.getLogger("turtlemq.broker")

run_batch = database_sync_to_async(dispatch.run_batch)

Waiting = tuple[dispatch.Operation, "asyncio.Future[None]"]
Outcomes = tuple[list[ProtocolError | DatabaseError | None], dispatch.Effects]


class GroupCommit:
    """The queue of operations of one event loop (one broker process) and the task that drains it."""

    def __init__(self) -> None:
        self._queue: list[Waiting] = []
        self._delivered: list[int] = []
        self._drainer: asyncio.Task[None] | None = None

    def submit(self, operation: dispatch.Operation) -> asyncio.Future[None]:
        """Queue ``operation`` for the next batch; the future is done once its effects were announced.

        It holds the operation's error, if any. Operations commit in the order they were submitted.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((operation, future))
        self._ensure_draining()
        return future

    def note_delivered(self, task_id: int) -> None:
        """The outcome of ``task_id`` was sent to its client: the next batch records it."""
        self._delivered.append(task_id)
        self._ensure_draining()

    def _ensure_draining(self) -> None:
        if self._drainer is None or self._drainer.done():
            # A context of its own: the drainer serves every connection and must not
            # inherit the context of the one that started it (asgiref keeps its
            # "a database call is under way here" guard in a context variable).
            self._drainer = asyncio.get_running_loop().create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        # While one batch's effects are announced here, the next batch already
        # runs in the database thread: announcing never holds up a commit.
        committed: tuple[list[Waiting], Outcomes] | None = None
        while True:
            running = self._start_batch()
            if committed is not None:
                await self._announce(*committed)
                committed = None
            if running is None:
                if self._queue or self._delivered:
                    continue  # queued while the last batch was announced
                return
            batch, result = running
            try:
                committed = (batch, await result)
            except BaseException as exc:
                # The database is unreachable, or the loop is closing: nothing was committed.
                for _, future in batch:
                    if not future.done():
                        future.cancel() if isinstance(exc, asyncio.CancelledError) else future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    def _start_batch(self) -> tuple[list[Waiting], asyncio.Future[Outcomes]] | None:
        """Send everything queued to the database thread as one batch (None: nothing is queued)."""
        if not (self._queue or self._delivered):
            return None
        batch, self._queue = self._queue, []
        operations = [operation for operation, _ in batch]
        if self._delivered:
            operations.append(dispatch.MarkDelivered(self._delivered))
            self._delivered = []
        return batch, asyncio.ensure_future(run_batch(operations))

    async def _announce(self, batch: list[Waiting], outcomes: Outcomes) -> None:
        """Ring a committed batch's effects, then tell each caller how its operation went."""
        errors, effects = outcomes
        try:
            await events.ring(effects, get_channel_layer(), local.deliver)
        except Exception:
            # A doorbell, not the truth: the database still says what is owed to whom.
            logger.exception("could not announce the effects of a batch of %s operations", len(batch))
        if len(errors) > len(batch) and errors[-1] is not None:
            # Only a repeat on resume: the database still counts these outcomes as owed.
            logger.error("could not record the delivery of outcomes: %s", errors[-1])
        for (_, future), error in zip(batch, errors[: len(batch)], strict=True):
            if future.done():
                continue  # its caller went away (its connection closed); the work is done all the same
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


_group_commits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommit] = weakref.WeakKeyDictionary()


def group_commit() -> GroupCommit:
    """The group commit of the running event loop (one per broker process)."""
    loop = asyncio.get_running_loop()
    group = _group_commits.get(loop)
    if group is None:
        group = _group_commits[loop] = GroupCommit()
    return group
