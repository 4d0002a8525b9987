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
"""

from __future__ import annotations

import asyncio
import logging
import weakref

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from . import dispatch, events, local

logger = logging.getLogger("turtlemq.broker")

run_batch = database_sync_to_async(dispatch.run_batch)

Waiting = tuple[dispatch.Operation, "asyncio.Future[None]"]


class GroupCommit:
    """The queue of operations of one event loop (one broker process) and the task that drains it."""

    def __init__(self) -> None:
        self._queue: list[Waiting] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, operation: dispatch.Operation) -> None:
        """Run ``operation`` in the next batch; return once its effects were announced, or raise its error."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.append((operation, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        await future

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                errors, effects = await run_batch([operation for operation, _ in batch])
            except BaseException as exc:
                # The database is unreachable, or the loop is closing: nothing was committed.
                for _, future in batch:
                    if not future.done():
                        future.cancel() if isinstance(exc, asyncio.CancelledError) else future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            try:
                await events.ring(effects, get_channel_layer(), local.deliver)
            except Exception:
                # A doorbell, not the truth: the database still says what is owed to whom.
                logger.exception("could not announce the effects of a batch of %s operations", len(batch))
            for (_, future), error in zip(batch, errors, strict=True):
                if future.done():
                    continue  # its caller went away (its connection closed); the work is done all the same
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)


_group_commits: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, GroupCommit] = weakref.WeakKeyDictionary()


async def run(operation: dispatch.Operation) -> None:
    """Run ``operation`` in this process's next batch (see :class:`GroupCommit`)."""
    loop = asyncio.get_running_loop()
    group = _group_commits.get(loop)
    if group is None:
        group = _group_commits[loop] = GroupCommit()
    await group.run(operation)
