"""Channel-layer events about topics: the doorbells rung after a commit.

* ``topic.message`` goes to the group ``topic.<pk>`` of the topic a message
  was published to; every connection following the topic turns it into a
  MESSAGE frame. This module is the one place that sends it. Several
  messages of one topic stored together travel as one ``topic.messages``.
* ``topic.created`` goes to the group ``topics``, which connections with a
  wildcard subscription join, so that they start following matching topics
  created later.

Group names come from primary keys, never from user input. A lost event only
delays a message: the next one on the topic reveals the gap, and the
receiving connection fills it from the database.
"""

from __future__ import annotations

from typing import Literal, TypedDict

from asgiref.sync import async_to_sync
from channels.layers import BaseChannelLayer, get_channel_layer

from .topics import Published, TopicRef

TOPICS_GROUP = "topics"


class TopicMessageEvent(TypedDict):
    type: Literal["topic.message"]
    topic_id: int
    topic: str
    id: int  # the message's sequence number in its topic
    data: str


class TopicMessagesEvent(TypedDict):
    """Several consecutive messages of one topic (a burst stored in one transaction), in order."""

    type: Literal["topic.messages"]
    topic_id: int
    topic: str
    messages: list[tuple[int, str]]  # (id, data), ids rising


class TopicCreatedEvent(TypedDict):
    type: Literal["topic.created"]
    topic_id: int
    topic: str


def topic_group(topic_id: int) -> str:
    """The channel-layer group of a topic's followers."""
    return f"topic.{topic_id}"


def message_event(published: Published) -> TopicMessageEvent:
    return {
        "type": "topic.message",
        "topic_id": published.topic_id,
        "topic": published.topic,
        "id": published.seq,
        "data": published.data,
    }


async def announce_message(published: Published, layer: BaseChannelLayer | None = None) -> None:
    """Tell the topic's followers, in every broker process, about a committed message."""
    layer = layer or get_channel_layer()
    await layer.group_send(topic_group(published.topic_id), message_event(published))


async def announce_messages(published: list[Published], layer: BaseChannelLayer | None = None) -> None:
    """Announce committed messages: one layer message per topic, however many messages it got."""
    layer = layer or get_channel_layer()
    by_topic: dict[int, list[Published]] = {}
    for message in published:
        by_topic.setdefault(message.topic_id, []).append(message)
    for topic_id, messages in by_topic.items():
        if len(messages) == 1:
            await layer.group_send(topic_group(topic_id), message_event(messages[0]))
            continue
        event: TopicMessagesEvent = {
            "type": "topic.messages",
            "topic_id": topic_id,
            "topic": messages[0].topic,
            "messages": [(message.seq, message.data) for message in messages],
        }
        await layer.group_send(topic_group(topic_id), event)


def split_messages(event: TopicMessagesEvent) -> list[TopicMessageEvent]:
    """A ``topic.messages`` event as the ``topic.message`` events it stands for."""
    return [
        {"type": "topic.message", "topic_id": event["topic_id"], "topic": event["topic"], "id": seq, "data": data}
        for seq, data in event["messages"]
    ]


def announce_message_from_sync(published: Published) -> None:
    """``announce_message`` for synchronous callers: the admin and management commands."""
    async_to_sync(announce_message)(published)


async def announce_topic_created(topic: TopicRef, layer: BaseChannelLayer | None = None) -> None:
    """Tell connections with wildcard subscriptions about a new topic."""
    layer = layer or get_channel_layer()
    event: TopicCreatedEvent = {"type": "topic.created", "topic_id": topic.id, "topic": topic.name}
    await layer.group_send(TOPICS_GROUP, event)


def announce_topic_created_from_sync(topic: TopicRef) -> None:
    """``announce_topic_created`` for synchronous callers."""
    async_to_sync(announce_topic_created)(topic)
