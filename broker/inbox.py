"""Task events between broker processes on Redis: one list per process, one message per batch and process.

A channels-redis layer message costs four Redis round trips to send and four
to receive (a capacity check, an expiry, a backup queue while it is being
read), and each connection's receive is a task and a lock of its own. Task
events are the busiest messages there are (each task crosses twice when its
client and its worker sit on different processes), so those of one batch for
the connections of one other process travel instead as one message on that
process's *inbox*: a Redis list that the process reads with BLPOP. One round
trip to send (RPUSH and EXPIRE, pipelined), one to receive, for all of them.

The inbox is named after the client prefix that channels-redis puts in the
name of every channel of a process (``specific.<prefix>!<id>``), so a sender
needs nothing but the destination channel to find it. The reader hands each
event to the consumer of its channel in this process (``broker.local``); an
event for a connection that has closed meanwhile is dropped.

As on the layer, a message is a doorbell: one lost (Redis restarted, the
process stopped while reading it) delays work, never loses it; the database
still says what is owed to whom. One that could not be posted (Redis out of
reach) is posted again for a while (``broker.events``); one whose answer was
lost on the way may thus arrive twice, as a reminder does
(``turtlemq_client`` ignores repeats). An inbox nobody reads (its process died)
expires after the layer's ``expiry``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any

import orjson

from . import local
from .aio import cancelling, end_task, is_redis_layer
from .dispatch import Assignment, Outcome

if TYPE_CHECKING:
    from channels.layers import BaseChannelLayer

logger = logging.getLogger("turtlemq.broker")

# How long one BLPOP waits before it asks again (well inside the layer's socket timeout).
BLOCK_SECONDS = 5
# After a failed read (Redis away), wait this long before the next.
READ_RETRY_SECONDS = 1.0
SPECIFIC = "specific."

Event = dict[str, Any]


def supported(layer: BaseChannelLayer) -> bool:
    """Whether task events on ``layer`` go through inboxes (channels-redis) rather than layer messages."""
    return is_redis_layer(layer)


def inbox_of(layer: Any, channel: str) -> str | None:
    """The Redis key of the inbox of the process that reads ``channel``; None for a channel of no process."""
    if not channel.startswith(SPECIFIC) or "!" not in channel:
        return None
    return f"{layer.prefix}inbox.{channel[len(SPECIFIC) : channel.index('!')]}"


class Unposted(Exception):
    """Posting failed at one inbox (Redis out of reach): ``events`` are those not posted, to try again."""

    def __init__(self, events: list[tuple[str, Event]]) -> None:
        super().__init__(f"{len(events)} task events not posted")
        self.events = events


async def post(layer: Any, events: list[tuple[str, Event]]) -> list[tuple[str, Event]]:
    """Send task events to the inboxes of their channels' processes, one message each; those that have none.

    Raises :class:`Unposted` with the events of the inbox that failed and of
    every one after it, and those that have none (none of which went).
    """
    by_inbox: dict[str, list[tuple[str, Event]]] = {}
    elsewhere: list[tuple[str, Event]] = []
    for channel, event in events:
        key = inbox_of(layer, channel)
        if key is None:
            elsewhere.append((channel, event))
        else:
            by_inbox.setdefault(key, []).append((channel, event))
    batches = list(by_inbox.items())
    for done, (key, batch) in enumerate(batches):
        try:
            connection = layer.connection(layer.consistent_hash(key))
            pipe = connection.pipeline(transaction=False)
            pipe.rpush(key, orjson.dumps(batch))
            pipe.expire(key, int(layer.expiry))
            await pipe.execute()
        except Exception as exc:
            unposted = [event for _, rest in batches[done:] for event in rest]
            raise Unposted(unposted + elsewhere) from exc
    return elsewhere


async def deliver(channel: str, event: Event) -> None:
    """Hand one task event to the consumer of ``channel``, if it still lives in this process."""
    peer = local.peer(channel)
    if peer is None:
        return  # it closed: its worker's tasks are released, its outcomes wait in the database
    if event["type"] == "task.assign":
        assignment = Assignment(channel, event["task_id"], event["data"])
        await local.deliver(channel, peer.send_assignment(assignment), "a task")
    elif event["type"] == "task.outcome":
        outcome = Outcome(channel, event["task_id"], event["message_id"], event["ok"], event["data"])
        await local.deliver(channel, peer.send_outcome(outcome), "an outcome")


class Inbox:
    """The reader of this process's inbox."""

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        # Any channel of this layer names the process: its client prefix is the layer's.
        self.key = inbox_of(layer, f"{SPECIFIC}{layer.client_prefix}!")
        assert self.key is not None
        self._reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read(), name="turtlemq task inbox")

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await end_task(reader)

    async def _read(self) -> None:
        failing = False
        while True:
            try:
                connection = self.layer.connection(self.layer.consistent_hash(self.key))
                popped = await connection.blpop([self.key], timeout=BLOCK_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if cancelling():
                    raise asyncio.CancelledError from None  # the loop is closing; redis-py said otherwise
                if not failing:
                    logger.exception("could not read this process's task inbox; retrying")
                else:
                    logger.warning("this process's task inbox is still unreadable (%s); retrying", exc)
                failing = True
                await asyncio.sleep(READ_RETRY_SECONDS)
                continue
            if cancelling():
                raise asyncio.CancelledError  # a cancellation redis-py swallowed (see broker.aio.end_task)
            if failing:
                logger.info("this process's task inbox is readable again")
                failing = False
            if popped is None:
                continue
            for channel, event in orjson.loads(popped[1]):
                await deliver(channel, event)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Inbox] = weakref.WeakKeyDictionary()


async def start(layer: BaseChannelLayer) -> None:
    """Start reading this process's inbox on ``layer`` (a channels-redis layer), if not already."""
    loop = asyncio.get_running_loop()
    inbox = _inboxes.get(loop)
    if inbox is not None and inbox.layer is not layer:
        await inbox.stop()
        inbox = None
    if inbox is None:
        inbox = _inboxes[loop] = Inbox(layer)
    inbox.start()


async def stop() -> None:
    """Stop reading the running event loop's inbox (the broker node stops)."""
    inbox = _inboxes.pop(asyncio.get_running_loop(), None)
    if inbox is not None:
        await inbox.stop()
