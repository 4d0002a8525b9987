"""Fan-out of topic messages within one broker process.

Each broker process (each event loop) has one channel of its own, which joins
the group ``topic.<pk>`` while at least one of its connections follows that
topic. ``announce_message`` therefore costs one layer message per process and
topic instead of one per subscriber; the process's reader encodes the MESSAGE
frame once and hands it to each local follower, which applies its own
exactly-once, in-order rule (``TopicFramesMixin.offer_topic_message``).

That holds on the in-memory layer (one process). On other layers (Redis,
several processes) each connection still joins the group itself, one layer
message per subscriber, and gets ``topic.message`` on its own channel:
channels-redis does not let a process-wide reader be cancelled cleanly when
its event loop closes, so that saving is left for later.

The registry below is a routing cache, not broker state: it only says which
live connections of this process follow which topic, exactly what their
group memberships used to say. The database still holds every message, and a
follower that misses one fills the gap from it on the next.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from channels.layers import InMemoryChannelLayer

from broker.protocol import encode

from . import protocol
from .events import TopicMessageEvent, topic_group

if TYPE_CHECKING:
    from channels.layers import BaseChannelLayer

logger = logging.getLogger("turtlemq.subscriptions")

# After a failed read of the process channel (Redis away), wait this long before the next.
READ_RETRY_SECONDS = 1.0


class Follower(Protocol):
    channel_name: str

    async def offer_topic_message(self, event: TopicMessageEvent, text: str) -> None: ...


class ProcessFanout:
    """This process's channel for topic messages and the local followers of each topic."""

    def __init__(self, layer: BaseChannelLayer) -> None:
        self.layer = layer
        self.channel: str | None = None
        self.followers: dict[int, set[Follower]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Lock()
        self.shared = isinstance(layer, InMemoryChannelLayer)  # one layer message per process, not per follower

    async def follow(self, topic_id: int, follower: Follower) -> None:
        """Route ``topic_id``'s messages to ``follower``; returns once it hears the topic's group."""
        if not self.shared:
            await self.layer.group_add(topic_group(topic_id), follower.channel_name)
            return
        channel = await self._start()
        followers = self.followers.setdefault(topic_id, set())
        first = not followers
        followers.add(follower)
        if first:
            await self.layer.group_add(topic_group(topic_id), channel)

    async def unfollow(self, topic_id: int, follower: Follower) -> None:
        if not self.shared:
            await self.layer.group_discard(topic_group(topic_id), follower.channel_name)
            return
        followers = self.followers.get(topic_id)
        if followers is None or follower not in followers:
            return
        followers.discard(follower)
        if not followers:
            del self.followers[topic_id]
            if self.channel is not None:
                await self.layer.group_discard(topic_group(topic_id), self.channel)

    async def _start(self) -> str:
        async with self._ready:
            if self.channel is None:
                # The default prefix: channels-redis reads all of a process's
                # channels from one Redis list only when they share it.
                self.channel = await self.layer.new_channel()
            if self._reader is None or self._reader.done():
                self._reader = asyncio.ensure_future(self._read(self.channel))
            return self.channel

    async def _read(self, channel: str) -> None:
        while True:
            try:
                event: dict[str, Any] = await self.layer.receive(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    return  # cancelled (the loop is closing), which redis-py may report as a lost connection
                logger.exception("could not read this process's topic channel; retrying")
                await asyncio.sleep(READ_RETRY_SECONDS)
                continue
            if event.get("type") == "topic.message":
                await self.deliver(event)  # type: ignore[arg-type]

    async def deliver(self, event: TopicMessageEvent) -> None:
        """Offer one message to every local follower of its topic, the frame encoded once."""
        followers = self.followers.get(event["topic_id"])
        if not followers:
            return
        text = encode(protocol.message_frame(event["topic"], event["id"], event["data"]))
        for follower in list(followers):
            try:
                await follower.offer_topic_message(event, text)
            except Exception:
                # One broken connection must not cost the others their message.
                logger.exception("could not offer message %s of topic %s", event["id"], event["topic"])


_fanouts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, ProcessFanout]] = weakref.WeakKeyDictionary()


def process_fanout(layer: BaseChannelLayer) -> ProcessFanout:
    """The fan-out of the running event loop (one per server process) for ``layer``."""
    per_loop = _fanouts.setdefault(asyncio.get_running_loop(), {})
    fanout = per_loop.get(id(layer))
    if fanout is None or fanout.layer is not layer:
        fanout = per_loop[id(layer)] = ProcessFanout(layer)
    return fanout
