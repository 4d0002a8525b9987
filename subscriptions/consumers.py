"""Topic frame handlers, mixed into ``broker.consumers.BrokerConsumer``.

What a connection follows is its own state, kept on the consumer instance:
for each followed topic, the subscriptions (exact names or patterns) that
brought it in and the last message ``id`` sent to the peer. That number is
what makes delivery exactly-once and in order:

* a ``topic.message`` event with an id at or below it is a duplicate (an
  event that arrived after its message was replayed or caught up) and is
  dropped;
* one that skips ahead means events overtook each other on the way (two
  publishers in different processes) or one was lost: the missing messages
  are read from the database and sent first.

Live messages reach a connection through its process's fan-out
(``subscriptions.fanout``: one layer message per process and topic, the frame
encoded once), which offers each to every local follower. A message that
continues a topic in order is sent at once; anything else, and anything that
arrives while the connection changes what it follows or catches up, waits in
``_topic_pending`` and is settled under ``_topic_lock``, one at a time.

SUBSCRIBE starts following a topic *before* reading where the topic stands,
then sends the stored messages above ``since``; live messages that arrive
meanwhile wait and are then dropped or sent by the rule above: no gap, no
duplicate.

UNSUBSCRIBE P undoes SUBSCRIBE P: a topic stays followed while another of the
connection's subscriptions (a name or a pattern) still covers it. SUBSCRIBE to
a topic already followed sends its content again but replays nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async

from . import protocol, topics
from .events import (
    TOPICS_GROUP,
    TopicCreatedEvent,
    TopicMessageEvent,
    TopicMessagesEvent,
    announce_messages,
    split_messages,
)
from .fanout import ProcessFanout, process_fanout
from .names import matches

if TYPE_CHECKING:
    from channels.layers import BaseChannelLayer

logger = logging.getLogger("turtlemq.subscriptions")

list_topic_names = database_sync_to_async(topics.list_topic_names)
resolve_subscription = database_sync_to_async(topics.resolve_subscription)
snapshot = database_sync_to_async(topics.snapshot)
messages_after = database_sync_to_async(topics.messages_after)
leave = database_sync_to_async(topics.leave)
publish_many = database_sync_to_async(topics.publish_many)

# Messages read per database call when replaying or filling a gap.
CATCH_UP_BATCH = 500
# PUBLISH frames of one connection stored together in one transaction, at most.
PUBLISH_BATCH = 256


@dataclass(slots=True)
class Following:
    """A topic this connection follows."""

    name: str
    last_id: int  # the newest message id sent to the peer (or skipped as older than the subscription)
    via: set[str] = field(default_factory=set)  # the SUBSCRIBE topics (names or patterns) that cover it


class TopicFramesMixin:
    """LIST_TOPICS, SUBSCRIBE, UNSUBSCRIBE and PUBLISH, and the ``topic.*`` channel-layer events."""

    if TYPE_CHECKING:
        channel_layer: BaseChannelLayer
        channel_name: str

        async def send_frame(self, frame: Mapping[str, Any]) -> None: ...

        async def send_error(self, exc: Any, obj: Mapping[str, Any]) -> None: ...

        async def send(
            self, text_data: str | None = None, bytes_data: bytes | None = None, close: bool = False
        ) -> None: ...

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._following: dict[int, Following] = {}  # topic id -> state
        self._patterns: set[str] = set()  # wildcard subscriptions, which also follow new topics
        self._topic_lock = asyncio.Lock()  # held while what we follow changes or a topic catches up
        self._topic_pending: list[TopicMessageEvent] = []  # live messages to settle under the lock, in arrival order
        self._settling: asyncio.Future[None] | None = None  # a task settling a gap (kept: the loop holds tasks weakly)
        self._to_publish: list[tuple[protocol.Publish, Mapping[str, Any]]] = []  # PUBLISH frames not yet stored
        self._publisher: asyncio.Future[None] | None = None  # the task storing them (see on_publish)
        self._published_some: asyncio.Future[None] | None = None  # done when it took the next batch

    async def disconnect(self, code: int) -> None:
        async with self._topic_lock:
            fanout = self._fanout()
            for topic_id in list(self._following):
                await fanout.unfollow(topic_id, self)
            if self._patterns:
                await self.channel_layer.group_discard(TOPICS_GROUP, self.channel_name)
            self._following.clear()
            self._patterns.clear()
            self._topic_pending.clear()
        await super().disconnect(code)  # type: ignore[misc]

    # --- frames from the peer ---------------------------------------------------

    async def on_list_topics(self, text: str, obj: Mapping[str, Any], frame: protocol.ListTopics) -> None:
        await self.send_frame(protocol.topics_frame(await list_topic_names()))

    async def on_subscribe(self, text: str, obj: Mapping[str, Any], frame: protocol.Subscribe) -> None:
        async with self._topic_section():
            await self._subscribe(frame)

    async def _subscribe(self, frame: protocol.Subscribe) -> None:
        if not frame.exact and not self._patterns:
            # Before looking for matches: a topic created meanwhile is announced to us.
            await self.channel_layer.group_add(TOPICS_GROUP, self.channel_name)
        if not frame.exact:
            self._patterns.add(frame.topic)
        found = await resolve_subscription(frame.topic, frame.email)  # UNKNOWN_TOPIC for an unknown exact name
        new = [topic for topic in found if topic.id not in self._following]
        for topic in new:
            await self._fanout().follow(topic.id, self)
        state = await snapshot([topic.id for topic in new], found[0].id if frame.exact else None)
        for topic in found:
            if topic.id in self._following:
                self._following[topic.id].via.add(frame.topic)  # already followed: no replay, no duplicate
            elif topic.id in state.last_ids:
                last = state.last_ids[topic.id]
                start = last if frame.since is None else min(frame.since, last)
                self._following[topic.id] = Following(topic.name, start, {frame.topic})
            else:
                # Deleted between the two reads: nothing to follow.
                await self._fanout().unfollow(topic.id, self)
        await self.send_frame(protocol.subscribed_frame(frame.topic, state.content or "", state.content_last_id))
        if frame.since is not None:
            for topic in sorted(new, key=lambda t: t.name):
                if topic.id in self._following:
                    await self._catch_up(topic.id, self._following[topic.id])

    async def on_unsubscribe(self, text: str, obj: Mapping[str, Any], frame: protocol.Unsubscribe) -> None:
        async with self._topic_section():
            await self._unsubscribe(frame)

    async def _unsubscribe(self, frame: protocol.Unsubscribe) -> None:
        followed = any(frame.topic in following.via for following in self._following.values())
        if frame.email is not None or (frame.exact and not followed):
            await leave(frame.topic, frame.email)  # UNKNOWN_TOPIC for a name no topic has
        for topic_id, following in list(self._following.items()):
            following.via.discard(frame.topic)
            if not following.via:
                del self._following[topic_id]
                await self._fanout().unfollow(topic_id, self)
        if frame.topic in self._patterns:
            self._patterns.discard(frame.topic)
            if not self._patterns:
                await self.channel_layer.group_discard(TOPICS_GROUP, self.channel_name)
        await self.send_frame(protocol.unsubscribed_frame(frame.topic))

    async def on_publish(self, text: str, obj: Mapping[str, Any], frame: protocol.Publish) -> None:
        """Queue the message and go on reading frames: a burst of them is stored in few transactions.

        A task of the connection stores what queued meanwhile (up to
        ``PUBLISH_BATCH`` messages) in one transaction, then answers each with
        PUBLISHED or its ERROR, in the order sent, and announces the messages.
        While a full batch waits, the next PUBLISH waits too (and with it the
        server's reading of this socket).
        """
        while len(self._to_publish) >= PUBLISH_BATCH:
            if self._published_some is None:
                self._published_some = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._published_some)
        self._to_publish.append((frame, obj))
        if self._publisher is None:
            self._publisher = asyncio.ensure_future(self._publish_queued())

    async def _publish_queued(self) -> None:
        try:
            while self._to_publish:
                batch, self._to_publish = self._to_publish[:PUBLISH_BATCH], self._to_publish[PUBLISH_BATCH:]
                if self._published_some is not None:
                    self._published_some.set_result(None)
                    self._published_some = None
                results = await publish_many([(frame.topic, frame.data) for frame, _ in batch])
                for (_, obj), result in zip(batch, results, strict=True):
                    await self._answer_publish(result, obj)
                published = [result for result in results if not isinstance(result, topics.UnknownTopic)]
                await announce_messages(published, self.channel_layer)
        finally:
            self._publisher = None

    async def _answer_publish(self, result: topics.Published | topics.UnknownTopic, obj: Mapping[str, Any]) -> None:
        try:
            if isinstance(result, topics.UnknownTopic):
                await self.send_error(result, obj)
            else:
                await self.send_frame(protocol.published_frame(result.topic, result.seq))
        except Exception:
            # The connection closed meanwhile: the message is stored all the same and is announced below.
            logger.debug("could not answer a PUBLISH on a closed connection", exc_info=True)

    # --- channel-layer events -----------------------------------------------------------

    async def offer_topic_message(self, event: TopicMessageEvent, text: str) -> None:
        """The process fan-out offers a live message (``text``: its MESSAGE frame): send it, or settle it later."""
        if self._topic_lock.locked() or self._topic_pending:
            self._topic_pending.append(event)  # after what waits already: order is kept
            return
        following = self._following.get(event["topic_id"])
        if following is None or event["id"] <= following.last_id:
            return
        if event["id"] == following.last_id + 1:
            following.last_id = event["id"]  # before the await: a later offer sees it
            await self.send(text_data=text)
            return
        # A gap: fill it from the database in a task of our own, not the process's reader.
        self._topic_pending.append(event)
        self._settling = asyncio.ensure_future(self._settle_pending())

    async def topic_message(self, event: TopicMessageEvent) -> None:
        """A ``topic.message`` sent to this connection's own channel: settle it like an offered one."""
        async with self._topic_section():
            await self._send_topic_message(event)

    async def _send_topic_message(self, event: TopicMessageEvent) -> None:
        """Send a live message as MESSAGE, after any it overtook, unless already sent."""
        following = self._following.get(event["topic_id"])
        if following is None or event["id"] <= following.last_id:
            return
        if event["id"] > following.last_id + 1:
            await self._catch_up(event["topic_id"], following, before=event["id"])
        await self.send_frame(protocol.message_frame(event["topic"], event["id"], event["data"]))
        following.last_id = event["id"]

    async def topic_messages(self, event: TopicMessagesEvent) -> None:
        """Several messages of one topic sent to this connection's own channel: each as ``topic_message``."""
        for message in split_messages(event):
            await self.topic_message(message)

    async def topic_created(self, event: TopicCreatedEvent) -> None:
        """A new topic: follow it from its first message if one of our patterns matches it."""
        async with self._topic_section():
            await self._follow_created(event)

    async def _follow_created(self, event: TopicCreatedEvent) -> None:
        via = {pattern for pattern in self._patterns if matches(pattern, event["topic"])}
        if not via:
            return
        following = self._following.get(event["topic_id"])
        if following is not None:
            following.via |= via
            return
        await self._fanout().follow(event["topic_id"], self)
        following = self._following[event["topic_id"]] = Following(event["topic"], 0, via)
        await self._catch_up(event["topic_id"], following)

    # --- helpers --------------------------------------------------------------------------

    def _fanout(self) -> ProcessFanout:
        return process_fanout(self.channel_layer)

    @asynccontextmanager
    async def _topic_section(self) -> AsyncIterator[None]:
        """Change what we follow (or catch up) with live messages held back, then settle those in order."""
        async with self._topic_lock:
            try:
                yield
            finally:
                while self._topic_pending:
                    await self._send_topic_message(self._topic_pending.pop(0))

    async def _settle_pending(self) -> None:
        async with self._topic_section():
            pass

    async def _catch_up(self, topic_id: int, following: Following, before: int | None = None) -> None:
        """Send the stored messages after ``following.last_id`` (and before ``before``), in order."""
        while True:
            batch = await messages_after(topic_id, following.last_id, before, CATCH_UP_BATCH)
            for message in batch:
                await self.send_frame(protocol.message_frame(following.name, message.seq, message.data))
                following.last_id = message.seq
            if len(batch) < CATCH_UP_BATCH:
                return

    FRAME_HANDLERS: dict[str, Callable[..., Awaitable[None]]] = {
        "LIST_TOPICS": on_list_topics,
        "SUBSCRIBE": on_subscribe,
        "UNSUBSCRIBE": on_unsubscribe,
        "PUBLISH": on_publish,
    }
