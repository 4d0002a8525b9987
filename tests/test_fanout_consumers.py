"""The per-process fan-out seen from the connections, on the configured layer.

In-process peers (``WebsocketCommunicator``) against the broker, on whatever
the settings give: SQLite and the in-memory layer in the first pass of
``make test``, PostgreSQL and channels-redis in the second. The layer's
``receive`` is wrapped to count the ``topic.message`` events each channel
receives: however many subscribers a topic has, a published message is one
event, received on the process channel, and reaches each subscriber once and
in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels import DEFAULT_CHANNEL_LAYER
from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer, channel_layers, get_channel_layer
from channels.testing import WebsocketCommunicator
from django.db import connections

from subscriptions import topics
from subscriptions.fanout import process_fanout, stop_process_fanout
from tests.communicators import TIMEOUT, Peer
from tests.test_fanout import group_members
from turtlemq_site.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

create_topic = database_sync_to_async(topics.create_topic)


class Subscriber(Peer):
    async def subscribe(self, topic: str, **extra: Any) -> None:
        await self.send({"type": "SUBSCRIBE", "topic": topic, **extra})
        assert (await self.expect("SUBSCRIBED"))["topic"] == topic

    async def unsubscribe(self, topic: str) -> None:
        await self.send({"type": "UNSUBSCRIBE", "topic": topic})
        assert await self.recv() == {"type": "UNSUBSCRIBED", "topic": topic}

    async def publish(self, topic: str, data: str) -> int:
        await self.send({"type": "PUBLISH", "topic": topic, "data": data})
        frame = await self.expect("PUBLISHED")
        return frame["id"]

    async def messages(self, count: int) -> list[tuple[str, int, str]]:
        """The next ``count`` frames, which must be MESSAGEs, as (topic, id, data)."""
        frames = [await self.expect("MESSAGE") for _ in range(count)]
        return [(frame["topic"], frame["id"], frame["data"]) for frame in frames]


@pytest.fixture
async def layer(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BaseChannelLayer]:
    """The configured layer, a fresh instance for this test's event loop, its receives counted in ``layer.counts``."""
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)
    made = get_channel_layer()
    counts: dict[str, int] = {}
    # On the class: on channels-redis the process channel lives on a layer instance of its own.
    receive = type(made).receive

    async def counting(self: BaseChannelLayer, channel: str) -> dict[str, Any]:
        message = await receive(self, channel)
        if message.get("type") == "topic.message":
            counts[channel] = counts.get(channel, 0) + 1
        return message

    monkeypatch.setattr(type(made), "receive", counting)
    made.counts = counts  # type: ignore[attr-defined]
    yield made
    channel_layers.backends.pop(DEFAULT_CHANNEL_LAYER, None)


@pytest.fixture
async def connect(layer: BaseChannelLayer) -> AsyncIterator[Callable[[], Awaitable[Subscriber]]]:
    opened: list[WebsocketCommunicator] = []

    async def open_peer() -> Subscriber:
        communicator = WebsocketCommunicator(application, "/")
        assert (await communicator.connect(timeout=TIMEOUT))[0]
        opened.append(communicator)
        return Subscriber(communicator, f"peer{len(opened)}")

    yield open_peer
    await asyncio.gather(
        *(communicator.disconnect(timeout=2) for communicator in opened if not communicator.future.done())
    )
    await stop_process_fanout()
    await database_sync_to_async(connections.close_all)()


async def test_many_subscribers_of_a_topic_cost_one_layer_message_per_published_message(layer, connect):
    a = await create_topic("fan.a")
    b = await create_topic("fan.b")
    of_a = [await connect() for _ in range(12)]
    of_b = [await connect() for _ in range(4)]
    for peer in of_a:
        await peer.subscribe("fan.a")
    for peer in of_b:
        await peer.subscribe("fan.b")
    process_channel = process_fanout(layer).channel
    assert await group_members(layer, a.id) == {process_channel}
    assert await group_members(layer, b.id) == {process_channel}
    publisher = await connect()
    for n in range(1, 11):
        assert await publisher.publish("fan.a", f"a{n}") == n
    await publisher.publish("fan.b", "b1")
    expected = [("fan.a", n, f"a{n}") for n in range(1, 11)]
    for peer in of_a:
        assert await peer.messages(10) == expected
    for peer in of_b:
        assert await peer.messages(1) == [("fan.b", 1, "b1")]
    # Nothing more was sent to anyone: the next frame is the next message.
    await publisher.publish("fan.a", "marker")
    for peer in of_a:
        assert await peer.messages(1) == [("fan.a", 11, "marker")]
    assert layer.counts == {process_channel: 12}  # 11 + 1 messages, no event on a subscriber's channel


async def test_the_group_keeps_the_process_channel_until_the_last_subscriber_leaves_in_any_way(layer, connect):
    topic = await create_topic("fan.leave")
    first, second, third = await connect(), await connect(), await connect()
    await first.subscribe("fan.leave")
    await first.unsubscribe("fan.leave")
    assert await group_members(layer, topic.id) == set()
    await first.subscribe("fan.leave")
    await second.subscribe("fan.leave")
    await third.subscribe("fan.#")
    process_channel = process_fanout(layer).channel
    assert await group_members(layer, topic.id) == {process_channel}
    await first.close()
    await second.unsubscribe("fan.leave")
    assert await group_members(layer, topic.id) == {process_channel}
    await third.publish("fan.leave", "still heard")
    assert await third.messages(1) == [("fan.leave", 1, "still heard")]
    await third.close()
    assert await group_members(layer, topic.id) == set()


async def test_several_subscribers_and_concurrent_publishers_get_every_message_once_and_in_order(layer, connect):
    topic = await create_topic("fan.race")
    exact = [await connect() for _ in range(5)]
    for peer in exact:
        await peer.subscribe("fan.race")
    pattern = await connect()
    await pattern.subscribe("fan.*")
    publishers = [await connect() for _ in range(3)]

    async def publish_many(peer: Subscriber, tag: str) -> None:
        for n in range(15):
            await peer.publish("fan.race", f"{tag}-{n}")

    racing = asyncio.gather(*(publish_many(peer, f"p{i}") for i, peer in enumerate(publishers)))
    late = await connect()
    await late.subscribe("fan.race", since=0)  # replay, then live, while the others publish
    await racing
    stored = await database_sync_to_async(topics.messages_after)(topic.id, 0)
    expected = [("fan.race", message.seq, message.data) for message in stored]
    assert [seq for _, seq, _ in expected] == list(range(1, 46))
    for peer in [*exact, pattern, late]:
        assert await peer.messages(45) == expected
