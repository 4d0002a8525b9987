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

SUBSCRIBE joins the topic's group *before* reading where the topic stands,
then sends the stored messages above ``since``; live events that arrive
meanwhile wait in the channel (a consumer handles one event at a time) and
are then dropped or sent by the rule above: no gap, no duplicate.

UNSUBSCRIBE P undoes SUBSCRIBE P: a topic stays followed while another of the
connection's subscriptions (a name or a pattern) still covers it. SUBSCRIBE to
a topic already followed sends its content again but replays nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from channels.db import database_sync_to_async

from . import protocol, topics
from .events import TOPICS_GROUP, TopicCreatedEvent, TopicMessageEvent, announce_message, topic_group
from .names import matches

if TYPE_CHECKING:
    from channels.layers import BaseChannelLayer

list_topic_names = database_sync_to_async(topics.list_topic_names)
resolve_subscription = database_sync_to_async(topics.resolve_subscription)
snapshot = database_sync_to_async(topics.snapshot)
messages_after = database_sync_to_async(topics.messages_after)
leave = database_sync_to_async(topics.leave)
publish = database_sync_to_async(topics.publish)

# Messages read per database call when replaying or filling a gap.
CATCH_UP_BATCH = 500


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._following: dict[int, Following] = {}  # topic id -> state
        self._patterns: set[str] = set()  # wildcard subscriptions, which also follow new topics

    async def disconnect(self, code: int) -> None:
        for topic_id in list(self._following):
            await self.channel_layer.group_discard(topic_group(topic_id), self.channel_name)
        if self._patterns:
            await self.channel_layer.group_discard(TOPICS_GROUP, self.channel_name)
        self._following.clear()
        self._patterns.clear()
        await super().disconnect(code)  # type: ignore[misc]

    # --- frames from the peer ---------------------------------------------------

    async def on_list_topics(self, text: str, obj: Mapping[str, Any], frame: protocol.ListTopics) -> None:
        await self.send_frame(protocol.topics_frame(await list_topic_names()))

    async def on_subscribe(self, text: str, obj: Mapping[str, Any], frame: protocol.Subscribe) -> None:
        if not frame.exact and not self._patterns:
            # Before looking for matches: a topic created meanwhile is announced to us.
            await self.channel_layer.group_add(TOPICS_GROUP, self.channel_name)
        if not frame.exact:
            self._patterns.add(frame.topic)
        found = await resolve_subscription(frame.topic, frame.email)  # UNKNOWN_TOPIC for an unknown exact name
        new = [topic for topic in found if topic.id not in self._following]
        for topic in new:
            await self.channel_layer.group_add(topic_group(topic.id), self.channel_name)
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
                await self.channel_layer.group_discard(topic_group(topic.id), self.channel_name)
        await self.send_frame(protocol.subscribed_frame(frame.topic, state.content or "", state.content_last_id))
        if frame.since is not None:
            for topic in sorted(new, key=lambda t: t.name):
                if topic.id in self._following:
                    await self._catch_up(topic.id, self._following[topic.id])

    async def on_unsubscribe(self, text: str, obj: Mapping[str, Any], frame: protocol.Unsubscribe) -> None:
        followed = any(frame.topic in following.via for following in self._following.values())
        if frame.email is not None or (frame.exact and not followed):
            await leave(frame.topic, frame.email)  # UNKNOWN_TOPIC for a name no topic has
        for topic_id, following in list(self._following.items()):
            following.via.discard(frame.topic)
            if not following.via:
                del self._following[topic_id]
                await self.channel_layer.group_discard(topic_group(topic_id), self.channel_name)
        if frame.topic in self._patterns:
            self._patterns.discard(frame.topic)
            if not self._patterns:
                await self.channel_layer.group_discard(TOPICS_GROUP, self.channel_name)
        await self.send_frame(protocol.unsubscribed_frame(frame.topic))

    async def on_publish(self, text: str, obj: Mapping[str, Any], frame: protocol.Publish) -> None:
        published = await publish(frame.topic, frame.data)
        await self.send_frame(protocol.published_frame(published.topic, published.seq))
        await announce_message(published, self.channel_layer)

    # --- channel-layer events -----------------------------------------------------------

    async def topic_message(self, event: TopicMessageEvent) -> None:
        """A message on a topic's group: send it as MESSAGE, after any it overtook, unless already sent."""
        following = self._following.get(event["topic_id"])
        if following is None or event["id"] <= following.last_id:
            return
        if event["id"] > following.last_id + 1:
            await self._catch_up(event["topic_id"], following, before=event["id"])
        await self.send_frame(protocol.message_frame(event["topic"], event["id"], event["data"]))
        following.last_id = event["id"]

    async def topic_created(self, event: TopicCreatedEvent) -> None:
        """A new topic: follow it from its first message if one of our patterns matches it."""
        via = {pattern for pattern in self._patterns if matches(pattern, event["topic"])}
        if not via:
            return
        following = self._following.get(event["topic_id"])
        if following is not None:
            following.via |= via
            return
        await self.channel_layer.group_add(topic_group(event["topic_id"]), self.channel_name)
        following = self._following[event["topic_id"]] = Following(event["topic"], 0, via)
        await self._catch_up(event["topic_id"], following)

    # --- helpers --------------------------------------------------------------------------

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
