"""Helpers of the two process-wide readers of Redis of a broker process.

They are the topic fan-out (``subscriptions.fanout``) and the task inbox
(``broker.inbox``): both must know whether a layer is channels-redis
(:func:`is_redis_layer`), and both must end background tasks that read Redis,
where redis-py on Python 3.11 may swallow a cancellation (:func:`end_task`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger("turtlemq.broker")


def is_redis_layer(layer: Any) -> bool:
    """Whether ``layer`` is channels-redis's (imported only when asked: the embedded stack needs none of it)."""
    try:
        from channels_redis.core import RedisChannelLayer
    except ImportError:  # pragma: no cover - a requirement
        return False
    return isinstance(layer, RedisChannelLayer)


# A task told to stop that still runs after this long is cancelled again (see ``end_task``).
CANCEL_AGAIN_SECONDS = 0.25


async def end_task(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` (unless it is being cancelled already) and wait until it has ended.

    One cancellation is not always enough: on Python 3.11, ``asyncio.wait_for``
    returns the result instead of raising when the cancellation arrives just as
    the operation it waits for completes, and redis-py sends every command
    through it (with ``socket_timeout`` set). The task, still "cancelling", then
    goes on into BZPOPMIN, which channels-redis repeats for as long as the
    channel stays empty, and a closing event loop would wait for it forever. So
    a task that still runs ``CANCEL_AGAIN_SECONDS`` after its cancellation is
    cancelled again, until it ends.
    """
    interrupted = False
    if not task.cancelling():
        task.cancel()
    while not task.done():
        try:
            await asyncio.wait({task}, timeout=CANCEL_AGAIN_SECONDS)
        except asyncio.CancelledError:
            interrupted = True  # we are being cancelled too: first see ``task`` end
        if not task.done():
            task.cancel()
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s failed", task.get_name(), exc_info=task.exception())
    if interrupted:
        raise asyncio.CancelledError


def cancelling() -> bool:
    """Whether the running task is being cancelled (whatever exception that surfaced as)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
